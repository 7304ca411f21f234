"""Which coupling makes the weighted objective target q(x) w(x)? A 2-D experiment through ORWCFMTrainer.

Setup: a flow pretrained on eight Gaussians (radius 5, variance 0.1); reward = -distance to
one centre. Two measurements per coupling:

A. Online ORW-CFM-W2 (the issue's protocol): 15 epochs x 20 steps, alpha in {0, 1}; final mean
   reward, diversity (mean pairwise distance) and mass on the rewarded mode.
B. One round (the target itself): ``last_policy`` held at the pretrained q for one long epoch with
   alpha = 0, so training minimises the weighted loss for samples of q. Its minimiser is the flow to
   q(x) exp(beta r(x)) / Z if the coupling is unbiased. We compare the learned mode masses with
   those of that tilted distribution (computed by importance weighting) by total variation.

"reference" is the published trainer's pairing (torchcfm's exact-OT ``sample_plan`` with the
weights left in their original order).

Run: ``python benchmarks/coupling_experiment.py [--json PATH]`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance  # noqa: E402

from orwcfm_fast.metrics import mean_pairwise_distance, mode_histogram  # noqa: E402
from orwcfm_fast.sampling import integrate  # noqa: E402
from orwcfm_fast.tasks.gaussians import (  # noqa: E402
    EightGaussians,
    MLPVelocity,
    ModeReward,
    finetune_eight_gaussians,
    pretrain_flow,
    reference_ot_coupling,
    tilted_mode_masses,
)

# name -> (coupling, extra config). "independent+batch" isolates the weight scale: raw exp(beta r)
# weights shrink the FM term against alpha * W2 when rewards are negative; batch-normalised ones do not.
VARIANTS = {
    "independent": ("independent", {}),
    "independent+batch": ("independent", {"weight_normalization": "batch"}),
    "exact_ot": ("exact_ot", {}),
    "weighted_ot": ("weighted_ot", {}),
    "reference": (reference_ot_coupling, {}),
}



def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "coupling_experiment_cpu.json")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--one-round-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # torchcfm's OT sampler (the "reference" pairing) draws from numpy
    torch.set_num_threads(1)  # tiny MLP: one thread is fastest and avoids oversubscription
    started = time.time()
    data = EightGaussians()
    reward = ModeReward(data.centers[0])
    pretrained = pretrain_flow(MLPVelocity(), data, steps=2000, seed=args.seed)
    with torch.no_grad():
        base = integrate(pretrained, torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
    base_row = {"reward": float(reward(base).mean()), "diversity": float(mean_pairwise_distance(base)),
                "mode_masses": [float(m) for m in mode_histogram(base, data.centers)]}
    target = tilted_mode_masses(data, reward, args.temperature)
    common = {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "warmup_steps": 0,
              "temperature": args.temperature, "seed": args.seed}
    online, one_round = [], []
    with tempfile.TemporaryDirectory() as savedir:
        for name, (coupling, extra) in VARIANTS.items():
            for alpha in (0.0, 1.0):
                r = finetune_eight_gaussians(pretrained, data, reward, alpha=alpha, coupling=coupling,
                                             epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                                             savedir=savedir, **common, **extra)
                online.append({"coupling": name, "alpha": alpha, "reward": r["reward"], "diversity": r["diversity"],
                               "rewarded_mode_mass": r["mode_masses"][0]})
                print(f"[online] {name:18s} alpha={alpha:.0f}: reward {r['reward']:.3f} "
                      f"diversity {r['diversity']:.3f} mass@mode0 {r['mode_masses'][0]:.3f}", flush=True)
            r = finetune_eight_gaussians(pretrained, data, reward, alpha=0.0, coupling=coupling, epochs=1,
                                         steps_per_epoch=args.one_round_steps, savedir=savedir, **common, **extra)
            masses = np.array(r["mode_masses"])
            tv = 0.5 * float(np.abs(masses - target.numpy()).sum())
            one_round.append({"coupling": name, "mode_masses": masses.round(4).tolist(), "tv_to_target": tv})
            print(f"[one round] {name:18s}: TV to q*w {tv:.3f}  masses {masses.round(3).tolist()}", flush=True)

    result = {
        "experiment": "coupling_target_eight_gaussians",
        **provenance("cpu"),
        "config": vars(args) | {"json": str(args.json)},
        "base": base_row,
        "target_mode_masses": target.numpy().round(4).tolist(),
        "online": online,
        "one_round": one_round,
        "elapsed_s": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['elapsed_s']} s)")
    return result


if __name__ == "__main__":
    main()
