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

import math
import warnings

import torch

from orwcfm_fast.config import WEIGHT_NORMALIZATIONS

__all__ = ["checked_reward_weights", "default_normalization", "effective_sample_size", "raw_weight_scale_warning",
           "reward_weights"]

#: raw weights are flagged when ``temperature * (max r - min r)`` exceeds this (weights spanning > e^5 ~ 150x) ...
RAW_SPREAD_LIMIT = 5.0
#: ... or their mean is outside ``[1 / RAW_MEAN_LIMIT, RAW_MEAN_LIMIT]``
RAW_MEAN_LIMIT = 10.0


def default_normalization(prompted: bool, images_per_prompt: int = 1) -> str:
    """Config ``weight_normalization: None`` resolved: what alpha means the same under, whatever the reward's offset.

    Plain models keep the published reference's raw weights (``"none"``: the drop-in). Prompted
    models (pipelines, conditional models) get ``"group"`` when each prompt has a group of
    ``images_per_prompt > 1`` samples, else ``"batch"``: both are invariant to adding a constant to
    the reward (PickScore ~22, HPS ~0.3, aesthetic ~5 all give the same weights), and their weights
    average 1, so ``alpha`` weighs W2 against a flow-matching term of unit scale.
    """
    if not prompted:
        return "none"
    return "group" if images_per_prompt > 1 else "batch"


def raw_weight_scale_warning(rewards: torch.Tensor, temperature: float, alpha: float) -> str | None:
    """A warning text when raw weights ``exp(temperature * r)`` are far from scale 1, else ``None``.

    With raw weights the loss is ``mean_i(w_i fm_i) + alpha * mean_i(w2_i)``: the flow-matching term
    is scaled by the mean weight ``m`` and W2 is not, and Adam is invariant to the loss's overall
    scale, so the run behaves as one with normalised weights and ``alpha / m``. Rewards around 22
    at temperature 0.5 give ``m ~ e^11``: W2 is then switched off in effect.

    Args:
        rewards: ``[B]`` rewards of one batch.
        temperature: ``beta``.
        alpha: the W2 coefficient.
    """
    r = rewards.detach().double()
    # one host read: the spread of the logits and the log of the mean raw weight (overflow-safe)
    spread, log_sum = torch.stack([temperature * (r.max() - r.min()), torch.logsumexp(temperature * r, 0)]).tolist()
    log_mean = log_sum - math.log(r.numel())
    if spread <= RAW_SPREAD_LIMIT and abs(log_mean) <= math.log(RAW_MEAN_LIMIT):
        return None
    mean = math.exp(log_mean) if log_mean < 700 else math.inf
    return (
        f"raw reward weights exp(temperature * reward) (weight_normalization 'none'): temperature * (max r - min r) "
        f"= {spread:.3g} and the mean weight is {mean:.3g}. The flow-matching term is scaled by the mean weight and "
        f"the W2 term is not, so alpha = {alpha:g} acts as alpha / mean weight = {alpha / mean:.3g} would with "
        "normalised weights (Adam ignores the loss's overall scale). Set config 'weight_normalization' to 'batch' "
        "(or 'group' with images_per_prompt > 1) so alpha means the same at any reward offset; to keep a run tuned "
        "with raw weights, use alpha / mean raw weight with 'batch'"
    )


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


def checked_reward_weights(rewards: torch.Tensor, temperature: float, normalization: str, group: int | None,
                           alpha: float, *, warn_scale: bool = True) -> tuple[torch.Tensor, bool]:
    """:func:`reward_weights`, checked: ``(weights [B], whether a scale warning was issued)``.

    With ``warn_scale`` and raw weights, :func:`raw_weight_scale_warning`'s text is issued as a warning.

    Raises:
        FloatingPointError: a weight overflowed (raw weights at a large ``temperature * reward``).
    """
    weights = reward_weights(rewards, temperature, normalization, group)
    message = raw_weight_scale_warning(rewards, temperature, alpha) if normalization == "none" and warn_scale else None
    if message is not None:
        warnings.warn(message, stacklevel=4)
    if not bool(torch.isfinite(weights).all()):
        bad = torch.nonzero(~torch.isfinite(weights)).flatten()[:5].tolist()
        raise FloatingPointError(
            f"weights exp(temperature * reward) overflowed for samples {bad} "
            f"(temperature {temperature}, max reward {rewards.max().item():.4g}); "
            "set config 'weight_normalization' to 'batch' (self-normalised, overflow-safe) or lower 'temperature'"
        )
    return weights, message is not None


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
