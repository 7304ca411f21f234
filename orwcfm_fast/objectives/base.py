"""The objective contract: what one training loss gets from the engine, and what the objectives share.

An objective (one file each in this package) says

- which per-sample quantities travel with a batch's samples (:meth:`Objective.per_sample`: the
  flow-matching weights, an advantage);
- the loss on a coupled batch (:meth:`Objective.loss`), through a :class:`LossContext` that runs
  the roles' forwards (counted, under the run's autocast) and draws the loss's times and noise from
  the trainer's generator, in the trainer's order;
- how the last policy is refreshed after an epoch (:meth:`Objective.last_policy_decay`: 0 copies it,
  more blends it as an EMA);
- where the samples come from (:meth:`Objective.make_samples`: the last policy, online, by default).

The trainer stays wiring: it samples, scores, weights, couples and steps the optimiser; the objective
turns the batch into a differentiable loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch

from orwcfm_fast.ops import conditional_path
from orwcfm_fast.profiling import phase

__all__ = ["LossContext", "Objective", "PathBatch", "advantages", "draw_path"]


@dataclass
class LossContext:
    """What a loss may use from the engine (built by the trainer for each loss).

    Attributes:
        config: the trainer's validated config.
        alpha: the regularisation strength (config ``w2_coefficient``; the trainer's ``alpha``).
        generator: the trainer's generator: every draw of the loss (times, noise) comes from it.
        backend: the ops backend (config ``ops_backend``).
        loss_times: ``(n, like) -> [n]`` times from config ``time_sampling``.
        forward: ``(role, t, x_t, cond) -> v`` the role's velocity (``"policy"`` with gradient,
            ``"reference"`` / ``"old_policy"`` without), under the run's autocast, returned in float32
            (float64 for float64 inputs), its passes counted.
    """

    config: Mapping[str, Any]
    alpha: float
    generator: torch.Generator
    backend: str | None
    loss_times: Callable[[int, torch.Tensor], torch.Tensor]
    forward: Callable[[str, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


@dataclass
class PathBatch:
    """One loss's points on the conditional path (each sample repeated ``loss_timesteps`` times).

    ``t`` ``[N]``; ``x_t``, ``u_t``, ``x_1`` ``[N, *sample_shape]``; ``per_sample`` ``{name: [N]}``; ``cond``
    the conditioning repeated likewise.
    """

    t: torch.Tensor
    x_t: torch.Tensor
    u_t: torch.Tensor
    x_1: torch.Tensor
    per_sample: dict[str, torch.Tensor]
    cond: tuple


def draw_path(ctx: LossContext, x_0: torch.Tensor, x_1: torch.Tensor, per_sample: Mapping[str, torch.Tensor],
              cond: tuple = ()) -> PathBatch:
    """Times, path noise and ``(x_t, u_t)`` for a coupled batch, drawn in the engine's order.

    With config ``loss_timesteps`` k > 1 each sample is used at k times (its rows repeated, fresh ``x_0``
    for the repeats), so one sampling pays for k loss terms. Then ``t`` (config ``time_sampling``), the
    path noise (config ``sigma > 0``) and ``x_t = t x_1 + (1 - t) x_0 + sigma noise``, ``u_t = x_1 - x_0``.

    Args:
        x_0: ``[B, *S]`` noise, coupled with ``x_1``. x_1: ``[B, *S]`` samples.
        per_sample: ``{name: [B]}`` quantities that follow their samples.
        cond: the samples' conditioning (``()`` for unconditional models).
    """
    k = ctx.config["loss_timesteps"]
    per_sample = dict(per_sample)
    if k > 1:
        extra = torch.randn((x_1.shape[0] * (k - 1), *x_1.shape[1:]), generator=ctx.generator,
                           device=x_1.device, dtype=x_1.dtype)
        x_0 = torch.cat([x_0, extra])
        x_1 = x_1.repeat((k,) + (1,) * (x_1.ndim - 1))
        per_sample = {name: value.repeat(k) for name, value in per_sample.items()}
        cond = tuple(c.repeat((k,) + (1,) * (c.ndim - 1)) for c in cond)
    t = ctx.loss_times(x_1.shape[0], x_1)
    sigma = ctx.config["sigma"]
    noise = torch.randn(x_1.shape, generator=ctx.generator, device=x_1.device, dtype=x_1.dtype) if sigma > 0 else None
    x_t, u_t = conditional_path(x_0, x_1, t, sigma, noise, backend=ctx.backend)
    return PathBatch(t, x_t, u_t, x_1, per_sample, tuple(cond))


def advantages(rewards: torch.Tensor, group: int | None, clip: float) -> torch.Tensor:
    """Clipped advantages ``clamp((r - group mean) / (batch std + 1e-4), -clip, clip)``.

    DiffusionNFT's estimate (its ``PerPromptStatTracker`` with ``global_std``): each reward minus the mean of
    its prompt's group, over the standard deviation (population, ``ddof=0``) of the whole batch. Groups are
    consecutive rows (a batch's ``images_per_prompt`` samples of one drawn prompt); the tracker pools by prompt
    text, which differs only when one batch draws a prompt twice.

    Args:
        rewards: ``[B]`` rewards.
        group: samples per prompt, in consecutive rows (``None``: the whole batch is one group).
        clip: the bound, ``> 0``.

    Returns:
        ``[B]`` float32 (float64 for float64 rewards) advantages in ``[-clip, clip]``.
    """
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    n = r.shape[0]
    size = n if group is None else int(group)
    if n % size:
        raise ValueError(f"advantages: {n} rewards do not split into groups of {size}")
    mean = r.view(-1, size).mean(dim=1, keepdim=True).expand(-1, size).reshape(n)
    std = r.std(unbiased=False) if n > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
    return ((r - mean) / (std + 1e-4)).clamp(-clip, clip)


class Objective:
    """One training objective (subclasses: one file each in :mod:`orwcfm_fast.objectives`).

    Attributes:
        name: its config ``objective`` value.
        roles: the forwards one loss runs, for the compute count and the docs.
        uses_reward_weights: whether the loss reads the ``exp(temperature * r)`` weights (else the trainer
            passes ones and skips their checks).
        online: whether samples come from the last policy each step (``offline-rwr``: from one fixed set).
    """

    name = ""
    roles: tuple[str, ...] = ("policy", "reference")
    uses_reward_weights = True
    online = True
    #: what :meth:`per_sample` gives besides ``"weights"``
    per_sample_names: tuple[str, ...] = ()
    #: couplings whose pairing keeps ``x_1``'s order (per-sample quantities other than the weights then still
    #: belong to their samples); ``weighted_ot`` resamples ``x_1``
    couplings: tuple[str, ...] | None = None

    def __init__(self, config: Mapping[str, Any]):
        self.config = config

    def per_sample(self, rewards: torch.Tensor, weights: torch.Tensor, group: int | None) -> dict[str, torch.Tensor]:
        """``{name: [B]}`` quantities that travel with the samples; ``"weights"`` first (the coupling moves it).

        Args:
            rewards: ``[B]`` checked rewards. weights: ``[B]`` their loss weights (ones when not
            :attr:`uses_reward_weights`). group: samples per prompt (``None``: no prompt groups).
        """
        return {"weights": weights}

    def loss(self, ctx: LossContext, x_0: torch.Tensor, x_1: torch.Tensor, per_sample: Mapping[str, torch.Tensor],
             cond: tuple = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The differentiable 0-dim loss on a coupled batch, and detached 0-dim metrics: at least ``fm_loss``,
        ``w2_loss`` and ``total_loss``."""
        raise NotImplementedError

    def last_policy_decay(self, global_step: int) -> float:
        """The last policy becomes ``decay * last + (1 - decay) * policy`` after each epoch (0: a copy)."""
        return 0.0

    def make_samples(self, engine, noise: torch.Tensor, prompts: list[str] | None):
        """A batch's samples: ``(samples, rewards, reward_terms, prompts, cond)``.

        Online (the default): ``noise`` integrated by the last policy for ``prompts``, then scored.
        ``engine`` is the trainer (its ``_encode``, ``_sample_last_policy`` and ``_score``).
        """
        cond = engine._encode(prompts)
        samples = engine._sample_last_policy(noise, cond)
        with phase("reward", engine.device):
            rewards, terms = engine._score(samples, prompts)
        return samples, rewards, terms, prompts, cond

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective (exact resume)."""
        return {}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        pass
