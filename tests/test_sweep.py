"""``orwcfm-fast sweep``: one fine-tuning per (objective, alpha, temperature) from the same pretrained model and
seed (diffusion-nft not crossed with temperatures), evaluated after every epoch (reward, held-out reward, diversity,
Vendi), forward counts from the trainer; sweep.json / pareto.png / compute.png / sweep.md (reward at matched
diversity, forwards to a reward target, reward at matched compute), resumable; every task kind; torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orwcfm_fast.cli import main
from orwcfm_fast.compute import FORWARD_KINDS
from orwcfm_fast.sweep import analyse, save_compute, save_pareto, sweep_settings, sweep_table, uses_temperature

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
ALL = ("orw-cfm-w2", "adrpo", "offline-rwr", "diffusion-nft")

# The tiny gaussians sweep of these tests: 2 epochs x 1 step of batch 16, 2 Euler steps, 24 evaluation samples.
TINY = ["--epochs", "2", "--steps-per-epoch", "1", "--samples-per-prompt", "24", "--pretrain-steps", "30",
        "--set", "batch_size=16", "--set", "ode_steps=2", "--quiet"]


def gaussians_sweep(tmp_path, *extra, alphas="0,2"):
    return main(["sweep", "--task", "gaussians", "--alphas", alphas, *TINY, "--outdir", str(tmp_path / "sweep"),
                 "--cache-dir", str(tmp_path / "cache"), *extra])


@pytest.fixture(scope="module")
def objectives_sweep(tmp_path_factory, one_cpu_thread):
    """One tiny sweep of orw-cfm-w2 and diffusion-nft x alphas 0, 2 x temperatures 0.5, 3 (six settings, ~4 s),
    shared by the tests that read its files: ``(folder, record)``."""
    tmp = tmp_path_factory.mktemp("objectives_sweep")
    assert gaussians_sweep(tmp, "--objectives", "orw-cfm-w2,diffusion-nft", "--temperatures", "0.5,3",
                           "--diversity-levels", "0.5,0.9,0.99") == 0
    return tmp, json.loads((tmp / "sweep" / "sweep.json").read_text())


# ----------------------------------------------------------------------------- the settings


def test_settings_cross_objectives_with_temperatures_only_where_they_apply():
    alphas, temps = [0.0, 0.3, 1.0], [0.5, 2.0]
    settings = sweep_settings(ALL, alphas, temps)
    got = [(s["objective"], s["alpha"], s["temperature"]) for s in settings]
    # written out independently: three weighted objectives x temperatures x alphas, diffusion-nft x alphas only
    expected = [(o, a, t) for o in ALL[:3] for t in temps for a in alphas] + [("diffusion-nft", a, None) for a in alphas]
    assert got == expected and len(got) == 3 * 2 * 3 + 3
    assert [uses_temperature(o) for o in ALL] == [True, True, True, False]
    # one objective without a temperature: one setting per alpha, whatever the temperatures
    assert sweep_settings(["diffusion-nft"], [1.0], [0.5, 2.0, 3.0]) == [
        {"objective": "diffusion-nft", "alpha": 1.0, "temperature": None}]


def test_sweep_writes_every_setting_with_its_objective_counts_and_evaluations(objectives_sweep):
    tmp, record = objectives_sweep
    out = tmp / "sweep"
    assert record["task"] == "gaussians" and record["objectives"] == ["orw-cfm-w2", "diffusion-nft"]
    assert record["alphas"] == [0.0, 2.0] and record["temperatures"] == [0.5, 3.0]
    settings = [(e["objective"], e["alpha"], e["temperature"]) for e in record["settings"]]
    assert settings == [("orw-cfm-w2", 0.0, 0.5), ("orw-cfm-w2", 2.0, 0.5), ("orw-cfm-w2", 0.0, 3.0),
                        ("orw-cfm-w2", 2.0, 3.0), ("diffusion-nft", 0.0, None), ("diffusion-nft", 2.0, None)]
    for e in record["settings"]:
        assert len(e["history"]) == 2 and [p["epoch"] for p in e["epochs"]] == [1, 2]
        for p, h in zip(e["epochs"], e["history"]):
            assert p["forwards_total"] == h["forwards_total"] and p["backwards_total"] == h["backwards_total"]
            assert 0.0 <= p["held_out_reward"] <= 1.0 and p["diversity"] > 0 and 1.0 <= p["vendi"] <= 2.0
        last = e["epochs"][-1]
        for key in ("reward", "held_out_reward", "diversity", "vendi"):
            assert e[key] == last[key]  # the final evaluation is the last epoch's
        assert e["forwards_total"] == last["forwards_total"] and e["backwards_total"] == last["backwards_total"]
        assert sum(e["forwards_by_kind"].values()) == e["forwards_total"] and e["evaluation_forwards_total"] > 0
        # the same evaluation noise: epoch 1 of two settings that differ only by alpha sample the same model
        assert isinstance(e["hacking_alarm"], bool)
    # diffusion-nft runs the old policy; with alpha 0 no reference forward, with alpha 2 one per sample
    nft0, nft2 = record["settings"][4:]
    assert nft0["forwards_by_kind"]["reference"] == 0 and nft2["forwards_by_kind"]["reference"] == 32
    assert nft0["forwards_by_kind"]["old_policy"] == nft2["forwards_by_kind"]["old_policy"] == 32
    assert record["settings"][0]["forwards_by_kind"]["old_policy"] == 0
    base = record["pretrained"]
    assert 0.0 <= base["held_out_reward"] <= 1.0 and base["vendi"] >= 1.0
    assert "posterior probability of mode 0" in record["held_out_reward"]
    assert record["device"] == "cpu" and record["torch"] == torch.__version__ and record["seed"] == 0
    assert record["cpu"] and record["eval_seed"] == 0 and record["commit"] is not None
    for name in ("pareto.png", "compute.png"):
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 10_000
    md = (out / "sweep.md").read_text()
    assert md.count("\n| orw-cfm-w2 | ") == 4 + 3 and md.count("\n| diffusion-nft | 2 | — |") == 1
    assert "Seeds: training 0 (every setting), evaluation noise 0" in md and record["cpu"] in md
    # each setting's own files: the trainer's CSV, its final evaluation and grid (a scatter plot for points)
    one = out / "diffusion-nft_alpha2"
    assert (one / "sweep_metrics.csv").exists() and (one / "result.json").exists()
    assert json.loads((one / "eval" / "evaluation.json").read_text())["reward"] == record["settings"][5]["reward"]
    assert len(list((one / "eval" / "grids").glob("*.png"))) == 1
    assert (out / "orw-cfm-w2_alpha2_temp0.5" / "result.json").exists()


def test_record_values_are_the_trainers_own(objectives_sweep):
    """diffusion-nft, alpha 2, trained again here by hand with no evaluation in between: the same per-epoch history
    (forward counts, batch rewards), the same totals by kind, and the same final evaluation. So the sweep's numbers
    are the trainer's, and evaluating after every epoch does not change training."""
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModePosteriorReward, ModeReward
    from orwcfm_fast.train_run import load_or_pretrain_gaussians_flow

    tmp, record = objectives_sweep
    entry = record["settings"][5]
    assert (entry["objective"], entry["alpha"]) == ("diffusion-nft", 2.0)
    data = EightGaussians()
    config = {"sample_shape": [2], "learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 16, "ode_steps": 2,
              "seed": 0, "objective": "diffusion-nft", "w2_coefficient": 2.0, "reward": ModeReward(data.centers[0]),
              "eval_reward": ModePosteriorReward(data, 0), "savedir": str(tmp / "by_hand")}
    trainer = ORWCFMTrainer(load_or_pretrain_gaussians_flow(tmp / "cache", steps=30), config, "cpu")
    trainer.train(2, 1)
    for mine, theirs in zip(trainer.history, entry["history"]):
        for key in ("forwards_total", "backwards_total", "forwards", *(f"forwards/{k}" for k in FORWARD_KINDS)):
            assert mine[key] == theirs[key], key
        assert mine["reward"] == pytest.approx(theirs["reward"], rel=1e-6)  # float32 means; CPU ops deterministic
    assert [p["forwards_total"] for p in entry["epochs"]] == [h["forwards_total"] for h in trainer.history]
    # the totals by kind: per-step means x 1 step, summed over the epochs; by hand 16 samples x 2 steps per role
    for kind in FORWARD_KINDS:
        assert entry["forwards_by_kind"][kind] == sum(h[f"forwards/{kind}"] for h in trainer.history)
    assert [entry["forwards_by_kind"][k] for k in ("policy", "reference", "old_policy")] == [32, 32, 32]
    assert entry["forwards_by_kind"]["sampling"] == 2 * 16 * 2  # 2 steps x 16 samples x 2 Euler steps
    ev = trainer.evaluate(samples_per_prompt=24, outdir=False, seed=0)
    for key in ("reward", "held_out_reward", "diversity", "vendi"):
        assert entry[key] == pytest.approx(ev[key], rel=1e-6), key


def test_pretrained_point_and_held_out_reward_are_independent_evaluations(objectives_sweep):
    """The pretrained point recomputed from the model's own samples on the evaluation noise: the training reward
    -||x - c_0||, the held-out reward from the mixture's densities written out (float64), the diversity."""
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModeReward
    from orwcfm_fast.train_run import load_or_pretrain_gaussians_flow

    tmp, record = objectives_sweep
    data = EightGaussians()
    model = load_or_pretrain_gaussians_flow(tmp / "cache", steps=30)
    trainer = ORWCFMTrainer(model, {"sample_shape": [2], "reward": ModeReward(data.centers[0]), "batch_size": 16,
                                    "ode_steps": 2, "seed": 0, "savedir": str(tmp / "x")}, "cpu")
    trainer.generator.manual_seed(0)
    x = trainer.sample(24, batch_size=16).double()
    assert record["pretrained"]["reward"] == pytest.approx(float(-(x - data.centers[0].double()).norm(dim=1).mean()),
                                                          rel=1e-5)
    var = data.std ** 2
    density = torch.stack([torch.exp(-((x - c.double()) ** 2).sum(1) / (2 * var)) / (2 * math.pi * var)
                           for c in data.centers], dim=1)  # [24, 8], equal mixture weights cancel
    assert record["pretrained"]["held_out_reward"] == pytest.approx(float((density[:, 0] / density.sum(1)).mean()),
                                                                    abs=1e-6)  # float32 posterior, 1e-7 per sample
    d = torch.cdist(x, x)
    assert record["pretrained"]["diversity"] == pytest.approx(float(d.sum() / (24 * 23)), rel=1e-6)


def test_settings_that_differ_only_by_alpha_start_alike(objectives_sweep):
    """Every setting starts from the same model and seed: epoch 1 samples from the same last policy (the same batch
    rewards), and alpha changes the losses."""
    _, record = objectives_sweep
    a, b = record["settings"][:2]
    assert (a["alpha"], b["alpha"]) == (0.0, 2.0) and a["temperature"] == b["temperature"]
    assert a["history"][0]["reward"] == b["history"][0]["reward"]
    assert a["history"][0]["total_loss"] != b["history"][0]["total_loss"] or a["history"][1] != b["history"][1]


# ----------------------------------------------------------------------------- sweep.md's comparisons


def _md_table(md: str, section: str) -> dict[str, list[str]]:
    """The rows of the table under ``## section``: ``{first cell: the other cells}``."""
    body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0]: the header


def _recomputed(record, target=None):
    """sweep.md's three comparisons, recomputed here from the settings' evaluated epochs alone."""
    points = {}
    for e in record["settings"]:
        points.setdefault(e["objective"], []).append(e["epochs"])
    base = record["pretrained"]
    matched = []
    for level in record["diversity_levels"]:
        row = {}
        for o, runs in points.items():
            kept = [p["reward"] for run in runs for p in run if p["diversity"] >= level * base["diversity"]]
            row[o] = max(kept) if kept else None
        matched.append(row)
    if target is None:
        best = max(p["reward"] for runs in points.values() for run in runs for p in run)
        target = base["reward"] + max(best - base["reward"], 0) / 2
    reach = {}
    for o, runs in points.items():
        firsts = [next((p["forwards_total"] for p in run if p["reward"] >= target), None) for run in runs]
        firsts = [f for f in firsts if f is not None]
        reach[o] = min(firsts) if firsts else None
    budget = min(max(p["forwards_total"] for run in runs for p in run) for runs in points.values())
    within = {}
    for o, runs in points.items():
        kept = [p["reward"] for run in runs for p in run if p["forwards_total"] <= budget]
        within[o] = max(kept) if kept else None
    return matched, target, reach, budget, within


def _check_md(md: str, record, target=None):
    matched, target, reach, budget, within = _recomputed(record, target)
    table = _md_table(md, "Reward at matched diversity")
    for k, row in enumerate(matched):
        for o, reward in row.items():
            cell = table[o][k]
            assert (cell == "—") if reward is None else cell.startswith(f"{reward:.4f} ("), (o, k, cell)
    assert f"Target reward {target:.4f} (" in md
    table = _md_table(md, "Forwards to a reward target")
    for o, forwards in reach.items():
        assert table[o][0] == ("not reached" if forwards is None else str(int(forwards))), o
    assert f"Budget {int(budget)} training forwards" in md
    table = _md_table(md, "Reward at matched compute")
    for o, reward in within.items():
        assert table[o][0] == ("—" if reward is None else f"{reward:.4f}"), o
    return matched, reach, within


def test_sweep_md_comparisons_equal_a_recomputation_from_sweep_json(objectives_sweep):
    tmp, record = objectives_sweep
    matched, reach, within = _check_md((tmp / "sweep" / "sweep.md").read_text(), record)
    assert record["analysis"]["reward_target_default"]
    # the run is not degenerate: somebody reaches the target, and the strictest level excludes some points
    assert any(f is not None for f in reach.values())
    n_points = sum(len(e["epochs"]) for e in record["settings"])
    strict = record["diversity_levels"][-1] * record["pretrained"]["diversity"]
    assert 0 < sum(p["diversity"] >= strict for e in record["settings"] for p in e["epochs"]) < n_points


def _point(epoch, forwards, reward, diversity):
    return {"epoch": epoch, "global_step": epoch, "forwards_total": float(forwards), "backwards_total": 0.0,
            "reward": reward, "held_out_reward": None, "diversity": diversity, "vendi": None, "hacking_alarm": False}


def _setting(objective, alpha, temperature, *points):
    last = points[-1]
    return {"objective": objective, "alpha": alpha, "temperature": temperature, "reward": last["reward"],
            "held_out_reward": None, "diversity": last["diversity"], "vendi": None,
            "forwards_total": last["forwards_total"], "epochs": list(points)}


HAND_RECORD = {
    "task": "t", "epochs": 2, "steps_per_epoch": 1, "samples_per_prompt": 4, "seed": 0, "eval_seed": 0,
    "device": "cpu", "cpu": "a CPU", "torch": "x", "date": "d", "objectives": ["orw-cfm-w2", "diffusion-nft",
                                                                                 "offline-rwr"],
    "diversity_levels": [0.5, 0.9, 0.95], "reward_target": None,
    "pretrained": {"reward": 0.0, "diversity": 10.0, "embedding": "pixels"},
    "settings": [
        _setting("orw-cfm-w2", 0.0, 1.0, _point(1, 100, 1.0, 8.0), _point(2, 200, 3.0, 4.0)),
        _setting("orw-cfm-w2", 1.0, 1.0, _point(1, 100, 0.5, 9.5), _point(2, 200, 2.0, 9.0)),
        _setting("diffusion-nft", 0.0, None, _point(1, 50, 2.5, 6.0), _point(2, 100, 2.8, 5.0)),
        _setting("offline-rwr", 0.0, 1.0, _point(1, 400, 1.0, 10.0), _point(2, 500, 0.2, 10.0)),
    ],
}


def test_comparisons_of_a_hand_made_record(tmp_path):
    """Answers worked out by hand: diversity >= the threshold is inclusive (5.0 at 0.5 x 10), any evaluated epoch
    counts (not just the last), forwards are those of a setting's *first* epoch at the target, and the compute budget
    is the smallest of the objectives' largest forward counts (100, inclusive)."""
    record = json.loads(json.dumps(HAND_RECORD))
    a = analyse(record)
    best = [{o: None if p is None else p["reward"] for o, p in level.items()} for level in a["matched_diversity"]]
    assert best == [{"orw-cfm-w2": 2.0, "diffusion-nft": 2.8, "offline-rwr": 1.0},
                    {"orw-cfm-w2": 2.0, "diffusion-nft": None, "offline-rwr": 1.0},
                    {"orw-cfm-w2": 0.5, "diffusion-nft": None, "offline-rwr": 1.0}]
    assert a["reward_target"] == 1.5 and a["reward_target_default"]  # half-way from 0 to the best, 3.0
    reach = {o: None if p is None else (p["forwards_total"], p["epoch"]) for o, p in a["forwards_to_target"].items()}
    assert reach == {"orw-cfm-w2": (200.0, 2), "diffusion-nft": (50.0, 1), "offline-rwr": None}
    assert a["compute_budget"] == 100.0
    assert {o: None if p is None else p["reward"] for o, p in a["matched_compute"].items()} == {
        "orw-cfm-w2": 1.0, "diffusion-nft": 2.8, "offline-rwr": None}
    record["analysis"] = a
    md = sweep_table(record)
    _check_md(md, record)
    assert "| diffusion-nft | 0 | — | 2.8000 |" in md and "| orw-cfm-w2 | 1 | 1 | 2.0000 | — | 9.0000 |" in md
    # an explicit target: the first epoch at reward >= 0.75
    record["reward_target"] = 0.75
    a = analyse(record)
    assert not a["reward_target_default"]
    assert {o: p["forwards_total"] for o, p in a["forwards_to_target"].items()} == {
        "orw-cfm-w2": 100.0, "diffusion-nft": 50.0, "offline-rwr": 400.0}
    record["analysis"] = a
    _check_md(sweep_table(record), record, target=0.75)
    assert save_pareto(record, tmp_path / "p.png").read_bytes()[:8] == PNG
    assert save_compute(record, tmp_path / "c.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- resume and bad arguments


def test_sweep_resumes_and_retrains_changed_settings(tmp_path, capsys):
    assert gaussians_sweep(tmp_path, alphas="0,1") == 0
    before = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    capsys.readouterr()
    # one more objective: the finished settings and the pretrained evaluation are read back, not redone
    assert main(["sweep", "--task", "gaussians", "--alphas", "0,1", "--objectives", "orw-cfm-w2,diffusion-nft",
                 *[a for a in TINY if a != "--quiet"], "--outdir", str(tmp_path / "sweep"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    log = capsys.readouterr().out
    assert log.count("done before") == 2 and "evaluating the pretrained model" not in log
    after = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert after["settings"][:2] == before["settings"]
    assert [(e["objective"], e["alpha"]) for e in after["settings"][2:]] == [("diffusion-nft", 0.0),
                                                                             ("diffusion-nft", 1.0)]
    # another number of epochs is another result: trained again
    assert gaussians_sweep(tmp_path, "--epochs", "1", alphas="0") == 0
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(again["settings"][0]["history"]) == 1 and len(again["settings"][0]["epochs"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--alphas", "a,b"], "comma-separated numbers"),
    (["--alphas", "-1"], ">= 0"),
    (["--alphas", "1,1"], "repeated"),
    (["--alphas", "1", "--objectives", "orw-cfm-w2,ppo"],
     "unknown objective 'ppo'; valid objectives: orw-cfm-w2, adrpo, offline-rwr, diffusion-nft"),
    (["--alphas", "1", "--objectives", "adrpo,adrpo"], "an objective is repeated"),
    (["--alphas", "1", "--objectives", ","], "valid: orw-cfm-w2, adrpo, offline-rwr, diffusion-nft"),
    (["--alphas", "1", "--diversity-levels", "0.5,2"], "fractions in (0, 1]"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--task", "gaussians", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_settings_are_refused_before_training(tmp_path, capsys):
    assert gaussians_sweep(tmp_path, "--samples-per-prompt", "1") == 2
    assert "--samples-per-prompt must be >= 2" in capsys.readouterr().err
    assert gaussians_sweep(tmp_path, "--set", "learning_rat=1") == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "sweep.json").exists()


# ----------------------------------------------------------------------------- the tasks' held-out rewards


def test_mode_posterior_reward_is_the_mixtures_posterior():
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModePosteriorReward

    data = EightGaussians()
    c = data.centers.double()
    x = torch.cat([c, (c[:1] + c[1:2]) / 2, torch.randn(40, 2, generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.float64) * 3])
    var = data.std ** 2
    density = torch.stack([torch.exp(-((x - ck) ** 2).sum(1) / (2 * var)) for ck in c], dim=1)
    for mode in (0, 3):
        got = ModePosteriorReward(data, mode)(x.float())
        assert got.dtype == torch.float32 and got.shape == (49,)
        # float32 output of a float64 computation: 6e-8 relative round-off on values <= 1
        torch.testing.assert_close(got.double(), density[:, mode] / density.sum(1), rtol=0, atol=1e-7)
    r = ModePosteriorReward(data, 0)(x.float())
    assert r[0] > 0.999 and r[4] < 1e-6 and r[8] == pytest.approx(0.5, abs=1e-6)  # centre, opposite, midway to 1
    with pytest.raises(ValueError, match="0..7"):
        ModePosteriorReward(data, 8)


def test_held_out_digits_classifier_is_another_architecture(tmp_path):
    from orwcfm_fast.tasks import digits as digits_mod

    clf, acc = digits_mod.load_or_train_digits_classifier(tmp_path, "cpu", steps=120, seed=1, architecture="mlp")
    assert isinstance(clf, digits_mod.DigitsMLPClassifier) and clf(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in clf.modules())
    assert acc >= 0.8, acc  # 120 steps of an MLP (chance 0.1): only a broken training is below
    mlp_path = digits_mod.classifier_cache_path(tmp_path, steps=120, seed=1, architecture="mlp")
    assert mlp_path.exists() and mlp_path.name.startswith("digits-mlp-classifier-")
    # the reward's CNN keeps its cache file name
    assert digits_mod.classifier_cache_path(tmp_path, steps=120, seed=1).name == (
        digits_mod.classifier_cache_path(tmp_path, steps=120, seed=1, architecture="cnn").name)
    assert digits_mod.classifier_cache_path(tmp_path, steps=120, seed=1).name.startswith("digits-classifier-")
    with pytest.raises(ValueError, match="architecture"):
        digits_mod.train_classifier(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), architecture="vit")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """One ``--cache-dir`` for the two digits tasks' sweeps: their reward, the digits classifier, is trained once
    (about 40 s on one CPU thread) and loaded by the other, as a second run with the same cache would."""
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture
def quick_held_out_classifier(monkeypatch):
    """The held-out MLP trained for 30 steps instead of 1500 (its cache file says so): the sweep's path, cheaply."""
    from orwcfm_fast.tasks import digits as digits_mod

    monkeypatch.setitem(digits_mod.HELD_OUT_CLASSIFIER, "steps", 30)


def test_digits_sweep(tmp_path, digits_cache, quick_held_out_classifier):
    code = main(["sweep", "--task", "digits", "--alphas", "1", "--epochs", "1", "--steps-per-epoch", "1",
                 "--samples-per-prompt", "8", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(digits_cache), "--pretrain-steps", "5", "--set", "batch_size=8", "--set", "ode_steps=2",
                 "--quiet"])
    assert code == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    e = record["settings"][0]
    assert 0.0 <= e["reward"] <= 1.0 and e["diversity"] > 0 and record["pretrained"]["embedding"] == "pixels"
    assert 0.0 <= e["held_out_reward"] <= 1.0 and e["held_out_reward"] != e["reward"]
    assert "MLP classifier" in record["held_out_reward"] and "digit 7" in record["held_out_reward"]
    assert len(list((tmp_path / "sweep" / "orw-cfm-w2_alpha1_temp3" / "eval" / "grids").glob("*.png"))) == 1


def test_text_to_image_sweep_per_prompt(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from orwcfm_fast.flows.tiny import TINY_SIZE, tiny_sd3_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a dog\na cat\n")
    code = main(["sweep", "--task", "text-to-image", "--alphas", "0,1", "--pretrained", str(tmp_path / "sd3"),
                 "--prompts", str(tmp_path / "prompts.txt"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--samples-per-prompt", "2", "--outdir", str(tmp_path / "sweep"), "--quiet",
                 "--set", f"resolution={TINY_SIZE}", "--set", "ode_steps=2", "--set", "batch_size=2",
                 "--set", "images_per_prompt=2", "--set", "max_sequence_length=16", "--set", "lora_rank=2",
                 "--set", 'reward={"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}'])
    assert code == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["held_out_reward"] is None  # no held-out reward for text-to-image unless the config names one
    for e in record["settings"]:
        assert set(e["per_prompt"]) == {"a dog", "a cat"} and e["held_out_reward"] is None
        assert "reward/jpeg_compressibility" in e and "reward/jpeg_incompressibility" in e
        # the weighted sum, recomputed from the terms
        assert e["reward"] == pytest.approx(e["reward/jpeg_compressibility"] + 0.5 * e["reward/jpeg_incompressibility"],
                                            abs=1e-4)
    grids = sorted(p.name for p in (tmp_path / "sweep" / "orw-cfm-w2_alpha1_temp0.5" / "eval" / "grids").glob("*.png"))
    assert grids == ["000_a_dog.png", "001_a_cat.png"]


def test_prompted_digits_sweep(tmp_path, monkeypatch, digits_cache, quick_held_out_classifier):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["sweep", "--task", "prompted-digits", "--alphas", "1", "--epochs", "1", "--steps-per-epoch", "1",
                 "--samples-per-prompt", "2", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(digits_cache), "--pretrain-steps", "3", "--quiet", "--set", "batch_size=4",
                 "--set", "images_per_prompt=2", "--set", "ode_steps=2",
                 "--set", 'prompts=["a handwritten 1", "a handwritten 7"]'])
    assert code == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    e = record["settings"][0]
    assert set(e["per_prompt"]) == {"a handwritten 1", "a handwritten 7"}
    assert 0.0 <= e["reward"] <= 1.0 and 0.0 <= e["held_out_reward"] <= 1.0
    assert "each prompt's digit" in record["held_out_reward"]


# Runs `orwcfm-fast sweep` as torchrun's workers run it (orwcfm_fast.cli.main, unchanged), watched from outside
# the library: each rank works in its own folder (nodes without a shared file system: only rank 0's files say
# which settings are done), and writes to WATCH_DIR/rank<r>.jsonl which settings it trains and evaluates and,
# once the command has returned on that rank, what rank 0's sweep.json holds. (The sweep logs on rank 0 only.)
RANK_WATCH = r"""
import json, os, sys, time
from pathlib import Path

from orwcfm_fast import sweep
from orwcfm_fast.cli import main
from orwcfm_fast.trainer import ORWCFMTrainer

RANK = int(os.environ["RANK"])
RECORD = Path(os.environ["RANK0_RECORD"])
EVENTS = Path(os.environ["WATCH_DIR"]) / f"rank{RANK}.jsonl"


def say(event, **data):
    with EVENTS.open("a") as f:
        f.write(json.dumps({"event": event, **data}) + "\n")


train, evaluate, write_json = ORWCFMTrainer.train, ORWCFMTrainer.evaluate, sweep._write_json


def watched_train(self, *args, **kwargs):
    say("train", alpha=self.alpha)
    return train(self, *args, **kwargs)


def watched_evaluate(self, *args, **kwargs):
    where = Path(kwargs["outdir"])
    say("evaluate", setting=where.name if where.name == "pretrained" else where.parent.name)
    return evaluate(self, *args, **kwargs)


def late_record(path, data):
    if RANK == 0 and Path(path).name == "sweep.json":
        # 1 s late: without the closing barrier every other rank, with nothing left to do, has returned and
        # read the record by then (the old one, or none)
        time.sleep(1.0)
    write_json(path, data)


ORWCFMTrainer.train, ORWCFMTrainer.evaluate, sweep._write_json = watched_train, watched_evaluate, late_record
folder = Path(f"rank{RANK}")
folder.mkdir(exist_ok=True)
os.chdir(folder)
code = main(sys.argv[1:])
record = json.loads(RECORD.read_text()) if RECORD.is_file() else None
say("returned", code=code, record=None if record is None else [e["alpha"] for e in record["settings"]])
sys.exit(code)
"""


def _torchrun_sweep(tmp_path, alphas: str) -> tuple[int, str, dict[int, list[dict]]]:
    """One two-rank gaussians sweep into ``rank<r>/sweep`` (per rank), the smallest one the command accepts.

    Ranks that call different collectives wait for each other (gloo's timeout is 30 minutes): after 240 s
    torchrun is stopped, and the watch events say where each rank was.

    Returns:
        ``(torchrun's exit status, the output of both ranks, each rank's watch events {rank: [{"event", ...}]})``.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "rank_watch.py").write_text(RANK_WATCH)
    watch = tmp_path / f"watch-{alphas}"
    watch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WATCH_DIR": str(watch),
           "RANK0_RECORD": str(tmp_path / "rank0" / "sweep" / "sweep.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "rank_watch.py",
           "sweep", "--task", "gaussians", "--alphas", alphas, "--epochs", "1", "--steps-per-epoch", "1",
           "--samples-per-prompt", "2", "--outdir", "sweep", "--cache-dir", str(tmp_path / "cache"),
           "--pretrain-steps", "1", "--set", "batch_size=2", "--set", "ode_steps=1", "--device", "cpu"]
    log = tmp_path / f"torchrun-{alphas}.log"
    with log.open("w") as sink:  # a file, not a pipe: nothing to drain if a worker outlives torchrun
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers (SIGTERM, then SIGKILL after its grace period)
            proc.wait(timeout=60)
    output = log.read_text()
    events = {}
    for r in (0, 1):
        lines = (watch / f"rank{r}.jsonl").read_text().splitlines() if (watch / f"rank{r}.jsonl").exists() else []
        events[r] = [json.loads(line) for line in lines]
    return proc.returncode, output, events


def _per_rank(events: dict[int, list[dict]], *kinds: str) -> dict[int, list[str]]:
    """Each rank's watch events of ``kinds``, in order, as ``"train alpha 2"`` / ``"evaluate pretrained"`` /
    ``"returned 0 with record [0.0, 1.0]"``."""
    text = {"train": lambda e: f"train alpha {e['alpha']:g}", "evaluate": lambda e: f"evaluate {e['setting']}",
            "returned": lambda e: f"returned {e['code']} with record {e['record']}"}
    return {r: [text[e["event"]](e) for e in events[r] if e["event"] in kinds] for r in (0, 1)}


def test_torchrun_sweep_two_ranks_resumes_the_same_settings_on_every_rank(tmp_path):
    """Two ranks, each with its own folder: a first sweep, then the same sweep with one more alpha. Rank 0's
    files decide which settings are done (broadcast), so both ranks skip the finished ones and the pretrained
    evaluation and train only the new alpha; a rank that decided from its own (empty) folder would evaluate and
    train again, and the ranks' collectives would no longer match (they hang). Every rank returns only after
    rank 0 has written the record (the closing barrier)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    record_file = tmp_path / "rank0" / "sweep" / "sweep.json"

    code, output, events = _torchrun_sweep(tmp_path, "0,1")
    tail = output[-4000:]
    every = ["evaluate pretrained", "train alpha 0", "evaluate orw-cfm-w2_alpha0_temp0.5", "train alpha 1",
             "evaluate orw-cfm-w2_alpha1_temp0.5"]
    assert _per_rank(events, "train", "evaluate") == {0: every, 1: every}, tail
    assert code == 0, tail
    # each rank returned after rank 0 had written the record (written 1 s late on purpose: a rank that left
    # without waiting would find none)
    assert _per_rank(events, "returned") == {r: ["returned 0 with record [0.0, 1.0]"] for r in (0, 1)}, tail
    before = json.loads(record_file.read_text())
    assert before["world_size"] == 2 and output.count("[sweep] 2 settings") == 1  # rank 0 reports and writes
    assert not (tmp_path / "rank1" / "sweep" / "sweep.json").exists()

    code, output, events = _torchrun_sweep(tmp_path, "0,1,2")
    tail = output[-4000:]
    # both ranks skip the finished settings and the pretrained evaluation: only the new alpha trains
    new = ["train alpha 2", "evaluate orw-cfm-w2_alpha2_temp0.5"]
    assert _per_rank(events, "train", "evaluate") == {0: new, 1: new}, tail
    assert code == 0, tail
    assert output.count("done before") == 2 and "evaluating the pretrained model" not in output  # rank 0's log
    assert _per_rank(events, "returned") == {r: ["returned 0 with record [0.0, 1.0, 2.0]"] for r in (0, 1)}, tail
    after = json.loads(record_file.read_text())
    assert [e["alpha"] for e in after["settings"]] == [0.0, 1.0, 2.0]  # every alpha once, in order
    assert after["settings"][:2] == before["settings"]  # the finished ones as they were, not trained again
    assert after["pretrained"] == before["pretrained"]
