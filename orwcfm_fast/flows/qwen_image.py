"""Qwen-Image (diffusers ``QwenImagePipeline``) as a library flow.

Qwen-Image is a 20 B double-stream MMDiT (``QwenImageTransformer2DModel``) conditioned on the last hidden
states of a Qwen2.5-VL language model, with a causal-3D VAE (``AutoencoderKLQwenImage``, Wan's design:
16 channels, 8x spatial downsampling, images as one-frame videos). How it maps onto the contract:

- **Samples** are *packed* latents ``[(H/16) (W/16), 64]``: tokens of 2x2 patches of the 16-channel VAE
  latent (the pipeline's ``_pack_latents``), the layout the transformer takes and returns. Its RoPE reads
  the patch grid from ``img_shapes``: ``[(1, H/16, W/16)]`` per sample, as the pipeline passes it.
- **Prompts** go through the pipeline's own ``encode_prompt``: each is put in its chat template (a system
  turn asking to describe the image, the prompt as the user turn, the assistant turn opened), encoded by
  the language model, its padding removed and its first ``prompt_template_encode_start_idx`` (34) tokens
  (the system turn and ``<|im_start|>user\\n``) dropped, then cut to ``max_sequence_length`` (at most
  1024, the pipeline's limit). Prompts therefore have different lengths: the conditioning is
  ``(prompt_embeds [B, L, D], prompt_mask [B, L])``, rows zero-padded at the end to the longest of the
  batch (or of the text-encoder chunk they were encoded in) and the mask (int64, 1 = token) handed to the
  transformer, which masks the padding out of its joint attention. The pipeline passes no mask when no
  row of its batch is padded; the flow always passes one (all ones is the same attention, and deciding
  would read the mask on the host on every forward, which a CUDA graph cannot do).
- **Time**: the pipeline passes ``timestep / 1000 = sigma`` (``timestep_scale = 1``); the transformer
  predicts ``noise - data`` (diffusers' convention, mapped in :mod:`~orwcfm_fast.flows.conventions`).
- **Guidance** is the pipeline's *true CFG*: config ``guidance_scale`` is its ``true_cfg_scale`` ``s``,
  two separate forwards (conditional, then the negative prompt; ``cfg_batched = False``: the two prompts'
  lengths differ and the pipeline never batches them), combined as ``v_u + s (v_c - v_u)`` and then
  rescaled, per token, to the conditional velocity's norm over the 64 packed channels
  (:meth:`QwenImageFlow._combine_guidance`; the norm is sign-blind, so it commutes with the library's sign).
  The pipeline guides only when ``true_cfg_scale > 1`` *and* a negative prompt is given (``None``: no
  guidance, whatever the scale; an empty string ``""`` is a negative prompt: its template around nothing).
  Here, as for SD3, ``guidance_scale != 1`` guides and ``1`` is off; the negative prompt is config
  ``negative_prompt`` (default ``""``: what the pipeline does with an empty negative prompt), and ``None``
  is taken as ``""`` rather than silently switching guidance off. A ``guidance_scale`` below 1 guides
  (towards the negative prompt), where the pipeline would ignore it. Config ``guidance_scale: None`` is 1
  (off): true CFG doubles every forward, and the pipeline itself only guides when given a negative prompt.
- **Time grid**: the pipeline's sigmas ``linspace(1, 1/steps, steps)`` through its scheduler with the
  resolution-dependent ``mu`` it always computes (``calculate_shift`` of the image token count with the
  scheduler's ``base/max_image_seq_len``, ``base/max_shift``); the released scheduler shifts dynamically
  and stretches the last sigma to ``shift_terminal`` 0.02.
- **VAE**: latents are normalised per channel, ``z = (encode(img) - latents_mean) / latents_std`` (the
  VAE config's lists, applied as the pipeline does: multiplied by ``1 / std``), and :meth:`decode` undoes it
  before decoding the one-frame video ``[B, 16, 1, h, w]``.

A transformer with ``guidance_embeds`` (a guidance-distilled variant) is refused: diffusers' forward cannot
take the guidance input it would need (``QwenTimestepProjEmbeddings`` has no guidance embedder), so its
pipeline cannot sample it either.

``QwenImage21Pipeline`` (Qwen-Image 2.1) is not this flow's: another transformer
(``QwenImage21Transformer2DModel``, single-stream and block-causal, with a KV cache and an image mask),
VAE (``AutoencoderKLQwenImage21``, 16x, 64 channels, unpacked latents, ``z * std + mean``), text encoder
(Qwen3-VL through a processor, left padding, a derived drop index) and guidance (no norm rescaling).

:func:`tiny_qwen_image_pipeline` builds a random-init ``QwenImagePipeline`` of this architecture at toy size.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from orwcfm_fast.flows.conventions import cfg_combine, latent_statistics, model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype

__all__ = ["QWEN_IMAGE_SCHEDULER", "QwenImageFlow", "tiny_qwen_image_pipeline"]

#: the released Qwen-Image's scheduler settings (its ``scheduler_config.json``)
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}

_MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses more (its tokenizer_max_length)


class QwenImageFlow(PipelineFlow):
    """A ``QwenImagePipeline`` behind the library's velocity contract (see the module docs).

    Args:
        pipe: the ``QwenImagePipeline``.
        **kwargs: :class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`'s; ``guidance_scale`` is the
            pipeline's ``true_cfg_scale``, ``negative_prompt`` ``None`` means ``""``.

    Raises:
        NotImplementedError: the transformer has ``guidance_embeds`` (see the module docs).
        ValueError: ``max_sequence_length`` above the pipeline's 1024.
    """

    family = "qwen_image"
    timestep_scale = 1.0  # the pipeline passes timestep / 1000 = sigma
    cfg_batched = False  # two forwards, as the pipeline runs true CFG (the prompts' lengths differ)

    def __init__(self, pipe, **kwargs):
        if kwargs.get("negative_prompt", "") is None:
            kwargs["negative_prompt"] = ""
        super().__init__(pipe, **kwargs)
        if self.transformer.config.get("guidance_embeds", False):
            raise NotImplementedError(
                "QwenImageTransformer2DModel with guidance_embeds=True: diffusers' forward cannot take the guidance "
                "input (QwenTimestepProjEmbeddings has no guidance embedder), so neither QwenImagePipeline nor this "
                "flow can sample it"
            )
        if self.max_sequence_length > _MAX_SEQUENCE_LENGTH:
            raise ValueError(f"config key 'max_sequence_length' is {self.max_sequence_length}, but Qwen-Image takes "
                             f"at most {_MAX_SEQUENCE_LENGTH} prompt tokens")
        h, w = (s // self.vae_scale_factor for s in (self.height, self.width))
        self._latent_hw = (h, w)
        self._img_shape = [(1, h // 2, w // 2)]  # one sample's img_shapes entry: one frame of (h/2) x (w/2) patches

    @property
    def sample_shape(self) -> tuple[int, ...]:
        h, w = self._latent_hw
        return ((h // 2) * (w // 2), self.transformer.config.in_channels)

    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor  # 128 x 8 = 1024, the pipeline's default

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 packing

    # ------------------------------------------------------------------ transformer and prompts

    def _transformer_call(self, t, x, cond, transformer):
        prompt_embeds, prompt_mask = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        return transformer(
            # float32 timestep: the transformer casts it to its own dtype, as it does the pipeline's
            hidden_states=x.to(dtype), timestep=model_timestep(t, self.timestep_scale).float(),
            encoder_hidden_states=prompt_embeds.to(dtype), encoder_hidden_states_mask=prompt_mask,
            img_shapes=self._img_shape * x.shape[0], return_dict=False,
        )[0]

    def _encode_prompts(self, prompts):
        """``(prompt_embeds [n, L, D], prompt_mask [n, L] int64)``, ``L`` the longest of ``prompts`` (capped)."""
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self._text_encoder_device(),
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask; the flow keeps one per row
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    # ------------------------------------------------------------------ guidance and time grid

    def _combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
        """The pipeline's true CFG: ``v_u + s (v_c - v_u)``, rescaled per token to ``|v_c|`` (norm over channels)."""
        combined = cfg_combine(v_uncond, v_cond, self.guidance_scale)
        cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (cond_norm / combined_norm)

    def _pipeline_mu(self) -> float:
        """The ``mu`` the pipeline computes (always) from the image token count and the scheduler's config."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        c = self.scheduler.config
        return calculate_shift(self.sample_shape[0], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def dynamic_shift_mu(self):
        """The pipeline's ``mu`` where the scheduler uses it (``use_dynamic_shifting``), else ``None``."""
        return self._pipeline_mu() if self.scheduler.config.get("use_dynamic_shifting", False) else None

    def _scheduler_grid(self, steps):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return scheduler_time_grid(self.scheduler, steps, sigmas=sigmas, mu=self._pipeline_mu())

    # ------------------------------------------------------------------ VAE

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 16, 1, h, w]``: the VAE's one-frame video latents (normalised, as the transformer sees them)."""
        return self.pipe._unpack_latents(x, self.height, self.width, self.vae_scale_factor)

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Packed samples of VAE latents ``[B, 16, 1, h, w]`` (or ``[B, 16, h, w]``)."""
        b, c, h, w = z.shape[0], z.shape[1], z.shape[-2], z.shape[-1]
        return self.pipe._pack_latents(z, b, c, h, w)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] of samples ``x``, decoded in chunks of ``batch_size``."""
        z = self.to_vae_latents(x).to(self.vae.dtype)
        mean, inv_std = latent_statistics(self.vae.config, z.device, z.dtype)
        z = z / inv_std + mean  # the pipeline's arithmetic, to the rounding
        return self._vae_decode(z, batch_size)[:, :, 0]  # [B, 3, 1, H, W]: one frame

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Samples (packed) of images ``[B, 3, H, W]`` in [0, 1]: the VAE posterior's mode, normalised."""
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)[:, :, None]).latent_dist.mode()
        mean, inv_std = latent_statistics(self.vae.config, z.device, z.dtype)
        return self.from_vae_latents(((z - mean) * inv_std).float())


# ---------------------------------------------------------------------- tiny pipeline

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")


def _tiny_qwen_tokenizer(template: str):
    """A byte-level ``Qwen2Tokenizer`` built in memory: Qwen's special tokens, the 256 byte characters, and each
    word of ``template`` as one token (merge chains), so the template's system turn is as many tokens as in
    Qwen's real vocabulary and ``prompt_template_encode_start_idx`` drops exactly it; prompts' own words are
    mostly single characters."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    text = template
    for token in _SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    for word in dict.fromkeys(re.findall(r" ?[A-Za-z]+", text)):
        (piece, _), = byte_level.pre_tokenize_str(word)  # " word" -> "Ġword"
        prefix = piece[0]
        for ch in piece[1:]:
            if (prefix, ch) not in merges:
                merges.append((prefix, ch))
            prefix += ch
            vocab.setdefault(prefix, len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768,
                          additional_special_tokens=list(_SPECIAL_TOKENS[1:]))


def _tiny_qwen_vl(tokenizer, hidden: int):
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` (text hidden size ``hidden``, 1-layer vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            # multimodal RoPE as in Qwen2.5-VL: its sections (t, h, w) sum to half the head dim (16 / 2)
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
            "patch_size": 2, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 8,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(*, seed: int = 0):
    """A random-init ``QwenImagePipeline`` of Qwen-Image's architecture at toy size.

    The released model's component classes (``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage`` with
    its ``latents_mean`` / ``latents_std``, ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2Tokenizer``,
    ``FlowMatchEulerDiscreteScheduler`` with :data:`QWEN_IMAGE_SCHEDULER`): a 2-layer transformer of 2 heads
    of 16 (about 0.1 M parameters), a VAE of base width 8 (8x downsampling, 16 latent channels), a 2-layer
    language model of width 32 and a tokenizer whose vocabulary is built in memory from the pipeline's own
    prompt template (no file is read or downloaded).

    Args:
        seed: seed of every module's initialisation (same seed, same weights).

    Returns:
        A float32 pipeline on the CPU; at :data:`~orwcfm_fast.flows.tiny.TINY_SIZE` (64) pixels its samples
        are 16 packed tokens of 64 channels.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    # the pipeline sets its prompt template in __init__; a bare instance (no components) has it
    template = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=None).prompt_template_encode
    tokenizer = _tiny_qwen_tokenizer(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_qwen_vl(tokenizer, hidden=32)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6),  # RoPE axes (frame, height, width) sum to the head dim
        ).eval()
        vae = AutoencoderKLQwenImage(  # the class's default latents_mean / latents_std are the released model's
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
