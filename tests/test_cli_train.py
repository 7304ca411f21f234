"""The ``train`` command: argument and config handling, a tiny gaussians run with resumption,
a clean stop on SIGTERM, and a two-process torchrun run (data-parallel, rank 0 writes)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orwcfm_fast.checkpoints import latest_checkpoint
from orwcfm_fast.cli import main
from orwcfm_fast.train_run import parse_assignment, resolve_config, weights_digest

REPO = Path(__file__).resolve().parents[1]

# Tiny gaussians runs: the flow pretrains in ~0.5 s (200 steps, cached per test), 10 Euler steps.
TINY = ["--task", "gaussians", "--steps-per-epoch", "3", "--batch-size", "16", "--pretrain-steps", "200",
        "--set", "ode_steps=10", "--device", "cpu", "--quiet"]


def _tiny(tmp_path: Path, *extra: str, outdir: str = "out") -> list[str]:
    return ["train", *TINY, "--outdir", str(tmp_path / outdir), "--cache-dir", str(tmp_path / "cache"), *extra]


def _csv_epochs(path: Path) -> list[int]:
    with path.open(newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


def _net_digest(path: Path) -> str:
    return weights_digest(torch.load(path, map_location="cpu", weights_only=True)["net_model"])


# ----------------------------------------------------------------------------- arguments and config


@pytest.mark.parametrize("text, expected", [
    ("learning_rate=1e-4", ("learning_rate", 1e-4)),
    ("seed=3", ("seed", 3)),
    ("use_wandb=true", ("use_wandb", True)),
    ("grad_clip=null", ("grad_clip", None)),
    ("grad_clip=None", ("grad_clip", None)),
    ("sample_shape=[1, 8, 8]", ("sample_shape", [1, 8, 8])),
    ('text_prompts=["a cat", "a dog"]', ("text_prompts", ["a cat", "a dog"])),
    ("reward=jpeg_compressibility", ("reward", "jpeg_compressibility")),  # not JSON: a plain string
    ("savedir=runs/a=b", ("savedir", "runs/a=b")),  # split at the first '='
    (' run_name="x y"', ("run_name", "x y")),
    ("run_name=", ("run_name", "")),
])
def test_set_values_are_json_else_strings(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["learning_rate", "=3", "  =x"])
def test_set_needs_key_and_equals(text):
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        parse_assignment(text)


def test_config_files_then_sets_then_flags(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"learning_rate": 1e-3, "temperature": 2.0, "seed": 5, "ode_steps": 7}))
    b.write_text(json.dumps({"temperature": 3.0, "w2_coefficient": 0.5}))
    config = resolve_config(
        "gaussians", [a, b],
        [("w2_coefficient", 0.25), ("seed", 9), ("w2_coefficient", 0.75), ("savedir", "from-set")],
        outdir=tmp_path / "flag", seed=None, batch_size=32,
    )
    assert config["learning_rate"] == 1e-3  # file a over the task default
    assert config["temperature"] == 3.0  # file b over file a
    assert config["w2_coefficient"] == 0.75  # later --set over earlier --set over files
    assert config["seed"] == 9  # --set over file; --seed not given
    assert config["savedir"] == str(tmp_path / "flag")  # --outdir over --set
    assert config["batch_size"] == 32
    assert config["sample_shape"] == [2] and config["warmup_steps"] == 0  # task defaults kept


@pytest.mark.parametrize("extra, named", [
    (["--set", "learning_rat=1e-3"], "'learning_rat'"),
    (["--set", "temperature=hot"], "'temperature'"),
    (["--set", "checkpoint_every=0"], "'checkpoint_every'"),
])
def test_bad_config_key_exits_2_naming_it(tmp_path, capsys, extra, named):
    assert main(_tiny(tmp_path, *extra)) == 2
    captured = capsys.readouterr()
    assert named in captured.err and "error" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # failed before any work


def test_unknown_key_in_config_file_suggests_the_known_one(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"bacth_size": 8}))
    assert main(_tiny(tmp_path, "--config", str(path))) == 2
    err = capsys.readouterr().err
    assert "'bacth_size'" in err and "'batch_size'" in err


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_config_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(_tiny(tmp_path, "--config", str(path))) == 2
    assert message in capsys.readouterr().err


def test_cifar10_without_pretrained_is_a_clear_error(tmp_path, capsys):
    argv = ["train", "--task", "cifar10", "--epochs", "1", "--steps-per-epoch", "1", "--outdir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "cifar10" in err and "Traceback" not in err
    assert main([*argv, "--pretrained", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    # The default reward 'clip' needs prompts: reported before the UNet is built.
    (tmp_path / "weights.pt").touch()
    assert main([*argv, "--pretrained", str(tmp_path / "weights.pt")]) == 2
    assert "'text_prompts'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--target", "8"], "--target"),  # eight modes: 0..7
    (["--ema"], "--ema needs --pretrained"),
    (["--resume", "nowhere.pt"], "--resume"),
])
def test_bad_flag_combinations_exit_2(tmp_path, capsys, extra, message):
    assert main(_tiny(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "gaussians", "--set", "no-equals-sign"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- in-process runs


def test_gaussians_run_then_resume_to_more_epochs(tmp_path, capsys):
    assert main(_tiny(tmp_path, "--epochs", "2", "--set", "checkpoint_every=1")) == 0
    out = tmp_path / "out"
    summary = capsys.readouterr().out
    assert "epoch 0 -> 2 of 2" in summary and str(out / "final.pt") in summary
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-e000001.pt", "checkpoint-e000002.pt"]
    assert _csv_epochs(out / "orw-cfm-w2_metrics.csv") == [1, 2]
    assert torch.load(out / "final.pt", map_location="cpu", weights_only=True)["epoch"] == 2
    record = json.loads((out / "train_run.json").read_text())
    assert record["task"] == "gaussians" and record["config"]["checkpoint_every"] == 1

    # --resume auto: the newest checkpoint; only epoch 3 is trained. final.pt would be picked too
    # (same state); remove it so the checkpoint folder is what is resumed from.
    (out / "final.pt").unlink()
    assert main(_tiny(tmp_path, "--epochs", "3", "--set", "checkpoint_every=1", "--resume", "auto")) == 0
    assert "epoch 2 -> 3 of 3 (1 trained" in capsys.readouterr().out
    assert _csv_epochs(out / "orw-cfm-w2_metrics.csv") == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-e000001.pt", "checkpoint-e000002.pt", "checkpoint-e000003.pt"]
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and len(final["history"]) == 3

    # Reaching --epochs again trains nothing (resumes from final.pt, the newest).
    assert main(_tiny(tmp_path, "--epochs", "3")) == 0
    assert "epoch 3 -> 3 of 3 (0 trained" in capsys.readouterr().out
    assert _csv_epochs(out / "orw-cfm-w2_metrics.csv") == [1, 2, 3]

    # The resumed run ends where an uninterrupted 3-epoch run ends (CPU: bit-identical).
    assert main(_tiny(tmp_path, "--epochs", "3", outdir="straight")) == 0
    assert _net_digest(tmp_path / "straight" / "final.pt") == _net_digest(out / "final.pt")

    # --resume never refuses to start afresh on top of an existing run.
    assert main(_tiny(tmp_path, "--epochs", "3", "--resume", "never")) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "orwcfm_fast.cli",
            *_tiny(tmp_path, "--epochs", "10000", "--set", "checkpoint_every=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60

        def past_epoch_two() -> bool:  # train() is running; older checkpoints may already be pruned
            newest = latest_checkpoint(out / "checkpoints")
            return newest is not None and newest.name >= "checkpoint-e000002.pt"

        while not past_epoch_two():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no checkpoint of epoch >= 2 within 60 s: {proc.communicate()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM" in stderr and "checkpoint saved to" in stderr and "--resume auto" in stderr
    assert "Traceback" not in stderr
    assert not (out / "final.pt").exists()
    latest = sorted((out / "checkpoints").iterdir())[-1]
    assert str(latest) in stderr


# ----------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_data_parallel(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out, dump = tmp_path / "out", tmp_path / "dump" / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "orwcfm_fast.cli",
           *_tiny(tmp_path, "--epochs", "2", "--set", "checkpoint_every=1", "--dump-samples", str(dump))]
    cmd.remove("--quiet")  # the summary lines are checked
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

    # One writer: rank 0's files only, each once.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.pt", "orw-cfm-w2_metrics.csv",
                                                     "train_run.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-e000001.pt", "checkpoint-e000002.pt"]
    assert _csv_epochs(out / "orw-cfm-w2_metrics.csv") == [1, 2]  # a second logger would add rows
    assert result.stdout.count("ORW-CFM-W2 train gaussians") == 1
    assert "2 ranks" in result.stdout
    assert "replicas: weights identical across 2 ranks" in result.stdout
    assert json.loads((out / "train_run.json").read_text())["world_size"] == 2

    # Replicas end bit-identical (and equal to final.pt); each rank sampled with its own seed.
    dumps = [torch.load(f"{dump}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [d["rank"] for d in dumps] == [0, 1] and all(d["world_size"] == 2 for d in dumps)
    assert dumps[0]["weights_sha256"] == dumps[1]["weights_sha256"] == _net_digest(out / "final.pt")
    a, b = dumps[0]["samples"], dumps[1]["samples"]
    assert a.shape == b.shape == (16, 2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)

    # Resumed under torchrun (rank 0 picks the checkpoint, every rank loads it): one more epoch,
    # replicas still identical, each rank still on its own random stream.
    cmd[cmd.index("--epochs") + 1] = "3"
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 2 -> 3 of 3 (1 trained" in result.stdout
    assert "replicas: weights identical across 2 ranks" in result.stdout
    assert _csv_epochs(out / "orw-cfm-w2_metrics.csv") == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-e000001.pt", "checkpoint-e000002.pt", "checkpoint-e000003.pt"]
    dumps = [torch.load(f"{dump}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(d["epoch"] == 3 for d in dumps)
    assert dumps[0]["weights_sha256"] == dumps[1]["weights_sha256"] == _net_digest(out / "final.pt")
    assert not torch.allclose(dumps[0]["samples"], dumps[1]["samples"])
