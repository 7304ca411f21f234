"""The library's fused tensor ops behind stable names, with a choice of backend.

- :func:`orw_cfm_w2_loss`: reward-weighted flow matching loss plus the W2 bound (scalar or
  per-sample W2 coefficient), with its gradient.
- :func:`conditional_path`: ``x_t`` and ``u_t`` on the straight path, in one pass.
- :func:`ode_step`: ``x + dt * sum_j c_j k_j``, a Runge-Kutta stage point or step update.

Each validates its inputs, then runs the backend given by ``backend=`` (``"torch"``,
``"cpp"``, ``"triton"``) or, with ``None``, the best one usable on the inputs' device
(:mod:`orwcfm_fast.ops.backends`). :func:`available_backends` says what is usable here
and why not otherwise. The pure-PyTorch versions in :mod:`orwcfm_fast.ops.reference` are
the fallback, the tests' oracle and the benchmarks' baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orwcfm_fast.ops.backends import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backend_module,
    resolve_backend,
)
from orwcfm_fast.ops.reference import (
    accumulation_dtype,
    conditional_path_reference,
    ode_step_reference,
    orw_cfm_w2_loss_backward_reference,
    orw_cfm_w2_loss_reference,
)

__all__ = [
    "orw_cfm_w2_loss",
    "conditional_path",
    "ode_step",
    "available_backends",
    "resolve_backend",
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "accumulation_dtype",
    "conditional_path_reference",
    "ode_step_reference",
    "orw_cfm_w2_loss_backward_reference",
    "orw_cfm_w2_loss_reference",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_same(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str, *, dtype: bool = True) -> None:
    _check_float(name, x)
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has {tuple(like.shape)}; they must match")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")
    if dtype and x.dtype != like.dtype:
        raise TypeError(f"{name} is {x.dtype} but {like_name} is {like.dtype}; cast one of them")


def _check_batch_vector(name: str, w: torch.Tensor, like: torch.Tensor) -> None:
    _check_float(name, w)
    if w.shape != (like.shape[0],):
        raise ValueError(f"{name} must have shape [B] = [{like.shape[0]}], got {tuple(w.shape)}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the samples are on {like.device}")


def _check_batched(name: str, x) -> None:
    _check_float(name, x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [B, ...] with at least one non-batch dim, got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); B must be >= 1")
    if x[0].numel() < 1:
        raise ValueError(f"{name} has samples without elements (shape {tuple(x.shape)}); each sample needs D >= 1")


def orw_cfm_w2_loss(v, u, v_ref, weights, alpha: float, backend: str | None = None, w2_weights=None):
    """Reward-weighted flow matching loss plus the W2 bound, differentiable in all tensor inputs.

    ``fm[i] = mean_D (v[i] - u[i])^2``, ``w2[i] = mean_D (v[i] - v_ref[i])^2``,
    ``loss = mean_i (weights[i] * fm[i] + alpha * c[i] * w2[i])`` (``D``: all non-batch elements;
    ``c = w2_weights``, all ones when ``None``), reduced in :func:`accumulation_dtype` (float32,
    or float64 for float64 inputs).

    Gradients (of ``loss``; ``B`` samples of ``D`` elements):
    ``d/dv[i] = 2 / (B * D) * (weights[i] (v[i] - u[i]) + alpha c[i] (v[i] - v_ref[i]))``,
    ``d/dweights[i] = fm[i] / B``, ``d/dw2_weights[i] = alpha * w2[i] / B``; ``u`` and ``v_ref``
    get the matching negated terms. Gradients of ``weights`` and ``w2_weights`` come back in
    their own dtypes.

    Args:
        v: ``[B, ...]`` policy velocity.
        u: ``[B, ...]`` target velocity ``u_t`` (same shape and dtype as ``v``).
        v_ref: ``[B, ...]`` reference velocity (same shape and dtype).
        weights: ``[B]`` loss weights, any float dtype.
        alpha: W2 coefficient ``>= 0``.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (best available).
        w2_weights: ``[B]`` per-sample W2 coefficients ``c`` (any float dtype, on the samples'
            device), e.g. ADRPO's advantage-derived ``alpha_i = alpha * c[i]``; ``None`` (the
            default) runs the scalar-``alpha`` kernels unchanged. The caller keeps ``c >= 0`` and
            finite: the values are not checked, since that would synchronise with the device in
            the training loop (a negative ``c`` rewards moving away from the reference).

    Returns:
        ``(loss, fm, w2)``: 0-dim loss and ``[B]`` per-sample terms, in the accumulation dtype.
    """
    _check_batched("v", v)
    _check_same("u", u, v, "v")
    _check_same("v_ref", v_ref, v, "v")
    _check_batch_vector("weights", weights, v)
    if w2_weights is not None:
        _check_batch_vector("w2_weights", w2_weights, v)
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    impl = backend_module(resolve_backend(backend, v.device.type))
    if w2_weights is None:  # today's call, unchanged
        return impl.orw_cfm_w2_loss(v, u, v_ref, weights, alpha)
    return impl.orw_cfm_w2_loss(v, u, v_ref, weights, alpha, w2_weights)


def conditional_path(x_0, x_1, t, sigma: float = 0.0, noise=None, backend: str | None = None):
    """``(x_t, u_t)`` on the straight conditional path, in one pass.

    ``x_t = t * x_1 + (1 - t) * x_0 + sigma * noise`` and ``u_t = x_1 - x_0`` (torchcfm's
    ``ConditionalFlowMatcher`` with constant ``sigma``).

    Args:
        x_0: ``[B, ...]`` noise.
        x_1: ``[B, ...]`` samples (same shape and dtype).
        t: ``[B]`` times, any float dtype.
        sigma: path noise std ``>= 0`` (0: deterministic).
        noise: ``[B, ...]`` standard normal draws, required when ``sigma > 0``.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (best available).

    Returns:
        ``(x_t, u_t)``, each ``[B, ...]`` in ``x_1``'s dtype.
    """
    _check_batched("x_1", x_1)
    _check_same("x_0", x_0, x_1, "x_1")
    _check_batch_vector("t", t, x_1)
    sigma = float(sigma)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma > 0:
        if noise is None:
            raise ValueError("conditional_path: sigma > 0 needs `noise` (standard normal, shaped like x_1)")
        _check_same("noise", noise, x_1, "x_1")
    else:
        noise = None
    impl = backend_module(resolve_backend(backend, x_1.device.type))
    return impl.conditional_path(x_0, x_1, t, sigma, noise)


def ode_step(x, ks: Sequence[torch.Tensor], coeffs: Sequence[float], dt: float, backend: str | None = None):
    """``x + dt * sum_j coeffs[j] * ks[j]`` in one pass: a Runge-Kutta stage point or update.

    Args:
        x: ``[B, ...]`` state.
        ks: stage derivatives, each shaped, placed and typed like ``x``.
        coeffs: one float per entry of ``ks`` (zeros are skipped before the kernel).
        dt: step size.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (best available).

    Returns:
        A new ``[B, ...]`` tensor in ``x``'s dtype (accumulated in :func:`accumulation_dtype`,
        rounded once); ``x`` itself when no coefficient is non-zero. Inputs are not modified.
    """
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension: expected [B, ...], got a 0-d tensor")
    if len(ks) != len(coeffs):
        raise ValueError(f"ode_step: got {len(coeffs)} coefficients for {len(ks)} stage values")
    for j, k in enumerate(ks):
        _check_same(f"ks[{j}]", k, x, "x")
    dt = float(dt)
    pairs = [(k, float(c)) for k, c in zip(ks, coeffs) if float(c) != 0.0]
    if dt == 0.0 or not pairs:
        return x
    impl = backend_module(resolve_backend(backend, x.device.type))
    return impl.ode_step(x, [k for k, _ in pairs], [c for _, c in pairs], dt)
