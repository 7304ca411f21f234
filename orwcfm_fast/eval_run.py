"""The ``eval`` command: per-prompt reward (and config ``eval_reward``'s held-out reward), within-prompt diversity and
Vendi score of a pretrained or fine-tuned policy.

``orwcfm-fast eval --run runs/sd35-jpeg`` evaluates a ``train`` run's ``final.pt`` with that run's task,
pretrained model and config (read from its ``train_run.json``); ``orwcfm-fast eval --task TASK
[--pretrained ...] [--checkpoint PATH]`` evaluates a checkpoint (or, without one, the pretrained model)
built from the same flags as ``train``. It runs :meth:`~orwcfm_fast.ORWCFMTrainer.evaluate` and writes
``OUTDIR/evaluation.json`` and one sample grid per prompt in ``OUTDIR/grids/``. Under ``torchrun`` the
prompts are shared out between the processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_eval", "record_assignments"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds ``eval`` to the ``orwcfm-fast`` subparsers."""
    from orwcfm_fast.train_run import TASKS, parse_assignment

    p = sub.add_parser(
        "eval",
        help="per-prompt reward and within-prompt diversity of a pretrained or fine-tuned policy",
        description=(
            "Evaluate a policy: per prompt (config eval_prompts, else the training prompts; one group for models "
            "without prompts) the mean of every configured reward (and of config eval_reward, a held-out reward), "
            "the within-prompt diversity (mean pairwise distance of image embeddings: config diversity_embedding) "
            "and the Vendi score of the same embeddings. Writes OUTDIR/evaluation.json and "
            "OUTDIR/grids/. --run DIR takes the task, pretrained model and config of a train run and its final.pt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", default=None,
                   help="a train run's folder: its train_run.json gives the task, --pretrained, --target and config; "
                        "its final.pt is evaluated unless --checkpoint is given")
    p.add_argument("--task", choices=sorted(TASKS), default=None, help="as for train (required without --run)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="a trainer checkpoint (final.pt or checkpoints/*.pt); default: --run's final.pt, else the "
                        "pretrained model itself")
    p.add_argument("--eval-prompts", metavar="FILE", default=None,
                   help="held-out prompts (.txt / .jsonl): config eval_prompts")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="samples per prompt (default: config eval_samples_per_prompt, 16)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation noise")
    p.add_argument("--outdir", default=None, help="default: RUN/eval, else runs/eval-TASK")
    p.add_argument("--target", type=int, default=None, help="as for train")
    p.add_argument("--pretrained", default=None, help="as for train")
    p.add_argument("--prompts", default=None, help="as for train (training prompts of pipelines)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="as for train")
    p.add_argument("--reward", default=None, help="as for train")
    p.add_argument("--ema", action="store_true", help="as for train")
    p.add_argument("--config", metavar="FILE.json", action="append", default=None, help="as for train")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", type=parse_assignment, default=None,
                   help="as for train (applied after --run's config)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per solve")
    p.add_argument("--seed", type=int, default=None, help="config seed")
    p.add_argument("--device", default=None, help="as for train")
    p.add_argument("--cache-dir", default="runs/cache", help="as for train")
    p.add_argument("--pretrain-steps", type=int, default=None, help="as for train")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def record_assignments(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """A train run's config (its ``train_run.json``) as ``--set`` assignments: the keys that differ from the
    defaults, without the callables (the task supplies its reward again) and the run's own folders."""
    from orwcfm_fast.config import DEFAULTS

    out = []
    for key, value in (record.get("config") or {}).items():
        if key in ("savedir", "checkpoint_dir", "ref_path") or key not in DEFAULTS:
            continue
        if isinstance(value, str) and value.startswith("<callable"):
            continue
        default = DEFAULTS[key]
        if value == default or (isinstance(default, tuple) and list(default) == value):
            continue
        out.append((key, value))
    return out


def run_eval(args: argparse.Namespace, prog: str = "orwcfm-fast eval") -> int:
    """Run the ``eval`` command for parsed ``args``; returns the exit status (0 done, 2 bad arguments, 1 a bad checkpoint)."""
    import torch.distributed as dist

    from orwcfm_fast import distributed
    from orwcfm_fast.train_run import UsageError, _plan

    def fail(message: str, status: int = 2) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return status

    ns = argparse.Namespace(**vars(args), resume="never", dump_samples=None, epochs=1, steps_per_epoch=1)
    checkpoint = args.checkpoint
    if args.run is not None:
        run = Path(args.run)
        try:
            record = json.loads((run / "train_run.json").read_text())
        except (OSError, ValueError) as err:
            return fail(f"--run {str(run)!r}: cannot read its train_run.json ({err}); is it a train run's folder?")
        if args.task is not None and args.task != record["task"]:
            return fail(f"--task {args.task} but --run {str(run)!r} is a {record['task']} run")
        ns.task = record["task"]
        arguments = record.get("arguments") or {}
        for name in ("target", "pretrained", "dtype", "ema", "cache_dir", "pretrain_steps"):
            if getattr(args, name) in (None, False) and arguments.get(name) is not None:
                setattr(ns, name, arguments[name])
        ns.pretrained = ns.pretrained or record.get("pretrained")
        ns.set = record_assignments(record) + list(args.set or [])
        if checkpoint is None:
            checkpoint = str(run / "final.pt")
        ns.outdir = args.outdir or str(run / "eval")
    elif args.task is None:
        return fail("give --task TASK (and its model flags) or --run DIR (a train run's folder)")
    if ns.outdir is None:
        ns.outdir = f"runs/eval-{ns.task}"
    if args.eval_prompts is not None:
        ns.set = list(ns.set or []) + [("eval_prompts", args.eval_prompts)]
    if checkpoint is not None and not Path(checkpoint).is_file():
        return fail(f"--checkpoint {checkpoint!r}: no such file")
    if args.samples_per_prompt is not None and args.samples_per_prompt < 2:
        return fail("--samples-per-prompt must be >= 2 (diversity compares pairs)")
    try:
        plan = _plan(ns)
    except UsageError as err:
        return fail(str(err))
    owns_group = distributed.launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    device = distributed.init_from_env(args.device)
    try:
        return _eval(plan, ns, checkpoint, device, prog, fail)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _eval(plan, args, checkpoint, device, prog, fail) -> int:
    from orwcfm_fast import distributed
    from orwcfm_fast.checkpoints import CheckpointError
    from orwcfm_fast.train_run import UsageError, build_trainer

    main = distributed.is_main_process()

    def log(message: str) -> None:
        if main and not args.quiet:
            print(message, flush=True)

    try:
        trainer, description = build_trainer(plan, args, device, log, handle_signals=False)
    except (UsageError, ValueError) as err:
        return fail(str(err))
    if checkpoint is not None:
        try:
            trainer.load_checkpoint(checkpoint)
        except CheckpointError as err:
            return fail(str(err), 1)
        log(f"[eval] {description}: {checkpoint} (epoch {trainer.epoch})")
    else:
        log(f"[eval] {description}: the pretrained model")
    outdir = Path(plan.config["savedir"])
    try:
        out = trainer.evaluate(samples_per_prompt=args.samples_per_prompt, outdir=outdir, seed=args.eval_seed)
    except ValueError as err:
        return fail(str(err))
    if main:
        width = max(len(p) for p in out["prompts"])
        held_out = out["held_out_reward"] is not None  # config eval_reward
        columns = ["reward"] + (["held_out_reward"] if held_out else []) + ["diversity", "vendi"]
        titles = {"held_out_reward": "held-out"}
        print(f"{'prompt':{width}s}" + "".join(f"  {titles.get(c, c):>10s}" for c in columns))
        for prompt in out["prompts"]:
            row = out["per_prompt"][prompt]
            print(f"{prompt:{width}s}" + "".join(f"  {row[c]:10.4f}" for c in columns))
        print(f"{'mean':{width}s}" + "".join(f"  {out[c]:10.4f}" for c in columns) +
              f"   ({out['samples_per_prompt']} samples per prompt, diversity and Vendi score of {out['embedding']} "
              "embeddings)")
        print(f"results: {outdir / 'evaluation.json'}, {outdir / 'grids'}/", flush=True)
    return 0
