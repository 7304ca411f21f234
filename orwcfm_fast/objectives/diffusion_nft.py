"""DiffusionNFT (NVlabs, ICLR 2026) on this engine, as its training script ``train_nft_sd3.py`` defines it.

On a clean sample ``x_1`` of the old policy (the last policy here: sampling uses it), at a time ``t``:

- the implicit positive and negative policies around the old policy ``v_old``:
  ``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v`` (config ``nft_beta``);
- their clean-sample predictions ``x+ = x_t + (1 - t) v+`` and ``x- = x_t + (1 - t) v-`` (the script's
  ``x0_prediction = x_t - t v`` in its convention: ``t`` noise-to-1, ``v = noise - x0``; here ``t`` runs
  noise-to-data and ``v = x_1 - x_0``, so the same point);
- the adaptive loss normalisation: each term's squared error over the detached mean absolute error of its
  sample, ``L+_i = mean_D (x+ - x_1)^2 / sg(max(mean_D |x+ - x_1|, 1e-5))`` (the mean taken in float64), and
  ``L-_i`` likewise;
- the reward-to-probability mapping ``r_i = clamp(A_i / (2 clip) + 1/2, 0, 1)``, ``A_i`` the clipped advantage
  (reward minus its prompt group's mean, over the batch std; ``advantage_clip`` is the script's
  ``adv_clip_max``, default 5 as there);
- ``loss = clip * mean_i (r_i L+_i + (1 - r_i) L-_i) / beta + alpha * mean_i mean_D (v - v_ref)^2``: the
  optional reference term (the script's ``train.beta``, here config ``w2_coefficient``; 0 skips the
  reference forward);
- the old policy: after each epoch, ``old = decay old + (1 - decay) policy`` with the script's
  ``return_decay(step, decay_type)`` schedules (config ``nft_decay_type``; ``step`` the optimiser steps so far).

For LoRA pipelines this is still one transformer: the trained adapter, the old (last-policy) adapter, and
the reference with adapters disabled. Differences from the script, by this engine's design: times come from
config ``time_sampling`` / ``loss_timesteps`` instead of the sampler's grid, samples from the library's ODE
solvers (the script's default for SD3 is a deterministic second-order solver too), advantages per rank.
The loss is plain PyTorch: its per-sample normalisation does not fit the fused ORW-CFM-W2 op.
"""

from __future__ import annotations

import torch

from orwcfm_fast.objectives.base import Objective, advantages, draw_path

__all__ = ["DiffusionNft", "nft_decay"]

#: the script's return_decay schedules: (flat steps, rate per step, cap)
_DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def nft_decay(step: int, decay_type: int) -> float:
    """DiffusionNFT's old-policy EMA decay after ``step`` optimiser steps (``decay_type`` 0, 1 or 2)."""
    flat, rate, cap = _DECAY_SCHEDULES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def _normalised_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` ``mean_D (p - x)^2 / sg(max(mean_D |p - x|, 1e-5))``, the normaliser taken in float64."""
    dims = tuple(range(1, target.ndim))
    with torch.no_grad():
        scale = (prediction.double() - target.double()).abs().mean(dim=dims).clamp(min=1e-5)
    return ((prediction - target) ** 2).mean(dim=dims) / scale.to(prediction.dtype)


class DiffusionNft(Objective):
    name = "diffusion-nft"
    roles = ("policy", "old_policy", "reference")
    uses_reward_weights = False
    couplings = ("independent", "exact_ot")
    per_sample_names = ("advantage",)

    def per_sample(self, rewards, weights, group):
        return {"weights": weights, "advantage": advantages(rewards, group, self.config["advantage_clip"])}

    def loss(self, ctx, x_0, x_1, per_sample, cond=()):
        beta, clip = self.config["nft_beta"], self.config["advantage_clip"]
        path = draw_path(ctx, x_0, x_1, per_sample, cond)
        v_old = ctx.forward("old_policy", path.t, path.x_t, path.cond)
        v = ctx.forward("policy", path.t, path.x_t, path.cond)
        shape = (-1,) + (1,) * (path.x_1.ndim - 1)
        remaining = (1 - path.t).to(v.dtype).view(shape)
        x_t = path.x_t.to(v.dtype)
        target = path.x_1.to(v.dtype)
        positive = x_t + remaining * (beta * v + (1 - beta) * v_old)
        negative = x_t + remaining * ((1 + beta) * v_old - beta * v)
        r = (path.per_sample["advantage"].to(v.dtype) / clip / 2 + 0.5).clamp(0, 1)
        per_sample_loss = r * _normalised_error(positive, target) + (1 - r) * _normalised_error(negative, target)
        policy_loss = (per_sample_loss / beta * clip).mean()
        dims = tuple(range(1, v.ndim))
        metrics = {"fm_loss": policy_loss.detach(),
                   "nft/old_deviation": ((v.detach() - v_old) ** 2).mean(),
                   "nft/probability": r.mean()}
        if ctx.alpha > 0:
            v_ref = ctx.forward("reference", path.t, path.x_t, path.cond)
            w2 = ((v - v_ref) ** 2).mean(dim=dims).mean()
            loss = policy_loss + ctx.alpha * w2
            metrics["w2_loss"] = w2.detach()
        else:
            loss = policy_loss
            metrics["w2_loss"] = torch.zeros((), dtype=v.dtype, device=v.device)
        metrics["total_loss"] = loss.detach()
        return loss, metrics

    def last_policy_decay(self, global_step):
        return nft_decay(global_step, self.config["nft_decay_type"])
