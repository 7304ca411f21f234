"""Command line interface: ``orwcfm-fast <command>`` or ``python -m orwcfm_fast.cli <command>``.

Commands:

- ``demo``: the offline 8x8-digits fine-tuning demo (:func:`orwcfm_fast.tasks.demo.run_demo`).
- ``demo-prompted``: the offline text-to-image demo on prompted digits, a real SD3 pipeline with
  LoRA (:func:`orwcfm_fast.tasks.prompted_digits.run_prompted_digits_demo`).
- ``train``: checkpointed, resumable ORW-CFM-W2 fine-tuning on a task, also under ``torchrun``
  (:mod:`orwcfm_fast.train_run`)::

      torchrun --nproc_per_node 2 -m orwcfm_fast.cli train --task gaussians --epochs 10

- ``eval``: per-prompt reward and within-prompt diversity of a pretrained or fine-tuned policy
  (:mod:`orwcfm_fast.eval_run`).
- ``sweep``: one fine-tuning per objective x alpha (x temperature), each evaluated every epoch with its
  training forwards counted; ``sweep.json``, ``pareto.png``, ``compute.png`` and ``sweep.md``: the
  reward-diversity trade-off and its compute, objective against objective (:mod:`orwcfm_fast.sweep`).
- ``reward-server``: serve a registered reward over HTTP on loopback, for trainers with config
  ``reward: "http://127.0.0.1:PORT"`` (:mod:`orwcfm_fast.reward_server`).
- ``plan``: will a text-to-image fine-tuning fit on N GPUs (DDP or FSDP, gradient checkpointing, largest batch),
  and what will a step cost; from the pipeline's configs alone, no GPU (:mod:`orwcfm_fast.plan`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["build_parser", "main"]


def _digit(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"must be a digit 0..9, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Description and epilog kept as written; defaults shown unless ``None``/``False`` (the help says those)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


_TRAIN_EPILOG = """\
configuration (lowest precedence first): the task's defaults, --config files in order, --set
assignments in order, then --outdir (savedir), --seed, --batch-size, --reward and --prompts.
Keys are the trainer's (see orwcfm_fast.config.OPTIONS / the README), e.g. learning_rate,
temperature, w2_coefficient, ode_solver, ode_steps, reward, text_prompts, checkpoint_every,
keep_checkpoints, checkpoint_dir; text-to-image: resolution, guidance_scale, lora_rank,
images_per_prompt, max_sequence_length.

files in OUTDIR: <run_name>_metrics.csv (one row per epoch), checkpoints/ (every checkpoint_every
epochs, and on SIGINT/SIGTERM), train_run.json (this run's settings), final.pt (at the end),
lora/ (text-to-image with LoRA, at the end: pipe.load_lora_weights(OUTDIR/lora)).
SIGINT/SIGTERM finish the current step, save a checkpoint and exit with status 128+signal;
running the same command again resumes (--resume auto).

examples:
  orwcfm-fast train --task gaussians --epochs 10 --set checkpoint_every=1
  orwcfm-fast train --task digits --target 3 --outdir runs/digits3 --set temperature=2
  torchrun --nproc_per_node 8 -m orwcfm_fast.cli train --task cifar10 --pretrained otcfm.pt --ema \\
      --epochs 100 --steps-per-epoch 100 --set 'text_prompts=["a photo of a cat", "a photo of a dog"]'
  orwcfm-fast train --task text-to-image --pretrained /models/sd3.5-medium --prompts prompts.txt \\
      --epochs 100 --steps-per-epoch 10 --set resolution=512 --set guidance_scale=4.5 --set ode_steps=10 \\
      --set batch_size=16 --set images_per_prompt=4 --outdir runs/sd35-jpeg
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``orwcfm-fast`` argument parser (one subparser per command)."""
    from orwcfm_fast import __version__
    from orwcfm_fast.tasks.demo import DEMO_DEFAULTS as D

    parser = argparse.ArgumentParser(
        prog="orwcfm-fast",
        description="Online reward-weighted conditional flow matching with W2 regularisation (ORW-CFM-W2).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="offline demo: steer a pretrained 8x8-digits flow model towards one digit",
        description=(
            "Pretrain (or load from the cache) a small flow-matching UNet on scikit-learn's 8x8 digits "
            "and a digit classifier, then fine-tune the UNet with ORW-CFM-W2 using the classifier's "
            "probability of the target digit as the reward. Writes samples_before.png, samples_after.png, "
            "curves.png and metrics.json into OUTDIR. No downloads; a few minutes on a 2-core CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--outdir", default="runs/demo", help="folder for figures and metrics.json")
    demo.add_argument("--target-digit", type=_digit, default=D["target_digit"], help="digit whose classifier probability is the reward")
    demo.add_argument("--epochs", type=_positive_int, default=D["epochs"], help="fine-tuning epochs")
    demo.add_argument("--steps-per-epoch", type=_positive_int, default=D["steps_per_epoch"], help="optimiser steps per epoch")
    demo.add_argument("--batch-size", type=_positive_int, default=D["batch_size"], help="samples per training step")
    demo.add_argument("--alpha", type=_non_negative_float, default=1.0, help="W2 coefficient")
    demo.add_argument("--temperature", type=_non_negative_float, default=D["temperature"],
                      help="beta in the weights exp(beta * reward)")
    demo.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0; %(default)s: cuda if available, else cpu")
    demo.add_argument("--cache-dir", default="runs/cache", help="cache of the pretrained UNet and classifier")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help="no pretraining bar or per-epoch lines (the trainer's epoch bars remain)")

    _add_prompted_demo_parser(sub)
    _add_train_parser(sub)
    from orwcfm_fast.sweep import add_parser as _add_sweep_parser

    _add_sweep_parser(sub)
    from orwcfm_fast.eval_run import add_parser as _add_eval_parser

    _add_eval_parser(sub)
    from orwcfm_fast.reward_server import add_parser as _add_reward_server_parser

    _add_reward_server_parser(sub)
    from orwcfm_fast.plan import add_parser as _add_plan_parser

    _add_plan_parser(sub)
    return parser


def _digit_list(value: str) -> tuple[int, ...]:
    try:
        digits = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated digits, e.g. 1,4,7, got {value!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
        raise argparse.ArgumentTypeError(f"expected distinct digits 0-9, got {value!r}")
    return digits


def _add_prompted_demo_parser(sub) -> None:
    from orwcfm_fast.tasks.prompted_digits import PROMPTED_DIGITS_DEFAULTS as P

    demo = sub.add_parser(
        "demo-prompted",
        help="offline text-to-image demo: a small SD3 pipeline on prompted 8x8 digits, fine-tuned with LoRA",
        description=(
            "Pretrain (or load from the cache) a small StableDiffusion3Pipeline on scikit-learn's 8x8 digits "
            "with the prompts 'a handwritten <d>', then fine-tune it with ORW-CFM-W2 and LoRA toward the "
            "classifier's probability of each prompt's digit. Writes samples_before.png, samples_after.png "
            "(one row per prompt), curves.png, metrics.json (per-prompt reward and within-prompt diversity) "
            "and lora/ into OUTDIR. No downloads (needs the 'diffusers' extra)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--outdir", default="runs/prompted-digits", help="folder for figures, metrics.json and lora/")
    demo.add_argument("--digits", type=_digit_list, default=P["digits"], help="the prompts' digits, comma-separated")
    demo.add_argument("--epochs", type=_positive_int, default=P["epochs"], help="fine-tuning epochs")
    demo.add_argument("--steps-per-epoch", type=_positive_int, default=P["steps_per_epoch"], help="optimiser steps per epoch")
    demo.add_argument("--alpha", type=_non_negative_float, default=P["w2_coefficient"], help="W2 coefficient")
    demo.add_argument("--temperature", type=_non_negative_float, default=P["temperature"],
                      help="beta in the weights exp(beta * reward)")
    demo.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    demo.add_argument("--cache-dir", default="runs/cache", help="cache of the pretrained pipeline and classifier")
    demo.add_argument("--seed", type=int, default=P["seed"], help="fine-tuning seed")


def _add_train_parser(sub) -> None:
    from orwcfm_fast.train_run import TASKS, parse_assignment

    train = sub.add_parser(
        "train",
        help="fine-tune a pretrained flow model with ORW-CFM-W2 (checkpointed, resumable, torchrun-ready)",
        description=(
            "Fine-tune a pretrained flow-matching model with ORW-CFM-W2 on a task:\n"
            "  gaussians  2-D MLP flow (pretrained and cached in --cache-dir, seconds on a CPU);\n"
            "             reward: closeness to mode --target\n"
            "  digits     the demo's 8x8-digits UNet (cached); reward: the classifier's p(digit --target)\n"
            "  prompted-digits\n"
            "             the text-to-image demo's SD3 pipeline on prompted 8x8 digits (cached), LoRA;\n"
            "             reward: the classifier's probability of each prompt's digit\n"
            "  cifar10    the paper's torchcfm UNet, weights from --pretrained; reward from the config\n"
            "             (default 'clip', which needs text_prompts)\n"
            "  text-to-image\n"
            "             a diffusers pipeline folder of a supported family (--pretrained DIR, written by\n"
            "             save_pretrained: SD3/3.5, FLUX.1, FLUX.2/klein, Qwen-Image, Z-Image, Wan), prompts from\n"
            "             --prompts FILE, LoRA (config lora_rank,\n"
            "             default 32) written to OUTDIR/lora; reward --reward (default\n"
            "             'jpeg_compressibility': no download), on the decoded images\n"
            "Under torchrun every process runs this same command and the trainer trains data-parallel\n"
            "(each rank samples with its own seed and prompts; gradients averaged); rank 0 writes all files."
        ),
        epilog=_TRAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    train.add_argument("--task", required=True, choices=sorted(TASKS), help="model, default reward and sample shape")
    train.add_argument("--target", type=_non_negative_int, default=None,
                       help="rewarded mode (gaussians, 0..7; default 0) or digit (digits, 0..9; default 7); "
                            "used unless the config sets 'reward'")
    train.add_argument("--pretrained", metavar="PATH", default=None,
                       help="pretrained weights (torchcfm checkpoint, ours, or a state dict); required for cifar10; "
                            "for text-to-image (required) the diffusers pipeline folder (save_pretrained; "
                            "its model_index.json names the family: any pipeline of orwcfm_fast.flows.PIPELINE_FLOWS); "
                            "default: the config's ref_path, else gaussians/digits pretrain into --cache-dir")
    train.add_argument("--prompts", metavar="FILE", default=None,
                       help="text-to-image: config prompts, a .txt file (one prompt a line; # comments) or .jsonl "
                            "(a \"prompt\" field a line); required unless the config sets 'prompts'")
    train.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="text-to-image: the pipeline's weights dtype (LoRA adapters stay fp32); "
                            "default: what the device runs natively (bf16 on CUDA sm_80+, fp32 on older GPUs and "
                            "on CPUs without native bf16)")
    train.add_argument("--reward", metavar="NAME", default=None,
                       help="config reward: a registered reward (clip, jpeg_compressibility, jpeg_incompressibility, "
                            "clip_score, pickscore, hpsv2, aesthetic; the last four need config reward_paths) or a "
                            "reward server's URL http://127.0.0.1:PORT (a weighted dict: --set 'reward={...}'); "
                            "default: the task's (text-to-image: jpeg_compressibility, which needs no download)")
    train.add_argument("--ema", action="store_true", help="load the --pretrained checkpoint's 'ema_model' weights")
    train.add_argument("--config", metavar="FILE.json", action="append", default=None,
                       help="JSON object of trainer config keys (repeatable; later files override earlier)")
    train.add_argument("--set", metavar="KEY=VALUE", action="append", type=parse_assignment, default=None,
                       help="one config key (repeatable, applied after --config; later overrides earlier); VALUE is "
                            "parsed as JSON (1e-4, true, null, [2], \"text\"), else taken as a plain string")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help="total epochs the run reaches (a resumed run trains only the rest); "
                            "default 10 for gaussians, 8 for digits, required for cifar10 and text-to-image")
    train.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                       help="optimiser steps per epoch; default 20 for gaussians, 30 for digits, required for cifar10 "
                            "and text-to-image")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="config batch_size: samples per step (per process under torchrun)")
    train.add_argument("--resume", default="auto", metavar="{auto,never,PATH}",
                       help="auto: continue from the newest checkpoint in the checkpoint folder (or OUTDIR/final.pt, "
                            "final.dcp when sharded) "
                            "if there is one; never: start afresh (refused if OUTDIR already holds a run); "
                            "PATH: that checkpoint")
    train.add_argument("--reshard", action="store_true",
                       help="resume a sharded (parallelism fsdp) checkpoint on another number of ranks or another "
                            "parallelism: weights, EMA and optimiser are loaded into this run's layout, the random "
                            "streams reseeded (without it such a resume is refused)")
    train.add_argument("--outdir", default=None,
                       help="config savedir: metrics, checkpoints/, final.pt; default runs/train-TASK")
    train.add_argument("--device", default=None,
                       help="torch device; default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    train.add_argument("--seed", type=_non_negative_int, default=None,
                       help="config seed (default 0; under torchrun each rank offsets it)")
    train.add_argument("--cache-dir", default="runs/cache", help="cache of the pretrained gaussians/digits models")
    train.add_argument("--pretrain-steps", type=_positive_int, default=None,
                       help="pretraining steps of the gaussians/digits model (prompted-digits: of its VAE and "
                            "transformer each) when not cached (default 1500 / 800 / 400+1000; cached per value)")
    train.add_argument("--dump-samples", metavar="PATH", default=None,
                       help="at the end every process writes 16 samples of its final policy (text-to-image: "
                            "latents), its trained weights' SHA-256 (text-to-image: the LoRA adapter's) and, with "
                            "prompts, its next batch's prompts to PATH.rank<R>.pt")
    train.add_argument("--quiet", action="store_true", help="no progress lines of this command (the trainer's remain)")


def _run_prompted_demo(args: argparse.Namespace) -> int:
    from orwcfm_fast.flows import MissingExtraError, require_diffusers

    try:
        require_diffusers()
    except MissingExtraError as err:
        print(f"orwcfm-fast demo-prompted: {err}", file=sys.stderr)
        return 2
    from orwcfm_fast.tasks.prompted_digits import run_prompted_digits_demo

    metrics = run_prompted_digits_demo(
        args.outdir, args.cache_dir, device=args.device, digits=args.digits, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, w2_coefficient=args.alpha, temperature=args.temperature,
        seed=args.seed,
    )
    print(f"ORW-CFM-W2 prompted-digits demo on {metrics['device']}: {metrics['total_seconds']:.0f} s "
          f"(fine-tuning {metrics['fine_tune_seconds']:.0f} s)")
    print(f"  {'prompt':22s} {'reward before -> after':>24s} {'diversity before -> after':>28s}")
    for p in metrics["prompts"]:
        b, a = metrics["before"]["per_prompt"][p], metrics["after"]["per_prompt"][p]
        print(f"  {p:22s} {b['reward']:10.3f} -> {a['reward']:.3f} {b['diversity']:16.3f} -> {a['diversity']:.3f}")
    print(f"  results: {args.outdir}/(samples_before.png, samples_after.png, curves.png, metrics.json, lora/)")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from orwcfm_fast.tasks.demo import run_demo

    metrics = run_demo(
        args.outdir,
        target_digit=args.target_digit,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        alpha=args.alpha,
        device=args.device,
        cache_dir=args.cache_dir,
        seed=args.seed,
        temperature=args.temperature,
        progress=not args.quiet,
    )
    digit = metrics["target_digit"]
    print(f"ORW-CFM-W2 digits demo (target digit {digit}) on {metrics['device']}: {metrics['elapsed_s']:.0f} s")
    print(f"  classifier held-out accuracy: {metrics['classifier_accuracy']:.4f}")
    print(
        f"  reward p(digit {digit}):  {metrics['base_reward']:.4f} -> {metrics['final_reward']:.4f}"
        f"   (share classified as {digit}: {metrics['base_target_fraction']:.1%} -> {metrics['final_target_fraction']:.1%})"
    )
    print(
        f"  diversity (mean pairwise distance): {metrics['base_diversity']:.3f} -> {metrics['final_diversity']:.3f}"
        f"   (real digits: {metrics['data_diversity']:.3f})"
    )
    print("  results:")
    for name, path in metrics["files"].items():
        print(f"    {name:15s} {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command.

    Returns:
        The process exit code: 0 on success, 2 for a bad config (argparse itself exits with 2 on
        bad arguments); ``train`` also returns 1 for an unusable checkpoint and ``128 + signum``
        when stopped by SIGINT/SIGTERM.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "demo-prompted":
        return _run_prompted_demo(args)
    if args.command == "train":
        from orwcfm_fast.train_run import run_train

        return run_train(args, prog=f"{parser.prog} train")
    if args.command == "eval":
        from orwcfm_fast.eval_run import run_eval

        return run_eval(args, prog=f"{parser.prog} eval")
    if args.command == "sweep":
        from orwcfm_fast.sweep import run_sweep

        return run_sweep(args, prog=f"{parser.prog} sweep")
    if args.command == "reward-server":
        from orwcfm_fast.reward_server import run as run_reward_server

        return run_reward_server(args)
    if args.command == "plan":
        from orwcfm_fast.plan import run_plan

        return run_plan(args, prog=f"{parser.prog} plan")
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
