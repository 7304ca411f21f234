"""Triton backend of :mod:`orwcfm_fast.ops`: fused kernels registered as torch custom ops.

Each op is a ``torch.library.triton_op`` whose body launches its kernels through
``torch.library.wrap_triton``, so ``torch.compile`` traces into it (Inductor can inline the
kernels), with autograd registered on it:

- ``orwcfm_fast::orw_cfm_w2_loss_triton``: ``(loss, fm, w2)``, one fused pass; long rows of small
  batches are split over several programs (``loss.py``);
- ``orwcfm_fast::orw_cfm_w2_loss_backward_triton``: ``grad_v``, one fused pass (``loss.py``);
- ``orwcfm_fast::conditional_path_triton``: ``(x_t, u_t)``, one pass (``path.py``);
- ``orwcfm_fast::ode_step_triton``: ``x + dt * sum_j c_j k_j``, one pass per four ``k_j`` (``ode.py``; not
  ``ode_step.py``, whose import would overwrite this package's ``ode_step`` function).

The wrappers below are what :mod:`orwcfm_fast.ops` calls once it has validated its inputs; they
accept non-contiguous tensors.

``TRITON_INTERPRET``: importing this package imports neither ``triton`` nor the kernels and
queries no GPU. A kernel module is imported at the first call of its wrapper, and
``@triton.jit`` reads ``TRITON_INTERPRET`` right then: with ``TRITON_INTERPRET=1`` the kernels
run in Triton's numpy interpreter and accept CPU tensors (the test suite's mode on CPU-only
machines, see ``tests/conftest.py``); otherwise they are compiled for the GPU and need CUDA
tensors. The mode is fixed for the process from the first call on; :func:`is_available`
reports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = [
    "conditional_path",
    "is_available",
    "ode_step",
    "orw_cfm_w2_loss",
]

_COMMON = "orwcfm_fast.ops.triton._common"  # imported with the first kernel module


def _interpret_requested() -> bool:
    """Whether kernels defined now would be interpreted (triton's own reading of TRITON_INTERPRET)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # older triton: same parsing of the variable
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available(device: str | torch.device | None = None) -> tuple[bool, str]:
    """Whether the Triton ops can run here, and why (not).

    Args:
        device: the device the tensors will be on; ``None`` asks whether any device works.
            CUDA tensors need a CUDA device (and run compiled kernels, or interpreted ones under
            ``TRITON_INTERPRET=1``); CPU tensors need ``TRITON_INTERPRET=1`` set before the kernels
            were defined (the first op call).

    Returns:
        ``(ok, reason)``: ``reason`` says what runs or what is missing.
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401  (a call, not the package import, may import it)
    except Exception as err:  # noqa: BLE001 - a broken install makes the backend unavailable
        return False, f"triton cannot be imported: {type(err).__name__}: {err}"
    if not hasattr(torch.library, "triton_op"):
        return False, f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)"
    common = sys.modules.get(_COMMON)
    if common is not None:
        interpreted = common.INTERPRETED
        when = "the kernels were defined"
    else:
        interpreted = _interpret_requested()
        when = "the kernels will be defined at the first op call"
    mode = "interpreted (TRITON_INTERPRET=1)" if interpreted else "compiled for the GPU"
    kind = None if device is None else torch.device(device).type

    def cuda() -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "CUDA tensors: no CUDA device"
        return True, f"CUDA tensors: yes, {mode}" + (" (correct but slow)" if interpreted else "")

    def cpu() -> tuple[bool, str]:
        if interpreted:
            return True, "CPU tensors: yes, in the Triton interpreter (TRITON_INTERPRET=1)"
        if common is not None:
            return False, (
                "CPU tensors: no, the kernels were defined compiled for the GPU; start the process with "
                "TRITON_INTERPRET=1 to run them on CPU tensors in the interpreter"
            )
        return False, "CPU tensors: no, they need TRITON_INTERPRET=1 set before the first Triton op call"

    if kind == "cuda":
        return cuda()
    if kind == "cpu":
        return cpu()
    if kind is not None:
        return False, f"{kind} tensors: no, the Triton ops run CUDA tensors (or CPU tensors when interpreted)"
    (cuda_ok, cuda_why), (cpu_ok, cpu_why) = cuda(), cpu()
    return cuda_ok or cpu_ok, f"triton: {cuda_why}; {cpu_why} ({when})"


def orw_cfm_w2_loss(v, u, v_ref, weights, alpha: float, w2_weights=None):
    """ORW-CFM-W2 loss, fused: ``(loss, fm, w2)``.

    Args:
        v: ``[B, ...]`` policy velocity (differentiable). u: ``[B, ...]`` target velocity.
        v_ref: ``[B, ...]`` reference velocity. weights: ``[B]`` weights. alpha: W2 coefficient.
        w2_weights: ``[B]`` per-sample W2 coefficients (``alpha * c[i] * w2[i]``) or ``None``.
        Same shapes and device; contiguous or not.

    Returns:
        0-dim ``loss`` and ``[B]`` ``fm``, ``w2`` in the accumulation dtype (float64 for float64
        ``v``, else float32); see :func:`orwcfm_fast.ops.reference.orw_cfm_w2_loss_reference`.
    """
    from orwcfm_fast.ops.triton.loss import orw_cfm_w2_loss_op

    if w2_weights is not None:
        w2_weights = w2_weights.contiguous()
    return orw_cfm_w2_loss_op(v.contiguous(), u.contiguous(), v_ref.contiguous(), weights.contiguous(), float(alpha),
                              w2_weights)


def conditional_path(x_0, x_1, t, sigma: float = 0.0, noise=None):
    """``(x_t, u_t)`` on the straight path, fused: ``x_t = t x_1 + (1 - t) x_0 (+ sigma noise)``, ``u_t = x_1 - x_0``.

    Args:
        x_0, x_1: ``[B, ...]``. t: ``[B]``. sigma: path noise std. noise: ``[B, ...]``, needed if
        ``sigma > 0``. Contiguous or not.

    Returns:
        ``(x_t, u_t)``, each ``[B, ...]`` in ``x_1``'s dtype.
    """
    if noise is not None:
        noise = noise.contiguous()
    from orwcfm_fast.ops.triton.path import conditional_path_op

    return conditional_path_op(x_0.contiguous(), x_1.contiguous(), t.contiguous(), float(sigma), noise)


def ode_step(x, ks: list[torch.Tensor], coeffs: list[float], dt: float):
    """``x + dt * sum_j coeffs[j] * ks[j]`` in ``x``'s dtype: one pass per 4 stage values, rounded once.

    Args:
        x: ``[B, ...]`` state. ks: stage values shaped like ``x``. coeffs: one float per
        ``k``. dt: step size. Contiguous or not.

    Raises:
        ValueError: ``len(ks) != len(coeffs)``.
    """
    from orwcfm_fast.ops.triton.ode import ode_step_op

    return ode_step_op(x.contiguous(), [k.contiguous() for k in ks], [float(c) for c in coeffs], float(dt))
