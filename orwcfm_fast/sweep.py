"""The ``sweep`` command: the reward-diversity trade-off of each objective, and what it costs in compute.

``orwcfm-fast sweep --task TASK --objectives orw-cfm-w2,adrpo,offline-rwr,diffusion-nft --alphas 0,0.3,1,3
[--temperatures 1,3] --outdir DIR`` fine-tunes once per setting from the same pretrained model and seed (the
``train`` command's tasks, model building and configuration). The settings are the objectives crossed with the
alphas (config ``w2_coefficient``: each objective's regularisation strength; for ``diffusion-nft`` the
coefficient of its reference term) and, for the objectives whose loss reads the weights ``exp(temperature r)``
(``orw-cfm-w2``, ``adrpo``, ``offline-rwr``), the temperatures; ``diffusion-nft`` is crossed with the alphas
only and its temperature is recorded as ``null`` (:func:`sweep_settings`). Without ``--objectives`` the
config's ``objective`` alone is swept.

The pretrained model is evaluated once, and every setting after each ``--eval-every`` epochs and at its end,
with :meth:`~orwcfm_fast.ORWCFMTrainer.evaluate` on the same evaluation noise: training reward, held-out
reward, diversity (mean pairwise distance) and Vendi score. Evaluation does not touch the training random
states, so a setting trains exactly as it would without it.

The held-out reward (config ``eval_reward``; the sweep sets one per task unless the config names one,
:func:`held_out_reward`) is never trained on:

- ``gaussians``: the data's own classifier, the eight-Gaussians mixture's posterior probability of the target
  mode (:class:`~orwcfm_fast.tasks.gaussians.ModePosteriorReward`), where training rewards the negative
  distance to the mode's centre: it gives nothing for pulling samples tighter than the mode's own spread and
  scores a point between two modes 1/2, not by its distance;
- ``digits``: another classifier's probability of the target digit, a convolution-free MLP trained with
  another seed on another train/test split (:data:`~orwcfm_fast.tasks.digits.HELD_OUT_CLASSIFIER`, held-out
  accuracy 0.98), where training rewards the CNN's (:class:`~orwcfm_fast.tasks.digits.DigitsClassifier`);
- ``prompted-digits``: the same MLP's probability of each prompt's digit;
- ``cifar10`` and ``text-to-image``: none unless ``--set eval_reward=...`` names one.

It writes:

- ``DIR/sweep.json``: ``{"task", "objectives", "alphas", "temperatures", "seed", "eval_seed", "held_out_reward"
  (its description), "pretrained": {reward, held_out_reward, diversity, vendi, ...}, "settings": [{"objective",
  "alpha", "temperature", "reward", "held_out_reward", "diversity", "vendi", "reward/<term>"..., "per_prompt",
  "hacking_alarm", "forwards_total", "backwards_total", "forwards_by_kind", "evaluation_forwards_total",
  "epochs": [{"epoch", "global_step", "forwards_total", "backwards_total", "reward", "held_out_reward",
  "diversity", "vendi", "hacking_alarm"}...], "history", "seconds", "eval_seconds"}...], "analysis",
  "device", "cpu", "torch", "commit", "date", ...}``. Forward counts are the trainer's
  (:mod:`orwcfm_fast.compute`): one sample through the model is one forward; training's sampling, policy,
  reference and old-policy passes, not evaluation's;
- ``DIR/pareto.png``: final reward against final diversity, a colour per objective, a marker per temperature,
  each point labelled with its alpha, the pretrained model as a star (:func:`save_pareto`);
- ``DIR/compute.png``: evaluated reward (and diversity) against training forwards, one line per setting
  coloured by objective (:func:`save_compute`);
- ``DIR/sweep.md``: the settings' table and the comparisons of :func:`analyse` (below), with the seeds, the
  device (the CPU's model), torch, commit and date (:func:`sweep_table`);
- per setting ``DIR/<objective>_alpha<a>[_temp<t>]/``: the trainer's metrics CSV, ``eval/`` (the final
  evaluation.json and grids) and ``result.json``; ``DIR/pretrained/``: the pretrained model's evaluation.

The comparisons (:func:`analyse`; points are the evaluations after epoch 1 and later, no interpolation between
them, so a point is a checkpoint a user could keep):

- *reward at matched diversity*: for each level ``f`` of ``--diversity-levels`` (default 0.5, 0.75, 0.9) and
  each objective, the highest evaluated reward among the objective's points (any setting, any evaluated epoch)
  whose diversity is at least ``f`` times the pretrained model's; none when no point keeps that much;
- *forwards to a reward target*: per objective, the fewest training forwards at which one of its settings'
  evaluated reward first reaches the target (``--reward-target``; default half-way from the pretrained reward
  to the best evaluated reward of the sweep); "not reached" otherwise;
- *reward at matched compute*: the budget is the smallest of the objectives' largest forward counts (every
  objective ran at least that far); per objective, its highest evaluated reward within the budget.

A setting whose ``result.json`` was written with the same settings is not trained again, so an interrupted
sweep continues where it stopped. Under ``torchrun`` every process runs the same command: each setting
trains data-parallel, evaluation shares the prompts out, rank 0 writes the files (forward counts are rank 0's).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from orwcfm_fast.cli import _positive_int

__all__ = ["add_parser", "run_sweep", "read_sweep", "sweep_settings", "uses_temperature", "held_out_reward",
           "analyse", "matched_diversity", "forwards_to_target", "matched_compute", "default_reward_target",
           "save_pareto", "save_compute", "sweep_table", "EVAL_SAMPLES", "DIVERSITY_LEVELS", "OBJECTIVE_COLOURS"]

#: evaluation samples per prompt (unconditional tasks: in all) of each task when --samples-per-prompt is not given
EVAL_SAMPLES = {"gaussians": 1000, "digits": 256, "cifar10": 64, "prompted-digits": 64, "text-to-image": 16}

#: default --diversity-levels: fractions of the pretrained model's diversity at which rewards are compared
DIVERSITY_LEVELS = (0.5, 0.75, 0.9)

#: a fixed colour per objective in both figures
OBJECTIVE_COLOURS = {"orw-cfm-w2": "tab:blue", "adrpo": "tab:orange", "offline-rwr": "tab:green",
                     "diffusion-nft": "tab:red"}

_TEMPERATURE_MARKERS = ("o", "s", "^", "D", "v", "P")
_ALPHA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0,0.3,1,3, got {text!r}") from None
    if not values or any(not v >= 0 or v != v or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r}")
    return values


def _fraction_list(text: str) -> list[float]:
    values = _float_list(text)
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1] of the pretrained diversity, got {text!r}")
    return sorted(values)


def _objective_list(text: str) -> list[str]:
    from orwcfm_fast.config import OBJECTIVES

    names = [v.strip() for v in text.split(",") if v.strip()]
    valid = ", ".join(OBJECTIVES)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated objectives (valid: {valid}), got {text!r}")
    for name in names:
        if name not in OBJECTIVES:
            raise argparse.ArgumentTypeError(f"unknown objective {name!r}; valid objectives: {valid}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an objective is repeated in {text!r}")
    return names


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds ``sweep`` to the ``orwcfm-fast`` subparsers (the ``train`` command's task and config flags)."""
    from orwcfm_fast.config import OBJECTIVES
    from orwcfm_fast.train_run import TASKS, parse_assignment

    p = sub.add_parser(
        "sweep",
        help="reward vs diversity vs compute: fine-tune once per objective x alpha (x temperature), evaluate, plot",
        description=(
            "Fine-tune the task's pretrained model once per (objective, alpha, temperature) from the same seed "
            "(diffusion-nft: per alpha; the temperature does not enter its loss), evaluate the pretrained model "
            "and each policy after every --eval-every epochs with the same noise (reward, held-out reward, "
            "within-prompt diversity, Vendi score), count the training forwards, and write OUTDIR/sweep.json, "
            "OUTDIR/pareto.png (reward against diversity), OUTDIR/compute.png (reward against forwards) and "
            "OUTDIR/sweep.md (reward at matched diversity and compute, forwards to a reward target). Settings "
            "already in OUTDIR are not trained again. Under torchrun every process runs this command."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="as for train")
    p.add_argument("--objectives", type=_objective_list, default=None,
                   help=f"objectives, comma-separated, of {', '.join(OBJECTIVES)} (default: the config's objective)")
    p.add_argument("--alphas", type=_float_list, required=True,
                   help="regularisation strengths (config w2_coefficient; diffusion-nft: its reference term's), "
                        "comma-separated")
    p.add_argument("--temperatures", type=_float_list, default=None,
                   help="temperatures beta, comma-separated, for the objectives that weight by exp(beta r) "
                        "(default: the task's / config's one)")
    p.add_argument("--outdir", default=None, help="folder of the sweep (default runs/sweep-TASK)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per setting (default: the task's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="steps per epoch (default: the task's)")
    p.add_argument("--eval-every", type=_positive_int, default=1,
                   help="evaluate each setting after every this many epochs (and after its last)")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="evaluation samples per prompt (unconditional tasks: in all); default per task: "
                        + ", ".join(f"{k} {v}" for k, v in EVAL_SAMPLES.items()))
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation noise")
    p.add_argument("--diversity-levels", type=_fraction_list, default=list(DIVERSITY_LEVELS),
                   help="fractions of the pretrained diversity at which sweep.md compares rewards")
    p.add_argument("--reward-target", type=_finite, default=None,
                   help="the reward whose first reach sweep.md counts forwards to (default: half-way from the "
                        "pretrained reward to the sweep's best evaluated reward)")
    p.add_argument("--target", type=int, default=None, help="as for train (gaussians mode / digits digit)")
    p.add_argument("--pretrained", default=None, help="as for train")
    p.add_argument("--prompts", default=None, help="as for train (text-to-image, prompted-digits)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="as for train (text-to-image)")
    p.add_argument("--reward", default=None, help="as for train")
    p.add_argument("--ema", action="store_true", help="as for train")
    p.add_argument("--config", metavar="FILE.json", action="append", default=None, help="as for train")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", type=parse_assignment, default=None,
                   help="as for train")
    p.add_argument("--batch-size", type=int, default=None, help="as for train")
    p.add_argument("--seed", type=int, default=None, help="config seed, the same for every setting (default 0)")
    p.add_argument("--device", default=None, help="as for train")
    p.add_argument("--cache-dir", default="runs/cache", help="as for train")
    p.add_argument("--pretrain-steps", type=int, default=None, help="as for train")
    p.add_argument("--quiet", action="store_true", help="no progress lines of this command")
    return p


# ----------------------------------------------------------------------------- settings


def uses_temperature(objective: str) -> bool:
    """Whether ``objective``'s loss reads the weights ``exp(temperature r)`` (all but ``diffusion-nft``)."""
    from orwcfm_fast.objectives import OBJECTIVES

    return bool(OBJECTIVES[objective].uses_reward_weights)


def sweep_settings(objectives: Sequence[str], alphas: Sequence[float],
                   temperatures: Sequence[float]) -> list[dict[str, Any]]:
    """The settings of a sweep, in training order: per objective, per temperature (``None`` once for the
    objectives without one, :func:`uses_temperature`), per alpha.

    Returns:
        ``[{"objective", "alpha", "temperature"}...]``.
    """
    settings = []
    for objective in objectives:
        temps = list(temperatures) if uses_temperature(objective) else [None]
        for temperature in temps:
            for alpha in alphas:
                settings.append({"objective": objective, "alpha": float(alpha),
                                 "temperature": None if temperature is None else float(temperature)})
    return settings


def _slug(value: float) -> str:
    return f"{value:g}".replace("-", "m")


def _setting_name(setting: Mapping[str, Any]) -> str:
    name = f"{setting['objective']}_alpha{_slug(setting['alpha'])}"
    return name if setting["temperature"] is None else f"{name}_temp{_slug(setting['temperature'])}"


def _setting_label(setting: Mapping[str, Any]) -> str:
    t = setting["temperature"]
    return f"α {setting['alpha']:g}" + ("" if t is None else f", T {t:g}")


def held_out_reward(task: str, target: int | None, cache_dir: str | os.PathLike, device) -> tuple[Any, str | None]:
    """The sweep's held-out reward of ``task`` (config ``eval_reward``) and its description (the module docstring
    says why each is not the training reward).

    Returns:
        ``(reward, description)``; ``(None, None)`` for tasks without one (``cifar10``, ``text-to-image``).
    """
    from orwcfm_fast.train_run import TASKS

    target = TASKS[task]["target"] if target is None else target
    if task == "gaussians":
        from orwcfm_fast.tasks.gaussians import EightGaussians, ModePosteriorReward

        return (ModePosteriorReward(EightGaussians(), target).to(device),
                f"the eight-Gaussians mixture's posterior probability of mode {target}")
    if task in ("digits", "prompted-digits"):
        from orwcfm_fast.rewards import ClassifierReward
        from orwcfm_fast.tasks.digits import HELD_OUT_CLASSIFIER, load_or_train_digits_classifier
        from orwcfm_fast.tasks.prompted_digits import prompted_digit_reward

        classifier, accuracy = load_or_train_digits_classifier(cache_dir, device, **HELD_OUT_CLASSIFIER)
        judge = (f"a held-out MLP classifier (seed {HELD_OUT_CLASSIFIER['seed']}, {HELD_OUT_CLASSIFIER['steps']} "
                 f"steps, held-out accuracy {accuracy:.3f})")
        if task == "digits":
            return ClassifierReward(classifier, target_class=target), f"{judge}'s probability of digit {target}"
        return prompted_digit_reward(classifier), f"{judge}'s probability of each prompt's digit"
    return None, None


def _fingerprint(plan, setting: Mapping[str, Any] | None, samples: int, eval_seed: int, eval_every: int,
                 held_out: str | None) -> str:
    """What a setting's result depends on (a result.json with another fingerprint is trained again); ``setting``
    None: the pretrained model's evaluation."""
    from orwcfm_fast.config import serializable_config

    config = {k: v for k, v in plan.config.items() if k not in ("savedir", "checkpoint_dir")}
    key = {"task": plan.task, "setting": None if setting is None else dict(setting), "samples": samples,
           "eval_seed": eval_seed, "target": plan.args.target, "held_out": held_out, "pretrained": plan.pretrained,
           "config": serializable_config(config)}
    if setting is not None:
        key.update(epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch, eval_every=eval_every)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _summary(ev: Mapping[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in ev.items() if k in ("reward", "held_out_reward", "diversity", "vendi")
            or k.startswith(("reward/", "held_out_reward/"))}
    for k in ("per_prompt", "embedding", "prompts", "samples_per_prompt", "seed"):
        keep[k] = ev[k]
    return keep


def _epoch_point(trainer, ev: Mapping[str, Any]) -> dict[str, Any]:
    """One evaluated epoch of a setting: the trainer's counts so far (its last history row) and the evaluation."""
    last = trainer.history[-1]
    return {"epoch": trainer.epoch, "global_step": trainer.global_step,
            "forwards_total": last["forwards_total"], "backwards_total": last["backwards_total"],
            "reward": ev["reward"], "held_out_reward": ev.get("held_out_reward"), "diversity": ev["diversity"],
            "vendi": ev.get("vendi"), "hacking_alarm": ev.get("hacking_alarm")}


# ----------------------------------------------------------------------------- the command


def run_sweep(args: argparse.Namespace, prog: str = "orwcfm-fast sweep") -> int:
    """Run the ``sweep`` command for parsed ``args``; returns the exit status (0 done, 2 bad arguments)."""
    import torch.distributed as dist

    from orwcfm_fast import distributed
    from orwcfm_fast.train_run import UsageError, _plan

    for name in ("epochs", "steps_per_epoch", "samples_per_prompt"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "samples_per_prompt" else 1):
            print(f"{prog}: error: --{name.replace('_', '-')} must be >= {2 if name == 'samples_per_prompt' else 1}",
                  file=sys.stderr)
            return 2
    train_args = argparse.Namespace(**vars(args), resume="never", dump_samples=None)
    if args.outdir is None:
        train_args.outdir = f"runs/sweep-{args.task}"
    try:
        plan = _plan(train_args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    from orwcfm_fast.config import validate_config

    resolved = validate_config(plan.config)
    temperatures = args.temperatures if args.temperatures is not None else [resolved["temperature"]]
    objectives = args.objectives if args.objectives is not None else [resolved["objective"]]
    settings = sweep_settings(objectives, args.alphas, temperatures)
    owns_group = distributed.launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env(args.device)
    try:
        return _sweep(plan, train_args, objectives, temperatures, settings, device, prog)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _sweep(plan, args, objectives, temperatures, settings, device, prog: str) -> int:
    import torch

    from orwcfm_fast import __version__, distributed
    from orwcfm_fast.hacking import evaluation_summary
    from orwcfm_fast.train_run import UsageError, build_trainer

    main = distributed.is_main_process()

    def log(message: str) -> None:
        if main and not args.quiet:
            print(message, flush=True)

    outdir = Path(plan.config["savedir"])
    samples = args.samples_per_prompt or EVAL_SAMPLES.get(plan.task, 16)
    eval_every = args.eval_every
    started = time.perf_counter()
    eval_reward, held_out = None, None
    if plan.config.get("eval_reward") is None:
        with distributed.main_process_first():  # the held-out classifier is trained once, then loaded
            eval_reward, held_out = held_out_reward(plan.task, args.target, args.cache_dir, device)
    else:
        held_out = f"config eval_reward {plan.config['eval_reward']!r}"

    # The pretrained model, evaluated once (the objective, alpha and temperature do not change it).
    pretrained_file = outdir / "pretrained" / "evaluation.json"
    base_key = _fingerprint(plan, None, samples, args.eval_seed, eval_every, held_out)
    pretrained = None
    if main and pretrained_file.is_file():
        old = json.loads(pretrained_file.read_text())
        pretrained = _summary(old) if old.get("sweep_fingerprint") == base_key else None
    pretrained = distributed.broadcast_object(pretrained)  # rank 0's files decide, for every rank
    entries = []
    try:
        for setting in settings:
            name, label = _setting_name(setting), f"{setting['objective']} {_setting_label(setting)}"
            where = outdir / name
            key = _fingerprint(plan, setting, samples, args.eval_seed, eval_every, held_out)
            result_file = where / "result.json"
            old = json.loads(result_file.read_text()) if main and result_file.is_file() else None
            old = distributed.broadcast_object(old)
            if old is not None and old.get("fingerprint") == key and pretrained is not None:
                log(f"[sweep] {label}: done before ({result_file})")
                entries.append(old)
                continue
            overrides = {"objective": setting["objective"], "w2_coefficient": setting["alpha"]}
            if setting["temperature"] is not None:
                overrides["temperature"] = setting["temperature"]
            if eval_reward is not None:
                overrides["eval_reward"] = eval_reward
            trainer, description = build_trainer(plan, args, device, log, savedir=str(where), run_name="sweep",
                                                 handle_signals=False, checkpoint_every=None, **overrides)
            if pretrained is None:
                log(f"[sweep] evaluating the pretrained model ({samples} samples per prompt)")
                ev = trainer.evaluate(samples_per_prompt=samples, outdir=outdir / "pretrained", seed=args.eval_seed)
                pretrained = _summary(ev)
                if main:
                    _write_json(pretrained_file, {**ev, "sweep_fingerprint": base_key})
            # every setting's alarm sees the pretrained model as its first evaluation (epoch 0)
            trainer.eval_history = [evaluation_summary(pretrained, 0, 0)]
            log(f"[sweep] {description}: {label}: {plan.epochs} epochs x {plan.steps_per_epoch} steps")
            points, train_seconds, eval_seconds = [], 0.0, 0.0
            for epoch in range(1, plan.epochs + 1):
                t0 = time.perf_counter()
                trainer.train(1, plan.steps_per_epoch)
                train_seconds += time.perf_counter() - t0
                if epoch % eval_every and epoch < plan.epochs:
                    continue
                t0 = time.perf_counter()
                ev = trainer.evaluate(samples_per_prompt=samples, outdir=where / "eval" if epoch == plan.epochs
                                      else False, seed=args.eval_seed)
                eval_seconds += time.perf_counter() - t0
                points.append(_epoch_point(trainer, ev))
            compute = trainer.compute
            entry = {**setting, **_summary(ev), "hacking_alarm": ev.get("hacking_alarm"),
                     "forwards_total": compute.forwards_total, "backwards_total": compute.total_backwards,
                     "forwards_by_kind": dict(compute.total), "evaluation_forwards_total": compute.evaluation,
                     "epochs": points, "seconds": train_seconds, "eval_seconds": eval_seconds,
                     "history": trainer.history, "fingerprint": key}
            if main:
                _write_json(result_file, entry)
            log(f"[sweep]   reward {pretrained['reward']:.4f} -> {entry['reward']:.4f}, diversity "
                f"{pretrained['diversity']:.4f} -> {entry['diversity']:.4f}, {entry['forwards_total']} forwards "
                f"({train_seconds:.0f} s + {eval_seconds:.0f} s evaluating)")
            entries.append(entry)
            del trainer
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except ValueError as err:  # ConfigError, a reward's bad setting
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    if not main:
        distributed.barrier()  # every rank leaves together, after rank 0 has written the files
        return 0
    from orwcfm_fast.config import validate_config

    record = {
        "task": plan.task, "target": args.target, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
        "eval_every": eval_every, "samples_per_prompt": samples, "seed": validate_config(plan.config)["seed"],
        "eval_seed": args.eval_seed, "objectives": list(objectives), "alphas": list(args.alphas),
        "temperatures": list(temperatures), "held_out_reward": held_out,
        "diversity_levels": list(args.diversity_levels), "reward_target": args.reward_target,
        "pretrained": pretrained,
        "settings": [{k: v for k, v in e.items() if k != "fingerprint"} for e in entries],
        "device": _device_name(device), "cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
        "world_size": distributed.world_size(), "torch": torch.__version__, "orwcfm_fast": __version__,
        "commit": _commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
    }
    record["analysis"] = analyse(record)
    _write_json(outdir / "sweep.json", record)
    save_pareto(record, outdir / "pareto.png")
    save_compute(record, outdir / "compute.png")
    (outdir / "sweep.md").write_text(sweep_table(record))
    log(f"[sweep] {len(entries)} settings: {outdir / 'sweep.json'}, {outdir / 'pareto.png'}, "
        f"{outdir / 'compute.png'}, {outdir / 'sweep.md'}")
    distributed.barrier()
    return 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere the platform's) and its logical CPU count."""
    import platform

    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} logical CPUs"


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep's ``sweep.json`` (a folder or the file)."""
    path = Path(path)
    return json.loads((path / "sweep.json" if path.is_dir() else path).read_text())


# ----------------------------------------------------------------------------- analysis


def _objectives_of(record: Mapping[str, Any]) -> list[str]:
    """The record's objectives in its order (older records: the settings' order)."""
    names = list(record.get("objectives") or [])
    for e in record["settings"]:
        if e.get("objective", "orw-cfm-w2") not in names:
            names.append(e.get("objective", "orw-cfm-w2"))
    return names


def _points(record: Mapping[str, Any], objective: str) -> list[dict[str, Any]]:
    """Every evaluated point of ``objective``'s settings, in the record's order: the epoch point plus its
    setting's ``objective``, ``alpha``, ``temperature``."""
    out = []
    for e in record["settings"]:
        if e.get("objective", "orw-cfm-w2") != objective:
            continue
        for p in e.get("epochs", ()):
            out.append({**p, "objective": objective, "alpha": e["alpha"], "temperature": e["temperature"]})
    return out


def _best(points: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The highest-reward point (ties: the fewer forwards, then the earlier in the record)."""
    best = None
    for p in points:
        if best is None or (p["reward"], -p["forwards_total"]) > (best["reward"], -best["forwards_total"]):
            best = p
    return None if best is None else dict(best)


def matched_diversity(record: Mapping[str, Any], level: float) -> dict[str, dict[str, Any] | None]:
    """Per objective, its highest evaluated reward among points whose diversity is at least ``level`` times the
    pretrained model's (``None``: no such point)."""
    threshold = level * record["pretrained"]["diversity"]
    return {o: _best([p for p in _points(record, o) if p["diversity"] >= threshold]) for o in _objectives_of(record)}


def default_reward_target(record: Mapping[str, Any]) -> float:
    """Half-way from the pretrained reward to the best evaluated reward of the sweep (the pretrained reward when
    nothing beat it)."""
    base = record["pretrained"]["reward"]
    rewards = [p["reward"] for o in _objectives_of(record) for p in _points(record, o)]
    return base + 0.5 * max(max(rewards, default=base) - base, 0.0)


def forwards_to_target(record: Mapping[str, Any], target: float) -> dict[str, dict[str, Any] | None]:
    """Per objective, the point with the fewest training forwards among its settings' first evaluated points
    whose reward reaches ``target`` (``None``: not reached)."""
    out = {}
    for objective in _objectives_of(record):
        firsts = []
        for e in record["settings"]:
            if e.get("objective", "orw-cfm-w2") != objective:
                continue
            for p in e.get("epochs", ()):
                if p["reward"] >= target:
                    firsts.append({**p, "objective": objective, "alpha": e["alpha"], "temperature": e["temperature"]})
                    break
        out[objective] = min(firsts, key=lambda p: p["forwards_total"], default=None)
    return out


def matched_compute(record: Mapping[str, Any]) -> tuple[float | None, dict[str, dict[str, Any] | None]]:
    """The budget (the smallest of the objectives' largest evaluated forward counts) and, per objective, its
    highest evaluated reward within it."""
    largest = [max((p["forwards_total"] for p in _points(record, o)), default=None) for o in _objectives_of(record)]
    largest = [f for f in largest if f is not None]
    if not largest:
        return None, {o: None for o in _objectives_of(record)}
    budget = min(largest)
    return budget, {o: _best([p for p in _points(record, o) if p["forwards_total"] <= budget])
                    for o in _objectives_of(record)}


def analyse(record: Mapping[str, Any]) -> dict[str, Any]:
    """The comparisons of sweep.md (module docstring), from the record alone.

    Returns:
        ``{"diversity_levels", "diversity_thresholds", "matched_diversity": [{objective: point or None}...] (one per
        level), "reward_target", "reward_target_default" (bool), "forwards_to_target": {objective: point or None},
        "compute_budget", "matched_compute": {objective: point or None}}``; a point is an evaluated epoch with its
        setting's ``objective``, ``alpha``, ``temperature``.
    """
    levels = list(record.get("diversity_levels") or DIVERSITY_LEVELS)
    target = record.get("reward_target")
    chosen = target is None
    if chosen:
        target = default_reward_target(record)
    budget, at_budget = matched_compute(record)
    return {"diversity_levels": levels,
            "diversity_thresholds": [f * record["pretrained"]["diversity"] for f in levels],
            "matched_diversity": [matched_diversity(record, f) for f in levels],
            "reward_target": target, "reward_target_default": chosen,
            "forwards_to_target": forwards_to_target(record, target),
            "compute_budget": budget, "matched_compute": at_budget}


# ----------------------------------------------------------------------------- figures and table


def _temperature_marker(temps: Sequence[float], temperature: float | None) -> str:
    return "X" if temperature is None else _TEMPERATURE_MARKERS[temps.index(temperature) % len(_TEMPERATURE_MARKERS)]


def _colour(objective: str) -> str:
    return OBJECTIVE_COLOURS.get(objective, "tab:gray")


def _save(fig, path) -> Path:
    """Writes ``fig`` as a PNG of at most 256 colours (a third of the RGB file's size: these go into the docs)."""
    import io

    from PIL import Image

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG",
                                                                                          optimize=True)
    return path


def save_pareto(record: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """``pareto.png``: final reward (y) against final diversity (x), a colour per objective, a marker per
    temperature (``X`` for objectives without one), each point labelled with its alpha and joined in the order of
    alpha; the pretrained model as a star; dotted verticals at the matched-diversity thresholds."""
    from matplotlib.lines import Line2D

    from orwcfm_fast.tasks.plots import _new_figure

    fig = _new_figure((6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    settings = record["settings"]
    temps = sorted({e["temperature"] for e in settings if e["temperature"] is not None})
    handles = []
    for objective in _objectives_of(record):
        mine = [e for e in settings if e.get("objective", "orw-cfm-w2") == objective]
        colour = _colour(objective)
        for temperature in sorted({e["temperature"] for e in mine}, key=lambda t: -1 if t is None else t):
            points = sorted((e for e in mine if e["temperature"] == temperature), key=lambda e: e["alpha"])
            marker = _temperature_marker(temps, temperature)
            ax.plot([e["diversity"] for e in points], [e["reward"] for e in points], color=colour, marker=marker,
                    markersize=6, linewidth=1, alpha=0.85)
            for e in points:
                ax.annotate(f"{e['alpha']:g}", (e["diversity"], e["reward"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=colour)
        handles.append(Line2D([], [], color=colour, marker="o", linewidth=1, label=objective))
    for temperature in temps:
        handles.append(Line2D([], [], color="gray", marker=_temperature_marker(temps, temperature), linestyle="none",
                              label=f"temperature {temperature:g}"))
    if any(e["temperature"] is None for e in settings):
        handles.append(Line2D([], [], color="gray", marker="X", linestyle="none", label="no temperature"))
    base = record["pretrained"]
    ax.scatter([base["diversity"]], [base["reward"]], marker="*", s=160, color="black", zorder=5)
    handles.append(Line2D([], [], color="black", marker="*", markersize=10, linestyle="none", label="pretrained"))
    for f in record.get("diversity_levels") or ():
        ax.axvline(f * base["diversity"], color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"diversity (mean pairwise distance, {base.get('embedding', 'pixels')}); "
                  "dotted: matched-diversity levels", fontsize=8)
    prompts = len(base.get("per_prompt", {})) > 1
    ax.set_ylabel("reward (mean over prompts)" if prompts else "reward (mean)")
    ax.set_title(title or f"{record['task']}: final reward vs diversity, labels = alpha ({record['epochs']} epochs "
                 f"x {record['steps_per_epoch']} steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    return _save(fig, path)


def save_compute(record: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """``compute.png``: evaluated reward (left) and diversity (right) against training forwards, one line per
    setting from the pretrained model at 0 forwards, coloured by objective, a line style per temperature (solid for
    objectives without one), a marker per alpha; the reward target as a dashed horizontal."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator

    from orwcfm_fast.tasks.plots import _new_figure

    fig = _new_figure((10.5, 4.4))
    axes = [fig.add_subplot(1, 2, k) for k in (1, 2)]
    base = record["pretrained"]
    settings = record["settings"]
    temps = sorted({e["temperature"] for e in settings if e["temperature"] is not None})
    alphas = sorted({e["alpha"] for e in settings})
    for e in settings:
        points = e.get("epochs", ())
        xs = [0.0] + [p["forwards_total"] for p in points]
        style = "-" if e["temperature"] is None else _LINESTYLES[temps.index(e["temperature"]) % len(_LINESTYLES)]
        marker = _ALPHA_MARKERS[alphas.index(e["alpha"]) % len(_ALPHA_MARKERS)]
        for ax, key in zip(axes, ("reward", "diversity")):
            ax.plot(xs, [base[key]] + [p[key] for p in points], color=_colour(e.get("objective", "orw-cfm-w2")),
                    linestyle=style, marker=marker, markersize=3.5, linewidth=1, alpha=0.8)
    target = (record.get("analysis") or {}).get("reward_target")
    if target is not None:
        axes[0].axhline(target, color="black", linestyle="--", linewidth=0.8)
    handles = [Line2D([], [], color=_colour(o), label=o) for o in _objectives_of(record)]
    handles += [Line2D([], [], color="gray", marker=_ALPHA_MARKERS[k % len(_ALPHA_MARKERS)], linestyle="none",
                       markersize=4, label=f"alpha {a:g}") for k, a in enumerate(alphas)]
    if len(temps) > 1:
        handles += [Line2D([], [], color="gray", linestyle=_LINESTYLES[k % len(_LINESTYLES)],
                           label=f"temperature {t:g}") for k, t in enumerate(temps)]
    if target is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="reward target"))
    # symmetric log: the pretrained model at 0, then decades (offline-rwr's cheap steps and the online objectives'
    # costly ones differ by several times)
    positive = [p["forwards_total"] for e in settings for p in e.get("epochs", ()) if p["forwards_total"] > 0]
    for ax, key in zip(axes, ("reward", "diversity")):
        if positive:  # linear up to the decade below the first point, so 0 and the first decade's tick stand apart
            low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
            ax.set_xscale("symlog", linthresh=10.0**low, linscale=0.5)
            ax.set_xlim(0, max(positive) * 1.15)
            ax.xaxis.set_major_locator(FixedLocator([0.0] + [10.0**k for k in range(low, high + 1)]))
            ax.xaxis.set_minor_locator(FixedLocator([m * 10.0**k for k in range(low, high) for m in range(2, 10)]))
        ax.set_xlabel("training forwards (samples through the model: sampling + loss passes; symlog)", fontsize=8)
        ax.set_ylabel(f"evaluated {key}")
        ax.grid(alpha=0.3)
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or f"{record['task']}: reward and diversity against compute (evaluated every "
                 f"{record.get('eval_every', 1)} epoch(s); the pretrained model at 0)", fontsize=9)
    return _save(fig, path)


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _forwards(value: float | None) -> str:
    return "—" if value is None else f"{int(round(value))}"


def _where(point: Mapping[str, Any]) -> str:
    return f"{_setting_label(point)}, epoch {point['epoch']}"


def sweep_table(record: Mapping[str, Any]) -> str:
    """``sweep.md``: one row per setting (and the pretrained model), then the comparisons of :func:`analyse`."""
    base = record["pretrained"]
    analysis = record.get("analysis") or analyse(record)
    objectives = _objectives_of(record)
    lines = [
        f"# Sweep: {record['task']}",
        "",
        f"{record['epochs']} epochs x {record['steps_per_epoch']} steps per setting, evaluated every "
        f"{record.get('eval_every', 1)} epoch(s) on {record['samples_per_prompt']} samples per prompt. Seeds: "
        f"training {record.get('seed')} (every setting), evaluation noise {record['eval_seed']}. Device "
        f"{record['device']} ({record.get('cpu', 'CPU not recorded')}, {record.get('torch_threads', '?')} torch "
        f"threads), torch {record['torch']}, commit {record.get('commit')}, {record['date']}.",
        "",
        f"Held-out reward: {record.get('held_out_reward') or 'none'}. Forwards: training passes through the model, "
        "one sample each (sampling + policy + reference + old policy), not evaluation's.",
        "",
        "| objective | alpha | temperature | reward | held-out reward | diversity | vendi | forwards | "
        "reward change | diversity change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| pretrained | | | {base['reward']:.4f} | {_number(base.get('held_out_reward'))} | {base['diversity']:.4f} "
        f"| {_number(base.get('vendi'), 3)} | 0 | | |",
    ]
    for e in record["settings"]:
        dr = e["reward"] - base["reward"]
        dd = (e["diversity"] / base["diversity"] - 1) * 100 if base["diversity"] else float("nan")
        t = "—" if e["temperature"] is None else f"{e['temperature']:g}"
        lines.append(f"| {e.get('objective', 'orw-cfm-w2')} | {e['alpha']:g} | {t} | {e['reward']:.4f} | "
                     f"{_number(e.get('held_out_reward'))} | {e['diversity']:.4f} | {_number(e.get('vendi'), 3)} | "
                     f"{_forwards(e.get('forwards_total'))} | {dr:+.4f} | {dd:+.1f}% |")
    levels, thresholds = analysis["diversity_levels"], analysis["diversity_thresholds"]
    lines += [
        "",
        "## Reward at matched diversity",
        "",
        "Per objective, the highest evaluated reward of any of its settings at any evaluated epoch whose diversity "
        "is at least the fraction shown of the pretrained model's (no interpolation; — : no point keeps that "
        "much diversity).",
        "",
        "| objective | " + " | ".join(f"diversity >= {f:g} x pretrained ({d:.4f})" for f, d in zip(levels, thresholds))
        + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for o in objectives:
        cells = []
        for at_level in analysis["matched_diversity"]:
            p = at_level.get(o)
            cells.append("—" if p is None else f"{p['reward']:.4f} ({_where(p)}, diversity {p['diversity']:.4f})")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    target = analysis["reward_target"]
    how = ("half-way from the pretrained reward to the sweep's best evaluated reward"
           if analysis["reward_target_default"] else "--reward-target")
    lines += [
        "",
        "## Forwards to a reward target",
        "",
        f"Target reward {target:.4f} ({how}). Per objective, the fewest training forwards at which one of its "
        "settings' evaluated reward first reached it.",
        "",
        "| objective | forwards | reward | diversity | setting |",
        "|---|---:|---:|---:|---|",
    ]
    for o in objectives:
        p = analysis["forwards_to_target"].get(o)
        lines.append(f"| {o} | not reached | | | |" if p is None else
                     f"| {o} | {_forwards(p['forwards_total'])} | {p['reward']:.4f} | {p['diversity']:.4f} | "
                     f"{_where(p)} |")
    budget = analysis["compute_budget"]
    lines += [
        "",
        "## Reward at matched compute",
        "",
        f"Budget {_forwards(budget)} training forwards (the smallest of the objectives' largest). Per objective, the "
        "highest evaluated reward within it.",
        "",
        "| objective | reward | diversity | forwards | setting |",
        "|---|---:|---:|---:|---|",
    ]
    for o in objectives:
        p = analysis["matched_compute"].get(o)
        lines.append(f"| {o} | — | | | |" if p is None else
                     f"| {o} | {p['reward']:.4f} | {p['diversity']:.4f} | {_forwards(p['forwards_total'])} | "
                     f"{_where(p)} |")
    return "\n".join(lines) + "\n"
