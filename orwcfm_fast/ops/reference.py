"""Pure-PyTorch reference implementations of the library's arithmetic.

One function per op. They are the CPU fallback, the oracle the tests compare
against, and the baseline the benchmarks time; faster backends must match them.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "conditional_path_reference",
    "ode_step_reference",
    "orw_cfm_w2_loss_backward_reference",
    "orw_cfm_w2_loss_reference",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which the ops accumulate and return reductions: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``[B]`` times to ``[B, 1, ..., 1]`` so they broadcast against ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def conditional_path_reference(
    x_0: torch.Tensor,
    x_1: torch.Tensor,
    t: torch.Tensor,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point and target velocity on the straight conditional path.

    ``x_t = t * x_1 + (1 - t) * x_0 + sigma * noise`` and ``u_t = x_1 - x_0``
    (torchcfm's ``ConditionalFlowMatcher`` with constant ``sigma``).

    Args:
        x_0: ``[B, ...]`` source (noise) samples.
        x_1: ``[B, ...]`` target samples, same shape as ``x_0``.
        t: ``[B]`` times in ``[0, 1]``.
        sigma: std of the Gaussian around the path; 0 gives the deterministic path.
        noise: ``[B, ...]`` standard normal draws, required when ``sigma > 0``.

    Returns:
        ``(x_t, u_t)``, each ``[B, ...]``.
    """
    tb = _per_sample(t, x_1)
    x_t = tb * x_1 + (1 - tb) * x_0
    if sigma > 0:
        if noise is None:
            raise ValueError("conditional path: sigma > 0 needs `noise`")
        x_t = x_t + sigma * noise
    return x_t, x_1 - x_0


def orw_cfm_w2_loss_reference(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    w2_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ORW-CFM-W2 loss, the published ``compute_loss`` arithmetic.

    ``fm[i] = mean_D (v[i] - u[i])^2``, ``w2[i] = mean_D (v[i] - v_ref[i])^2`` and
    ``loss = mean_i (weights[i] * fm[i] + alpha * c[i] * w2[i])``, where ``D`` are all non-batch
    dims and ``c = w2_weights`` (all ones when ``None``: the published loss, computed without
    the extra product). The reductions run in :func:`accumulation_dtype` (float32 for
    half/bf16/float32 inputs, float64 for float64), and ``loss``, ``fm``, ``w2`` are returned in
    that dtype: a bf16 policy still gets an fp32 loss. For float32 inputs and no ``w2_weights``
    this is exactly the published arithmetic.

    Args:
        v: ``[B, ...]`` policy velocity (differentiable).
        u: ``[B, ...]`` conditional target velocity.
        v_ref: ``[B, ...]`` frozen reference velocity.
        weights: ``[B]`` per-sample weights.
        alpha: W2 coefficient, ``>= 0``.
        w2_weights: ``[B]`` per-sample W2 coefficients ``c`` (ADRPO's advantage-derived
            ``alpha_i = alpha * c[i]``), or ``None``.

    Returns:
        ``(loss, fm, w2)``: a 0-dim loss and the ``[B]`` per-sample terms.
    """
    acc = accumulation_dtype(v.dtype)
    v, u, v_ref = v.to(acc), u.to(acc), v_ref.to(acc)
    fm = (v - u).pow(2).flatten(1).mean(dim=1)
    w2 = (v - v_ref).pow(2).flatten(1).mean(dim=1)
    w2_term = alpha * w2 if w2_weights is None else alpha * w2_weights.to(acc) * w2
    loss = (weights.to(acc) * fm + w2_term).mean()
    return loss, fm, w2


def orw_cfm_w2_loss_backward_reference(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    c_fm: torch.Tensor,
    c_w2: torch.Tensor,
) -> torch.Tensor:
    """Gradient of the loss with respect to ``v``, given per-sample coefficients.

    ``grad_v[i] = c_fm[i] * (v[i] - u[i]) + c_w2[i] * (v[i] - v_ref[i])``. With upstream
    gradients ``g_loss`` (0-dim), ``g_fm``, ``g_w2`` (``[B]``) of :func:`orw_cfm_w2_loss_reference`'s
    three outputs, ``c_fm = 2 / D * (g_loss * weights / B + g_fm)`` and
    ``c_w2 = 2 / D * (g_loss * alpha * c / B + g_w2)`` (``D`` = elements per sample; ``c`` the
    ``w2_weights``, 1 without them).

    Args:
        v, u, v_ref: ``[B, ...]``, same shape.
        c_fm, c_w2: ``[B]`` coefficients (any float dtype).

    Returns:
        ``[B, ...]`` gradient in ``v``'s dtype (computed in :func:`accumulation_dtype`).
    """
    acc = accumulation_dtype(v.dtype)
    shape = (v.shape[0],) + (1,) * (v.ndim - 1)
    v_acc = v.to(acc)
    grad = c_fm.to(acc).reshape(shape) * (v_acc - u.to(acc)) + c_w2.to(acc).reshape(shape) * (v_acc - v_ref.to(acc))
    return grad.to(v.dtype)


def ode_step_reference(
    x: torch.Tensor,
    ks: list[torch.Tensor] | tuple[torch.Tensor, ...],
    coeffs: list[float] | tuple[float, ...],
    dt: float,
) -> torch.Tensor:
    """One Runge-Kutta combination: ``x + dt * sum_j coeffs[j] * ks[j]``.

    It is both a stage point (``coeffs`` = a row of the tableau's ``a``) and the step
    update (``coeffs`` = ``b``). Accumulates in :func:`accumulation_dtype` and rounds once.

    Args:
        x: ``[B, ...]`` state.
        ks: stage derivatives, each shaped like ``x`` (may be empty).
        coeffs: one float per entry of ``ks``.
        dt: step size.

    Returns:
        A new ``[B, ...]`` tensor in ``x``'s dtype; ``x`` and ``ks`` are not modified.
    """
    if len(ks) != len(coeffs):
        raise ValueError(f"ode_step: got {len(coeffs)} coefficients for {len(ks)} stage values")
    acc = accumulation_dtype(x.dtype)
    out = x.to(acc, copy=True)
    for coeff, k in zip(coeffs, ks):
        out.add_(k.to(acc), alpha=dt * coeff)
    return out.to(x.dtype)
