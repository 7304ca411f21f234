"""``orwcfm-fast eval``: a train run's final.pt (``--run``), a checkpoint, or the pretrained model, evaluated
per prompt with the same noise as ``trainer.evaluate``; bad input."""

from __future__ import annotations

import json

import pytest

from orwcfm_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = ["--pretrain-steps", "30", "--set", "batch_size=16", "--set", "ode_steps=3", "--quiet"]


# The fine-tuning of the first test: 2 epochs x 10 steps toward mode 2 at temperature 3, batch-normalised weights.
# (With the plain task's default raw weights, weight_normalization 'none', temperature 3 spreads them so far that
# alpha acts as ~136 and the W2 term holds the policy at the base: the eval reward then moved by -0.03 .. +0.07
# over five seeds, at 2 x 3 and at 3 x 10 steps; no sign of fine-tuning either way.)
TUNE = ["--epochs", "2", "--steps-per-epoch", "10", "--set", "weight_normalization=batch"]
# Eval reward (30 samples, the same eval noise for every model) of the fine-tuned run minus:
# - the pretrained model's: measured 0.61 at this test's seeds, 0.46 .. 1.04 (mean 0.75) over config seeds 0-9 x
#   eval seeds 0-2. 0.2 is under half the smallest. A run that leaves the policy at the base gives 0.
# - a reward-blind run's (the same run at temperature 0: uniform weights, so the same fine-tuning on its own samples
#   without the reward): 0.52 here, 0.21 .. 0.92 (mean 0.60) over the same 30 pairs. 0.1 is half the smallest.
#   Weights that ignore the reward give exactly 0 (the two runs are the same); they still move the pretrained
#   model (self-training on its own 3-step samples: -0.13 .. +0.56 against it), which the first margin alone
#   cannot tell from fine-tuning.
MIN_GAIN_OVER_BASE, MIN_GAIN_OVER_REWARD_BLIND = 0.2, 0.1


def _train_and_eval(run, cache, temperature, capsys):
    """Fine-tunes toward mode 2 into ``run`` at ``temperature`` and evaluates its final.pt with ``eval --run``:
    ``(run/eval/evaluation.json's content, what eval printed)``."""
    assert main(["train", "--task", "gaussians", "--target", "2", "--outdir", str(run), "--cache-dir", cache,
                 "--set", f"temperature={temperature}", *TUNE, *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--samples-per-prompt", "30", "--quiet"]) == 0
    return json.loads((run / "eval" / "evaluation.json").read_text()), capsys.readouterr().out


def test_eval_of_a_train_run_and_of_the_pretrained_model(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    tuned, printed = _train_and_eval(run, cache, 3, capsys)
    assert "<unconditional>" in printed and "mean" in printed
    assert tuned["epoch"] == 2 and tuned["samples_per_prompt"] == 30

    # The same numbers as the trainer's own evaluate() after loading final.pt (same task, target, config).
    import torch

    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModeReward
    from orwcfm_fast.train_run import load_or_pretrain_gaussians_flow

    trainer = ORWCFMTrainer(load_or_pretrain_gaussians_flow(cache, steps=30),
                            {"sample_shape": [2], "reward": ModeReward(EightGaussians().centers[2]), "batch_size": 16,
                             "ode_steps": 3, "temperature": 3.0, "weight_normalization": "batch",
                             "learning_rate": 1e-3, "warmup_steps": 0, "savedir": str(tmp_path / "x")}, "cpu")
    trainer.load_checkpoint(run / "final.pt")
    again = trainer.evaluate(samples_per_prompt=30, outdir=False)
    assert again["per_prompt"] == tuned["per_prompt"]

    # Without a checkpoint: the pretrained model, on the same eval noise. Fine-tuning raised the reward, and by
    # more than the same fine-tuning without the reward does.
    assert main(["eval", "--task", "gaussians", "--target", "2", "--cache-dir", cache, "--samples-per-prompt", "30",
                 "--outdir", str(tmp_path / "base"), *TINY]) == 0
    base = json.loads((tmp_path / "base" / "evaluation.json").read_text())
    assert base["epoch"] == 0 and base["samples_per_prompt"] == 30
    assert torch.isfinite(torch.tensor(base["diversity"]))
    blind, _ = _train_and_eval(tmp_path / "blind", cache, 0, capsys)
    rewards = {"tuned": tuned["reward"], "pretrained": base["reward"], "reward-blind": blind["reward"]}
    assert tuned["reward"] - base["reward"] > MIN_GAIN_OVER_BASE, rewards
    assert tuned["reward"] - blind["reward"] > MIN_GAIN_OVER_REWARD_BLIND, rewards


def test_eval_of_a_pipeline_run_per_prompt(tmp_path, saved):
    """A LoRA run of the tiny SD3 pipeline (conftest's ``saved``, written once per session) on held-out prompts."""
    from orwcfm_fast.flows.tiny import TINY_SIZE

    (tmp_path / "train.txt").write_text("a dog\na cat\n")
    (tmp_path / "held_out.txt").write_text("a red bird\na blue bird\na tree\n")
    run = tmp_path / "run"
    flags = ["--set", f"resolution={TINY_SIZE}", "--set", "ode_steps=2", "--set", "batch_size=2",
             "--set", "images_per_prompt=2", "--set", "max_sequence_length=16", "--set", "lora_rank=2"]
    assert main(["train", "--task", "text-to-image", "--pretrained", str(saved / "sd3"), "--prompts",
                 str(tmp_path / "train.txt"), "--epochs", "1", "--steps-per-epoch", "1", "--outdir", str(run),
                 "--quiet", *flags]) == 0
    assert main(["eval", "--run", str(run), "--eval-prompts", str(tmp_path / "held_out.txt"),
                 "--samples-per-prompt", "2", "--quiet"]) == 0
    out = json.loads((run / "eval" / "evaluation.json").read_text())
    assert out["prompts"] == ["a red bird", "a blue bird", "a tree"] and out["epoch"] == 1
    assert len(list((run / "eval" / "grids").glob("*.png"))) == 3


def test_eval_bad_input(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "--task TASK" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "train_run.json" in capsys.readouterr().err
    assert main(["eval", "--task", "gaussians", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--task", "gaussians", "--samples-per-prompt", "1"]) == 2
    assert ">= 2" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--task", "gaussians", "--checkpoint", str(bad), "--cache-dir", str(tmp_path / "c"),
                 *TINY]) == 1
