"""The library's tensor arithmetic behind stable names.

``orw_cfm_w2_loss`` and ``conditional_path`` validate their inputs and run the
pure-PyTorch reference in :mod:`orwcfm_fast.ops.reference`; faster backends
(Triton, C++/CUDA) are added under these same calls.
"""

from __future__ import annotations

import torch

from orwcfm_fast.ops.reference import conditional_path_reference, orw_cfm_w2_loss_reference

__all__ = [
    "conditional_path",
    "orw_cfm_w2_loss",
    "conditional_path_reference",
    "orw_cfm_w2_loss_reference",
]


def _check_same(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has {tuple(like.shape)}; they must match")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def _check_batch_vector(name: str, w: torch.Tensor, like: torch.Tensor) -> None:
    if w.shape != (like.shape[0],):
        raise ValueError(f"{name} must have shape [B] = [{like.shape[0]}], got {tuple(w.shape)}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the samples are on {like.device}")


def orw_cfm_w2_loss(v, u, v_ref, weights, alpha: float):
    """Reward-weighted flow matching loss plus the W2 bound.

    Args:
        v: ``[B, ...]`` policy velocity (differentiable).
        u: ``[B, ...]`` target velocity ``u_t``.
        v_ref: ``[B, ...]`` reference velocity.
        weights: ``[B]`` loss weights.
        alpha: W2 coefficient ``>= 0``.

    Returns:
        ``(loss, fm, w2)``: 0-dim loss, ``[B]`` flow matching and W2 terms;
        see :func:`orw_cfm_w2_loss_reference` for the formulas.
    """
    if v.ndim < 2:
        raise ValueError(f"v must be [B, ...] with at least one non-batch dim, got shape {tuple(v.shape)}")
    _check_same("u", u, v, "v")
    _check_same("v_ref", v_ref, v, "v")
    _check_batch_vector("weights", weights, v)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return orw_cfm_w2_loss_reference(v, u, v_ref, weights, alpha)


def conditional_path(x_0, x_1, t, sigma: float = 0.0, noise=None):
    """``(x_t, u_t)`` on the straight path between ``x_0`` and ``x_1`` at times ``t``.

    Args:
        x_0: ``[B, ...]`` noise. x_1: ``[B, ...]`` samples. t: ``[B]`` times.
        sigma: path noise std (0: deterministic). noise: ``[B, ...]``, needed if sigma > 0.

    Returns:
        ``(x_t, u_t)``, each ``[B, ...]``.
    """
    _check_same("x_0", x_0, x_1, "x_1")
    _check_batch_vector("t", t, x_1)
    if noise is not None:
        _check_same("noise", noise, x_1, "x_1")
    return conditional_path_reference(x_0, x_1, t, sigma, noise)
