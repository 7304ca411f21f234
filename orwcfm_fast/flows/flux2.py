"""FLUX.2 and FLUX.2-klein (diffusers ``Flux2Pipeline``, ``Flux2KleinPipeline``) as one library flow.

Both pipelines drive the same ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2``; they differ in
their text encoder and in their guidance:

- ``Flux2Pipeline`` (FLUX.2-dev): a Mistral-3 encoder (``Mistral3ForConditionalGeneration`` behind a
  ``PixtralProcessor`` chat template with the pipeline's system message), and a guidance-distilled
  transformer: ``guidance = guidance_scale`` (default 4.0) is an input of its one forward, as for
  FLUX.1-dev (:meth:`Flux2Flow._guided` is False, so every ``cfg_mode`` is the same).
- ``Flux2KleinPipeline`` (FLUX.2-klein): a Qwen3 encoder (``Qwen3ForCausalLM``, Qwen chat template with
  thinking switched off), no guidance input (``guidance=None``), and for the base models
  (``is_distilled`` False) true classifier-free guidance: for ``guidance_scale > 1`` (default 4.0) a
  second forward on the negative prompt (the pipeline's is ``""``; config ``negative_prompt`` here),
  ``v_u + g (v_c - v_u)``, run as two forwards of ``B`` like the pipeline (``cfg_batched = False``).
  Step-distilled klein models (``is_distilled`` True) ignore ``guidance_scale``, as the pipeline does.

Mapping onto the contract (:class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`):

- conditioning ``(prompt_embeds [B, L, 3 D],)``: the pipeline's own ``encode_prompt`` (hidden states of
  three encoder layers, the pipeline's defaults, stacked per token), every prompt padded to
  ``L = max_sequence_length`` tokens by the tokenizer; the transformer gets no text mask (the pipeline
  passes none) and text position ids ``(0, 0, 0, l)``;
- samples ``[(H/16) (W/16), 4 C]``: the VAE latent ``[C, H/8, W/8]`` patchified 2x2 into ``4 C``
  channels, normalised by the VAE's batch-norm running statistics and packed row-major into tokens, with
  position ids ``(0, h, w, 0)``; this is the pipeline's ``latents`` tensor itself;
- ``timestep = sigma`` (the transformer multiplies by 1000), per sample;
- time grid: the scheduler's, on the pipeline's sigmas ``linspace(1, 1/S, S)`` with the FLUX.2
  ``compute_empirical_mu(tokens, S)`` shift, which depends on the number of steps ``S``;
- ``decode``: unpack, ``z * sqrt(running_var + eps) + running_mean``, unpatchify, VAE decode, ``x / 2 + 0.5``;
  ``encode_images`` inverts it from the VAE posterior's mode (the pipeline's ``_encode_vae_image``);
- LoRA: the double-stream attention projections plus the single-stream blocks' fused
  ``to_qkv_mlp_proj`` / ``to_out`` (FLUX.2 has no separate q/k/v there), as diffusers' own FLUX.2 LoRA
  scripts target them.

:func:`tiny_flux2_pipeline` builds a random-init pipeline of either kind at toy size for tests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from orwcfm_fast.flows.conventions import model_timestep, scheduler_time_grid
from orwcfm_fast.flows.diffusers_base import PipelineFlow
from orwcfm_fast.flows.dtypes import transformer_dtype
from orwcfm_fast.flows.lora import DEFAULT_TARGET_MODULES
from orwcfm_fast.flows.tiny import QWEN3_CHAT_TEMPLATE  # klein's tiny tokenizer (what Flux2KleinPipeline renders)

__all__ = ["Flux2Flow", "tiny_flux2_pipeline"]

#: steps the FLUX.2 pipelines take by default (their ``num_inference_steps``): the step count the
#: step-dependent shift ``mu`` is computed for when no step count is given (:meth:`Flux2Flow.sampling_shift`)
PIPELINE_DEFAULT_STEPS = 50


def _is_klein(pipe) -> bool:
    return any(cls.__name__ == "Flux2KleinPipeline" for cls in type(pipe).__mro__)


class Flux2Flow(PipelineFlow):
    """A ``Flux2Pipeline`` (FLUX.2-dev) or ``Flux2KleinPipeline`` (FLUX.2-klein) behind the velocity contract."""

    family = "flux2"
    timestep_scale = 1.0  # the pipelines pass timestep = sigma (their 1000-scale divided by 1000)
    cfg_batched = False  # klein's true CFG: negative and positive forwards one after the other, as the pipeline

    def __init__(self, pipe, **kwargs):
        #: FLUX.2-klein (Qwen3 encoder, no guidance input, true CFG unless step-distilled)
        self.klein = _is_klein(pipe)
        #: a step-distilled klein model: no guidance of any kind
        self.distilled = bool(self.klein and pipe.config.get("is_distilled", False))
        super().__init__(pipe, **kwargs)
        if self.distilled and self.guidance_scale > 1.0:
            warnings.warn(f"guidance_scale {self.guidance_scale:g} is ignored for step-distilled FLUX.2-klein "
                          "models (as Flux2KleinPipeline ignores it)", stacklevel=2)
        cells = self.vae_scale_factor * 2
        self._grid_hw = (self.height // cells, self.width // cells)  # packed token grid (2x2 patches)
        h, w = self._grid_hw
        # [h w, 4] position ids (0, row, column, 0), as the pipeline makes them for its latents
        self._img_ids = pipe._prepare_latent_ids(torch.empty(1, 0, h, w))[0].to(self.device)
        self._txt_ids: dict[tuple[int, torch.device], torch.Tensor] = {}
        prefix = self._template_prefix_tokens()
        if prefix is not None and self.max_sequence_length <= prefix:
            warnings.warn(f"max_sequence_length {self.max_sequence_length} leaves no token for the prompt: the "
                          f"pipeline's chat template puts {prefix} tokens before it, so every prompt encodes the "
                          "same (the pipeline truncates at max_sequence_length)", stacklevel=2)

    def _template_prefix_tokens(self) -> int | None:
        """Tokens the pipeline's chat template puts before the prompt's first (where two prompts' ids first differ),
        tokenized as the pipeline tokenizes; ``None`` if the tokenizer does not render the template."""
        tokenizer = self.pipe.tokenizer
        try:
            if self.klein:  # Flux2KleinPipeline: one user turn, generation prompt, thinking off
                def ids(prompt):
                    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                         add_generation_prompt=True, enable_thinking=False)
                    return tokenizer(text)["input_ids"]
            else:  # Flux2Pipeline: the system message, then the prompt as a user turn
                from diffusers.pipelines.flux2.pipeline_flux2 import format_input

                def ids(prompt):
                    out = tokenizer.apply_chat_template(format_input([prompt], self.pipe.system_message),
                                                        add_generation_prompt=False, tokenize=True, return_dict=True,
                                                        return_tensors="pt")
                    return out["input_ids"][0].tolist()
            first, second = ids("a"), ids("b")
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        return next((i for i, (u, v) in enumerate(zip(first, second)) if u != v), None)

    # ------------------------------------------------------------------ layout

    @property
    def sample_shape(self) -> tuple[int, ...]:
        h, w = self._grid_hw
        return (h * w, self.transformer.config.in_channels)

    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor  # the pipelines' own default (1024)

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 patchified VAE latents

    def image_tokens(self) -> int:
        return self.sample_shape[0]  # the pipelines' image_seq_len: one token per 2x2 latent patch

    def default_lora_targets(self) -> tuple[str, ...]:
        """The double-stream attention projections and the single-stream blocks' fused projections.

        A single-stream block has one fused input map ``attn.to_qkv_mlp_proj`` (q, k, v and the MLP's
        input) and one output map ``attn.to_out`` (a plain Linear, where the double-stream blocks have a
        ``to_out`` ModuleList): those are named by their full path.
        """
        singles = tuple(f"single_transformer_blocks.{i}.attn.to_out"
                        for i in range(self.transformer.config.num_single_layers))
        return (*DEFAULT_TARGET_MODULES, "to_qkv_mlp_proj", *singles)

    # ------------------------------------------------------------------ guidance

    def _guided(self) -> bool:
        # Flux2Pipeline: guidance is an input of the distilled transformer; klein: true CFG when > 1
        return self.klein and not self.distilled and self.guidance_scale > 1.0

    def default_guidance_scale(self) -> float:
        """Each pipeline's default (4.0) where it guides: FLUX.2-dev's guidance input (if the transformer
        embeds guidance), klein base models' CFG; 1 (off) for step-distilled klein models."""
        if self.klein:
            return 1.0 if self.distilled else 4.0
        return 4.0 if self.transformer.config.guidance_embeds else 1.0

    # ------------------------------------------------------------------ transformer

    def _text_ids(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, device)
        ids = self._txt_ids.get(key)
        if ids is None:  # [L, 4] (0, 0, 0, l), the pipeline's _prepare_text_ids, made on the device (capture-safe)
            ids = torch.zeros(length, 4, dtype=torch.long, device=device)
            ids[:, 3] = torch.arange(length, device=device)
            self._txt_ids[key] = ids
        return ids

    def _transformer_call(self, t, x, cond, transformer):
        (prompt_embeds,) = cond
        dtype = transformer_dtype(transformer)  # O(1); ModelMixin.dtype walks every module
        guidance = None
        if not self.klein and transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        return transformer(
            # float32 timestep (the transformer casts it to the latents' dtype itself)
            hidden_states=x.to(dtype), timestep=model_timestep(t, self.timestep_scale).float(), guidance=guidance,
            encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=self._text_ids(prompt_embeds.shape[1], x.device),
            img_ids=self._img_ids.to(x.device), return_dict=False,
        )[0]

    def _encode_prompts(self, prompts):
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self._text_encoder_device(),
                                            max_sequence_length=self.max_sequence_length)
        return (embeds,)

    # ------------------------------------------------------------------ time grid

    def dynamic_shift_mu(self, steps: int | None = None) -> float | None:
        """FLUX.2's shift ``mu = compute_empirical_mu(tokens, steps)`` (the pipelines' own, which depends on the
        number of steps; ``None``: :data:`PIPELINE_DEFAULT_STEPS`), or ``None`` if the scheduler has no
        dynamic shifting (it then ignores ``mu`` and applies its static ``shift``)."""
        if not self.scheduler.config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(self.image_tokens(), PIPELINE_DEFAULT_STEPS if steps is None else int(steps))

    def sampling_shift(self, steps: int | None = None) -> float:
        """The base class's shift (config ``time_shift``, else the scheduler's), ``mu`` taken at ``steps`` sampling
        steps (``None``: the pipelines' default, :data:`PIPELINE_DEFAULT_STEPS`)."""
        if self.time_shift is not None:
            return float(self.time_shift)
        mu = self.dynamic_shift_mu(steps)
        if mu is None:
            return float(self.scheduler.config.get("shift", 1.0))
        return float(mu) if self.scheduler.config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    def _scheduler_grid(self, steps):
        sigmas = None if self.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        return scheduler_time_grid(self.scheduler, steps, sigmas=sigmas, mu=self._pipeline_mu(steps))

    def _pipeline_mu(self, steps: int) -> float:
        """The ``mu`` the pipelines pass to ``set_timesteps`` (always; a scheduler without dynamic shifting ignores it)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(self.image_tokens(), steps)

    # ------------------------------------------------------------------ VAE

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` ``[1, 4 C, 1, 1]`` of the VAE's batch norm (running statistics, its eps), as ``like``."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H/8, W/8]`` latents the VAE decodes (unnormalised, unpatchified) of samples ``x``.

        What ``Flux2KleinPipeline`` returns for ``output_type="latent"``.
        """
        b, n, c = x.shape
        h, w = self._grid_hw
        z = x.transpose(1, 2).reshape(b, c, h, w)  # the inverse of the pipeline's _pack_latents
        mean, std = self._bn_stats(z)
        return self.pipe._unpatchify_latents(z * std + mean)

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vae_latents`: patchify 2x2, normalise, pack."""
        z = self.pipe._patchify_latents(z)
        mean, std = self._bn_stats(z)
        return self.pipe._pack_latents((z - mean) / std)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] of samples ``x``, decoded in chunks of ``batch_size``."""
        return self._vae_decode(self.to_vae_latents(x.float()), batch_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Samples (the flow's layout) of images ``[B, 3, H, W]`` in [0, 1]: the VAE posterior's mode, normalised."""
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        return self.from_vae_latents(z.float())


# ---------------------------------------------------------------------------------------------- tiny pipelines

_TINY_SIZE = 64  # pixels: 8x8 VAE latents, a 4x4 grid of packed tokens (orwcfm_fast.flows.tiny.TINY_SIZE)
_LATENT_CHANNELS = 8  # the released VAE has 32; the transformer sees 4x as many (2x2 patches)
_TEXT_HIDDEN = 16
_MAX_POSITIONS = 512  # the pipelines' default max_sequence_length fits

# Mistral's tekken special tokens, at their ids (0-19); <pad> is 11, [IMG] 10
_MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
# tekken's pre-tokenizer split (the released tokenizer.json's)
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                   r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The text path of the Mistral Small 3.1 chat template (system turn, user turns of text / image blocks)
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
_QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN3_ADDED = ("<think>", "</think>")


def _mistral_processor(vision_patch: int, spatial_merge: int):
    """A ``PixtralProcessor`` of a byte-level BPE tokenizer built like the released tekken one (tekken's
    pre-tokenizer split, byte-level, Mistral's special tokens at their ids, no automatic BOS: the chat
    template writes it), its merges trained in memory on the pipeline's system message."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PixtralImageProcessor, PixtralProcessor
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = Tokenizer(BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(_MISTRAL_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SYSTEM_MESSAGE], trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = TokenizersBackend(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=_MAX_POSITIONS)
    image_processor = PixtralImageProcessor(patch_size=vision_patch, size={"longest_edge": 8 * vision_patch})
    return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_patch,
                            spatial_merge_size=spatial_merge, chat_template=_MISTRAL_CHAT_TEMPLATE)


def _mistral3_encoder(tokenizer, layers: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": _TEXT_HIDDEN,
                     "intermediate_size": 2 * _TEXT_HIDDEN, "num_hidden_layers": layers, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": _TEXT_HIDDEN // 2, "max_position_embeddings": _MAX_POSITIONS,
                     "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "patch_size": 4, "image_size": 32, "num_channels": 3},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, tie_word_embeddings=False,
        **ids,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _qwen_tokenizer():
    """A ``Qwen2TokenizerFast`` (Qwen's byte-level BPE and pre-tokenizer) with Qwen3's chat tokens, its merges
    trained in memory on the chat template's own text (so ``user``, ``assistant``, ``\\n\\n`` are one token each,
    as in the released vocabulary)."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(_QWEN3_SPECIALS + _QWEN3_ADDED),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["user\n", "assistant\n", "system\n", "\n\n"], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2TokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=_MAX_POSITIONS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN3_SPECIALS[1:])})
    tokenizer.add_tokens([AddedToken(t, special=False) for t in _QWEN3_ADDED])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _qwen3_encoder(tokenizer, layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=_TEXT_HIDDEN // 2,
        max_position_embeddings=_MAX_POSITIONS, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_pipeline(*, seed: int = 0, klein: bool = False, distilled: bool = False):
    """A random-init ``Flux2Pipeline`` (FLUX.2-dev) or, with ``klein``, ``Flux2KleinPipeline`` at toy size.

    The released models' component classes: ``Flux2Transformer2DModel`` (1 double-stream and 2
    single-stream blocks, 2 heads of 16, 4 RoPE axes; a guidance embedding for FLUX.2-dev only),
    ``AutoencoderKLFlux2`` (8x downsampling, 8 latent channels, batch-norm running statistics set to
    seeded non-trivial values so the latent normalisation is exercised), a FlowMatch Euler scheduler with
    dynamic shifting, and a text encoder whose layers include the ones the pipeline reads by default
    ((10, 20, 30) of a 32-layer ``Mistral3ForConditionalGeneration``; (9, 18, 27) of a 28-layer
    ``Qwen3ForCausalLM`` for klein), hidden size 16, tokenizers built in memory.

    Args:
        seed: seed of every module's initialisation (same seed, same weights).
        klein: build a ``Flux2KleinPipeline`` (Qwen3 encoder, no guidance embedding).
        distilled: klein only: a step-distilled model (``is_distilled``: no classifier-free guidance).

    Returns:
        A float32 pipeline on the CPU; images of 64 pixels (8x8x8 latents, 16 packed tokens of 32 channels).
    """
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                           Flux2Transformer2DModel)

    if distilled and not klein:
        raise ValueError("distilled is a FLUX.2-klein option (Flux2KleinPipeline's is_distilled): pass klein=True")
    torch.manual_seed(seed)
    if klein:
        tokenizer = _qwen_tokenizer()
        text_encoder = _qwen3_encoder(tokenizer, layers=28)
    else:
        tokenizer = _mistral_processor(vision_patch=4, spatial_merge=2)
        text_encoder = _mistral3_encoder(tokenizer.tokenizer, layers=32)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * _TEXT_HIDDEN, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=not klein,
    ).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=_LATENT_CHANNELS, norm_num_groups=4, sample_size=_TINY_SIZE,
    ).eval()
    with torch.no_grad():  # the released VAE's statistics are far from (0, 1); make the tiny one's so too
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(torch.empty(vae.bn.num_features).uniform_(0.25, 4.0))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    components = {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                  "transformer": transformer}
    if klein:
        return Flux2KleinPipeline(**components, is_distilled=distilled)
    return Flux2Pipeline(**components)
