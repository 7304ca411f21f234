"""``orwcfm-fast sweep``: one fine-tuning per (alpha, temperature) from the same pretrained model and seed,
the pretrained model evaluated once, sweep.json / pareto.png / sweep.md, resumable; every task kind;
torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orwcfm_fast.cli import main
from orwcfm_fast.sweep import save_pareto, sweep_table

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(__file__).resolve().parents[1]


def gaussians_sweep(tmp_path, *extra, alphas="0,2"):
    return main(["sweep", "--task", "gaussians", "--alphas", alphas, "--epochs", "2", "--steps-per-epoch", "2",
                 "--samples-per-prompt", "40", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(tmp_path / "cache"), "--pretrain-steps", "30", "--set", "batch_size=32", "--set", "ode_steps=4",
                 "--quiet", *extra])


def test_gaussians_sweep_writes_the_record_and_figures(tmp_path):
    assert gaussians_sweep(tmp_path, "--temperatures", "0.5,3") == 0
    out = tmp_path / "sweep"
    record = json.loads((out / "sweep.json").read_text())
    assert record["task"] == "gaussians" and record["alphas"] == [0.0, 2.0] and record["temperatures"] == [0.5, 3.0]
    settings = [(e["alpha"], e["temperature"]) for e in record["settings"]]
    assert settings == [(0.0, 0.5), (2.0, 0.5), (0.0, 3.0), (2.0, 3.0)]
    for e in record["settings"]:
        assert {"reward", "diversity", "per_prompt", "history", "seconds"} <= set(e)
        assert len(e["history"]) == 2 and e["diversity"] > 0
    assert {"reward", "diversity"} <= set(record["pretrained"])
    assert record["device"] == "cpu" and record["torch"] == torch.__version__
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 1 + 1 + 4  # header, pretrained, four settings (the separator starts with |-)
    assert "| pretrained |" in table
    # each setting's own files: the trainer's CSV, its evaluation and grid (a scatter plot for points)
    one = out / "alpha2_temp0.5"
    assert (one / "sweep_metrics.csv").exists() and (one / "result.json").exists()
    assert json.loads((one / "eval" / "evaluation.json").read_text())["reward"] == record["settings"][1]["reward"]
    assert len(list((one / "eval" / "grids").glob("*.png"))) == 1


def test_same_seed_settings_differ_only_by_alpha(tmp_path):
    """Every setting starts from the same model and seed: with the W2 term exactly zero at the first step
    (policy == reference), the first step's losses agree, and alpha changes the rest."""
    assert gaussians_sweep(tmp_path, alphas="0,5") == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    a, b = record["settings"]
    assert a["history"][0]["fm_loss"] != b["history"][0]["fm_loss"] or a["history"][1] != b["history"][1]
    assert a["history"][0]["reward"] == b["history"][0]["reward"]  # epoch 1 samples from the same last_policy


def test_pretrained_point_is_an_independent_evaluation(tmp_path):
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.gaussians import EightGaussians, ModeReward
    from orwcfm_fast.train_run import load_or_pretrain_gaussians_flow

    assert gaussians_sweep(tmp_path, alphas="1") == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    model = load_or_pretrain_gaussians_flow(tmp_path / "cache", steps=30)
    trainer = ORWCFMTrainer(model, {"sample_shape": [2], "reward": ModeReward(EightGaussians().centers[0]),
                                    "batch_size": 32, "ode_steps": 4, "seed": 0, "savedir": str(tmp_path / "x")},
                            "cpu")
    trainer.generator.manual_seed(0)
    x = trainer.sample(40, batch_size=32)
    reward = -(x - EightGaussians().centers[0]).norm(dim=1)
    assert record["pretrained"]["reward"] == pytest.approx(float(reward.mean()), rel=1e-5)
    d = torch.cdist(x.double(), x.double())
    assert record["pretrained"]["diversity"] == pytest.approx(float(d.sum() / (40 * 39)), rel=1e-6)


def test_sweep_resumes_and_retrains_changed_settings(tmp_path, capsys):
    assert gaussians_sweep(tmp_path, alphas="0,1") == 0
    before = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    capsys.readouterr()
    assert main(["sweep", "--task", "gaussians", "--alphas", "0,1,3", "--epochs", "2", "--steps-per-epoch", "2",
                 "--samples-per-prompt", "40", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(tmp_path / "cache"), "--pretrain-steps", "30", "--set", "batch_size=32", "--set",
                 "ode_steps=4"]) == 0
    log = capsys.readouterr().out
    assert log.count("done before") == 2 and "evaluating the pretrained model" not in log
    after = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert after["settings"][:2] == before["settings"] and after["settings"][2]["alpha"] == 3.0
    # another number of epochs is another result: trained again
    assert gaussians_sweep(tmp_path, "--epochs", "1", alphas="0") == 0
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(again["settings"][0]["history"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--alphas", "a,b"], "comma-separated numbers"),
    (["--alphas", "-1"], ">= 0"),
    (["--alphas", "1,1"], "repeated"),
])
def test_bad_alphas(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--task", "gaussians", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_settings_are_refused_before_training(tmp_path, capsys):
    assert gaussians_sweep(tmp_path, "--samples-per-prompt", "1") == 2
    assert "--samples-per-prompt must be >= 2" in capsys.readouterr().err
    assert gaussians_sweep(tmp_path, "--set", "learning_rat=1") == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_table_and_pareto_from_a_record(tmp_path):
    record = {"task": "t", "epochs": 1, "steps_per_epoch": 1, "samples_per_prompt": 4, "eval_seed": 0,
              "device": "cpu", "torch": "x", "date": "d",
              "pretrained": {"reward": 1.0, "diversity": 2.0},
              "settings": [{"alpha": 0.0, "temperature": 1.0, "reward": 1.5, "diversity": 1.0},
                           {"alpha": 1.0, "temperature": 1.0, "reward": 1.2, "diversity": 1.8}]}
    table = sweep_table(record)
    assert "| 0 | 1 | 1.5000 | 1.0000 | +0.5000 | -50.0% |" in table
    assert "| 1 | 1 | 1.2000 | 1.8000 | +0.2000 | -10.0% |" in table
    assert save_pareto(record, tmp_path / "p.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """One ``--cache-dir`` for the two digits tasks' sweeps: their reward, the digits classifier, is trained once
    (about 40 s on one CPU thread) and loaded by the other, as a second run with the same cache would."""
    return tmp_path_factory.mktemp("digits_cache")


def test_digits_sweep(tmp_path, digits_cache):
    code = main(["sweep", "--task", "digits", "--alphas", "1", "--epochs", "1", "--steps-per-epoch", "1",
                 "--samples-per-prompt", "8", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(digits_cache), "--pretrain-steps", "5", "--set", "batch_size=8", "--set", "ode_steps=2",
                 "--quiet"])
    assert code == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    e = record["settings"][0]
    assert 0.0 <= e["reward"] <= 1.0 and e["diversity"] > 0 and record["pretrained"]["embedding"] == "pixels"
    assert len(list((tmp_path / "sweep" / "alpha1_temp3" / "eval" / "grids").glob("*.png"))) == 1


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
    for e in record["settings"]:
        assert set(e["per_prompt"]) == {"a dog", "a cat"}
        assert "reward/jpeg_compressibility" in e and "reward/jpeg_incompressibility" in e
        # the weighted sum, recomputed from the terms
        assert e["reward"] == pytest.approx(e["reward/jpeg_compressibility"] + 0.5 * e["reward/jpeg_incompressibility"],
                                            abs=1e-4)
    grids = sorted(p.name for p in (tmp_path / "sweep" / "alpha1_temp0.5" / "eval" / "grids").glob("*.png"))
    assert grids == ["000_a_dog.png", "001_a_cat.png"]


def test_prompted_digits_sweep(tmp_path, monkeypatch, digits_cache):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["sweep", "--task", "prompted-digits", "--alphas", "1", "--epochs", "1", "--steps-per-epoch", "1",
                 "--samples-per-prompt", "2", "--outdir", str(tmp_path / "sweep"), "--cache-dir",
                 str(digits_cache), "--pretrain-steps", "3", "--quiet", "--set", "batch_size=4",
                 "--set", "images_per_prompt=2", "--set", "ode_steps=2",
                 "--set", 'prompts=["a handwritten 1", "a handwritten 7"]'])
    assert code == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(record["settings"][0]["per_prompt"]) == {"a handwritten 1", "a handwritten 7"}
    assert 0.0 <= record["settings"][0]["reward"] <= 1.0


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
    every = ["evaluate pretrained", "train alpha 0", "evaluate alpha0_temp0.5", "train alpha 1",
             "evaluate alpha1_temp0.5"]
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
    new = ["train alpha 2", "evaluate alpha2_temp0.5"]
    assert _per_rank(events, "train", "evaluate") == {0: new, 1: new}, tail
    assert code == 0, tail
    assert output.count("done before") == 2 and "evaluating the pretrained model" not in output  # rank 0's log
    assert _per_rank(events, "returned") == {r: ["returned 0 with record [0.0, 1.0, 2.0]"] for r in (0, 1)}, tail
    after = json.loads(record_file.read_text())
    assert [e["alpha"] for e in after["settings"]] == [0.0, 1.0, 2.0]  # every alpha once, in order
    assert after["settings"][:2] == before["settings"]  # the finished ones as they were, not trained again
    assert after["pretrained"] == before["pretrained"]
