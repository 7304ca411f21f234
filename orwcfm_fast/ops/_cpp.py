"""The C++/CUDA backend: a thin layer over the compiled extension ``orwcfm_fast._C``.

The extension registers the ops ``torch.ops.orwcfm_fast.*`` (schema in csrc/ops.cpp, CPU
kernels in csrc/cpu/, CUDA kernels in kernels/):

- ``orw_cfm_w2_loss(v, u, v_ref, weights, alpha, w2_weights=None) -> (loss, fm, w2)``
- ``orw_cfm_w2_loss_backward(v, u, v_ref, c_fm, c_w2) -> grad_v``
- ``conditional_path(x_0, x_1, t, sigma=0.0, noise=None) -> (x_t, u_t)``
- ``ode_step(x, ks, coeffs, dt) -> x + dt * sum_j coeffs[j] * ks[j]``

Importing this module does no work. The extension is loaded on first use
(:func:`is_available`, :func:`cuda_available` or a wrapper call), which then registers from
Python what C++ does not provide: fake (meta) implementations, for FakeTensor and
``torch.compile``, and the autograd formulas. No GPU is queried here.

The wrappers assume inputs already validated by :mod:`orwcfm_fast.ops`; the kernels check
again and raise ``RuntimeError`` naming the offending argument. Non-contiguous inputs are
accepted (the kernels make contiguous copies). Call :func:`is_available` before compiling a
function that uses the wrappers, so that ``torch.compile`` does not trace the loading.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

import torch

from orwcfm_fast.ops.reference import accumulation_dtype

__all__ = ["conditional_path", "cuda_available", "is_available", "ode_step", "orw_cfm_w2_loss"]

_NAMESPACE = "orwcfm_fast"
_OPS = ("orw_cfm_w2_loss", "orw_cfm_w2_loss_backward", "conditional_path", "ode_step")

_state: tuple[bool, str] | None = None  # (loaded, reason if not), once loading was attempted
_lock = threading.Lock()


# ----------------------------------------------------------------------------- loading


def is_available() -> tuple[bool, str]:
    """Whether the extension is built and loads: ``(True, "")`` or ``(False, reason)``."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def cuda_available() -> tuple[bool, str]:
    """Whether the extension was built with its CUDA kernels: ``(True, "")`` or ``(False, reason)``.

    Says nothing about a GPU being present (that is ``torch.cuda.is_available()``).
    """
    ok, why = is_available()
    if not ok:
        return False, why
    missing = [
        name for name in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{name}", "CUDA")
    ]
    if missing:
        return False, (
            f"orwcfm_fast._C has no CUDA kernels for {', '.join(missing)}: it was built with ORWCFM_FAST_NO_CUDA=1, "
            "against a CPU-only torch, or without nvcc"
        )
    return True, ""


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("orwcfm_fast._C")
    except ModuleNotFoundError as e:
        if e.name == "orwcfm_fast._C":
            return False, (
                "orwcfm_fast._C is not built (installed with ORWCFM_FAST_NO_EXT=1?); build it with "
                "`pip install --no-build-isolation -e .`"
            )
        return False, f"importing orwcfm_fast._C failed: {e}"
    except (ImportError, OSError) as e:  # e.g. undefined symbols: built against another torch
        return False, f"importing orwcfm_fast._C failed (was it built against this torch {torch.__version__}?): {e}"
    namespace = getattr(torch.ops, _NAMESPACE)
    missing = [name for name in _OPS if not hasattr(namespace, name)]
    if missing:
        return False, f"orwcfm_fast._C loaded but does not register {', '.join(missing)}; rebuild it"
    _register_python_parts()
    return True, ""


def _ops():
    """``torch.ops.orwcfm_fast``, loading the extension first if needed."""
    if _state is None or not _state[0]:
        ok, why = is_available()
        if not ok:
            raise RuntimeError(f"the C++/CUDA backend is unavailable: {why}")
    return torch.ops.orwcfm_fast


# ----------------------------------------------------------------------------- wrappers


def orw_cfm_w2_loss(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    w2_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ORW-CFM-W2 loss; see :func:`orwcfm_fast.ops.reference.orw_cfm_w2_loss_reference`.

    Args:
        v: ``[B, ...]`` policy velocity (differentiable), float32/float64/float16/bfloat16.
        u: ``[B, ...]`` target velocity, like ``v``.
        v_ref: ``[B, ...]`` reference velocity, like ``v``.
        weights: ``[B]`` per-sample weights, any float dtype.
        alpha: W2 coefficient, ``>= 0``.
        w2_weights: ``[B]`` per-sample W2 coefficients ``c`` (``alpha * c[i] * w2[i]``), any float
            dtype, or ``None`` for ``alpha * w2[i]``.

    Returns:
        ``(loss, fm, w2)``: 0-dim and ``[B]``, ``[B]``, in the accumulation dtype (float64
        for float64 inputs, else float32). Differentiable in v, u, v_ref, weights and w2_weights.
    """
    return _ops().orw_cfm_w2_loss(v, u, v_ref, weights, float(alpha), w2_weights)


def conditional_path(
    x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor, sigma: float = 0.0, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused straight-path point and velocity; see :func:`orwcfm_fast.ops.reference.conditional_path_reference`.

    Args:
        x_0: ``[B, ...]`` source samples, same dtype as ``x_1``.
        x_1: ``[B, ...]`` target samples.
        t: ``[B]`` times, any float dtype.
        sigma: path noise std; noise is added only when ``sigma > 0``.
        noise: ``[B, ...]`` standard normal draws like ``x_1``, required when ``sigma > 0``.

    Returns:
        ``(x_t, u_t)``, each ``[B, ...]`` in ``x_1``'s dtype (computed in the accumulation
        dtype and rounded once). Differentiable in x_0, x_1, t and noise.
    """
    return _ops().conditional_path(x_0, x_1, t, float(sigma), noise)


def ode_step(x: torch.Tensor, ks: Sequence[torch.Tensor], coeffs: Sequence[float], dt: float) -> torch.Tensor:
    """Fused Runge-Kutta combination ``x + dt * sum_j coeffs[j] * ks[j]``; see
    :func:`orwcfm_fast.ops.reference.ode_step_reference`.

    Args:
        x: ``[B, ...]`` state.
        ks: stage derivatives shaped and typed like ``x`` (any number, may be empty).
        coeffs: one float per entry of ``ks``.
        dt: step size.

    Returns:
        A new tensor like ``x`` (accumulated in the accumulation dtype, rounded once).
        Differentiable in x and ks.
    """
    return _ops().ode_step(x, list(ks), [float(c) for c in coeffs], float(dt))


# ----------------------------------------------------------------------------- fake implementations
# Same checks and messages as csrc/checks.h, so tracing fails like eager execution does.


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"{_NAMESPACE}::{op}: {message}")


def _check_like(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        _fail(op, f"{name} has shape {list(t.shape)} but {like_name} has {list(like.shape)}; they must match")
    if t.dtype != like.dtype:
        _fail(op, f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must match")
    if t.device != like.device:
        _fail(op, f"{name} is on {t.device} but {like_name} is on {like.device}; all tensor arguments must be on "
                  "the same device")


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        _fail(op, f"{name} must be a float32, float64, float16 or bfloat16 tensor, got {t.dtype}")


def _check_batch_vector(op: str, name: str, w: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    _check_float(op, name, w)
    if w.ndim != 1 or w.shape[0] != like.shape[0]:
        _fail(op, f"{name} must have shape [B] = [{like.shape[0]}] (B = {like_name}.shape[0]), got {list(w.shape)}")
    if w.device != like.device:
        _fail(op, f"{name} is on {w.device} but {like_name} is on {like.device}; all tensor arguments must be on "
                  "the same device")


def _check_samples(op: str, name: str, x: torch.Tensor) -> None:
    _check_float(op, name, x)
    if x.ndim < 2:
        _fail(op, f"{name} must be [B, ...] with at least one non-batch dim, got shape {list(x.shape)}")


def _fake_loss(v, u, v_ref, weights, alpha, w2_weights=None):
    op = "orw_cfm_w2_loss"
    _check_samples(op, "v", v)
    _check_like(op, "u", u, "v", v)
    _check_like(op, "v_ref", v_ref, "v", v)
    _check_batch_vector(op, "weights", weights, "v", v)
    if w2_weights is not None:
        _check_batch_vector(op, "w2_weights", w2_weights, "v", v)
    acc = accumulation_dtype(v.dtype)
    b = v.shape[0]
    return v.new_empty((), dtype=acc), v.new_empty((b,), dtype=acc), v.new_empty((b,), dtype=acc)


def _fake_loss_backward(v, u, v_ref, c_fm, c_w2):
    op = "orw_cfm_w2_loss_backward"
    _check_samples(op, "v", v)
    _check_like(op, "u", u, "v", v)
    _check_like(op, "v_ref", v_ref, "v", v)
    _check_batch_vector(op, "c_fm", c_fm, "v", v)
    _check_batch_vector(op, "c_w2", c_w2, "v", v)
    return v.new_empty(v.shape)


def _fake_path(x_0, x_1, t, sigma=0.0, noise=None):
    op = "conditional_path"
    _check_float(op, "x_1", x_1)
    if x_1.ndim < 1:
        _fail(op, "x_1 must be [B, ...], got a 0-dim tensor")
    _check_like(op, "x_0", x_0, "x_1", x_1)
    _check_batch_vector(op, "t", t, "x_1", x_1)
    if noise is not None:
        _check_like(op, "noise", noise, "x_1", x_1)
    elif sigma > 0:
        _fail(op, f"sigma = {sigma} > 0 needs `noise` (standard normal, shaped like x_1)")
    return x_1.new_empty(x_1.shape), x_1.new_empty(x_1.shape)


def _fake_ode_step(x, ks, coeffs, dt):
    op = "ode_step"
    _check_float(op, "x", x)
    if len(ks) != len(coeffs):
        _fail(op, f"got {len(coeffs)} coefficients for {len(ks)} stage values ks; they must match")
    for j, k in enumerate(ks):
        _check_like(op, f"ks[{j}]", k, "x", x)
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- autograd


def _loss_setup_context(ctx, inputs, output):
    # The dispatcher fills in the default: inputs always has w2_weights (None when not given).
    v, u, v_ref, weights, alpha, w2_weights = inputs
    _, fm, w2 = output
    ctx.per_sample_w2 = w2_weights is not None
    if ctx.per_sample_w2:  # [B] extras only: no full-size tensor beyond the inputs
        ctx.save_for_backward(v, u, v_ref, weights, fm, w2_weights, w2)
    else:
        ctx.save_for_backward(v, u, v_ref, weights, fm)
    ctx.alpha = alpha


def _loss_backward(ctx, g_loss, g_fm, g_w2):
    """``c_fm = 2/D (g_loss weights / B + g_fm)``, ``c_w2 = 2/D (g_loss alpha c / B + g_w2)``, then the fused kernel.

    ``c`` is ``w2_weights`` (1 without them); ``d/dweights = g_loss fm / B`` and
    ``d/dw2_weights = g_loss alpha w2 / B``. The ``[B]`` coefficients are formed in float64
    (negligible work) so the kernel rounds them once.
    """
    v, u, v_ref, weights, fm, *per_sample = ctx.saved_tensors
    # needs_input_grad has no entry for w2_weights when it was left at its default (None).
    needs = tuple(ctx.needs_input_grad) + (False,) * (6 - len(ctx.needs_input_grad))
    b = v.shape[0]
    d = v.numel() // b
    f64 = torch.float64
    gl = g_loss.to(f64) if g_loss is not None else v.new_zeros((), dtype=f64)
    c_fm = gl * weights.to(f64) / b
    if g_fm is not None:
        c_fm = c_fm + g_fm.to(f64)
    if per_sample:
        w2_weights, w2 = per_sample
        c_w2 = gl * (ctx.alpha / b) * w2_weights.to(f64)
    else:
        c_w2 = (gl * (ctx.alpha / b)).expand(b)
    if g_w2 is not None:
        c_w2 = c_w2 + g_w2.to(f64)
    c_fm = c_fm * (2.0 / d)
    c_w2 = c_w2 * (2.0 / d)
    ops = torch.ops.orwcfm_fast
    grad_v = grad_u = grad_v_ref = grad_weights = None
    if needs[0]:
        grad_v = ops.orw_cfm_w2_loss_backward(v, u, v_ref, c_fm, c_w2)
    if needs[1] or needs[2]:
        zeros = torch.zeros_like(c_fm)
        if needs[1]:  # -c_fm (v - u) = c_fm (u - v)
            grad_u = ops.orw_cfm_w2_loss_backward(u, v, v, c_fm, zeros)
        if needs[2]:  # -c_w2 (v - v_ref) = c_w2 (v_ref - v)
            grad_v_ref = ops.orw_cfm_w2_loss_backward(v_ref, v, v, c_w2, zeros)
    if needs[3]:
        grad_weights = (gl * fm.to(f64) / b).to(weights.dtype)
    grad_w2_weights = None
    if needs[5]:
        grad_w2_weights = (gl * (ctx.alpha / b) * w2.to(f64)).to(w2_weights.dtype)
    return grad_v, grad_u, grad_v_ref, grad_weights, None, grad_w2_weights


def _path_setup_context(ctx, inputs, output):
    x_0, x_1, t, sigma, noise = inputs
    ctx.sigma = sigma
    ctx.t_needs_samples = bool(ctx.needs_input_grad[2])
    if ctx.t_needs_samples:
        ctx.save_for_backward(t, x_0, x_1)
    else:
        ctx.save_for_backward(t)


def _path_backward(ctx, g_x_t, g_u_t):
    """Linear: dx_0 = (1-t) g_xt - g_ut, dx_1 = t g_xt + g_ut, dt = sum_sample (x_1-x_0) g_xt, dnoise = sigma g_xt."""
    saved = ctx.saved_tensors
    t = saved[0]
    needs = ctx.needs_input_grad
    like = g_x_t if g_x_t is not None else g_u_t
    if like is None:
        return None, None, None, None, None
    dtype = like.dtype
    acc = accumulation_dtype(dtype)
    g_x = g_x_t.to(acc) if g_x_t is not None else torch.zeros_like(like, dtype=acc)
    g_u = g_u_t.to(acc) if g_u_t is not None else torch.zeros_like(like, dtype=acc)
    tb = t.to(acc).reshape((t.shape[0],) + (1,) * (like.ndim - 1))
    grad_x_0 = ((1 - tb) * g_x - g_u).to(dtype) if needs[0] else None
    grad_x_1 = (tb * g_x + g_u).to(dtype) if needs[1] else None
    grad_t = None
    if needs[2]:
        x_0, x_1 = saved[1], saved[2]
        prod = (x_1.to(acc) - x_0.to(acc)) * g_x
        grad_t = (prod.flatten(1).sum(1) if prod.ndim > 1 else prod).to(t.dtype)
    grad_noise = None
    # needs_input_grad has no entries for trailing arguments left at their defaults.
    if len(needs) > 4 and needs[4] and ctx.sigma > 0:
        grad_noise = (ctx.sigma * g_x).to(dtype)
    return grad_x_0, grad_x_1, grad_t, None, grad_noise


def _ode_setup_context(ctx, inputs, output):
    _, _, coeffs, dt = inputs
    ctx.scales = [dt * c for c in coeffs]


def _ode_backward(ctx, g):
    """dx = g, dk_j = dt coeffs[j] g."""
    needs = ctx.needs_input_grad
    grad_x = g if needs[0] else None
    grad_ks = [g * s if need else None for s, need in zip(ctx.scales, needs[1])]
    # torch's tensor-list autograd support sees an empty `coeffs` as an (empty) list of
    # tensors and then wants an empty list back for it, not None.
    grad_coeffs = [] if not ctx.scales else None
    return grad_x, grad_ks, grad_coeffs, None


def _register_python_parts() -> None:
    """Fake implementations and autograd formulas of the extension's ops (once, after loading)."""
    lib = _NAMESPACE
    torch.library.register_fake(f"{lib}::orw_cfm_w2_loss", _fake_loss)
    torch.library.register_fake(f"{lib}::orw_cfm_w2_loss_backward", _fake_loss_backward)
    torch.library.register_fake(f"{lib}::conditional_path", _fake_path)
    torch.library.register_fake(f"{lib}::ode_step", _fake_ode_step)
    torch.library.register_autograd(f"{lib}::orw_cfm_w2_loss", _loss_backward, setup_context=_loss_setup_context)
    torch.library.register_autograd(f"{lib}::conditional_path", _path_backward, setup_context=_path_setup_context)
    torch.library.register_autograd(f"{lib}::ode_step", _ode_backward, setup_context=_ode_setup_context)
