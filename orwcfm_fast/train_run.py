"""The ``train`` command: fine-tune a pretrained flow model with ORW-CFM-W2 from the command line.

``orwcfm-fast train --task TASK ...`` (or ``python -m orwcfm_fast.cli train ...``) runs
:class:`~orwcfm_fast.ORWCFMTrainer` on one of four tasks, with periodic checkpoints, automatic
resumption and clean stops on SIGINT/SIGTERM; under ``torchrun`` every process runs the same
command and the trainer trains data-parallel::

    torchrun --nproc_per_node 8 -m orwcfm_fast.cli train --task cifar10 \\
        --pretrained otcfm_cifar10_weights_step_400000.pt --ema --config cifar10.json \\
        --epochs 100 --steps-per-epoch 100 --set checkpoint_every=1 --outdir runs/cifar10

Tasks (model, default reward, sample shape):

- ``gaussians``: :class:`~orwcfm_fast.tasks.gaussians.MLPVelocity` pretrained on the 2-D
  eight-Gaussians mixture (cached in ``--cache-dir``; a few seconds), reward
  :class:`~orwcfm_fast.tasks.gaussians.ModeReward` of mode ``--target`` (default 0); ``(2,)``.
- ``digits``: the demo's small torchcfm UNet pretrained on scikit-learn's 8x8 digits and the
  digit classifier's probability of ``--target`` (default 7) as the reward (both cached);
  ``(1, 8, 8)``. Fine-tuning defaults are the demo's.
- ``cifar10``: torchcfm's ``UNetModelWrapper`` with the paper's CIFAR-10 configuration
  (:data:`PAPER_UNET`); ``--pretrained`` is required; the reward is the config's (default
  ``"clip"``, which needs ``text_prompts``); ``(3, 32, 32)``.
- ``text-to-image``: a diffusers ``StableDiffusion3Pipeline`` (SD3, SD3.5) or ``FluxPipeline``
  saved with ``save_pretrained`` in the folder ``--pretrained`` (the class is read from its
  ``model_index.json``; weights in ``--dtype``, default what the device runs natively:
  :func:`orwcfm_fast.precision.native_low_precision`, bf16 on CUDA sm_80+, else fp32), config
  ``prompts`` from ``--prompts FILE`` (.txt or .jsonl); LoRA by default (config ``lora_rank``,
  32), written in diffusers' format to ``<outdir>/lora`` at the end of every run. The reward is
  the config's registered name (``--reward``; default ``"jpeg_compressibility"``, the paper's
  compression task, no download); each reward gets the decoded images in the value range it
  declares (``Reward.input_range``). diffusers is imported only by this task.
- ``prompted-digits``: the text-to-image demo's small SD3 pipeline (pretrained in-process and cached
  in ``--cache-dir``), LoRA, reward the digit classifier's probability of each prompt's digit.

Configuration, lowest precedence first: the task's defaults (:data:`TASKS`), the ``--config``
JSON files in order, the ``--set key=value`` assignments in order, then the dedicated flags
(``--outdir`` = ``savedir``, ``--seed``, ``--batch-size``). Every key is checked by
:func:`orwcfm_fast.config.validate_config` before anything is built.

Files under ``--outdir``: the trainer's metrics CSV, ``checkpoints/`` (``checkpoint_every``,
and on a signal), ``train_run.json`` (this run's settings) and, at the end, ``final.pt`` (and
``lora/`` for text-to-image with LoRA).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from orwcfm_fast.flows import PIPELINE_FLOWS

__all__ = [
    "TASKS",
    "PAPER_UNET",
    "PIPELINE_CLASSES",
    "GAUSSIANS_PRETRAIN_DEFAULTS",
    "UsageError",
    "parse_assignment",
    "read_config_file",
    "resolve_config",
    "load_or_pretrain_gaussians_flow",
    "pipeline_class_name",
    "load_pipeline",
    "weights_digest",
    "build_trainer",
    "run_train",
]

#: torchcfm ``UNetModelWrapper`` keyword arguments of the paper's CIFAR-10 model (36.5M parameters;
#: torchcfm's ``examples/images/cifar10`` training script; also ``benchmarks/throughput.py``).
PAPER_UNET: dict[str, Any] = dict(
    dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
    num_head_channels=64, attention_resolutions="16", dropout=0.1,
)

#: Pretraining of the eight-Gaussians flow (plain CFM; ~3 s on two CPU cores).
GAUSSIANS_PRETRAIN_DEFAULTS: dict[str, Any] = {"steps": 1500, "batch_size": 256, "lr": 2e-3, "seed": 0}
_GAUSSIANS_CACHE_VERSION = "gaussians-v1"

#: Per task: trainer-config defaults (under ``--config``/``--set``), default ``--target``,
#: ``--epochs`` and ``--steps-per-epoch`` (``None``: the flag is required).
TASKS: dict[str, dict[str, Any]] = {
    "gaussians": {
        "config": {"sample_shape": [2], "learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 256,
                   "seed": 0, "savedir": "runs/train-gaussians"},
        "target": 0, "targets": range(8), "epochs": 10, "steps_per_epoch": 20,
    },
    "digits": {
        # The demo's fine-tuning settings (orwcfm_fast.tasks.demo.DEMO_DEFAULTS).
        "config": {"sample_shape": [1, 8, 8], "temperature": 3.0, "learning_rate": 5e-4, "warmup_steps": 30,
                   "weight_normalization": "none", "batch_size": 64, "ode_solver": "midpoint", "ode_steps": 5,
                   "seed": 0, "savedir": "runs/train-digits"},
        "target": 7, "targets": range(10), "epochs": 8, "steps_per_epoch": 30,
    },
    "cifar10": {
        "config": {"sample_shape": [3, 32, 32], "seed": 0, "savedir": "runs/train-cifar10"},
        "target": None, "targets": None, "epochs": None, "steps_per_epoch": None,
    },
    # The prompted-digits demo's SD3 pipeline (pretrained and cached) with LoRA; reward: the classifier's
    # probability of each prompt's digit. Fine-tuning defaults are the demo's.
    "prompted-digits": {
        "config": {"prompts": ["a handwritten 1", "a handwritten 4", "a handwritten 7", "a handwritten 8"],
                   "resolution": 8, "max_sequence_length": 16, "guidance_scale": 2.0, "ode_steps": 8, "lora_rank": 8,
                   "batch_size": 64, "images_per_prompt": 16, "temperature": 5.0, "learning_rate": 2e-3,
                   "warmup_steps": 0, "weight_normalization": "batch", "eval_samples_per_prompt": 64,
                   "seed": 0, "savedir": "runs/train-prompted-digits"},
        "target": None, "targets": None, "epochs": 8, "steps_per_epoch": 15,
    },
    # A diffusers pipeline from --pretrained DIR; the trainer's text-to-image defaults otherwise
    # (LoRA rank 32, the model's resolution). The reward needs no download.
    "text-to-image": {
        "config": {"reward": "jpeg_compressibility", "seed": 0, "savedir": "runs/train-text-to-image"},
        "target": None, "targets": None, "epochs": None, "steps_per_epoch": None,
    },
}

#: The text-to-image task's pipelines (``model_index.json``'s ``_class_name``): the registered families'.
PIPELINE_CLASSES = tuple(PIPELINE_FLOWS)
_T2I = "text-to-image"
_PROMPTED = "prompted-digits"

_RUN_RECORD = "train_run.json"
_FINAL = "final.pt"
_FINAL_SHARDED = "final.dcp"  # config parallelism "fsdp": a sharded checkpoint folder
_LORA = "lora"


class UsageError(Exception):
    """A bad command line, config file or config value: reported as ``error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------- configuration


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value parsed as JSON, else kept as a string.

    ``None``, ``True`` and ``False`` (Python's spellings) are accepted as JSON's ``null``,
    ``true`` and ``false``. Used as an argparse ``type``.

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. learning_rate=1e-4), got {text!r}")
    python_spellings = {"None": None, "True": True, "False": False}
    if raw.strip() in python_spellings:
        return key, python_spellings[raw.strip()]
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer-config keys in a JSON file holding one object.

    Raises:
        UsageError: the file is missing, is not JSON, or does not hold an object.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"--config {str(path)!r}: cannot read it: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--config {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {str(path)!r} must hold a JSON object of config keys, got {type(data).__name__}")
    return data


def resolve_config(
    task: str,
    config_files: Sequence[str | os.PathLike] = (),
    assignments: Sequence[tuple[str, Any]] = (),
    *,
    outdir: str | os.PathLike | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    reward: str | None = None,
    prompts: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The trainer config of a ``train`` run, validated (the task's reward is added later).

    Precedence, lowest first: ``TASKS[task]["config"]``, ``config_files`` in order,
    ``assignments`` in order, then ``outdir`` (``savedir``), ``seed``, ``batch_size``, ``reward``
    and ``prompts`` when given.

    Returns:
        The merged user keys (not filled with every default).

    Raises:
        UsageError: an unreadable config file, or the trainer's :class:`ConfigError` message for an
            unknown key or an invalid value.
    """
    from orwcfm_fast.config import ConfigError, validate_config

    config: dict[str, Any] = dict(TASKS[task]["config"])
    for path in config_files:
        config.update(read_config_file(path))
    for key, value in assignments:
        config[key] = value
    for key, value in (("savedir", None if outdir is None else str(outdir)), ("seed", seed),
                       ("batch_size", batch_size), ("reward", reward),
                       ("prompts", None if prompts is None else str(prompts))):
        if value is not None:
            config[key] = value
    try:
        validate_config(config)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return config


# ----------------------------------------------------------------------------- models


def load_or_pretrain_gaussians_flow(
    cache_dir: str | os.PathLike,
    device=None,
    *,
    steps: int = GAUSSIANS_PRETRAIN_DEFAULTS["steps"],
    batch_size: int = GAUSSIANS_PRETRAIN_DEFAULTS["batch_size"],
    lr: float = GAUSSIANS_PRETRAIN_DEFAULTS["lr"],
    seed: int = GAUSSIANS_PRETRAIN_DEFAULTS["seed"],
) -> "torch.nn.Module":
    """The eight-Gaussians flow of :func:`~orwcfm_fast.tasks.gaussians.pretrain_flow`, cached.

    The initial weights come from ``seed`` (the global RNG is left as it was), so every process
    that pretrains with the same hyperparameters gets the same model. The cache file
    ``cache_dir/gaussians-flow-<hash>.pt`` has torchcfm's layout (``net_model``, ``ema_model``).

    Returns:
        An :class:`~orwcfm_fast.tasks.gaussians.MLPVelocity` on ``device`` (default CPU), eval mode.
    """
    import torch

    from orwcfm_fast.checkpoints import atomic_save
    from orwcfm_fast.tasks.gaussians import EightGaussians, MLPVelocity, pretrain_flow

    hparams = {"version": _GAUSSIANS_CACHE_VERSION, "model": {"dim": 2, "hidden": 128, "depth": 3},
               "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}
    digest = hashlib.sha256(json.dumps(hparams, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"gaussians-flow-{digest}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPVelocity(**hparams["model"])
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["net_model"])
    else:
        pretrain_flow(model, EightGaussians(), steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        atomic_save({"net_model": state, "ema_model": state, "step": int(steps), "hparams": hparams}, path)
    return model.to(device if device is not None else "cpu").eval()


def _seeded(build, seed: int = 0):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def pipeline_class_name(path: str | os.PathLike) -> str:
    """The pipeline class of a folder written by diffusers' ``save_pretrained`` (its ``model_index.json``).

    Raises:
        UsageError: ``path`` is not a folder, has no readable ``model_index.json``, or holds a
            pipeline other than :data:`PIPELINE_CLASSES`.
    """
    path = Path(path)
    where = f"--pretrained {str(path)!r}"
    if not path.is_dir():
        raise UsageError(f"{where}: no such folder (--task {_T2I} takes a diffusers pipeline folder written by "
                         "save_pretrained, e.g. a downloaded stabilityai/stable-diffusion-3.5-medium)")
    index = path / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except OSError:
        raise UsageError(f"{where} has no model_index.json: not a diffusers pipeline folder "
                         "(write one with pipe.save_pretrained(DIR))") from None
    except ValueError as err:
        raise UsageError(f"{where}: model_index.json is not valid JSON: {err}") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name not in PIPELINE_CLASSES:
        raise UsageError(f"{where} holds a {name!r} pipeline; --task {_T2I} supports {', '.join(PIPELINE_CLASSES)}")
    return name


def load_pipeline(path: str | os.PathLike, dtype: str = "fp32"):
    """The ``StableDiffusion3Pipeline`` / ``FluxPipeline`` saved in ``path``, on the CPU, weights in ``dtype``.

    Args:
        path: the folder ``save_pretrained`` wrote.
        dtype: ``"fp32"`` or ``"bf16"``.

    Raises:
        UsageError: see :func:`pipeline_class_name`, or diffusers could not load the folder.
    """
    import torch

    name = pipeline_class_name(path)
    from orwcfm_fast.flows import require_diffusers

    require_diffusers()
    import diffusers

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        return getattr(diffusers, name).from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise UsageError(f"--pretrained {str(path)!r}: diffusers cannot load this {name}: {err}") from None


@dataclass
class _TaskParts:
    model: Any
    reward: Any = None  # None: the config's reward
    description: str = ""
    notes: list[str] = field(default_factory=list)
    loads_pretrained: bool = False  # the task loaded --pretrained itself (no trainer.load_pretrained)


def _build_task(task: str, args: argparse.Namespace, device, *, pretrained: str | None, log,
                config: Mapping[str, Any]) -> _TaskParts:
    """The task's model (pretrained here unless ``pretrained`` is given) and default reward."""
    target = args.target if args.target is not None else TASKS[task]["target"]
    if task == "gaussians":
        from orwcfm_fast.tasks.gaussians import EightGaussians, MLPVelocity, ModeReward

        if pretrained is None:
            kw = dict(GAUSSIANS_PRETRAIN_DEFAULTS)
            if args.pretrain_steps is not None:
                kw["steps"] = args.pretrain_steps
            log(f"[train] eight-Gaussians flow: pretraining or loading from {args.cache_dir} ({kw['steps']} steps)")
            model = load_or_pretrain_gaussians_flow(args.cache_dir, device, **kw)
        else:
            model = _seeded(MLPVelocity).to(device)
        return _TaskParts(model, ModeReward(EightGaussians().centers[target]).to(device), f"gaussians (mode {target})")
    if task == "digits":
        from orwcfm_fast.rewards import ClassifierReward
        from orwcfm_fast.tasks.digits import (
            PRETRAIN_DEFAULTS,
            load_or_pretrain_digits_unet,
            load_or_train_digits_classifier,
            make_digits_unet,
        )

        if pretrained is None:
            kw = dict(PRETRAIN_DEFAULTS)
            if args.pretrain_steps is not None:
                kw["steps"] = args.pretrain_steps
            log(f"[train] digits UNet: pretraining or loading from {args.cache_dir} ({kw['steps']} steps)")
            model = load_or_pretrain_digits_unet(args.cache_dir, device, progress=not args.quiet, **kw)
        else:
            model = _seeded(make_digits_unet).to(device)
        log(f"[train] digit classifier: training or loading from {args.cache_dir}")
        classifier, accuracy = load_or_train_digits_classifier(args.cache_dir, device)
        return _TaskParts(model, ClassifierReward(classifier, target_class=target),
                          f"digits (digit {target})", [f"classifier held-out accuracy {accuracy:.4f}"])
    if task == "cifar10":
        from torchcfm.models.unet.unet import UNetModelWrapper

        model = _seeded(lambda: UNetModelWrapper(**PAPER_UNET)).to(device)
        return _TaskParts(model, None, "cifar10")
    if task == _PROMPTED:
        import torch
        from diffusers import StableDiffusion3Pipeline

        from orwcfm_fast.tasks.digits import load_or_train_digits_classifier
        from orwcfm_fast.tasks.prompted_digits import load_or_pretrain_prompted_digits, prompted_digit_reward

        log(f"[train] prompted-digits SD3 pipeline: pretraining or loading from {args.cache_dir}")
        steps = {} if args.pretrain_steps is None else {"vae_steps": args.pretrain_steps,
                                                        "flow_steps": args.pretrain_steps}
        path = load_or_pretrain_prompted_digits(args.cache_dir, log=log, **steps)
        classifier, accuracy = load_or_train_digits_classifier(args.cache_dir, device)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32)
        return _TaskParts(pipe, prompted_digit_reward(classifier), "prompted digits (SD3 pipeline, LoRA)",
                          [f"classifier held-out accuracy {accuracy:.4f}"], loads_pretrained=True)
    if task == _T2I:
        if args.dtype:
            dtype = args.dtype
        else:  # what the device computes natively: bf16 on an fp32-only device is emulated and far slower
            from orwcfm_fast.precision import native_low_precision

            native = native_low_precision(device)
            dtype = native.dtype_name
            log(f"[train] --dtype {native.reason}")
        log(f"[train] loading {pipeline_class_name(pretrained)} ({dtype}) from {pretrained}")
        pipe = load_pipeline(pretrained, dtype)
        # Each reward gets the decoded images in its own input range (the trainer converts them).
        return _TaskParts(pipe, None, f"text-to-image ({type(pipe).__name__}, {dtype})",
                          [f"reward {config['reward']}"], loads_pretrained=True)
    raise UsageError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")


def build_trainer(plan: "_Plan", args: argparse.Namespace, device, log=print, **overrides: Any):
    """A fresh trainer of ``plan``'s task: its model built (pretrained and cached where the task does that) and
    broadcast from rank 0, the task's reward unless the config names one, ``overrides`` on top of the config,
    the ``--pretrained`` weights loaded. Used by ``sweep`` (one per setting) and ``eval``.

    Returns:
        ``(trainer, description)``.

    Raises:
        UsageError: the task cannot be built from the arguments; ``ValueError`` for a bad config value.
    """
    import torch

    from orwcfm_fast import distributed
    from orwcfm_fast.trainer import ORWCFMTrainer

    ordered = contextlib.nullcontext() if plan.task == _T2I else distributed.main_process_first()
    with ordered:
        parts = _build_task(plan.task, args, device, pretrained=plan.pretrained, log=log, config=plan.config)
    if isinstance(parts.model, torch.nn.Module):
        distributed.broadcast_module(parts.model)
    if isinstance(parts.reward, torch.nn.Module):
        distributed.broadcast_module(parts.reward)
    config = {**plan.config, **overrides}
    if parts.reward is not None and "reward" not in config:
        config["reward"] = parts.reward
    trainer = ORWCFMTrainer(parts.model, config, device)
    if plan.pretrained is not None and not parts.loads_pretrained:
        trainer.load_pretrained(plan.pretrained, ema=args.ema)
    return trainer, parts.description


# ----------------------------------------------------------------------------- distributed helpers


def weights_digest(weights) -> str:
    """SHA-256 of a module's (or a state dict's) tensors: names, dtypes, shapes and bytes, in key order.

    Equal digests mean bit-identical weights (used to check that data-parallel replicas agree).
    """
    import torch

    from orwcfm_fast.checkpoints import unwrap_model

    state = unwrap_model(weights).state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trained_weights(trainer):
    """What the replicas must agree on: ``net_model``, or a pipeline's trained parameters (its LoRA adapter)."""
    from orwcfm_fast import distributed
    from orwcfm_fast.flows.models import ModuleModels

    if isinstance(trainer.models, ModuleModels):
        return trainer.net_model
    # sharded (FSDP) parameters gathered whole: a collective, every rank calls this
    return {f"trainable.{i}": distributed.full_tensor(p.detach())
            for i, p in enumerate(trainer.models.trainable_parameters())}


def _next_prompts(trainer) -> list[str]:
    """The prompts of this rank's next batch, drawn from a copy of its prompt generator (its state is untouched)."""
    import torch

    from orwcfm_fast.prompts import draw_prompts

    generator = torch.Generator().set_state(trainer.cpu_generator.get_state())
    return draw_prompts(trainer.prompts, trainer.batch_size, trainer.config["images_per_prompt"], generator)


# ----------------------------------------------------------------------------- the command


@dataclass
class _Plan:
    """What a run will do, decided from the arguments alone (before torch does any work)."""

    task: str
    config: dict[str, Any]
    epochs: int
    steps_per_epoch: int
    pretrained: str | None
    resume: str  # "auto", "never" or a path
    args: argparse.Namespace


def _plan(args: argparse.Namespace) -> _Plan:
    task = args.task
    spec = TASKS[task]
    if args.target is not None:
        if spec["targets"] is None:
            raise UsageError(f"--target does not apply to --task {task} (its reward comes from the config)")
        if args.target not in spec["targets"]:
            low, high = spec["targets"].start, spec["targets"].stop - 1
            raise UsageError(f"--target for --task {task} must be in {low}..{high}, got {args.target}")
    if args.pretrain_steps is not None and task in ("cifar10", _T2I):
        raise UsageError(f"--pretrain-steps does not apply to --task {task}")
    t2i = task == _T2I
    if args.prompts is not None and task not in (_T2I, _PROMPTED):
        raise UsageError(f"--prompts applies to --task {_T2I} and {_PROMPTED} only")
    if args.dtype is not None and not t2i:
        raise UsageError(f"--dtype applies to --task {_T2I} only")
    if task == _PROMPTED:
        if args.pretrained is not None or args.ema:
            raise UsageError(f"--task {_PROMPTED} pretrains its pipeline itself (cached in --cache-dir): "
                             "--pretrained / --ema do not apply")
        missing = [name for name in ("diffusers", "transformers", "peft") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"--task {_PROMPTED} needs {', '.join(missing)}: install the extra with "
                             "`pip install 'orwcfm_fast[diffusers]'`")
    if t2i and args.ema:
        raise UsageError(f"--ema does not apply to --task {_T2I} (a pipeline folder holds one set of weights)")
    config = resolve_config(task, args.config or (), args.set or (), outdir=args.outdir, seed=args.seed,
                            batch_size=args.batch_size, reward=args.reward, prompts=args.prompts)
    pretrained = args.pretrained or config.get("ref_path")
    if task == "cifar10" and pretrained is None:
        raise UsageError(
            "--task cifar10 needs --pretrained PATH: a torchcfm CIFAR-10 checkpoint (e.g. "
            "otcfm_cifar10_weights_step_400000.pt from torchcfm's examples/images/cifar10 training; add --ema "
            "for its EMA weights). Nothing is downloaded."
        )
    if t2i:
        if pretrained is None:
            raise UsageError(
                f"--task {_T2I} needs --pretrained DIR: a diffusers StableDiffusion3Pipeline or FluxPipeline "
                "folder written by save_pretrained (e.g. a downloaded stabilityai/stable-diffusion-3.5-medium). "
                "Nothing is downloaded."
            )
        pipeline_class_name(pretrained)  # a folder holding a supported pipeline
        missing = [name for name in ("diffusers", "transformers", "peft") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"--task {_T2I} needs {', '.join(missing)}: install the extra with "
                             "`pip install 'orwcfm_fast[diffusers]'`")
        _check_prompts(config)
    elif pretrained is not None and not Path(pretrained).is_file():
        raise UsageError(f"--pretrained {str(pretrained)!r}: no such file")
    if args.ema and pretrained is None:
        raise UsageError("--ema needs --pretrained (it picks the checkpoint's 'ema_model' weights)")
    if pretrained is not None:
        config["ref_path"] = str(pretrained)
    _check_reward_name(config.get("reward"))
    # The one reward whose setting is commonly missing: say so before minutes of model building.
    reward = config.get("reward", "clip" if task == "cifar10" else None)
    if isinstance(reward, str) and reward.strip().lower() == "clip" and not config.get("text_prompts"):
        raise UsageError(
            "reward 'clip' needs config key 'text_prompts': [target prompt, contrast prompt] (reward "
            "p(target) - p(contrast)), e.g. --set 'text_prompts=[\"a photo of a cat\", \"a photo of a dog\"]'"
        )
    if args.resume not in ("auto", "never") and not Path(args.resume).exists():
        raise UsageError(f"--resume {args.resume!r}: no such file or sharded checkpoint folder (or use 'auto' / 'never')")
    epochs = args.epochs if args.epochs is not None else spec["epochs"]
    steps = args.steps_per_epoch if args.steps_per_epoch is not None else spec["steps_per_epoch"]
    missing = [flag for flag, value in (("--epochs", epochs), ("--steps-per-epoch", steps)) if value is None]
    if missing:
        raise UsageError(f"--task {task} needs {' and '.join(missing)}")
    return _Plan(task, config, epochs, steps, None if pretrained is None else str(pretrained), args.resume, args)


def _check_prompts(config: Mapping[str, Any]) -> None:
    """Text-to-image: config ``prompts`` (``--prompts FILE``) is given and readable, before any model is loaded."""
    from orwcfm_fast.prompts import PromptError, load_prompts

    if config.get("prompts") is None:
        raise UsageError(f"--task {_T2I} needs --prompts FILE: training prompts, a .txt file (one a line) or a "
                         ".jsonl file (a \"prompt\" field a line); or config key 'prompts'")
    try:
        load_prompts(config["prompts"], "prompts")
    except PromptError as err:
        raise UsageError(str(err).replace("config key 'prompts'", "--prompts / config key 'prompts'", 1)) from None


def _check_reward_name(reward: Any) -> None:
    """A reward given by name is a registered one (else the error lists them), before any model is built.
    A reward dict's names are checked each; a reward server's URL is checked when the trainer connects."""
    if isinstance(reward, Mapping):
        for name in reward:
            _check_reward_name(name)
        return
    if not isinstance(reward, str) or reward.strip().lower().startswith(("http://", "https://")):
        return
    from orwcfm_fast.rewards.registry import unknown_reward_hint

    hint = unknown_reward_hint(reward)
    if hint is not None:
        raise UsageError(f"unknown reward {reward!r} (--reward / config key 'reward'){hint}")


def _find_resume(plan: _Plan, config: Mapping[str, Any]) -> Path | None:
    """The checkpoint to resume from (rank 0 decides), or None for a fresh run.

    ``auto``: the newer (by modification time) of the checkpoint directory's latest checkpoint and
    ``<outdir>/final.pt`` (sharded runs: ``final.dcp``), so a finished run is extended by raising ``--epochs``.
    ``never``: a fresh run, refused when the output folder already holds one (their checkpoints would mix).
    """
    from orwcfm_fast.checkpoints import latest_checkpoint
    from orwcfm_fast.trainer import checkpoint_directory

    ckpt_dir = checkpoint_directory(config)
    finals = [Path(config["savedir"]) / _FINAL, Path(config["savedir"]) / _FINAL_SHARDED]
    finals = [p for p in finals if (p.is_dir() if p.suffix == ".dcp" else p.is_file())]
    candidates = [p for p in (latest_checkpoint(ckpt_dir), *finals) if p is not None]
    if plan.resume == "never":
        if candidates:
            raise UsageError(
                f"--resume never but {str(candidates[0].parent)!r} already holds a run ({candidates[0].name}); "
                "continue it with --resume auto, or pick another --outdir (or checkpoint_dir)"
            )
        return None
    if plan.resume != "auto":
        return Path(plan.resume)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name in (_FINAL, _FINAL_SHARDED)))


def _write_record(outdir: Path, plan: _Plan, trainer, *, resumed_from, world: int, device) -> None:
    from orwcfm_fast.config import serializable_config

    record = {
        "task": plan.task,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "pretrained": plan.pretrained,
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "start_epoch": trainer.epoch,
        "world_size": world,
        "device": str(device),
        "arguments": {k: v for k, v in vars(plan.args).items()},
        "config": serializable_config(trainer.config),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / f".{_RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, outdir / _RUN_RECORD)


def run_train(args: argparse.Namespace, prog: str = "orwcfm-fast train") -> int:
    """Run the ``train`` command for parsed ``args`` (see :func:`orwcfm_fast.cli.build_parser`).

    Returns:
        The exit status: 0 done, 2 bad arguments or config, 1 an unusable checkpoint, ``128 + signum``
        when stopped by SIGINT/SIGTERM (after saving a checkpoint).
    """
    try:
        plan = _plan(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from orwcfm_fast import distributed

    owns_group = distributed.launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env(args.device)
    try:
        return _train(plan, args, device, prog)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(plan: _Plan, args: argparse.Namespace, device, prog: str) -> int:
    import torch

    from orwcfm_fast import distributed
    from orwcfm_fast.checkpoints import CheckpointError
    from orwcfm_fast.trainer import ORWCFMTrainer, TrainingInterrupted

    main_process = distributed.is_main_process()
    world = distributed.world_size()
    where = f"[rank {distributed.rank()}] " if world > 1 else ""

    def log(message: str) -> None:
        if main_process and not args.quiet:
            print(message, flush=True)

    def fail(message: str, status: int) -> int:
        print(f"{where}{prog}: error: {message}", file=sys.stderr, flush=True)
        return status

    start = time.perf_counter()
    # Rank 0 fills the caches, the others then read them; a pipeline folder is read by all ranks at once.
    ordered = contextlib.nullcontext() if plan.task == _T2I else distributed.main_process_first()
    with ordered:
        try:
            parts = _build_task(plan.task, args, device, pretrained=plan.pretrained, log=log, config=plan.config)
        except UsageError as err:  # caught inside: every rank still passes the barrier, then reports
            parts = err
    if isinstance(parts, UsageError):
        return fail(str(parts), 2)
    # Identical starting weights on every rank, whatever each one computed. (A pipeline: every rank
    # loaded the same files, and the LoRA adapters are initialised from the config's seed.)
    if isinstance(parts.model, torch.nn.Module):
        distributed.broadcast_module(parts.model)
    if isinstance(parts.reward, torch.nn.Module):
        distributed.broadcast_module(parts.reward)
    for note in parts.notes:
        log(f"[train] {note}")

    config = dict(plan.config)
    if parts.reward is not None and "reward" not in config:
        config["reward"] = parts.reward
    try:
        trainer = ORWCFMTrainer(parts.model, config, device)
    except ValueError as err:  # ConfigError, or a reward factory's bad setting
        return fail(str(err), 2)

    try:
        if plan.pretrained is not None and not parts.loads_pretrained:
            trainer.load_pretrained(plan.pretrained, ema=args.ema)
            log(f"[train] loaded pretrained weights{' (EMA)' if args.ema else ''} from {plan.pretrained}")
        try:
            resume = _find_resume(plan, trainer.config) if main_process else None
        except UsageError as err:
            resume = err
        resume = distributed.broadcast_object(resume)
        if isinstance(resume, UsageError):
            return fail(str(resume), 2)
        if resume is not None:
            trainer.load_checkpoint(resume, reshard=getattr(args, "reshard", False))
            log(f"[train] resumed from {resume} (epoch {trainer.epoch} completed)")
    except CheckpointError as err:
        return fail(str(err), 1)

    outdir = Path(trainer.config["savedir"])
    start_epoch = trainer.epoch
    remaining = plan.epochs - start_epoch
    if main_process:
        _write_record(outdir, plan, trainer, resumed_from=resume, world=world, device=device)
        csv_path = outdir / f"{trainer.config['run_name']}_metrics.csv"
        if resume is None and csv_path.exists():
            print(f"[train] note: fresh run, but {csv_path} exists (an earlier run without checkpoints?): "
                  "appending to it", file=sys.stderr, flush=True)
    if remaining <= 0:
        log(f"[train] already at epoch {start_epoch} of --epochs {plan.epochs}: nothing to train")
    else:
        log(f"[train] {parts.description} on {device}{f', {world} ranks' if world > 1 else ''}: "
            f"epochs {start_epoch + 1}..{plan.epochs}, {plan.steps_per_epoch} steps each, "
            f"batch {trainer.config['batch_size']}{' per rank' if world > 1 else ''}")
        try:
            trainer.train(remaining, plan.steps_per_epoch)
        except TrainingInterrupted as stop:
            if main_process:
                print(f"{prog}: {stop} (epoch {trainer.epoch} completed); run the same command again to resume "
                      "(--resume auto)", file=sys.stderr, flush=True)
            code = stop.code
            return code if isinstance(code, int) else 1

    final = outdir / (_FINAL_SHARDED if trainer.models.sharded else _FINAL)
    trainer.save_checkpoint(final)  # a collective under torch.distributed: rank 0 writes (sharded: every rank)
    lora = None
    if getattr(trainer.models, "roles", None) is not None:  # a pipeline trained with LoRA
        lora = outdir / _LORA
        trainer.save_lora(lora)  # diffusers' format; rank 0 writes
    digest = weights_digest(_trained_weights(trainer))
    digests = [digest]
    if distributed.is_distributed():
        digests = [None] * world
        torch.distributed.all_gather_object(digests, digest)
    if args.dump_samples:
        samples = trainer.sample(16).detach().cpu()
        dump = Path(f"{args.dump_samples}.rank{distributed.rank()}.pt")
        dump.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": distributed.rank(), "world_size": world, "epoch": trainer.epoch,
                  "samples": samples, "weights_sha256": digest}
        if trainer.prompts is not None:
            record["next_prompts"] = _next_prompts(trainer)
        torch.save(record, dump)
    elapsed = time.perf_counter() - start

    if main_process:
        history = trainer.history
        reward = ""
        if history and "reward" in history[0] and "reward" in history[-1]:
            first, last = history[0], history[-1]
            reward = f"reward {first['reward']:.4f} (epoch {first.get('epoch', 1)})"
            if len(history) > 1:
                reward += f" -> {last['reward']:.4f} (epoch {last.get('epoch', trainer.epoch)})"
            reward += "; "
        csv_path = outdir / f"{trainer.config['run_name']}_metrics.csv"
        ranks = f", {world} ranks" if world > 1 else ""
        print(f"ORW-CFM-W2 train {parts.description} on {device}{ranks}: epoch {start_epoch} -> {trainer.epoch} "
              f"of {plan.epochs} ({max(remaining, 0)} trained x {plan.steps_per_epoch} steps) in {elapsed:.0f} s; "
              f"{reward}final checkpoint {final}, {f'LoRA {lora}, ' if lora is not None else ''}metrics {csv_path}",
              flush=True)
        if world > 1:
            if len(set(digests)) == 1:
                print(f"  replicas: weights identical across {world} ranks (sha256 {digest[:16]})", flush=True)
            else:
                print(f"{prog}: warning: replicas' weights differ across ranks (sha256 per rank: "
                      f"{[d[:16] for d in digests]}); final.pt holds rank 0's", file=sys.stderr, flush=True)
    return 0
