"""Tests of benchmarks/solver_accuracy.py on small smooth models (not the pretrained digits UNet).

The velocity field is a random tanh MLP on 2-D points: untrained, but smooth, time-dependent and
curved enough that every solver has a clearly measurable discretisation error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import solver_accuracy as sa  # noqa: E402


class RandomMLPVelocity(nn.Module):
    """``v(t, x) = gain * MLP([x, t])`` with random weights (fixed by ``seed``)."""

    def __init__(self, dim: int = 2, hidden: int = 32, gain: float = 3.0, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, dim))
        self.gain = gain

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def _noise(n: int = 64, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _rows_by_config(rows):
    return {(r["solver"], r["steps"]): r for r in rows}


def _check_structure(rows) -> None:
    by = _rows_by_config(rows)
    for solver in {r["solver"] for r in rows}:
        errors = [r["rms_mean"] for r in sorted((r for r in rows if r["solver"] == solver), key=lambda r: r["steps"])]
        assert all(b < a for a, b in zip(errors, errors[1:])), f"{solver}: errors do not decrease: {errors}"
    # equal NFE (20): rk4 with 5 steps beats euler with 20
    assert by[("rk4", 5)]["nfe"] == by[("euler", 20)]["nfe"] == 20
    assert by[("rk4", 5)]["rms_mean"] < by[("euler", 20)]["rms_mean"]
    for r in rows:
        assert r["nfe"] == sa.nfe(r["solver"], r["steps"])
        assert 0 <= r["rms_mean"] <= r["rms_max"] <= r["abs_max"] * (1 + 1e-12)
        assert r["seconds"] > 0


def test_measure_on_random_mlp():
    model = RandomMLPVelocity().double().eval()
    x_0 = _noise()
    configs = sa.configs_from_grid(sa.QUICK_GRID)
    result = sa.measure(model, x_0, configs, reference_rtol=1e-10, reference_atol=1e-12)
    rows = result["rows"]
    assert [(r["solver"], r["steps"]) for r in rows] == configs
    _check_structure(rows)

    # even the 100x looser dopri5 check is well below the best fixed-step error
    ref = result["reference"]
    assert ref["nfe"] > 0 and ref["check"]["rms_mean"] < 0.1 * min(r["rms_mean"] for r in rows)

    # the orders show: 5x the steps cut euler's error ~5x; 2x the steps cut rk4's ~16x
    by = _rows_by_config(rows)
    assert 3 < by[("euler", 20)]["rms_mean"] / by[("euler", 100)]["rms_mean"] < 8
    assert by[("rk4", 5)]["rms_mean"] / by[("rk4", 10)]["rms_mean"] > 8

    best, base = sa.recommend(rows)
    assert (base["solver"], base["steps"]) == sa.BASELINE
    assert best["rms_mean"] <= base["rms_mean"]
    assert best["nfe"] <= 100
    assert best["nfe"] == min(r["nfe"] for r in rows if r["rms_mean"] <= base["rms_mean"])


def test_refinement_finds_the_fewest_steps():
    model = RandomMLPVelocity().double().eval()
    # a coarse grid and a demanding baseline, so that every solver has a bracket to bisect
    baseline = ("euler", 1000)
    grid = {"euler": [100, 1000], "midpoint": [3, 20], "heun": [2, 40], "rk4": [1, 10]}
    result = sa.measure(model, _noise(), sa.configs_from_grid(grid), reference_rtol=1e-10, reference_atol=1e-12,
                        check_factor=0, refine=baseline)
    rows = result["rows"]
    by = _rows_by_config(rows)
    assert set(sa.configs_from_grid(grid)) <= set(by) and any(r["refined"] for r in rows)
    best, base = sa.recommend(rows, baseline)
    bar = base["rms_mean"]
    # the winner's next smaller step count was measured and fails the bar
    assert best["steps"] == 1 or by[(best["solver"], best["steps"] - 1)]["rms_mean"] > bar
    # no unmeasured step count of any solver could be cheaper: every cheaper one was tried or is
    # below a measured failing one (errors decrease with steps)
    for solver in grid:
        stages = sa.SOLVERS[solver].stages
        for steps in range(1, best["nfe"] // stages + 1):
            if (solver, steps) == (best["solver"], best["steps"]):
                continue
            failing_above = [s for (sv, s), r in by.items() if sv == solver and s >= steps and r["rms_mean"] > bar]
            assert failing_above or sa.nfe(solver, steps) == best["nfe"], (solver, steps)
    assert [r["solver"] for r in rows] == sorted((r["solver"] for r in rows), key=list(grid).index)


def test_measure_with_probe_and_float32_solves():
    model64 = RandomMLPVelocity().double().eval()
    model32 = RandomMLPVelocity().eval()

    def probe(x):  # a smooth "classifier" of 2-D points: 3 classes
        return torch.softmax(torch.stack([x[:, 0], x[:, 1], -x.sum(1)], dim=1).float(), dim=1)

    x_0 = _noise(32)
    result = sa.measure(model32, x_0.float(), [("euler", 10), ("rk4", 10)], reference_model=model64,
                        reference_rtol=1e-8, reference_atol=1e-10, check_factor=0, probe=probe)
    assert "check" not in result["reference"]
    euler, rk4 = result["rows"]
    for row in (euler, rk4):
        assert 0 <= row["prob_tv_mean"] <= row["prob_tv_max"] <= 1 and 0 <= row["label_flip"] <= 1
    assert rk4["rms_mean"] < euler["rms_mean"] and rk4["prob_tv_mean"] < euler["prob_tv_mean"]
    assert rk4["rms_mean"] > 0  # float32 rounding is measured, never exactly zero


def test_recommend_needs_baseline():
    with pytest.raises(ValueError, match="baseline"):
        sa.recommend([{"solver": "rk4", "steps": 5, "nfe": 20, "rms_mean": 1e-3}])


def test_main_quick(tmp_path, capsys):
    def load_subject(args, device):
        return sa.Subject("random tanh MLP on 2-D points", RandomMLPVelocity().to(device).eval(), (2,))

    path = tmp_path / "out.json"
    out = sa.main(["--quick", "--device", "cpu", "--samples", "64", "--ref-rtol", "1e-10", "--ref-atol", "1e-12",
                   "--json", str(path)], load_subject=load_subject)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(out))
    for key in ("device", "date", "commit", "torch", "reference", "rows", "baseline", "recommended",
                "float64_port_check", "script_seconds"):
        assert key in saved
    assert saved["dtype"] == "float64" and saved["samples"] == 64 and saved["quick"]
    assert saved["float64_port_check"]["max_relative_difference"] < 1e-5
    assert {"rms_max", "abs_max"} <= set(saved["by_other_metrics"])
    _check_structure(saved["rows"])
    rec, base = saved["recommended"], saved["baseline"]
    assert (base["solver"], base["steps"]) == sa.BASELINE
    assert rec["rms_mean"] <= base["rms_mean"] and rec["nfe"] <= 100
    assert rec["nfe_ratio_vs_baseline"] == pytest.approx(base["nfe"] / rec["nfe"])
    printed = capsys.readouterr().out
    assert "recommended solver:" in printed and "rms_mean" in printed


def test_to_float64_removes_torchcfm_float32_casts():
    pytest.importorskip("torchcfm")
    from orwcfm_fast.tasks.digits import make_digits_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = make_digits_unet(dropout=0.0).eval()
        for p in unet.parameters():  # torchcfm zero-initialises the output convolutions
            if not p.any():
                nn.init.normal_(p, std=0.05)
    unet64 = sa.to_float64(unet)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    with torch.no_grad():
        v64 = unet64(t, x)
        v32 = unet(t.float(), x.float())
    assert v64.dtype == torch.float64 and v32.dtype == torch.float32  # the original is untouched
    assert v64.abs().max() > 0
    assert torch.allclose(v64, v32.double(), rtol=0, atol=1e-5 * float(v64.abs().max()))
    # a float64-only change of t moves the float64 velocity: the time embedding is float64 now
    with torch.no_grad():
        dv = unet64(t + 1e-12, x) - v64
    assert dv.abs().max() > 0
