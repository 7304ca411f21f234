"""Tiny random-init diffusers pipelines (SD3, SD3.5, Flux) built offline in milliseconds.

Same architectures as the released models, at toy sizes: a transformer of about 0.1 M
parameters, a 4-block ``AutoencoderKL`` (8x downsampling, 16 latent channels, SD3's latent
``shift_factor``/``scaling_factor``) and 2-layer CLIP / T5 text encoders whose tokenizers get
their vocabulary in memory (byte-level characters for CLIP, a small Unigram list for T5). No
file is downloaded. Tests save them with ``save_pretrained`` and load them back through the
real loading path (``from_pretrained``); the benchmarks use them on the CPU.

The newer families' builders live in their family's file (``tiny_qwen_image_pipeline`` in
:mod:`~orwcfm_fast.flows.qwen_image`, ...); :data:`TINY_PIPELINES` names every tiny pipeline and
:func:`build_tiny_pipeline` builds one by name.

Importing this module imports nothing heavy; each builder imports diffusers and transformers
(the ``diffusers`` extra) when called.
"""

from __future__ import annotations

import string

import torch

__all__ = ["QWEN3_CHAT_TEMPLATE", "TINY_PIPELINES", "TINY_SIZE", "build_tiny_pipeline", "tiny_flux_pipeline",
           "tiny_sd3_pipeline"]

TINY_SIZE = 64
"""Image side (pixels) the tiny pipelines are built for: 8x8 latents (a multiple of VAE 8 x patch 2)."""

#: every tiny pipeline by name: ``("module:builder", keyword arguments)``
TINY_PIPELINES: dict[str, tuple[str, dict]] = {
    "sd3": ("orwcfm_fast.flows.tiny:tiny_sd3_pipeline", {}),
    "sd35": ("orwcfm_fast.flows.tiny:tiny_sd3_pipeline", {"sd35": True}),
    "flux": ("orwcfm_fast.flows.tiny:tiny_flux_pipeline", {}),
    "qwen_image": ("orwcfm_fast.flows.qwen_image:tiny_qwen_image_pipeline", {}),
    "flux2": ("orwcfm_fast.flows.flux2:tiny_flux2_pipeline", {}),
    "flux2_klein": ("orwcfm_fast.flows.flux2:tiny_flux2_pipeline", {"klein": True}),
    "z_image": ("orwcfm_fast.flows.z_image:tiny_z_image_pipeline", {}),
    "wan": ("orwcfm_fast.flows.wan:tiny_wan_pipeline", {}),
    "wan22": ("orwcfm_fast.flows.wan:tiny_wan_pipeline", {"two_experts": True}),
}


def build_tiny_pipeline(name: str, **overrides):
    """The tiny pipeline ``name`` of :data:`TINY_PIPELINES` (float32, CPU), its builder's arguments updated by ``overrides``."""
    import importlib

    if name not in TINY_PIPELINES:
        raise ValueError(f"no tiny pipeline {name!r}; there are {', '.join(TINY_PIPELINES)}")
    target, kwargs = TINY_PIPELINES[name]
    module, builder = target.split(":")
    return getattr(importlib.import_module(module), builder)(**{**kwargs, **overrides})


#: Qwen3's chat template for what the FLUX.2-klein and Z-Image pipelines ask of it (user turns, a generation
#: prompt, ``enable_thinking``), for their tiny Qwen3 tokenizers
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_CLIP_MAX = 77
_T5_MAX = 512


def _clip_tokenizer(max_length: int = _CLIP_MAX):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + ch, -2.5) for ch in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX)


def _clip_encoder(tokenizer, hidden: int, projection: int, *, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=TINY_SIZE, shift_factor=shift_factor,
        scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def tiny_sd3_pipeline(*, sd35: bool = False, seed: int = 0, shift: float = 3.0):
    """A random-init ``StableDiffusion3Pipeline`` of SD3's (or, with ``sd35``, SD3.5's) architecture.

    Args:
        sd35: SD3.5 style transformer: dual attention in layer 0 and RMS q/k norm.
        seed: seed of every module's initialisation (same seed, same weights).
        shift: the scheduler's static time shift (3.0 as in the released SD3/SD3.5).

    Returns:
        A float32 pipeline on the CPU; images of :data:`TINY_SIZE` pixels (8x8x16 latents).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, 16, 8, with_projection=True)
    text_encoder_2 = _clip_encoder(tokenizer_2, 16, 8, with_projection=True)
    text_encoder_3 = _t5_encoder(tokenizer_3, 32)  # joint_attention_dim >= 16 + 16 (CLIP hidden sizes)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SIZE // 8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
        out_channels=16, pos_embed_max_size=16,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}),
    ).eval()
    vae = _vae(0.0609, 1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(*, seed: int = 0, guidance_embeds: bool = True):
    """A random-init ``FluxPipeline`` of Flux's architecture (dev-style guidance embedding by default).

    Returns:
        A float32 pipeline on the CPU; images of :data:`TINY_SIZE` pixels (packed 2x2 latents:
        a 16-token sequence of 64 channels).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, 16, 16, with_projection=False)  # pooled output: hidden size
    text_encoder_2 = _t5_encoder(tokenizer_2, 32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = _vae(0.1159, 0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
