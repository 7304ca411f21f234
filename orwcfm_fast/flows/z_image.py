"""Z-Image (diffusers ``ZImagePipeline``: Z-Image, Z-Image-Turbo) as a library flow.

Z-Image is a single-stream DiT (``ZImageTransformer2DModel``, "S3-DiT": image tokens and caption tokens
refined apart, then one joint stack) conditioned on the second-to-last hidden states of a Qwen3 language
model, with FLUX.1's 16-channel ``AutoencoderKL``. How it maps onto the contract:

- **Samples** are the VAE latents ``[16, H/8, W/8]``; the transformer takes a *list* of per-sample
  ``[16, 1, H/8, W/8]`` tensors (a frame axis of one) and returns the same; it patchifies 2x2 itself.
- **Prompts** are wrapped in the tokenizer's chat template (one user turn, generation prompt,
  ``enable_thinking=True``), tokenized to ``max_sequence_length`` and encoded; the pipeline keeps only the
  real (unmasked) tokens, so each prompt has its own length. The conditioning is ``(prompt_embeds [B, L, D],
  prompt_mask [B, L])``: the rows zero-padded at the end to the batch's longest, the mask (int64, 1 = token)
  saying how long each is. The transformer is handed ``prompt_embeds[i][mask[i]]`` per sample, exactly the
  list the pipeline hands it (it pads captions itself, to multiples of 32 with a learned pad token).
- **Time**: the pipeline feeds the transformer ``(1000 - 1000 sigma) / 1000 = 1 - sigma``, which is the
  library's ``t`` itself (0 = noise; computed in the pipeline's order of operations, since the transformer
  multiplies it by 1000 again), and negates its output before the scheduler step: the transformer
  predicts ``data - noise``, the library's velocity, directly. :meth:`ZImageFlow._transformer_call` returns
  diffusers' ``noise - data`` (the negated output) as the contract asks, so
  :meth:`~orwcfm_fast.flows.diffusers_base.PipelineFlow.transformer_velocity` gives the output back unchanged.
- **Guidance** is true CFG in one ``2B`` forward, as the pipeline runs it. The pipeline writes it
  ``v_c + g_z (v_c - v_u)`` (``g_z = 0``: off, its default 5.0); the library's ``guidance_scale`` ``s`` is
  the usual ``v_u + s (v_c - v_u)`` (1 = off, as for SD3), so ``s = g_z + 1``; config ``guidance_scale: None``
  is 1 (off: Z-Image-Turbo is guidance-distilled and samples with ``g_z = 0``). The pipeline's
  ``cfg_normalization`` (clip each guided sample's norm to that many times the conditional's) and
  ``cfg_truncation`` (no guidance once ``t`` exceeds it) are this flow's keyword arguments, default off as in
  the pipeline.
- **Time grid**: the pipeline's sigmas ``linspace(1, 1/steps, steps)`` through the scheduler, with the
  resolution-dependent ``mu`` it always passes (used only by a scheduler with ``use_dynamic_shifting``; the
  released models' scheduler has a static shift 3).
- **VAE**: ``z = (encode(img) - shift_factor) * scaling_factor``, the base class's :meth:`decode` /
  :meth:`encode_images`.

:func:`tiny_z_image_pipeline` builds a random-init ``ZImagePipeline`` of this architecture at toy size.
"""

from __future__ import annotations

import torch

from orwcfm_fast.flows.conventions import model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype
from orwcfm_fast.flows.tiny import QWEN3_CHAT_TEMPLATE  # the tiny tokenizer's chat template

__all__ = ["ZImageFlow", "tiny_z_image_pipeline"]


class ZImageFlow(PipelineFlow):
    """A ``ZImagePipeline`` behind the library's velocity contract (see the module docs).

    Args:
        pipe: the ``ZImagePipeline``.
        cfg_normalization: the pipeline's option of that name: with guidance, each guided sample's norm is
            clipped to ``cfg_normalization`` times its conditional velocity's (0 / False: off, the default).
        cfg_truncation: the pipeline's option of that name: samples at times ``t > cfg_truncation`` get the
            conditional velocity, unguided (default 1.0: guidance everywhere). Costs one more conditional
            forward per guided velocity while it is below 1.
        **kwargs: :class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`'s.
    """

    family = "z_image"
    #: the scheduler's timestep is 1000 sigma; the transformer is given (1000 - timestep) / 1000 (see _transformer_call)
    timestep_scale = 1000.0

    def __init__(self, pipe, *, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, **kwargs):
        super().__init__(pipe, **kwargs)
        self.cfg_normalization = float(cfg_normalization or 0.0)
        self.cfg_truncation = float(cfg_truncation)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, self.height // f, self.width // f)

    def default_resolution(self) -> int:
        return 1024  # the pipeline's default height and width

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self._patch_size()

    def _patch_size(self) -> int:
        return int(self.transformer.config.all_patch_size[0])  # the pipeline calls with the default, 2

    def default_lora_targets(self) -> tuple[str, ...]:
        """The attention projections of every block (noise / context refiners and the main stack)."""
        return ("to_q", "to_k", "to_v", "to_out.0")

    # ------------------------------------------------------------------ the transformer

    def _transformer_call(self, t, x, cond, transformer):
        prompt_embeds, prompt_mask = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        # the pipeline's per-prompt rows: each row's tokens, its padding (at the end, see pad_rows) cut off; one
        # host sync for the lengths, which the transformer's list input needs as Python ints
        lengths = prompt_mask.sum(1).tolist()
        captions = [row[:n].to(dtype) for row, n in zip(prompt_embeds, lengths)]
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # [C, 1, h, w] each: one frame
        # the pipeline's (1000 - timestep) / 1000 of the scheduler's timestep 1000 sigma, in float32 and in its
        # order of operations: equal to t, but the transformer multiplies it by 1000 again, so a rounding apart
        # (1 - (1 - t) instead) moves its velocity by ~1e-5
        scale = self.timestep_scale
        timestep = (scale - model_timestep(t.float(), scale)) / scale
        out = transformer(latents, timestep, captions, patch_size=self._patch_size(), return_dict=False)[0]
        # the transformer predicts data - noise; diffusers' convention (the pipeline's noise_pred) is its negation
        return -torch.stack(out).squeeze(2)

    # ------------------------------------------------------------------ guidance

    def _combine_guidance(self, v_uncond, v_cond):
        """``v_u + s (v_c - v_u)``, the pipeline's ``v_c + (s - 1)(v_c - v_u)``; with ``cfg_normalization``
        each sample's result is scaled down to at most ``cfg_normalization * |v_c|`` (norms over the sample)."""
        guided = super()._combine_guidance(v_uncond, v_cond)
        if self.cfg_normalization > 0.0:
            dims = tuple(range(1, guided.dim()))
            ceiling = torch.linalg.vector_norm(v_cond.float(), dim=dims) * self.cfg_normalization
            norm = torch.linalg.vector_norm(guided.float(), dim=dims)
            scale = torch.where(norm > ceiling, ceiling / norm, torch.ones_like(norm))
            guided = guided * scale.view(-1, *(1,) * len(dims)).to(guided.dtype)
        return guided

    def velocity(self, t, x, cond, transformer=None):
        """The base class's sampling velocity; with ``cfg_truncation < 1`` the samples past it are unguided."""
        v = super().velocity(t, x, cond, transformer)
        if self._guided() and self.cfg_truncation < 1.0:
            late = (t.float() > self.cfg_truncation).view(-1, *(1,) * (x.dim() - 1))
            v = torch.where(late, self.transformer_velocity(t, x, cond, transformer), v)
        return v

    # ------------------------------------------------------------------ prompts

    def _encode_prompts(self, prompts):
        """``(embeds [n, L, D], mask [n, L])``: the pipeline's per-prompt rows, zero-padded to the longest (L)."""
        # a copy of the list: the pipeline writes the chat-templated prompts into the one it is given
        rows, _ = self.pipe.encode_prompt(list(prompts), device=self._text_encoder_device(),
                                          do_classifier_free_guidance=False,
                                          max_sequence_length=self.max_sequence_length)
        longest = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros((len(rows), longest, rows[0].shape[-1]))
        mask = torch.zeros((len(rows), longest), dtype=torch.int64, device=rows[0].device)
        for i, r in enumerate(rows):
            embeds[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
        return embeds, mask

    # ------------------------------------------------------------------ time grid and latents

    def image_tokens(self) -> int:
        """Latent tokens of one image, as the pipeline counts them for ``mu``: ``(h // 2) (w // 2)``."""
        return (self.height // self.vae_scale_factor // 2) * (self.width // self.vae_scale_factor // 2)

    def _pipeline_mu(self) -> float:
        """The ``mu`` the pipeline computes from the image's token count (and passes whatever the scheduler)."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        c = self.scheduler.config
        return calculate_shift(self.image_tokens(), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def dynamic_shift_mu(self):
        """The pipeline's ``mu`` where the scheduler uses it (``use_dynamic_shifting``); else None (static shift)."""
        return self._pipeline_mu() if self.scheduler.config.get("use_dynamic_shifting", False) else None

    def _scheduler_grid(self, steps):
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        return scheduler_time_grid(self.scheduler, steps, sigmas=get_default_z_image_sigmas(steps),
                                   mu=self._pipeline_mu())

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ---------------------------------------------------------------------------------------------- tiny pipeline

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_MERGED_WORDS = ("user", "assistant")  # the template's role names are one token each, as in Qwen's vocabulary


def _qwen_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen3's class) with its special tokens and chat template, in memory."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for word in _MERGED_WORDS:
        merged = word[0]
        for ch in word[1:]:
            merges.append((merged, ch))
            merged += ch
            vocab.setdefault(merged, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in _SPECIAL_TOKENS[1:]])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_z_image_pipeline(*, seed: int = 0, shift: float = 3.0, use_dynamic_shifting: bool = False):
    """A random-init ``ZImagePipeline`` of Z-Image's architecture at toy size.

    A ``ZImageTransformer2DModel`` (dim 32, 2 heads of 16, one noise / context refiner block each, two main
    blocks, patch 2; its caption and image pad tokens drawn at random, as trained ones are not zero), a
    2-layer ``Qwen3Model`` text encoder (hidden 16 = the transformer's ``cap_feat_dim``) with an in-memory
    ``Qwen2Tokenizer``, FLUX.1's 16-channel ``AutoencoderKL`` normalisation (``shift_factor`` 0.1159,
    ``scaling_factor`` 0.3611; 8x downsampling) and a ``FlowMatchEulerDiscreteScheduler``.

    Args:
        seed: seed of every module's initialisation (same seed, same weights).
        shift: the scheduler's static shift (3.0 as in the released Z-Image / Z-Image-Turbo).
        use_dynamic_shifting: give the scheduler resolution-dependent shifting instead (the pipeline's ``mu``).

    Returns:
        A float32 pipeline on the CPU; images of :data:`~orwcfm_fast.flows.tiny.TINY_SIZE` pixels (16x8x8 latents).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from orwcfm_fast.flows.tiny import _vae

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    ).eval()
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = _vae(0.1159, 0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                                use_dynamic_shifting=use_dynamic_shifting)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
