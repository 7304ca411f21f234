"""Wan 2.1 / 2.2 text-to-video (diffusers ``WanPipeline``) as a library flow.

Wan is a rectified flow over video latents. What its pipeline's ``__call__`` computes, and where it sits in the
contract (:class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`):

- **samples** are the transformer's native latents ``[C, F', h, w]`` (``C`` = the VAE's ``z_dim``: 16 for Wan 2.1,
  48 for Wan 2.2 TI2V-5B), ``F' = (F - 1) / 4 + 1`` latent frames for ``F`` video frames (config ``num_frames``,
  default the pipeline's 81; the VAE keeps the first frame and compresses the rest 4x in time, so ``F`` must be
  ``4k + 1``: the pipeline rounds other values, the flow refuses them rather than change the user's value),
  ``h, w`` the resolution over the VAE's spatial factor (8, or 16 for Wan 2.2's VAE). Height and width must be
  multiples of 16 and of that factor times the transformer's ``(1, 2, 2)`` patch; the default resolution is the
  pipeline's 480 x 832.
- **conditioning** is one tensor, ``prompt_embeds [B, max_sequence_length, D]`` from the UMT5 encoder, computed by
  the pipeline's own ``encode_prompt``: prompts cleaned (ftfy, HTML entities, whitespace), tokenized to
  ``max_sequence_length`` (config ``max_sequence_length``; the pipeline's default is 512), encoded with the
  attention mask, cut to each prompt's tokens and zero-padded back to ``max_sequence_length``. The transformer
  gets no text mask (the pipeline passes none): the zero rows are part of what it sees, so every row of a batch
  has the same length and nothing is re-padded.
- **time**: the transformer takes ``timestep = 1000 sigma`` (float, one per sample). Wan 2.2 TI2V-5B
  (``expand_timesteps``) takes one timestep per latent token, ``[B, F' ceil(h/2) ceil(w/2)]``, built as the pipeline
  builds it (a mask of ones, every second row and column of each latent frame, times the timestep): for
  text-to-video all of a sample's tokens share its timestep, and the flow passes that same 2-D tensor.
- **guidance** is true classifier-free guidance in two forwards (conditional, unconditional;
  ``cfg_batched = False``), combined ``v_u + g (v_c - v_u)`` without rescaling; the negative prompt is encoded
  like any prompt (the pipeline's default negative prompt is ``""``, as the library's). ``guidance_scale: None``
  gives the pipeline's default, 5.0. The pipeline guides only when ``g > 1``; the flow follows the library's
  meaning (1 = off, any other value guides), so only a scale below 1 differs.
- **time grid**: the scheduler's own sigmas, terminal 0 included, for the two schedulers Wan is shipped or used
  with: ``FlowMatchEulerDiscreteScheduler`` (the library's Euler sampler then *is* the pipeline's loop) and
  ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` and ``flow_prediction`` (the released checkpoints':
  ``flow_shift`` 3 for 480p, 5 for 720p; its first sigma is ``1 - 1e-6``). With UniPC the library integrates with
  its own solvers (euler, heun, ...) on the same sigmas, so its samples differ from the pipeline's by the two
  solvers' discretisation errors (UniPC is a multistep predictor-corrector); UniPC also hands the transformer
  integer timesteps (``int64(1000 sigma)``, rounded down) where the flow passes ``1000 sigma`` unrounded, as the
  pipeline does with ``FlowMatchEulerDiscreteScheduler``. ``time_shift`` and ``time_sampling: "shifted"`` use
  UniPC's ``flow_shift`` (or the Euler scheduler's ``shift``).
- **decoding**: ``AutoencoderKLWan`` latents are normalised per channel with the VAE's ``latents_mean`` /
  ``latents_std``: ``decode`` maps ``z / (1 / std) + mean`` (the pipeline's arithmetic) through the VAE to videos
  ``[B, 3, F, H, W]`` in ``[0, 1]``; ``encode_images`` takes such videos back to the flow's latents (posterior
  mode, ``(z - mean) * (1 / std)``, as Wan's image-to-video pipeline encodes its condition).

Not supported, refused in ``WanFlow.__init__`` with a ``ValueError``: Wan 2.2's two-expert models (A14B:
``transformer`` for high noise, ``transformer_2`` for low noise, switching at ``boundary_ratio``). This library
trains one transformer; training one expert would train a model that is not the one that samples. Wan 2.1 and
Wan 2.2 TI2V-5B have one transformer and work. Schedulers other than the two above are refused as well.

:func:`tiny_wan_pipeline` builds a random-init ``WanPipeline`` of the real architecture at toy size.
"""

from __future__ import annotations

import math

import torch

from orwcfm_fast.flows.conventions import latent_statistics, model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype

__all__ = ["DEFAULT_NUM_FRAMES", "DEFAULT_RESOLUTION", "WanFlow", "tiny_wan_pipeline"]

DEFAULT_NUM_FRAMES = 81
"""Frames per video of config ``num_frames: None``: ``WanPipeline.__call__``'s default."""

DEFAULT_RESOLUTION = (480, 832)
"""``(height, width)`` of config ``resolution: None``: ``WanPipeline.__call__``'s defaults."""

_PIPELINE_SIZE_MULTIPLE = 16
"""``WanPipeline.check_inputs`` refuses a height or width that is not a multiple of 16."""


def _scheduler_kind(scheduler) -> str:
    """``"euler"`` or ``"unipc"`` (by class name, through the MRO), else ``ValueError`` naming what works."""
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if "FlowMatchEulerDiscreteScheduler" in names:
        return "euler"
    if "UniPCMultistepScheduler" in names:
        config = scheduler.config
        if config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction":
            return "unipc"
        raise ValueError(
            f"WanPipeline's UniPCMultistepScheduler must be a flow scheduler (use_flow_sigmas=True, "
            f"prediction_type='flow_prediction', as the released Wan checkpoints ship it); this one has "
            f"use_flow_sigmas={config.get('use_flow_sigmas')!r}, prediction_type={config.get('prediction_type')!r}"
        )
    raise ValueError(
        f"WanPipeline with a {type(scheduler).__name__}: the library reads the time grid of "
        "FlowMatchEulerDiscreteScheduler or of a flow UniPCMultistepScheduler (use_flow_sigmas, flow_prediction); "
        "set pipe.scheduler to one of them"
    )


def _refuse_unsupported_experts(pipe) -> None:
    """``ValueError`` for a Wan 2.2 two-expert pipeline (or one without its first transformer)."""
    name = type(pipe).__name__
    boundary = pipe.config.get("boundary_ratio", None)
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            f"{name} has two experts, transformer and transformer_2, switching at boundary_ratio {boundary} "
            "(transformer denoises the high-noise steps, transformer_2 the low-noise ones; Wan 2.2 A14B): this library "
            "fine-tunes one transformer, and training only one of the two would train a model that is not the one "
            "that samples. Use Wan 2.1 text-to-video (one transformer) or Wan 2.2 TI2V-5B (one transformer) instead"
        )
    if boundary is not None:
        raise ValueError(
            f"{name} has boundary_ratio {boundary} but no transformer_2: its own sampling would switch to a missing "
            "low-noise expert. A one-transformer Wan model (Wan 2.1, Wan 2.2 TI2V-5B) has boundary_ratio None"
        )
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{name} has no transformer (only transformer_2): the library fine-tunes pipe.transformer")


class WanFlow(PipelineFlow):
    """A text-to-video ``WanPipeline`` (Wan 2.1, Wan 2.2 TI2V-5B) behind the library's velocity contract.

    Args:
        pipe: the ``WanPipeline``; one transformer only (see the module docs).
        **kwargs: :class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`'s; ``num_frames`` (``None``: 81) must be
            ``4k + 1``.

    Raises:
        ValueError: a two-expert pipeline, ``num_frames`` not ``4k + 1`` (naming config key ``'num_frames'``), a
            resolution that is not a multiple of the pipeline's (naming ``'resolution'``), an unsupported scheduler.
    """

    family = "wan"
    timestep_scale = 1000.0  # Wan takes timestep = sigma * num_train_timesteps
    video = True
    cfg_batched = False  # the pipeline runs the conditional and unconditional forwards one after the other

    def __init__(self, pipe, **kwargs):
        _refuse_unsupported_experts(pipe)
        _scheduler_kind(pipe.scheduler)
        super().__init__(pipe, **kwargs)
        #: video frames per latent frame after the first (the VAE's temporal compression)
        self.temporal_factor = int(pipe.vae_scale_factor_temporal)
        frames = DEFAULT_NUM_FRAMES if self.num_frames is None else self.num_frames
        if frames < 1 or (frames - 1) % self.temporal_factor:
            f = self.temporal_factor
            below = max(1, (frames - 1) // f * f + 1)
            raise ValueError(
                f"config key 'num_frames' is {frames}, but Wan makes videos of {f}k + 1 frames (its VAE keeps the "
                f"first frame and compresses the others {f}x in time): use {below} or {below + f}. WanPipeline would "
                "round the value; the library does not change it silently"
            )
        self.frames = frames
        #: latent frames per video: ``(frames - 1) / temporal_factor + 1``
        self.latent_frames = (frames - 1) // self.temporal_factor + 1
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))

    # ------------------------------------------------------------------ layout

    @property
    def sample_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, self.latent_frames, self.height // f, self.width // f)

    def _vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def default_resolution(self) -> list[int]:
        return list(DEFAULT_RESOLUTION)

    def resolution_multiple(self) -> int:
        _, p_h, p_w = self.transformer.config.patch_size
        return math.lcm(_PIPELINE_SIZE_MULTIPLE, self.vae_scale_factor * p_h, self.vae_scale_factor * p_w)

    def image_tokens(self) -> int:
        """Latent tokens of one video at the configured size: the transformer's sequence length."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        _, frames, h, w = self.sample_shape
        return (frames // p_t) * (h // p_h) * (w // p_w)

    def _timestep_tokens(self) -> int:
        """Length of the per-token timestep of ``expand_timesteps``: the pipeline's ``mask[0][0][:, ::2, ::2]``."""
        _, frames, h, w = self.sample_shape
        return frames * len(range(0, h, 2)) * len(range(0, w, 2))

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F', h, w]``: the samples are the VAE's normalised latents as they are."""
        return x

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z

    # ------------------------------------------------------------------ transformer and prompts

    def default_guidance_scale(self) -> float:
        """``WanPipeline.__call__``'s default classifier-free guidance, 5.0."""
        return 5.0

    def _transformer_call(self, t, x, cond, transformer):
        (prompt_embeds,) = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        # float32, as the pipeline passes the scheduler's timesteps (bf16 would round 1000 sigma to steps of 4)
        timestep = model_timestep(t, self.timestep_scale).float()
        if self.expand_timesteps:  # Wan 2.2 TI2V-5B: one timestep per latent token, [B, seq_len]
            timestep = timestep[:, None].expand(-1, self._timestep_tokens())
        return transformer(
            hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=prompt_embeds.to(dtype),
            return_dict=False,
        )[0]

    def _encode_prompts(self, prompts):
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self._text_encoder_device(),
        )
        return (embeds,)

    # ------------------------------------------------------------------ time grid

    def _scheduler_grid(self, steps):
        # both schedulers: set_timesteps(steps) on a copy, as WanPipeline calls it (no sigmas, no mu)
        _scheduler_kind(self.scheduler)
        return scheduler_time_grid(self.scheduler, steps)

    def sampling_shift(self, steps: int | None = None) -> float:
        """Config ``time_shift``, else UniPC's ``flow_shift`` or the Euler scheduler's ``shift`` (``steps``: unused)."""
        if self.time_shift is None and _scheduler_kind(self.scheduler) == "unipc":
            return float(self.scheduler.config.flow_shift)
        return super().sampling_shift(steps)

    # ------------------------------------------------------------------ videos

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Videos ``[B, 3, F, H, W]`` float32 in [0, 1] of latents ``x`` ``[B, C, F', h, w]``, in chunks of ``batch_size``."""
        z = self.to_vae_latents(x).to(self.vae.dtype)
        mean, inv_std = latent_statistics(self.vae.config, z.device, z.dtype)
        return self._vae_decode(z / inv_std + mean, batch_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F', h, w]`` of videos ``[B, 3, F, H, W]`` in [0, 1] (``F = 4k + 1``): the posterior mode, normalised."""
        if images.dim() != 5 or images.shape[1] != 3:
            raise ValueError(f"Wan encodes videos [B, 3, F, H, W]; got a tensor of shape {tuple(images.shape)}")
        if (images.shape[2] - 1) % self.temporal_factor:
            raise ValueError(f"videos of {images.shape[2]} frames: Wan's VAE encodes {self.temporal_factor}k + 1 frames")
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = latent_statistics(self.vae.config, z.device, z.dtype)
        return self.from_vae_latents((z - mean) * inv_std)


# ---------------------------------------------------------------------------------------------- tiny pipeline


def tiny_wan_pipeline(*, seed: int = 0, two_experts: bool = False, expand_timesteps: bool = False,
                      wan22_vae: bool | None = None, unipc: bool = False, boundary_ratio: float = 0.875):
    """A random-init ``WanPipeline`` of Wan's architecture at toy size (float32, CPU, built in milliseconds).

    The released models' component classes: ``UMT5EncoderModel`` (2 layers, d_model 32) with a T5 tokenizer whose
    vocabulary is built in memory, ``WanTransformer3DModel`` (2 layers, 2 heads of 12, patch ``(1, 2, 2)``),
    ``AutoencoderKLWan`` (channels 8, one residual block per level; 8x spatial and 4x temporal compression).

    Args:
        seed: seed of every module's initialisation (same seed, same weights).
        two_experts: Wan 2.2 A14B style: a second transformer ``transformer_2`` for the low-noise steps, switching
            at ``boundary_ratio`` (:class:`WanFlow` refuses it).
        expand_timesteps: Wan 2.2 TI2V-5B style per-token timesteps.
        wan22_vae: Wan 2.2's VAE layout (48 latent channels, residual blocks, 2x2 patchified input: 16x spatial
            compression) with a 48-channel transformer; ``None``: as ``expand_timesteps`` (TI2V-5B ships both).
            Its per-channel ``latents_mean`` / ``latents_std`` are seeded stand-ins (the real ones are released
            statistics); Wan 2.1's layout keeps the VAE's default statistics, the released model's.
        unipc: the released checkpoints' scheduler (``UniPCMultistepScheduler``, flow sigmas, ``flow_shift`` 3)
            instead of ``FlowMatchEulerDiscreteScheduler(shift=3)``.
        boundary_ratio: the expert switch of ``two_experts`` (0.875: Wan 2.2 A14B text-to-video's).

    Returns:
        A float32 ``WanPipeline`` on the CPU; at 64 x 64 pixels and 5 frames its latents are ``[16, 2, 8, 8]``
        (``[48, 2, 4, 4]`` with ``wan22_vae``).
    """
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    from orwcfm_fast.flows.tiny import _t5_tokenizer

    if wan22_vae is None:
        wan22_vae = expand_timesteps
    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()
    if wan22_vae:
        z_dim = 48
        stats = torch.Generator().manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
            latents_mean=(0.5 * torch.randn(z_dim, generator=stats)).tolist(),
            latents_std=(0.5 + torch.rand(z_dim, generator=stats)).tolist(),
        ).eval()
    else:
        z_dim = 16
        vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z_dim, out_channels=z_dim,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()

    if unipc:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer(),
        transformer_2=transformer() if two_experts else None, boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=expand_timesteps,
    )
