"""Flux (diffusers ``FluxPipeline``) as a library flow.

Latents are kept *packed*, as the transformer takes them: ``[(H/16) (W/16), 64]`` tokens of
2x2 patches of the 16-channel VAE latent. Conditioning ``(prompt_embeds [B, L, D],
pooled_projections [B, P])`` from CLIP (pooled) and T5. The transformer takes
``timestep = sigma`` and, for guidance-distilled models (Flux-dev: ``guidance_embeds``),
``guidance = guidance_scale`` in one forward; there is no two-pass CFG (the pipeline's
``true_cfg_scale`` is not used). The time grid is the scheduler's, with the pipeline's
resolution-dependent dynamic shift ``mu``.
"""

from __future__ import annotations

import numpy as np
import torch

from orwcfm_fast.flows.conventions import model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype

__all__ = ["FluxFlow"]


class FluxFlow(PipelineFlow):
    """A ``FluxPipeline`` behind the library's velocity contract."""

    family = "flux"
    timestep_scale = 1.0  # Flux takes timestep = sigma (the pipeline divides its 1000-scale by 1000)

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        h, w = (s // self.vae_scale_factor for s in (self.height, self.width))
        self._latent_hw = (h, w)
        self._img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, torch.float32)
        self._txt_ids = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        h, w = self._latent_hw
        return ((h // 2) * (w // 2), self.transformer.config.in_channels)

    def default_resolution(self) -> int:
        return 1024

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 packing

    def _guided(self) -> bool:
        return False  # guidance is an input of the distilled transformer, not a second pass

    def _transformer_call(self, t, x, cond, transformer):
        prompt_embeds, pooled = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=x.device, dtype=dtype)
        return transformer(
            # float32 timestep (the pipeline casts it to the latents' dtype; bf16 would round it)
            hidden_states=x.to(dtype), timestep=model_timestep(t, self.timestep_scale).float(), guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=txt_ids,
            img_ids=self._img_ids.to(device=x.device, dtype=dtype), return_dict=False,
        )[0]

    def _encode_prompts(self, prompts):
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self._text_encoder_device(),
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def default_guidance_scale(self) -> float:
        """FluxPipeline's own default guidance (3.5) for guidance-distilled models (Flux-dev), else 1."""
        return 3.5 if self.transformer.config.guidance_embeds else 1.0

    def dynamic_shift_mu(self):
        """Flux's resolution-dependent shift, as FluxPipeline computes it (always, whatever the scheduler's flag)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        return calculate_shift(self.sample_shape[0], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _scheduler_grid(self, steps):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return scheduler_time_grid(self.scheduler, steps, sigmas=sigmas, mu=self.dynamic_shift_mu())

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents(x, self.height, self.width, self.vae_scale_factor)

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)
