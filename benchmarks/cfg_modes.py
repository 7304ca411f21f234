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
row, where the demo's sampling-only run drew a bright pixel in the bottom-left corner: the bottom-left pixel that
brightened most, per mode, and whether the reward pays for it (:func:`artefact_probe`).

Writes ``benchmarks/results/cfg_modes_<device>.json`` (with provenance) and ``docs/figures/cfg-modes-7.png``.
Run: ``python benchmarks/cfg_modes.py [--epochs 8] [--modes guided,cfg_free,sampling_only]`` (about
3 minutes per mode on 2 CPU cores, plus 2-3 minutes of pretraining on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance  # noqa: E402

from orwcfm_fast.tasks.prompted_digits import digit_prompt, run_prompted_digits_demo  # noqa: E402

def p7(classifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's p(7) of ``images`` ``[N, 3, 8, 8]`` in [0, 1]."""
    gray = images.float().mean(1, keepdim=True) * 2 - 1
    with torch.no_grad():
        return torch.softmax(classifier(gray), -1)[:, 7]


def artefact_probe(classifier, before: torch.Tensor, after: torch.Tensor) -> dict:
    """The bottom-left pixel that brightened most from ``before`` to ``after`` (rows 4-7, columns 0-3 of the 8x8
    "7"s), and whether the reward pays for it: p(7) of the ``before`` images with that pixel set white, and of the
    ``after`` images with it set back to its ``before`` mean."""
    mean_before, mean_after = before.mean((0, 1)), after.mean((0, 1))
    delta = (mean_after - mean_before)[4:, :4]
    i = int(delta.argmax())
    row, col = 4 + i // 4, i % 4
    lit, restored = before.clone(), after.clone()
    lit[:, :, row, col] = 1.0
    restored[:, :, row, col] = float(mean_before[row, col])
    return {"pixel": [row, col], "mean_before": float(mean_before[row, col]), "mean_after": float(mean_after[row, col]),
            "share_lit_after": float((after[:, :, row, col].mean(1) > 0.5).float().mean()),
            "share_lit_before": float((before[:, :, row, col].mean(1) > 0.5).float().mean()),
            "p7_before": float(p7(classifier, before).mean()), "p7_before_pixel_white": float(p7(classifier, lit).mean()),
            "p7_after": float(p7(classifier, after).mean()),
            "p7_after_pixel_restored": float(p7(classifier, restored).mean()),
            "mean_image_before": (mean_before * 100).round().int().tolist(),
            "mean_image_after": (mean_after * 100).round().int().tolist()}


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

    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [m for m in args.modes.split(",") if m]
    classifier = None  # the demo trains and caches it on its first run; loaded once after that
    results, rows, titles = {}, [], []
    seven = digit_prompt(7)
    for mode in modes:
        t0 = time.perf_counter()
        metrics = run_prompted_digits_demo(outdir=Path(args.outdir) / mode, cache_dir=args.cache_dir, device=device,
                                           cfg_mode=mode, epochs=args.epochs)
        images = metrics.pop("images")
        per = metrics["config"]["eval_per_prompt"]
        i7 = metrics["prompts"].index(seven) if seven in metrics["prompts"] else None
        entry = {k: metrics[k] for k in ("before", "after", "curves", "fine_tune_seconds", "cfg_mode")}
        if i7 is not None:
            if classifier is None:
                classifier, _ = load_or_train_digits_classifier(args.cache_dir, "cpu")
            sl = slice(i7 * per, (i7 + 1) * per)
            after7, before7 = images["after"][sl].cpu(), images["before"][sl].cpu()
            entry["seven"] = artefact_probe(classifier, before7, after7)
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
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    if rows:
        save_sample_grid(torch.cat(rows), args.figure, nrow=16,
                         title=f"'{seven}', rows: {', '.join(titles)}")
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
