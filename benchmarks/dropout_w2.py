"""What the policy's dropout does to the W2 term, measured at the start of fine-tuning.

The published trainer runs the policy in train mode (dropout on) and the frozen reference in
eval mode. At initialisation the two models hold the same weights, so the true W2 bound is 0;
any W2 loss and gradient seen then come from dropout noise alone. This script measures, on the
demo's pretrained digits UNet (dropout 0.1), over several batches of policy samples:

- the W2 term ``mean_i ||v(t, x_t) - v_ref(t, x_t)||^2`` with dropout on vs off,
- the gradient norm of ``alpha * W2`` against that of the weighted FM term (alpha = 1),
- the FM loss itself, for scale.

Run: ``python benchmarks/dropout_w2.py`` (uses or creates the demo's cached UNet in runs/cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance  # noqa: E402

from orwcfm_fast.ops import conditional_path, orw_cfm_w2_loss  # noqa: E402
from orwcfm_fast.sampling import integrate  # noqa: E402
from orwcfm_fast.tasks.digits import load_or_pretrain_digits_unet  # noqa: E402


def _grad_norm(loss: torch.Tensor, params) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "dropout_w2_cpu.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    policy = load_or_pretrain_digits_unet(args.cache_dir, "cpu")
    reference = load_or_pretrain_digits_unet(args.cache_dir, "cpu", progress=False).eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    rows = {"dropout_on": [], "dropout_off": []}
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batches):
        with torch.no_grad():
            x1 = integrate(reference, torch.randn(args.batch_size, 1, 8, 8, generator=g), steps=20)
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(x1.shape[0], generator=g)
        x_t, u_t = conditional_path(x0, x1, t)
        with torch.no_grad():
            v_ref = reference(t, x_t)
        weights = torch.ones(x1.shape[0])
        for name, training in (("dropout_on", True), ("dropout_off", False)):
            policy.train(training)
            v = policy(t, x_t)
            _, fm, w2 = orw_cfm_w2_loss(v, u_t, v_ref, weights, 1.0)
            rows[name].append({
                "fm": fm.mean().item(),
                "w2": w2.mean().item(),
                "grad_fm": _grad_norm(fm.mean(), params),
                "grad_w2": _grad_norm(w2.mean(), params),
            })
    summary = {}
    for name, items in rows.items():
        mean = {k: sum(r[k] for r in items) / len(items) for k in items[0]}
        mean["grad_w2_over_grad_fm"] = mean["grad_w2"] / mean["grad_fm"]
        summary[name] = {k: round(v, 6) for k, v in mean.items()}
        print(f"{name:12s} fm {mean['fm']:.4f}  w2 {mean['w2']:.5f}  |grad fm| {mean['grad_fm']:.4f}  "
              f"|grad w2| {mean['grad_w2']:.4f}  ratio {mean['grad_w2_over_grad_fm']:.3f}")
    from orwcfm_fast.tasks.digits import unet_cache_path

    result = {"experiment": "dropout_w2_at_init", **provenance("cpu"),
              "unet_checkpoint": unet_cache_path(args.cache_dir).name, "batches": args.batches, "batch_size": args.batch_size,
              "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
