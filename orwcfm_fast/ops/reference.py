"""Pure-PyTorch reference implementations of the library's arithmetic.

One function per op. They are the CPU fallback, the oracle the tests compare
against, and the baseline the benchmarks time; faster backends must match them.
"""

from __future__ import annotations

import torch

__all__ = ["conditional_path_reference", "orw_cfm_w2_loss_reference"]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ORW-CFM-W2 loss, the published ``compute_loss`` arithmetic.

    ``fm[i] = mean_D (v[i] - u[i])^2``, ``w2[i] = mean_D (v[i] - v_ref[i])^2`` and
    ``loss = mean_i (weights[i] * fm[i] + alpha * w2[i])``, where ``D`` are all non-batch dims.

    Args:
        v: ``[B, ...]`` policy velocity (differentiable).
        u: ``[B, ...]`` conditional target velocity.
        v_ref: ``[B, ...]`` frozen reference velocity.
        weights: ``[B]`` per-sample weights.
        alpha: W2 coefficient, ``>= 0``.

    Returns:
        ``(loss, fm, w2)``: a 0-dim loss and the ``[B]`` per-sample terms.
    """
    fm = (v - u).pow(2).flatten(1).mean(dim=1)
    w2 = (v - v_ref).pow(2).flatten(1).mean(dim=1)
    loss = (weights.to(fm.dtype) * fm + alpha * w2).mean()
    return loss, fm, w2
