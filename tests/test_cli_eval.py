"""``orwcfm-fast eval``: a train run's final.pt (``--run``), a checkpoint, or the pretrained model, evaluated
per prompt with the same noise as ``trainer.evaluate``; bad input."""

from __future__ import annotations

import json

import pytest

from orwcfm_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = ["--pretrain-steps", "30", "--set", "batch_size=16", "--set", "ode_steps=3", "--quiet"]


def test_eval_of_a_train_run_and_of_the_pretrained_model(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    assert main(["train", "--task", "gaussians", "--target", "2", "--epochs", "2", "--steps-per-epoch", "3",
                 "--outdir", str(run), "--cache-dir", cache, "--set", "temperature=3", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--samples-per-prompt", "30", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "<unconditional>" in printed and "mean" in printed
    tuned = json.loads((run / "eval" / "evaluation.json").read_text())
    assert tuned["epoch"] == 2 and tuned["samples_per_prompt"] == 30

    # The same numbers as the trainer's own evaluate() after loading final.pt (same task, target, config).
    import torch

    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModeReward
    from orwcfm_fast.train_run import load_or_pretrain_gaussians_flow

    trainer = ORWCFMTrainer(load_or_pretrain_gaussians_flow(cache, steps=30),
                            {"sample_shape": [2], "reward": ModeReward(EightGaussians().centers[2]), "batch_size": 16,
                             "ode_steps": 3, "temperature": 3.0, "learning_rate": 1e-3, "warmup_steps": 0,
                             "savedir": str(tmp_path / "x")}, "cpu")
    trainer.load_checkpoint(run / "final.pt")
    again = trainer.evaluate(samples_per_prompt=30, outdir=False)
    assert again["per_prompt"] == tuned["per_prompt"]

    # Without a checkpoint: the pretrained model (lower reward toward mode 2 than the fine-tuned one here).
    assert main(["eval", "--task", "gaussians", "--target", "2", "--cache-dir", cache, "--samples-per-prompt", "30",
                 "--outdir", str(tmp_path / "base"), *TINY]) == 0
    base = json.loads((tmp_path / "base" / "evaluation.json").read_text())
    assert base["epoch"] == 0 and base["reward"] != tuned["reward"]
    assert torch.isfinite(torch.tensor(base["diversity"]))


def test_eval_of_a_pipeline_run_per_prompt(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from orwcfm_fast.flows.tiny import TINY_SIZE, tiny_sd3_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    (tmp_path / "train.txt").write_text("a dog\na cat\n")
    (tmp_path / "held_out.txt").write_text("a red bird\na blue bird\na tree\n")
    run = tmp_path / "run"
    flags = ["--set", f"resolution={TINY_SIZE}", "--set", "ode_steps=2", "--set", "batch_size=2",
             "--set", "images_per_prompt=2", "--set", "max_sequence_length=16", "--set", "lora_rank=2"]
    assert main(["train", "--task", "text-to-image", "--pretrained", str(tmp_path / "sd3"), "--prompts",
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
