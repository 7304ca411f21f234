"""The reward-hacking alarm (orwcfm_fast.hacking, wired into evaluate()): the rule on hand-made series, the warning
once per evaluation that fires, the result / evaluation.json / run-log fields, rank 0 only, and a real fine-tuning
whose held-out reward is the training reward's negative: the alarm fires, and a resumed trainer decides the same."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.hacking import (RELATIVE_TOLERANCE, RewardHackingWarning, check_hacking, comparable_series,
                                 evaluation_summary)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def series(rewards, held_out=None, diversity=None, setting="s"):
    """eval_history summaries, one per epoch (global step 10 per epoch); held-out / diversity default to flat."""
    n = len(rewards)
    held_out = [None] * n if held_out is None else held_out
    diversity = [1.0] * n if diversity is None else diversity
    return [{"epoch": i, "global_step": 10 * i, "reward": r, "held_out_reward": h, "diversity": d, "vendi": 2.0,
             "setting": setting} for i, (r, h, d) in enumerate(zip(rewards, held_out, diversity))]


# ---------------------------------------------------------------- the rule, on series


def test_rising_reward_and_falling_held_out_alarms():
    alarm = check_hacking(series([0.1, 0.2, 0.3], held_out=[0.5, 0.45, 0.4]), 3)
    assert alarm is not None and alarm.signals == ["held_out_reward"]
    assert alarm.fell["held_out_reward"] == (0.5, 0.4)
    assert [s["epoch"] for s in alarm.window] == [0, 1, 2]
    # Only the ends count: a middle point above the first does not hide the fall.
    assert check_hacking(series([0.1, 0.2, 0.3], held_out=[0.5, 0.7, 0.4]), 3).signals == ["held_out_reward"]


def test_rising_reward_and_falling_diversity_alarms():
    alarm = check_hacking(series([1.0, 2.0, 3.0], diversity=[1.0, 0.9, 0.95]), 3)
    assert alarm is not None and alarm.signals == ["diversity"] and alarm.fell["diversity"] == (1.0, 0.95)
    both = check_hacking(series([1.0, 2.0, 3.0], held_out=[2.0, 1.0, 0.0], diversity=[1.0, 0.9, 0.8]), 3)
    assert both.signals == ["held_out_reward", "diversity"]


@pytest.mark.parametrize("held_out, diversity", [
    ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0]),  # flat: no alarm, however steep the reward's rise
    ([0.5, 0.6, 0.7], [1.0, 1.1, 1.2]),  # both rose
    ([0.5, 0.4, 0.5], [1.0, 0.8, 1.0]),  # fell and came back: the ends are equal
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # flat at zero (a collapsed model's diversity): no fall either
])
def test_rising_reward_without_a_fall_is_quiet(held_out, diversity):
    assert check_hacking(series([0.1, 0.5, 0.9], held_out=held_out, diversity=diversity), 3) is None


@pytest.mark.parametrize("rewards", [[0.1, 0.1, 0.3], [0.1, 0.3, 0.2], [0.3, 0.2, 0.1]])
def test_a_reward_that_did_not_rise_at_every_step_is_quiet(rewards):
    assert check_hacking(series(rewards, held_out=[0.5, 0.4, 0.3], diversity=[3.0, 2.0, 1.0]), 3) is None


def test_fewer_than_window_evaluations_are_quiet():
    falling = dict(held_out=[0.5, 0.4, 0.3, 0.2], diversity=[4.0, 3.0, 2.0, 1.0])
    hist = series([0.1, 0.2, 0.3, 0.4], **falling)
    assert check_hacking(hist[:2], 3) is None
    assert check_hacking(hist[:3], 3) is not None
    assert check_hacking(hist[:3], 4) is None
    assert check_hacking(hist, 4) is not None
    # the window is the last W: an early non-rise outside it does not matter, inside it does
    early_dip = series([0.2, 0.1, 0.3, 0.4], **falling)
    assert check_hacking(early_dip, 3) is not None and check_hacking(early_dip, 4) is None


def test_round_off_is_neither_a_rise_nor_a_fall():
    tiny = RELATIVE_TOLERANCE / 10  # a float32-round-off-sized relative change
    flat_reward = series([1.0, 1.0 + tiny, 1.0 + 2 * tiny], held_out=[0.5, 0.4, 0.3])
    assert check_hacking(flat_reward, 3) is None
    wiggle = series([0.1, 0.2, 0.3], held_out=[0.5, 0.5, 0.5 * (1 - tiny)], diversity=[2.0, 2.0, 2.0 * (1 - tiny)])
    assert check_hacking(wiggle, 3) is None
    real = series([0.1, 0.2, 0.3], held_out=[0.5, 0.5, 0.5 * (1 - 1e-4)])
    assert check_hacking(real, 3).signals == ["held_out_reward"]


def test_held_out_missing_at_an_end_is_not_compared():
    hist = series([0.1, 0.2, 0.3], held_out=[None, 0.4, 0.3])
    assert check_hacking(hist, 3) is None
    hist = series([0.1, 0.2, 0.3], held_out=[None, 0.4, 0.3], diversity=[1.0, 1.0, 0.5])
    assert check_hacking(hist, 3).signals == ["diversity"]


def test_only_comparable_evaluations_count():
    hist = series([0.1, 0.2, 0.3], held_out=[0.5, 0.4, 0.3])
    other = dict(hist[1], reward=5.0, held_out_reward=9.0, setting="other prompts")
    mixed = hist[:2] + [other] + hist[2:]
    assert comparable_series(mixed) == hist and check_hacking(mixed, 3) is not None
    # the newest summary picks the setting: after an evaluation of another kind there is nothing to compare
    assert check_hacking(mixed + [dict(other, global_step=99)], 3) is None
    # re-evaluating one training step replaces its point
    again = dict(hist[2], reward=0.15)
    assert comparable_series(hist + [again]) == hist[:2] + [again]
    assert check_hacking(hist + [again], 3) is None
    assert check_hacking(hist + [again, hist[2]], 3) is not None


def test_the_message_says_what_fell_by_how_much_when_and_what_to_do():
    hist = series([0.1, 0.2, 0.3], held_out=[0.5, 0.45, 0.4], diversity=[2.0, 1.8, 1.5])
    text = check_hacking(hist, 3).message(w2_coefficient=0.5, temperature=3.0)
    for part in ("held-out reward fell by 0.1 (0.5 -> 0.4, -20.0%)", "diversity fell by 0.5 (2 -> 1.5, -25.0%)",
                 "epochs 0, 1, 2", "0.1 -> 0.3", "raise w2_coefficient (now 0.5)", "lower temperature (now 3)",
                 "checkpoint of epoch 0"):
        assert part in text, (part, text)
    # DiffusionNFT does not weight by exp(temperature * r): no temperature advice
    nft = check_hacking(hist, 3).message(w2_coefficient=1e-4, temperature=None, temperature_applies=False)
    assert "temperature" not in nft and "raise w2_coefficient (now 0.0001), or stop" in nft


# ---------------------------------------------------------------- evaluate(): scripted evaluations


class MLPVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def first_coordinate(x):
    return x[:, 0]


def minus_first_coordinate(x):
    return -x[:, 0]


@pytest.fixture(autouse=True)
def _register_test_rewards():
    from orwcfm_fast.rewards import register_reward

    register_reward("first", lambda config, device: first_coordinate, overwrite=True)
    register_reward("minus_first", lambda config, device: minus_first_coordinate, overwrite=True)


def config(tmp_path, **overrides):
    cfg = {"batch_size": 8, "ode_steps": 3, "warmup_steps": 0, "learning_rate": 1e-2, "sample_shape": (2,),
           "seed": 0, "savedir": str(tmp_path), "handle_signals": False, "reward": "first",
           "eval_reward": "minus_first", "hacking_window": 3}
    cfg.update(overrides)
    return cfg


def scripted(monkeypatch, rows):
    """evaluate()'s per-prompt rows replaced by ``rows`` (dicts of reward, held_out_reward, diversity, vendi),
    one per evaluation."""
    from orwcfm_fast import evaluation

    calls = iter(rows)
    monkeypatch.setattr(evaluation, "_evaluate_prompt", lambda trainer, *args: (dict(next(calls)), torch.zeros(2, 2)))


def evaluations(trainer, n, **kwargs):
    """``n`` evaluations one epoch (10 steps) apart: ``(results, hacking warnings of each)``."""
    results, warned = [], []
    for _ in range(n):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(trainer.evaluate(samples_per_prompt=2, **kwargs))
        warned.append([str(w.message) for w in caught if issubclass(w.category, RewardHackingWarning)])
        trainer.epoch += 1
        trainer.global_step += 10
    return results, warned


ROWS = [{"reward": r, "held_out_reward": h, "diversity": d, "vendi": v}
        for r, h, d, v in [(0.1, 0.5, 1.0, 3.0), (0.2, 0.6, 1.0, 3.0), (0.3, 0.55, 1.0, 3.0),  # held-out 0.5 -> 0.55
                           (0.4, 0.5, 1.0, 3.0), (0.5, 0.45, 0.9, 2.0), (0.5, 0.4, 0.8, 2.0)]]
#: for ROWS at window 3: evaluation 4 (held-out 0.6 -> 0.5), 5 (0.55 -> 0.45, diversity 1 -> 0.9); 6: reward flat
EXPECTED = [False, False, False, True, True, False]


def test_evaluate_warns_once_per_firing_evaluation_and_reports_it(tmp_path, monkeypatch):
    scripted(monkeypatch, ROWS)
    trainer = ORWCFMTrainer(MLPVelocity(), config(tmp_path), "cpu")
    results, warned = evaluations(trainer, 3, outdir=False)
    for outdir in (tmp_path / "eval", False, False):  # evaluation.json of the first that fires
        result, warning = evaluations(trainer, 1, outdir=outdir)
        results, warned = results + result, warned + warning
    assert [r["hacking_alarm"] for r in results] == EXPECTED
    assert [len(w) for w in warned] == [int(e) for e in EXPECTED]  # one warning per evaluation that fires
    assert [r["hacking_signals"] for r in results] == [[], [], [], ["held_out_reward"],
                                                       ["held_out_reward", "diversity"], []]
    assert "held-out reward fell by 0.1 (0.6 -> 0.5" in warned[3][0] and "epochs 1, 2, 3" in warned[3][0]
    assert results[3]["hacking_message"] == warned[3][0] and results[0]["hacking_message"] is None
    assert [(s["epoch"], s["global_step"], s["reward"], s["held_out_reward"], s["diversity"], s["vendi"])
            for s in trainer.eval_history] == [(i, 10 * i, r["reward"], r["held_out_reward"], r["diversity"],
                                                r["vendi"]) for i, r in enumerate(ROWS)]
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["hacking_alarm"] is True and saved["hacking_signals"] == ["held_out_reward"]
    assert saved["hacking_message"] == warned[3][0] and saved["held_out_reward"] == 0.5 and saved["vendi"] == 3.0


def test_evaluation_metrics_go_to_their_own_csv_and_to_wandb(tmp_path, monkeypatch):
    import csv
    import sys
    import types

    logged = []

    class Run:
        def log(self, data, step=None):
            logged.append((step, dict(data)))

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run()))
    trainer = ORWCFMTrainer(MLPVelocity(), config(tmp_path, use_wandb=True), "cpu")
    trainer.train(1, 1)  # the epoch CSV first: the evaluation rows must not join it
    scripted(monkeypatch, ROWS)
    evaluations(trainer, 4)
    eval_rows = list(csv.DictReader((tmp_path / "orw-cfm-w2_eval.csv").open()))
    assert [(int(r["epoch"]), float(r["eval/held_out_reward"]), int(r["eval/hacking_alarm"])) for r in eval_rows] \
        == [(1 + i, ROWS[i]["held_out_reward"], int(EXPECTED[i])) for i in range(4)]
    assert {"eval/reward", "eval/diversity", "eval/vendi"} <= set(eval_rows[0])
    with (tmp_path / "orw-cfm-w2_metrics.csv").open() as fh:
        epoch_rows = list(csv.DictReader(fh))
    assert len(epoch_rows) == 1 and not any(k.startswith("eval/") for k in epoch_rows[0])
    evals = [(step, data) for step, data in logged if "eval/reward" in data]
    assert [step for step, _ in evals] == [1, 2, 3, 4]  # trainer.epoch
    assert [d["eval/hacking_alarm"] for _, d in evals] == [0, 0, 0, 1]
    assert evals[2][1] == {"eval/reward": 0.3, "eval/held_out_reward": 0.55, "eval/diversity": 1.0,
                           "eval/vendi": 3.0, "eval/hacking_alarm": 0}
    # outdir=False writes nothing, the log included
    scripted(monkeypatch, ROWS)
    before = len(logged)
    trainer.evaluate(samples_per_prompt=2, outdir=False)
    assert len(logged) == before


def test_other_ranks_keep_the_history_but_neither_warn_nor_log(tmp_path, monkeypatch):
    from orwcfm_fast import distributed

    scripted(monkeypatch, ROWS)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    trainer = ORWCFMTrainer(MLPVelocity(), config(tmp_path), "cpu")
    results, warned = evaluations(trainer, 3, outdir=False)
    for outdir in (tmp_path / "eval", False, False):  # evaluation.json of the first that fires
        result, warning = evaluations(trainer, 1, outdir=outdir)
        results, warned = results + result, warned + warning
    assert [r["hacking_alarm"] for r in results] == EXPECTED and not any(warned)
    assert len(trainer.eval_history) == len(ROWS)
    assert not (tmp_path / "orw-cfm-w2_eval.csv").exists() and not (tmp_path / "eval" / "evaluation.json").exists()


# ---------------------------------------------------------------- a real fine-tuning that hacks its reward


def fine_tune_and_evaluate(trainer, evaluations_left, save_after=None):
    """evaluate, then one epoch of 2 steps, ``evaluations_left`` times: the results' (alarm, signals, message);
    with ``save_after=k`` a checkpoint right after the k-th evaluation of this call."""
    decisions = []
    for k in range(evaluations_left):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RewardHackingWarning)
            out = trainer.evaluate(samples_per_prompt=8, outdir=False)
        decisions.append((out["hacking_alarm"], out["hacking_signals"], out["hacking_message"]))
        if save_after == k + 1:
            trainer.save_checkpoint(trainer.config["savedir"] + "/mid.pt")
        trainer.train(1, 2)
    return decisions


def test_a_run_that_hacks_its_reward_alarms_and_a_resumed_run_alarms_the_same(tmp_path):
    """Training reward x_0, held-out reward -x_0: fine-tuning raises one exactly as it lowers the other. Measured
    (MLP, lr 1e-2, temperature 0.5, alpha 1): rewards 0.150, 0.157, 0.193, 0.212, 0.229 over five evaluations
    (diversity 1.77 -> 1.62), so the alarm fires from the third (the first full window) on. A trainer resumed
    from the checkpoint taken after the second evaluation holds two summaries of history and so alarms at its
    first evaluation, exactly as the uninterrupted run does (a resume that lost eval_history would stay quiet)."""
    straight = ORWCFMTrainer(MLPVelocity(), config(tmp_path / "a"), "cpu")
    decisions = fine_tune_and_evaluate(straight, 5, save_after=2)
    assert [d[0] for d in decisions] == [False, False, True, True, True]
    assert all(d[1][0] == "held_out_reward" for d in decisions[2:])
    rewards = [s["reward"] for s in straight.eval_history]
    assert all(s["held_out_reward"] == pytest.approx(-s["reward"], abs=1e-7) for s in straight.eval_history)
    assert rewards == sorted(rewards)

    resumed = ORWCFMTrainer(MLPVelocity(), config(tmp_path / "b"), "cpu")
    resumed.load_checkpoint(tmp_path / "a" / "mid.pt")
    assert len(resumed.eval_history) == 2
    resumed.train(1, 2)  # the epoch the checkpoint was taken before
    assert fine_tune_and_evaluate(resumed, 3) == decisions[2:]
    assert resumed.eval_history == straight.eval_history


def test_summary_is_plain_data():
    out = {"reward": 1.0, "held_out_reward": None, "diversity": 2.0, "vendi": 1.5, "prompts": ["<unconditional>"],
           "samples_per_prompt": 4, "seed": 0, "embedding": "pixels"}
    summary = evaluation_summary(out, epoch=3, global_step=30)
    assert summary["held_out_reward"] is None and summary["epoch"] == 3 and summary["global_step"] == 30
    assert evaluation_summary(dict(out, seed=1), 3, 30)["setting"] != summary["setting"]
    assert evaluation_summary(dict(out, samples_per_prompt=5), 3, 30)["setting"] != summary["setting"]
    assert evaluation_summary(dict(out, reward=9.0), 4, 40)["setting"] == summary["setting"]
