"""What classifier-free guidance should train: the three ``cfg_mode`` settings on the prompted-digits demo.

The demo fine-tunes a small SD3 pipeline (CFG 2) with ORW-CFM-W2 + LoRA toward p(prompt's digit)
(:mod:`orwcfm_fast.tasks.prompted_digits`). It runs once per mode, from the same pretrained pipeline,
seed and evaluation noise:

- ``guided``: the loss and W2 on the guided velocity ``v_u + s (v_c - v_u)``, the one that samples;
- ``cfg_free``: sampling with guidance 1, the conditional velocity trained;
- ``sampling_only``: sampling guided, the conditional velocity trained (the peers' way).

Per mode: per-prompt reward and within-prompt diversity before and after, and per epoch the drift of
the sampled distribution from that epoch's target (:func:`~orwcfm_fast.tasks.prompted_digits.target_drift`:
the Fréchet distance, in the classifier's logit space, between the epoch's samples and the previous
samples reweighted by ``exp(beta r)``, and the reward overshoot). It also looks at the "a handwritten 7"
row, where the demo's sampling-only run drew a bright pixel in the bottom-left corner: the pixel's mean
value per mode, and whether the reward pays for it (p(7) of the pretrained 7s with that pixel set white).

Writes ``benchmarks/results/cfg_modes_<device>.json`` (with provenance) and ``docs/figures/cfg-modes-7.png``.
Run: ``python benchmarks/cfg_modes.py [--epochs 8] [--modes guided,cfg_free,sampling_only]`` (about
3 minutes per mode on 2 CPU cores, plus 2-3 minutes of pretraining on first use).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance  # noqa: E402

from orwcfm_fast.tasks.prompted_digits import digit_prompt, run_prompted_digits_demo  # noqa: E402

CORNER = (7, 0)  # (row, column) of the bottom-left pixel of the 8x8 digits


def corner_probe(classifier, images: torch.Tensor) -> dict[str, float]:
    """p(7) of ``images`` (``[N, 3, 8, 8]`` in [0, 1]) as they are and with the bottom-left pixel set white."""
    def p7(x):
        gray = x.float().mean(1, keepdim=True) * 2 - 1
        with torch.no_grad():
            return torch.softmax(classifier(gray), -1)[:, 7]

    bright = images.clone()
    bright[:, :, CORNER[0], CORNER[1]] = 1.0
    base, lit = p7(images), p7(bright)
    return {"p7": float(base.mean()), "p7_corner_white": float(lit.mean()),
            "share_raised": float((lit > base).float().mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="guided,cfg_free,sampling_only")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--outdir", default="runs/cfg-modes")
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/results/cfg_modes_<device>.json)")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "cfg-modes-7.png"))
    args = parser.parse_args(argv)
    from orwcfm_fast.tasks.digits import load_or_train_digits_classifier
    from orwcfm_fast.tasks.plots import save_sample_grid

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [m for m in args.modes.split(",") if m]
    results, rows, titles = {}, [], []
    seven = digit_prompt(7)
    for mode in modes:
        t0 = time.perf_counter()
        metrics = run_prompted_digits_demo(outdir=Path(args.outdir) / mode, cache_dir=args.cache_dir, device=device,
                                           cfg_mode=mode, epochs=args.epochs)
        images = metrics.pop("images")
        per = metrics["config"]["eval_per_prompt"]
        i7 = metrics["prompts"].index(seven) if seven in metrics["prompts"] else None
        classifier, _ = load_or_train_digits_classifier(args.cache_dir, "cpu")
        entry = {k: metrics[k] for k in ("before", "after", "curves", "fine_tune_seconds", "cfg_mode")}
        if i7 is not None:
            sl = slice(i7 * per, (i7 + 1) * per)
            after7, before7 = images["after"][sl].cpu(), images["before"][sl].cpu()
            entry["seven"] = {
                "corner_mean_before": float(before7[:, :, CORNER[0], CORNER[1]].mean()),
                "corner_mean_after": float(after7[:, :, CORNER[0], CORNER[1]].mean()),
                "corner_lit_share_after": float((after7[:, :, CORNER[0], CORNER[1]].mean(1) > 0.5).float().mean()),
                "probe_before": corner_probe(classifier, before7),
            }
            if not rows:
                rows.append(before7[:16].mean(1, keepdim=True) * 2 - 1)
                titles.append("pretrained")
            rows.append(after7[:16].mean(1, keepdim=True) * 2 - 1)
            titles.append(mode)
        entry["wall_seconds"] = time.perf_counter() - t0
        results[mode] = entry
        last = metrics["curves"][-1]
        print(f"{mode}: reward {metrics['before']['reward']:.3f} -> {metrics['after']['reward']:.3f}, diversity "
              f"{metrics['before']['diversity']:.3f} -> {metrics['after']['diversity']:.3f}, last-epoch drift "
              f"{last.get('target_fd', float('nan')):.3f}", flush=True)
    out = {**provenance(device), "benchmark": "cfg_modes", "epochs": args.epochs, "modes": results}
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"cfg_modes_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import json

    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    if rows:
        save_sample_grid(torch.cat(rows), args.figure, nrow=16,
                         title=f"'{seven}', rows: {', '.join(titles)}")
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
