"""Offline reward-weighted regression: the ORW-CFM-W2 paper's offline baseline.

The training set is drawn once from the pretrained model (config ``offline_samples``; None: 8 batches,
rounded up to whole batches), scored once, and never refreshed. Each step trains on ``batch_size`` of its
samples (whole prompt groups, drawn without replacement within the batch from the trainer's CPU generator)
with the ORW-CFM-W2 loss: flow matching weighted by ``exp(temperature * r)`` (normalised within the drawn
batch as config ``weight_normalization`` says) plus ``alpha`` W2 to the reference (``w2_coefficient: 0``
gives plain RWR). Against ``orw-cfm-w2`` this isolates what online sampling buys (the paper's
online-offline gap).

The last policy is never refreshed: it stays the pretrained model, the sampler of the set. The set is not
stored in checkpoints: a resumed run draws it again from the same seed (bit-identical on the CPU; the
checkpoint keeps the set's rewards and a resume warns if the redraw differs).
"""

from __future__ import annotations

import warnings

import torch

from orwcfm_fast.objectives.orw_cfm_w2 import OrwCfmW2
from orwcfm_fast.prompts import draw_prompts

__all__ = ["OfflineRwr"]

#: offsets of the set's own generators from the run's seed (independent of the training draws)
_NOISE_SEED, _PROMPT_SEED = 7_777_777, 7_777_778


class OfflineRwr(OrwCfmW2):
    name = "offline-rwr"
    online = False

    def __init__(self, config):
        super().__init__(config)
        self.samples: torch.Tensor | None = None  # [N, *S] the fixed set
        self.rewards: torch.Tensor | None = None  # [N]
        self.terms: dict[str, torch.Tensor] = {}  # reward dict terms, [N] each
        self.prompts: list[str] | None = None  # N prompts (None: unconditional)
        self._expected_rewards: torch.Tensor | None = None  # from a checkpoint

    def size(self, batch_size: int) -> int:
        n = self.config["offline_samples"] or 8 * batch_size
        return -(-n // batch_size) * batch_size

    @torch.no_grad()
    def build(self, engine) -> None:
        """Draw and score the set with the last policy (the pretrained model), in batches of ``batch_size``."""
        batch = engine.batch_size
        noise_gen = torch.Generator(device=engine.device).manual_seed(engine.seed + _NOISE_SEED)
        prompt_gen = torch.Generator().manual_seed(engine.seed + _PROMPT_SEED)
        parts, rewards, terms, prompts = [], [], {}, []
        # a resume draws the checkpoint's set again: the run that drew it first counted its passes
        counts = engine.compute.state() if self._expected_rewards is not None else None
        for _ in range(self.size(batch) // batch):
            batch_prompts = None
            if engine.prompts is not None:
                batch_prompts = draw_prompts(engine.prompts, batch, self.config["images_per_prompt"], prompt_gen)
                prompts.extend(batch_prompts)
            noise = torch.randn((batch, *engine.sample_shape), generator=noise_gen, device=engine.device)
            samples = engine._sample_last_policy(noise, engine._encode(batch_prompts))
            r, t = engine._score(samples, batch_prompts)
            parts.append(samples)
            rewards.append(r)
            for name, values in t.items():
                terms.setdefault(name, []).append(values)
        self.samples = torch.cat(parts)
        self.rewards = torch.cat(rewards)
        self.terms = {name: torch.cat(values) for name, values in terms.items()}
        self.prompts = prompts if engine.prompts is not None else None
        if counts is not None:
            engine.compute.load_state(counts)
        if self._expected_rewards is not None and not torch.equal(self._expected_rewards.to(self.rewards.device),
                                                                  self.rewards):
            warnings.warn("offline-rwr: the training set drawn again on resume differs from the checkpoint's "
                          "(non-deterministic sampling or a changed model/reward): training continues on the new draw",
                          stacklevel=2)

    def make_samples(self, engine, noise, prompts):
        if self.samples is None:
            self.build(engine)
        group = self.config["images_per_prompt"] if self.prompts is not None else 1
        groups = self.samples.shape[0] // group
        chosen = torch.randperm(groups, generator=engine.cpu_generator)[: engine.batch_size // group]
        rows = (chosen[:, None] * group + torch.arange(group)).reshape(-1)
        device_rows = rows.to(self.samples.device)
        batch_prompts = [self.prompts[i] for i in rows.tolist()] if self.prompts is not None else None
        terms = {name: values[device_rows] for name, values in self.terms.items()}
        return (self.samples[device_rows], self.rewards[device_rows], terms, batch_prompts,
                engine._encode(batch_prompts))

    def state(self):
        return {"rewards": self.rewards.cpu() if self.rewards is not None else None}

    def load_state(self, state):
        self.samples = self.rewards = self.prompts = None
        self.terms = {}
        self._expected_rewards = (state or {}).get("rewards")
