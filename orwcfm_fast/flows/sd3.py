"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline``) as a library flow.

Latents ``[16, H/8, W/8]`` (the transformer's native layout); conditioning
``(prompt_embeds [B, 77 + max_sequence_length, D], pooled_projections [B, P])`` from the
pipeline's three text encoders; the transformer takes ``timestep = 1000 * sigma``; CFG runs
the negative and positive halves as one batch, as the pipeline does.
"""

from __future__ import annotations

import torch

from orwcfm_fast.flows.conventions import model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype

__all__ = ["SD3Flow"]


class SD3Flow(PipelineFlow):
    """A ``StableDiffusion3Pipeline`` (SD3, SD3.5) behind the library's velocity contract."""

    family = "sd3"
    timestep_scale = 1000.0  # SD3 takes timestep = sigma * num_train_timesteps

    @property
    def sample_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, self.height // f, self.width // f)

    def default_resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    def _transformer_call(self, t, x, cond, transformer):
        prompt_embeds, pooled = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        return transformer(
            # the timestep stays float32, as the pipeline passes it (bf16 would round 1000 sigma to steps of 4)
            hidden_states=x.to(dtype), timestep=model_timestep(t, self.timestep_scale).float(),
            encoder_hidden_states=prompt_embeds.to(dtype), pooled_projections=pooled.to(dtype), return_dict=False,
        )[0]

    def _encode_prompts(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self._text_encoder_device(),
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def dynamic_shift_mu(self):
        if not self.scheduler.config.get("use_dynamic_shifting", None):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c = self.scheduler.config
        return calculate_shift(self.image_tokens(), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def _scheduler_grid(self, steps):
        return scheduler_time_grid(self.scheduler, steps, mu=self.dynamic_shift_mu())

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z
