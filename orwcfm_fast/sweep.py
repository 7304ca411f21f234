"""The ``sweep`` command: the reward-diversity trade-off that alpha (and the temperature) control.

``orwcfm-fast sweep --task TASK --alphas 0,0.3,1,3 [--temperatures 1,3] --outdir DIR`` fine-tunes
once per setting from the same pretrained model and seed (the ``train`` command's tasks, model
building and configuration), evaluates the pretrained model once and each fine-tuned policy with
:meth:`~orwcfm_fast.ORWCFMTrainer.evaluate` (the same evaluation noise for all of them), and writes:

- ``DIR/sweep.json``: ``{"task", "pretrained": {reward, diversity, ...}, "settings": [{"alpha",
  "temperature", "reward", "diversity", "reward/<term>"..., "per_prompt", "history", "seconds"}...],
  "device", "torch", "date", ...}``;
- ``DIR/pareto.png``: reward against diversity, one point per setting (labelled with alpha; one line per
  temperature), the pretrained model marked;
- ``DIR/sweep.md``: the same as a table;
- per setting ``DIR/alpha<a>_temp<t>/``: the trainer's metrics CSV, ``eval/`` (evaluation.json, grids) and
  ``result.json``; ``DIR/pretrained/``: the pretrained model's evaluation.

A setting whose ``result.json`` was written with the same settings is not trained again, so an interrupted
sweep continues where it stopped. Under ``torchrun`` every process runs the same command: each setting
trains data-parallel, evaluation shares the prompts out, rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["add_parser", "run_sweep", "read_sweep", "save_pareto", "sweep_table", "EVAL_SAMPLES"]

#: evaluation samples per prompt (unconditional tasks: in all) of each task when --samples-per-prompt is not given
EVAL_SAMPLES = {"gaussians": 1000, "digits": 256, "cifar10": 64, "prompted-digits": 64, "text-to-image": 16}


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


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds ``sweep`` to the ``orwcfm-fast`` subparsers (the ``train`` command's task and config flags)."""
    from orwcfm_fast.train_run import TASKS, parse_assignment

    p = sub.add_parser(
        "sweep",
        help="the reward-diversity trade-off: fine-tune once per alpha (and temperature), evaluate, plot",
        description=(
            "Fine-tune the task's pretrained model once per (alpha, temperature) from the same seed, evaluate "
            "each policy and the pretrained model with the same noise (per-prompt reward, within-prompt "
            "diversity), and write OUTDIR/sweep.json, OUTDIR/pareto.png (reward against diversity) and "
            "OUTDIR/sweep.md. Settings already in OUTDIR are not trained again. Under torchrun every process "
            "runs this command."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="as for train")
    p.add_argument("--alphas", type=_float_list, required=True, help="W2 coefficients, comma-separated")
    p.add_argument("--temperatures", type=_float_list, default=None,
                   help="temperatures beta, comma-separated (default: the task's / config's one)")
    p.add_argument("--outdir", default=None, help="folder of the sweep (default runs/sweep-TASK)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per setting (default: the task's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="steps per epoch (default: the task's)")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="evaluation samples per prompt (unconditional tasks: in all); default per task: "
                        + ", ".join(f"{k} {v}" for k, v in EVAL_SAMPLES.items()))
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation noise")
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


def _slug(value: float) -> str:
    return f"{value:g}".replace("-", "m")


def _setting_dir(outdir: Path, alpha: float, temperature: float) -> Path:
    return outdir / f"alpha{_slug(alpha)}_temp{_slug(temperature)}"


def _fingerprint(plan, alpha: float, temperature: float, samples: int, eval_seed: int) -> str:
    """What a setting's result depends on (a result.json with another fingerprint is trained again)."""
    from orwcfm_fast.config import serializable_config

    config = {k: v for k, v in plan.config.items() if k not in ("savedir", "checkpoint_dir")}
    key = {"task": plan.task, "alpha": alpha, "temperature": temperature, "epochs": plan.epochs,
           "steps_per_epoch": plan.steps_per_epoch, "pretrained": plan.pretrained, "samples": samples,
           "eval_seed": eval_seed, "target": plan.args.target, "config": serializable_config(config)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _summary(ev: Mapping[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in ev.items() if k in ("reward", "diversity") or k.startswith("reward/")}
    keep["per_prompt"] = ev["per_prompt"]
    keep["embedding"] = ev["embedding"]
    return keep


def run_sweep(args: argparse.Namespace, prog: str = "orwcfm-fast sweep") -> int:
    """Run the ``sweep`` command for parsed ``args``; returns the exit status (0 done, 2 bad arguments)."""
    import torch.distributed as dist

    from orwcfm_fast import distributed
    from orwcfm_fast.train_run import UsageError, _plan

    temperatures = args.temperatures
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
    if temperatures is None:
        from orwcfm_fast.config import validate_config

        temperatures = [validate_config(plan.config)["temperature"]]
    owns_group = distributed.launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env(args.device)
    try:
        return _sweep(plan, train_args, args.alphas, temperatures, device, prog)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _sweep(plan, args, alphas: Sequence[float], temperatures: Sequence[float], device, prog: str) -> int:
    import torch

    from orwcfm_fast import __version__, distributed
    from orwcfm_fast.train_run import UsageError, build_trainer

    main = distributed.is_main_process()

    def log(message: str) -> None:
        if main and not args.quiet:
            print(message, flush=True)

    outdir = Path(plan.config["savedir"])
    samples = args.samples_per_prompt or EVAL_SAMPLES.get(plan.task, 16)
    started = time.perf_counter()

    def setting_trainer(alpha: float, temperature: float, savedir: Path):
        return build_trainer(plan, args, device, log, w2_coefficient=alpha, temperature=temperature,
                             savedir=str(savedir), run_name="sweep", handle_signals=False, checkpoint_every=None)

    # The pretrained model, evaluated once (alpha and temperature do not change it).
    pretrained_file = outdir / "pretrained" / "evaluation.json"
    base_key = _fingerprint(plan, 0.0, 0.0, samples, args.eval_seed)
    pretrained = None
    if main and pretrained_file.is_file():
        old = json.loads(pretrained_file.read_text())
        pretrained = _summary(old) if old.get("sweep_fingerprint") == base_key else None
    pretrained = distributed.broadcast_object(pretrained)  # rank 0's files decide, for every rank
    entries = []
    try:
        for temperature in temperatures:
            for alpha in alphas:
                where = _setting_dir(outdir, alpha, temperature)
                key = _fingerprint(plan, alpha, temperature, samples, args.eval_seed)
                result_file = where / "result.json"
                old = json.loads(result_file.read_text()) if main and result_file.is_file() else None
                old = distributed.broadcast_object(old)
                if old is not None:
                    if old.get("fingerprint") == key and pretrained is not None:
                        log(f"[sweep] alpha {alpha:g}, temperature {temperature:g}: done before ({result_file})")
                        entries.append(old)
                        continue
                trainer, description = setting_trainer(alpha, temperature, where)
                if pretrained is None:
                    log(f"[sweep] evaluating the pretrained model ({samples} samples per prompt)")
                    ev = trainer.evaluate(samples_per_prompt=samples, outdir=outdir / "pretrained",
                                          seed=args.eval_seed)
                    pretrained = _summary(ev)
                    if main:
                        _write_json(pretrained_file, {**ev, "sweep_fingerprint": base_key})
                log(f"[sweep] {description}: alpha {alpha:g}, temperature {temperature:g}: "
                    f"{plan.epochs} epochs x {plan.steps_per_epoch} steps")
                t0 = time.perf_counter()
                trainer.train(plan.epochs, plan.steps_per_epoch)
                seconds = time.perf_counter() - t0
                ev = trainer.evaluate(samples_per_prompt=samples, outdir=where / "eval", seed=args.eval_seed)
                entry = {"alpha": alpha, "temperature": temperature, **_summary(ev), "seconds": seconds,
                         "history": trainer.history, "fingerprint": key}
                if main:
                    _write_json(result_file, entry)
                log(f"[sweep]   reward {pretrained['reward']:.4f} -> {entry['reward']:.4f}, diversity "
                    f"{pretrained['diversity']:.4f} -> {entry['diversity']:.4f} ({seconds:.0f} s)")
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
    record = {
        "task": plan.task, "target": args.target, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
        "samples_per_prompt": samples, "eval_seed": args.eval_seed, "alphas": list(alphas),
        "temperatures": list(temperatures), "pretrained": pretrained,
        "settings": [{k: v for k, v in e.items() if k != "fingerprint"} for e in entries],
        "device": _device_name(device), "world_size": distributed.world_size(), "torch": torch.__version__,
        "orwcfm_fast": __version__, "commit": _commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
    }
    _write_json(outdir / "sweep.json", record)
    save_pareto(record, outdir / "pareto.png")
    (outdir / "sweep.md").write_text(sweep_table(record))
    log(f"[sweep] {len(entries)} settings: {outdir / 'sweep.json'}, {outdir / 'pareto.png'}, {outdir / 'sweep.md'}")
    distributed.barrier()
    return 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


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


def save_pareto(record: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """``pareto.png``: reward (y) against diversity (x), one point per setting labelled with its alpha, a line
    per temperature in the order of alpha, the pretrained model as a star."""
    from orwcfm_fast.tasks.plots import _new_figure

    fig = _new_figure((5.6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    temps = sorted({e["temperature"] for e in record["settings"]})
    for k, temperature in enumerate(temps):
        points = sorted((e for e in record["settings"] if e["temperature"] == temperature), key=lambda e: e["alpha"])
        xs, ys = [e["diversity"] for e in points], [e["reward"] for e in points]
        label = f"temperature {temperature:g}" if len(temps) > 1 else "fine-tuned"
        ax.plot(xs, ys, marker="o", label=label)
        for e in points:
            ax.annotate(f"α={e['alpha']:g}", (e["diversity"], e["reward"]), textcoords="offset points",
                        xytext=(5, 4 - 11 * (k % 3)), fontsize=8, color=ax.lines[-1].get_color())
    base = record["pretrained"]
    ax.scatter([base["diversity"]], [base["reward"]], marker="*", s=160, color="black", zorder=5, label="pretrained")
    ax.set_xlabel(f"diversity (mean pairwise distance, {base.get('embedding', 'pixels')})")
    prompts = len(base.get("per_prompt", {})) > 1
    ax.set_ylabel("reward (mean over prompts)" if prompts else "reward (mean)")
    ax.set_title(title or f"{record['task']}: reward vs diversity ({record['epochs']} epochs x "
                 f"{record['steps_per_epoch']} steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def sweep_table(record: Mapping[str, Any]) -> str:
    """``sweep.md``: one row per setting (and the pretrained model), with the changes from the pretrained model."""
    base = record["pretrained"]
    lines = [
        f"# Sweep: {record['task']}",
        "",
        f"{record['epochs']} epochs x {record['steps_per_epoch']} steps per setting, {record['samples_per_prompt']} "
        f"evaluation samples per prompt (seed {record['eval_seed']}), device {record['device']}, torch "
        f"{record['torch']}, commit {record.get('commit')}, {record['date']}.",
        "",
        "| alpha | temperature | reward | diversity | reward change | diversity change |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| pretrained | | {base['reward']:.4f} | {base['diversity']:.4f} | | |",
    ]
    for e in sorted(record["settings"], key=lambda e: (e["temperature"], e["alpha"])):
        dr = e["reward"] - base["reward"]
        dd = (e["diversity"] / base["diversity"] - 1) * 100 if base["diversity"] else float("nan")
        lines.append(f"| {e['alpha']:g} | {e['temperature']:g} | {e['reward']:.4f} | {e['diversity']:.4f} | "
                     f"{dr:+.4f} | {dd:+.1f}% |")
    return "\n".join(lines) + "\n"
