"""Rewards -> loss weights.

ORW-CFM-W2 weights each sample's flow matching loss by ``w = exp(temperature * r)``.
Two forms are offered:

- ``"none"``: the published reference's raw ``exp(temperature * r)``. Its scale
  follows the rewards (it overflows float32 once ``temperature * r > 88.7``).
- ``"batch"``: self-normalised within the batch, ``B * softmax(temperature * r)``.
  The weights then average 1, and the softmax subtracts the batch maximum, so they
  never overflow. Relative weights (and the target ``q(x) w(x) / Z``) are the same.
- ``"group"``: per prompt. The rewards of each group of ``group_size`` samples (one prompt's
  ``images_per_prompt`` images) are standardised within the group, ``z = (r - mean) / (std +
  1e-6)``, and weighted ``k * softmax(temperature * z)`` within it: every prompt's weights sum to
  its ``k`` samples, so easy prompts (high rewards) do not drown hard ones, the temperature acts
  on a scale-free reward, and nothing overflows. Relative weights *within* a group are
  ``exp(temperature * z)``: the batch form's, with the reward measured in the group's own units.
"""

from __future__ import annotations

import torch

from orwcfm_fast.config import WEIGHT_NORMALIZATIONS

__all__ = ["reward_weights", "effective_sample_size"]


def reward_weights(rewards: torch.Tensor, temperature: float, normalization: str = "none",
                   group_size: int | None = None) -> torch.Tensor:
    """Weights ``exp(temperature * rewards)``, optionally self-normalised.

    Args:
        rewards: ``[B]`` rewards (groups of ``group_size`` consecutive samples for ``"group"``).
        temperature: ``beta >= 0``; 0 gives uniform weights.
        normalization: ``"none"`` (raw exponentials), ``"batch"`` (``B * softmax(beta * r)``,
            mean 1, overflow-safe) or ``"group"`` (per group of standardised rewards, see the
            module docs).
        group_size: samples per group for ``"group"`` (``None``: the whole batch is one group).

    Returns:
        ``[B]`` weights, float32 (or the rewards' dtype if it is wider).

    Raises:
        ValueError: ``rewards`` is not ``[B]``, an unknown normalisation, or ``group_size`` does not divide ``B``.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    logits = temperature * rewards.to(dtype)
    if normalization == "none":
        return torch.exp(logits)
    if normalization == "batch":
        return torch.softmax(logits, dim=0) * rewards.shape[0]
    if normalization == "group":
        b = rewards.shape[0]
        k = b if group_size is None else int(group_size)
        if k < 1 or b % k:
            raise ValueError(f"weight_normalization 'group': a batch of {b} is not made of groups of {k}")
        r = rewards.to(dtype).reshape(b // k, k)
        z = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)
        return (torch.softmax(temperature * z, dim=1) * k).reshape(b)
    raise ValueError(f"weight_normalization must be one of {list(WEIGHT_NORMALIZATIONS)}, got {normalization!r}")


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size as a fraction of the batch, ``(sum w)^2 / (B sum w^2)``.

    Args:
        weights: ``[B]`` non-negative weights.

    Returns:
        0-dim tensor in ``[1/B, 1]``: 1 when all weights are equal, ``1/B`` when one dominates.
        All-zero weights (raw weights that underflowed) give ``1/B``: no sample carries weight.
    """
    w = weights.double()
    w = w / w.max().clamp_min(torch.finfo(torch.float64).tiny)  # scale-free; avoids 0/0 and w*w underflow
    sq = (w * w).sum()
    ess = torch.where(sq > 0, w.sum() ** 2 / (w.numel() * sq), torch.full_like(sq, 1.0 / w.numel()))
    return ess.to(weights.dtype)
