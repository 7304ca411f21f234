"""Trainer configuration: the known keys, their defaults, and validation.

The keys and defaults of the published ORW-CFM-W2 trainer are kept as they are
(``learning_rate`` ... ``parallel``); the keys this library adds are documented in
:data:`OPTIONS` and in the README's config table. Validation happens once, in the
trainer's constructor: an unknown key names the closest known one, a bad value names
its key and what was expected.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError",
    "Option",
    "OPTIONS",
    "DEFAULTS",
    "ODE_SOLVERS",
    "COUPLINGS",
    "WEIGHT_NORMALIZATIONS",
    "CFG_MODES",
    "OPS_BACKENDS",
    "PRECISIONS",
    "TIME_SAMPLINGS",
    "OBJECTIVES",
    "validate_config",
    "serializable_config",
]

ODE_SOLVERS = ("euler", "midpoint", "heun", "rk4")
COUPLINGS = ("independent", "exact_ot", "weighted_ot")
WEIGHT_NORMALIZATIONS = ("none", "batch", "group")
PRECISIONS = ("fp32", "bf16")
CFG_MODES = ("guided", "cfg_free", "sampling_only")
OBJECTIVES = ("orw-cfm-w2", "adrpo", "offline-rwr", "diffusion-nft")  # orwcfm_fast.objectives.OBJECTIVES' keys
OPS_BACKENDS = ("torch", "cpp", "triton")  # orwcfm_fast.ops.backends.BACKENDS (not imported: no torch here)


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid. The message names the key."""


@dataclass(frozen=True)
class Option:
    """One configuration key.

    Attributes:
        default: value used when the key is absent.
        check: ``check(value) -> value`` normalises a valid value or raises ``ValueError``
            whose text says what was expected (the key is added by :func:`validate_config`).
        doc: one line for the README's config table.
    """

    default: Any
    check: Callable[[Any], Any]
    doc: str


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _float(low=None, low_inclusive=True, allow_none=False):
    def check(value):
        if value is None and allow_none:
            return None
        if not _is_real(value) or not math.isfinite(float(value)):
            raise ValueError(f"expected a finite number, got {value!r}")
        value = float(value)
        if low is not None and (value < low or (value == low and not low_inclusive)):
            sign = ">=" if low_inclusive else ">"
            raise ValueError(f"expected a number {sign} {low}, got {value!r}")
        return value

    return check


def _int(low):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < low:
            raise ValueError(f"expected an integer >= {low}, got {value!r}")
        return int(value)

    return check


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected True or False, got {value!r}")
    return value


def _str(allow_none=False):
    def check(value):
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value

    return check


def _choice(choices, allow_callable=False):
    def check(value):
        if allow_callable and callable(value):
            return value
        if not isinstance(value, str) or value not in choices:
            hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
            extra = " or a callable" if allow_callable else ""
            raise ValueError(f"expected one of {list(choices)}{extra}, got {value!r}{hint}")
        return value

    return check


def _optional_bool(value):
    return None if value is None else _bool(value)


def _choice_or_none(choices):
    def check(value):
        return None if value is None else _choice(choices)(value)

    return check


def _prompts(value):
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value) or len(value) == 0:
        raise ValueError(f"expected a non-empty list of strings, got {value!r}")
    return list(value)


def _reward(value):
    if isinstance(value, str) or callable(value):
        return value
    if isinstance(value, Mapping) and value:
        for name, weight in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"a reward dict maps registered names (or http:// URLs) to weights, got the key {name!r}")
            if not _is_real(weight) or not math.isfinite(float(weight)):
                raise ValueError(f"the weight of reward {name!r} must be a finite number, got {weight!r}")
        return {name: float(weight) for name, weight in value.items()}
    raise ValueError(
        "expected a registered reward name, an http://127.0.0.1:PORT reward server, a dict {name: weight} "
        f"(a weighted sum, each term logged) or a callable samples -> [B] tensor, got {value!r}")


def _optional_reward(value):
    return None if value is None else _reward(value)


def _decay_type(value):
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise ValueError(f"expected DiffusionNFT's decay_type 0, 1 or 2, got {value!r}")
    return int(value)


def _reward_paths(value):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a dict {{reward name: local path}}, got {value!r}")
    out = {}
    for name, path in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"expected reward names as keys, got {name!r}")
        if isinstance(path, Mapping):
            if not path or not all(isinstance(k, str) and (isinstance(v, str) or hasattr(v, "__fspath__"))
                                   for k, v in path.items()):
                raise ValueError(f"reward_paths[{name!r}]: expected a path or a dict {{part: path}}, got {path!r}")
            out[name] = {k: str(v) for k, v in path.items()}
        elif isinstance(path, str) or hasattr(path, "__fspath__"):
            out[name] = str(path)
        else:
            raise ValueError(f"reward_paths[{name!r}]: expected a local path, got {path!r}")
    return out


def _shape(value):
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        shape = tuple(value)
    except TypeError:
        raise ValueError(f"expected a tuple of positive integers, got {value!r}") from None
    if not shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"expected a non-empty tuple of positive integers, got {value!r}")
    return tuple(int(d) for d in shape)


def _optional_int(low):
    def check(value):
        return None if value is None else _int(low)(value)

    return check


def _int_range(low, high):
    def check(value):
        value = _int(low)(value)
        if value > high:
            raise ValueError(f"expected an integer <= {high}, got {value!r}")
        return value

    return check


_seed = _optional_int(0)

TIME_SAMPLINGS = ("uniform", "logit_normal", "shifted")


def _prompt_source(value):
    """A list of strings or a path (loaded and checked by :func:`orwcfm_fast.prompts.load_prompts`)."""
    if value is None:
        return None
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return str(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"expected a non-empty list of strings or a .txt/.jsonl path, got {value!r}")


def _optional_callable(value):
    if value is None or callable(value):
        return value
    raise ValueError(f"expected a callable list[str] -> tensor (or tuple of tensors), got {value!r}")


def _resolution(value):
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value):
        return [int(v) for v in value]
    raise ValueError(f"expected a positive int or [height, width], got {value!r}")


def _module_names(value):
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a non-empty list of module name suffixes, got {value!r}")
    return list(value)


def _decay(value):
    if value is None:
        return None
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"expected None or a number in [0, 1), got {value!r}")
    return float(value)


OPTIONS: dict[str, Option] = {
    # --- the published reference's keys, same meanings and defaults ---
    "learning_rate": Option(2e-4, _float(0.0, low_inclusive=False), "Adam learning rate"),
    "warmup_steps": Option(5000, _int(0), "linear LR warmup: lr * min(step, warmup_steps) / warmup_steps"),
    "w2_coefficient": Option(1.0, _float(0.0), "alpha: weight of the W2 bound ||v - v_ref||^2"),
    "temperature": Option(0.5, _float(0.0), "beta: weights are exp(temperature * reward)"),
    "grad_clip": Option(1.0, _float(0.0, low_inclusive=False, allow_none=True),
                        "max gradient norm (None: no clipping)"),
    "batch_size": Option(128, _int(1), "samples drawn and trained on per step"),
    "text_prompts": Option(None, _prompts, "CLIP prompts; reward = p(prompt 0) - p(prompt 1)"),
    "use_wandb": Option(False, _bool, "log epoch means to Weights & Biases (imported only then)"),
    "wandb_project": Option("flow-matching", _str(), "wandb project"),
    "run_name": Option("orw-cfm-w2", _str(), "wandb run name; prefix of the metrics CSV"),
    "savedir": Option("./results", _str(), "where the epoch-metrics CSV is written"),
    "ref_path": Option(None, _str(allow_none=True), "pretrained checkpoint path (for your script)"),
    "parallel": Option(False, _bool, "wrap the policy in DataParallel over all visible GPUs"),
    # --- keys this library adds ---
    "reward": Option("clip", _reward,
                     "registered reward name or callable samples [B, ...] -> [B] (prompts: (images, prompts) -> [B])"),
    "sample_shape": Option(None, _shape, "shape of one sample; inferred from torchcfm UNets"),
    "ode_solver": Option("euler", _choice(ODE_SOLVERS), "fixed-step sampler: euler, midpoint, heun, rk4"),
    "ode_steps": Option(100, _int(1), "solver steps from t=0 to t=1"),
    "coupling": Option("independent", _choice(COUPLINGS, allow_callable=True),
                       "pairing of noise x_0 with samples x_1: independent, exact_ot, weighted_ot"),
    "weight_normalization": Option(None, _choice_or_none(WEIGHT_NORMALIZATIONS),
                                   "none: raw exp(beta r); batch: B * softmax(beta r), overflow-safe; group: "
                                   "k * softmax(beta z) per prompt group, z the group-standardised reward; None: "
                                   "'none' for plain models (the reference's), for prompted models 'group' when "
                                   "images_per_prompt > 1, else 'batch' (alpha then means the same at any reward offset)"),
    "sigma": Option(0.0, _float(0.0), "std of the Gaussian around the conditional path (torchcfm's sigma)"),
    "policy_dropout": Option(False, _bool, "keep the policy's dropout active in its training forward"),
    "clip_model": Option("ViT-B-32", _str(), "open_clip architecture for the CLIP reward"),
    "clip_pretrained": Option("openai", _str(allow_none=True),
                              "open_clip tag or local weights file; None = random init"),
    "clip_batch_size": Option(None, _optional_int(1), "images per CLIP forward (None: the whole batch)"),
    "jpeg_quality": Option(95, _int_range(1, 100), "JPEG quality for the jpeg_(in)compressibility rewards"),
    "seed": Option(None, _seed, "seed for noise, times and couplings (None: nondeterministic)"),
    "ops_backend": Option(None, _choice_or_none(OPS_BACKENDS),
                          "fused-op backend: torch, cpp, triton; None = best available"),
    "precision": Option("fp32", _choice(PRECISIONS + ("auto",)),
                        "fp32: the reference's math; bf16: autocast forwards, fp32 weights, ODE state and loss; "
                        "auto: bf16 where the device runs it natively (CUDA sm_80+, CPUs with AVX512-BF16 / AMX), "
                        "else fp32"),
    "compile": Option(False, _bool, "torch.compile the policy, reference and sampling forwards"),
    "compile_backend": Option("inductor", _str(), "torch.compile backend when 'compile' is True"),
    "unet_speedups": Option(True, _bool,
                            "torchcfm UNets: SDPA attention, GroupNorm without fp32 copies (same weights)"),
    "cuda_graphs": Option(None, _optional_bool, "replay sampling from one CUDA graph; None = on CUDA devices"),
    "overlap_sampling": Option(None, _optional_bool,
                               "train(): make the next batch in a background thread/stream during this "
                               "step's update; None = on CUDA devices (not for LoRA pipelines)"),
    "log_every": Option(10, _int(1), "train(): steps between progress-bar updates (each reads metrics from the device)"),
    "checkpoint_every": Option(None, _optional_int(1),
                               "train(): save a checkpoint every this many epochs (None: only on SIGINT/SIGTERM)"),
    "checkpoint_dir": Option(None, _str(allow_none=True), "folder of train()'s checkpoints; None = <savedir>/checkpoints"),
    "keep_checkpoints": Option(3, _optional_int(1), "train(): keep the newest this many checkpoints (None: all)"),
    "handle_signals": Option(True, _bool,
                             "train(): on SIGINT/SIGTERM finish the step, save a checkpoint, raise TrainingInterrupted"),
    # --- text-to-image and conditional models ---
    "prompts": Option(None, _prompt_source, "training prompts: a list, or a .txt (one a line) / .jsonl ('prompt') path"),
    "eval_prompts": Option(None, _prompt_source, "held-out prompts for evaluation (same forms as 'prompts')"),
    "prompt_encoder": Option(None, _optional_callable,
                             "conditional models: list[str] -> tensor or tuple, passed as model(t, x, *cond)"),
    "images_per_prompt": Option(1, _int(1), "samples per prompt in a batch (batch_size must be a multiple)"),
    "guidance_scale": Option(None, _float(0.0, allow_none=True),
                             "guidance: classifier-free guidance v_u + s (v_c - v_u) (1 = off; Qwen-Image's true CFG "
                             "with its rescale; Z-Image's pipeline scale is s - 1), or the guidance input of distilled "
                             "models (FLUX.1-dev, FLUX.2-dev); None: the family's default (SD3, Qwen-Image, Z-Image 1 = off; "
                             "Flux 3.5; FLUX.2 and klein 4.0; Wan 5.0)"),
    "cfg_mode": Option("guided", _choice(CFG_MODES),
                       "what CFG trains: guided (the loss and W2 use v_u + s (v_c - v_u), the velocity that samples), "
                       "cfg_free (sample with guidance 1, train v_c), sampling_only (sample guided, train v_c: biased, "
                       "guidance compounds over epochs)"),
    "negative_prompt": Option("", _str(), "the unconditional prompt of classifier-free guidance"),
    "resolution": Option(None, _resolution, "pipelines: image size, int or [h, w] (None: the model's default)"),
    "time_shift": Option(None, _float(0.0, low_inclusive=False, allow_none=True),
                         "pipelines: static sampling-time shift (None: the scheduler's, Flux's dynamic shift included)"),
    "max_sequence_length": Option(256, _int(1), "pipelines: text tokens per prompt (T5 for SD3/Flux; the LLM encoders of the newer families)"),
    "num_frames": Option(None, _optional_int(1), "video pipelines (Wan): frames per video (None: the family's default)"),
    "video_frame_reduction": Option("mean", _choice(("mean", "min")),
                                    "video pipelines: an image reward scores every decoded frame; one score per "
                                    "video is their mean, or their min (every frame must pass)"),
    # 32 fits a 24 GB card beside SD3.5-medium (bf16: transformer 4.5 GB, T5-XXL 9.5 GB, CLIPs 1.6 GB):
    # under no_grad T5-XXL holds one layer's activations, per prompt at L = max_sequence_length tokens
    # about 3 x 64 heads x L^2 x 2 B of eager attention scores + 4 x L x 10240 x 2 B of gated FF,
    # ~45 MB at L = 256 and ~140 MB at L = 512: 1.5 / 4.5 GB for 32 prompts (estimated; not measured on a GPU;
    # the CPU's peak RSS over one such layer gave 30-80 MB per prompt in bf16 terms)
    "text_encoder_batch_size": Option(32, _int(1), "pipelines: prompts per text-encoder forward"),
    "prompt_cache_size": Option(None, _optional_int(1),
                                "pipelines: prompt embeddings kept in host memory (None: every prompt, encoded "
                                "at start; N: encoded when drawn, text encoders stay on the device, N kept)"),
    "lora_rank": Option(32, _optional_int(1), "pipelines: LoRA rank (None: full fine-tuning with three models)"),
    "lora_alpha": Option(None, _float(0.0, low_inclusive=False, allow_none=True), "pipelines: LoRA alpha (None: the rank)"),
    "lora_target_modules": Option(None, _module_names,
                                  "pipelines: module name suffixes to adapt (None: the attention projections)"),
    "loss_timesteps": Option(1, _int(1), "times t drawn per sample per step (amortises the sampling cost)"),
    "time_sampling": Option("uniform", _choice(TIME_SAMPLINGS),
                            "loss times: uniform, logit_normal (sigmoid of N(0, 1)), shifted (uniform, time-shifted)"),
    "ema_decay": Option(None, _decay, "EMA of the trained weights, used by sample() and save_lora (None: off)"),
    "gradient_checkpointing": Option(False, _bool, "pipelines: recompute the transformer's activations in backward"),
    "parallelism": Option("ddp", _choice(("ddp", "fsdp")),
                          "under torchrun: ddp replicates the model on every rank; fsdp (pipelines) shards the "
                          "transformer with FSDP2's fully_shard, one unit per block (checkpoints: torch.distributed"
                          ".checkpoint folders)"),
    "vae_batch_size": Option(None, _optional_int(1), "pipelines: images per VAE decode (None: the whole batch)"),
    "reward_paths": Option(None, _reward_paths,
                           "local weights of the preference rewards: {name: path} (clip_score, pickscore, hpsv2, "
                           "aesthetic; see the README)"),
    "reward_batch_size": Option(None, _optional_int(1),
                                "images per forward of the preference rewards / per reward-server request (None: all)"),
    "reward_dtype": Option("auto", _choice(("auto", "fp32", "bf16")),
                           "preference rewards' weights: auto = bf16 on CUDA if the reward is bf16-safe, else fp32"),
    "reward_timeout": Option(120.0, _float(0.0, low_inclusive=False), "seconds a reward-server request may take"),
    "reward_retries": Option(3, _int(0), "retries of a failed reward-server request (then a clear error)"),
    "use_tensorboard": Option(False, _bool, "log epoch scalars and sample grids to TensorBoard (<savedir>/tensorboard)"),
    "log_samples": Option(8, _int(0), "samples in the grid logged each epoch to TensorBoard / wandb (0: none)"),
    "diversity_embedding": Option("auto", _choice(("auto", "pixels", "clip", "dino")),
                                  "evaluate(): embedding of within-prompt diversity (auto: clip with "
                                  "reward_paths['clip_score'], else pixels)"),
    "eval_samples_per_prompt": Option(16, _int(2), "evaluate(): samples per prompt"),
    "eval_reward": Option(None, _optional_reward,
                          "evaluate(): a held-out reward (same forms as 'reward'), reported beside it, never trained on"),
    "hacking_window": Option(3, _int(2),
                             "evaluate(): alarm when the training reward rose over this many consecutive evaluations "
                             "while the held-out reward or the diversity fell"),
    "objective": Option("orw-cfm-w2", _choice(OBJECTIVES),
                        "the loss: orw-cfm-w2, adrpo (per-sample W2 coefficient from the advantage), offline-rwr "
                        "(one fixed set from the pretrained model), diffusion-nft"),
    "updates_per_batch": Option(1, _int(1), "optimiser steps on each sampled batch, each with fresh times and noise"),
    "offline_samples": Option(None, _optional_int(1),
                              "offline-rwr: samples drawn once from the pretrained model (None: 8 batches)"),
    "advantage_clip": Option(5.0, _float(0.0, low_inclusive=False),
                             "adrpo / diffusion-nft: advantages (reward - prompt-group mean) / batch std clip to +-this"),
    "nft_beta": Option(1.0, _float(0.0, low_inclusive=False),
                       "diffusion-nft: beta, the step from the old policy to the implicit positive / negative policy"),
    "nft_decay_type": Option(1, _decay_type,
                             "diffusion-nft: the old policy's EMA decay schedule per epoch (0: copy; 1: min(0.001 "
                             "step, 0.5); 2: 0 for 75 steps, then min(0.0075 (step - 75), 0.999))"),
}

DEFAULTS: dict[str, Any] = {name: opt.default for name, opt in OPTIONS.items()}


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a user config and fill in defaults.

    Args:
        config: the user's keys; ``None`` means all defaults.

    Returns:
        A new dict with every key of :data:`OPTIONS`, values normalised
        (ints to floats where a float is meant, lists to tuples for shapes).

    Raises:
        ConfigError: for an unknown key (naming the closest known key) or an invalid
            value (naming the key and what was expected).
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict of options, got {type(config).__name__}")
    for key in config:
        if key not in OPTIONS:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(str(key), OPTIONS)}")
    resolved = {}
    for key, opt in OPTIONS.items():
        value = config.get(key, opt.default)
        try:
            resolved[key] = opt.check(value)
        except ValueError as err:
            raise ConfigError(f"config key {key!r}: {err}") from None
    return resolved


def serializable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with callables replaced by a description, so it can be saved.

    Checkpoints store the config for the record; a callable reward or coupling is
    code, which the user passes again when building a trainer to resume.
    """
    out = {}
    for key, value in config.items():
        if callable(value):
            name = getattr(value, "__qualname__", None) or type(value).__qualname__
            out[key] = f"<callable {name}>"
        else:
            out[key] = value
    return out
