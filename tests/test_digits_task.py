"""The 8x8 digits task: data, UNet pretraining and its cache, classifier, metrics, plots, CLI, demo.

Budget: well under 2 minutes on 2 CPU cores (the slow end-to-end demo test included).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from orwcfm_fast.data import load_digits_images
from orwcfm_fast.metrics import mean_pairwise_distance, mode_histogram
from orwcfm_fast.tasks import digits as digits_mod
from orwcfm_fast.tasks.digits import (
    CACHE_VERSION,
    DigitsClassifier,
    classifier_cache_path,
    load_or_pretrain_digits_unet,
    load_or_train_digits_classifier,
    make_digits_unet,
    pretrain_cfm,
    unet_cache_path,
)
from orwcfm_fast.tasks.plots import make_grid, save_curves, save_sample_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Smallest UNet the wrapper builds for 8x8: one resolution, no attention (~0.16M parameters).
TINY_UNET = {"channel_mult": (1,), "attention_resolutions": "16", "dropout": 0.0}


@pytest.fixture(scope="module")
def digits():
    return load_digits_images()


# ----------------------------------------------------------------------------- data


def test_digits_images_shape_range_labels(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() == 1.0  # pixel 0 -> -1, pixel 16 -> +1
    # pixel values are 0..16, so the scaled values sit on the grid v/8 - 1
    torch.testing.assert_close((images + 1) * 8, ((images + 1) * 8).round())
    counts = torch.bincount(labels, minlength=10)
    assert counts.numel() == 10 and counts.min().item() >= 170  # 174..183 images per digit


def test_digits_images_dtype():
    images, _ = load_digits_images(dtype=torch.float64)
    assert images.dtype == torch.float64 and images.shape == (1797, 1, 8, 8)


def test_import_does_no_work():
    code = (
        "import sys, orwcfm_fast.data, orwcfm_fast.tasks, orwcfm_fast.tasks.digits, orwcfm_fast.tasks.plots, "
        "orwcfm_fast.tasks.demo, orwcfm_fast.metrics, orwcfm_fast.cli; "
        "bad = [m for m in ('sklearn', 'matplotlib', 'torchcfm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- UNet and pretraining


def test_digits_unet_shape():
    model = make_digits_unet(**TINY_UNET)
    x = torch.randn(3, 1, 8, 8)
    assert model(torch.rand(3), x).shape == x.shape


def test_pretrain_cfm_loss_decreases_and_leaves_global_rng(digits):
    images, _ = digits
    torch.manual_seed(0)
    model = make_digits_unet(**TINY_UNET)
    state = torch.random.get_rng_state()
    losses: list[float] = []
    out = pretrain_cfm(model, images, steps=60, batch_size=64, lr=2e-3, device="cpu", seed=0,
                       progress=False, loss_history=losses)
    assert out is model and not model.training
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # E||x1 - x0||^2 per pixel starts near 1 + E[x1^2] ~ 1.7 and falls fast once the net predicts the mean.
    assert last < 0.8 * first, (first, last)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded internally, caller's RNG untouched


def test_unet_cache_round_trip(tmp_path, monkeypatch):
    kw = dict(steps=3, batch_size=8, lr=1e-3, seed=1, unet_kwargs=TINY_UNET, progress=False)
    path = unet_cache_path(tmp_path, steps=3, batch_size=8, lr=1e-3, seed=1, unet_kwargs=TINY_UNET)
    assert not path.exists()
    calls = []
    real = digits_mod.pretrain_cfm
    monkeypatch.setattr(digits_mod, "pretrain_cfm", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = load_or_pretrain_digits_unet(tmp_path, "cpu", **kw)
    assert calls == [1] and path.exists()
    assert path.name.startswith("digits-unet-") and path.suffix == ".pt"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"net_model", "ema_model", "step"} <= set(ckpt)  # torchcfm's checkpoint layout
    assert ckpt["step"] == 3 and ckpt["version"] == CACHE_VERSION and ckpt["hparams"]["steps"] == 3
    mtime = path.stat().st_mtime_ns

    second = load_or_pretrain_digits_unet(tmp_path, "cpu", **kw)
    assert calls == [1], "the cached UNet must be reloaded, not retrained"
    assert path.stat().st_mtime_ns == mtime
    for (k1, v1), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert k1 == k2 and torch.equal(v1.cpu(), v2.cpu())
    # the file loads like a torchcfm checkpoint into a fresh model
    fresh = make_digits_unet(**TINY_UNET)
    fresh.load_state_dict(ckpt["ema_model"])

    # other hyperparameters -> another file
    assert unet_cache_path(tmp_path, steps=4, batch_size=8, lr=1e-3, seed=1, unet_kwargs=TINY_UNET) != path
    assert unet_cache_path(tmp_path, steps=3, batch_size=8, lr=1e-3, seed=1) != path


# ----------------------------------------------------------------------------- classifier


def test_classifier_shape():
    assert DigitsClassifier()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_classifier_accuracy_and_cache(tmp_path, monkeypatch):
    # 150 Adam steps (~3 s): a linear model already gets ~96% on these digits and the CNN 99.4%
    # after the demo's 600 steps, so 0.9 only fails if training is broken (chance is 0.1).
    clf, acc = load_or_train_digits_classifier(tmp_path, "cpu", steps=150, seed=0)
    assert acc >= 0.9, acc
    assert not clf.training
    path = classifier_cache_path(tmp_path, steps=150, seed=0)
    assert path.exists() and path.name.startswith("digits-classifier-")

    monkeypatch.setattr(digits_mod, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again, acc2 = load_or_train_digits_classifier(tmp_path, "cpu", steps=150, seed=0)
    assert acc2 == acc
    x = load_digits_images()[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(again(x), clf(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- metrics


def test_mean_pairwise_distance_matches_double_loop():
    x = torch.randn(9, 1, 3, 2, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(9, -1).double()
    total, pairs = 0.0, 0
    for i in range(9):
        for j in range(9):
            if i != j:
                total += torch.sqrt(((flat[i] - flat[j]) ** 2).sum()).item()
                pairs += 1
    assert pairs == 72
    assert mean_pairwise_distance(x) == pytest.approx(total / pairs, rel=1e-12)
    assert mean_pairwise_distance(x, chunk_size=2) == pytest.approx(total / pairs, rel=1e-12)
    assert mean_pairwise_distance(x.float().flatten(1)) == pytest.approx(total / pairs, rel=1e-6)


def test_mean_pairwise_distance_edge_cases():
    assert mean_pairwise_distance(torch.ones(5, 4)) == 0.0  # collapsed
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        mean_pairwise_distance(torch.zeros(1, 3))


def test_mode_histogram_known_points():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.tensor([[0.1, 0.0], [9.0, 1.0], [11.0, 0.0], [-1.0, 0.5], [0.0, 7.0], [5.0, 0.0]])
    hist = mode_histogram(points, centers)
    # [5, 0] is equidistant from centers 0 and 1: the lower index wins
    torch.testing.assert_close(hist, torch.tensor([3, 2, 1], dtype=torch.float64) / 6)
    assert hist.sum().item() == pytest.approx(1.0)
    assert mode_histogram(points, centers[:1]).tolist() == [1.0]
    with pytest.raises(ValueError):
        mode_histogram(points, torch.zeros(3, 3))


# ----------------------------------------------------------------------------- plots


def test_make_grid_layout():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    grid = make_grid(x, nrow=2, padding=1, pad_value=-1.0)
    assert grid.shape == (1, 3 * 3 + 1, 2 * 3 + 1)
    assert grid[0, 1, 1].item() == 0 and grid[0, 1, 4].item() == 1 and grid[0, 7, 1].item() == 4
    assert grid[0, 7, 4].item() == -1.0  # empty cell


def test_plots_write_valid_pngs(tmp_path):
    samples = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    p1 = save_sample_grid(samples, tmp_path / "sub" / "grid.png", nrow=8, title="samples")
    history = [{"epoch": i, "eval_reward": 0.1 * i, "eval_diversity": 5.0 - 0.2 * i} for i in range(4)]
    p2 = save_curves(history, ["eval_reward", "eval_diversity"], tmp_path / "curves.png", "curves",
                     references={"eval_diversity": {"data": 6.0}}, zero_based=True)
    p3 = save_curves([{"loss": 1.0}, {"loss": 0.5}], ["loss", "missing"], tmp_path / "c2.png")
    for p in (p1, p2, p3):
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    from PIL import Image

    with Image.open(p1) as img:  # 8 images per row x 8 px x upscale 8 -> wider than 8 * 64 px
        assert img.size[0] >= 8 * 8 * 8


# ----------------------------------------------------------------------------- CLI


def test_cli_parses_and_reports(monkeypatch, capsys, tmp_path):
    from orwcfm_fast import cli
    from orwcfm_fast.tasks import demo

    seen = {}

    def fake_run_demo(outdir, **kwargs):
        seen.update(kwargs, outdir=outdir)
        return {"target_digit": kwargs["target_digit"], "device": "cpu", "elapsed_s": 1.0, "classifier_accuracy": 0.99,
                "base_reward": 0.07, "final_reward": 0.9, "base_target_fraction": 0.07, "final_target_fraction": 0.9,
                "base_diversity": 5.9, "final_diversity": 4.6, "data_diversity": 6.0,
                "files": {"metrics": str(tmp_path / "metrics.json")}}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    code = cli.main(["demo", "--outdir", str(tmp_path), "--target-digit", "3", "--epochs", "2",
                     "--steps-per-epoch", "4", "--batch-size", "8", "--alpha", "0.5", "--device", "cpu",
                     "--cache-dir", str(tmp_path / "c"), "--seed", "5"])
    assert code == 0
    assert seen["target_digit"] == 3 and seen["epochs"] == 2 and seen["steps_per_epoch"] == 4
    assert seen["batch_size"] == 8 and seen["alpha"] == 0.5 and seen["device"] == "cpu" and seen["seed"] == 5
    out = capsys.readouterr().out
    assert "0.0700 -> 0.9000" in out and "metrics.json" in out

    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--target-digit", "12"])
    assert err.value.code == 2


def test_cli_demo_help():
    from orwcfm_fast.cli import main

    with pytest.raises(SystemExit) as err:
        main(["demo", "--help"])
    assert err.value.code == 0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_demo_end_to_end(tmp_path):
    from orwcfm_fast.tasks.demo import run_demo

    metrics = run_demo(
        tmp_path / "out", target_digit=3, epochs=2, steps_per_epoch=2, batch_size=16, device="cpu",
        cache_dir=tmp_path / "cache", seed=0, pretrain_steps=30, classifier_steps=30, eval_samples=24,
        progress=False,
    )
    out = tmp_path / "out"
    for name in ("samples_before.png", "samples_after.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    saved = json.loads((out / "metrics.json").read_text())
    required = {"base_reward", "final_reward", "base_diversity", "final_diversity", "target_digit",
                "classifier_accuracy", "epochs", "steps_per_epoch", "device", "elapsed_s", "history"}
    assert required <= set(saved)
    assert saved["target_digit"] == 3 and saved["epochs"] == 2 and saved["steps_per_epoch"] == 2
    assert saved["device"] == "cpu" and saved["elapsed_s"] > 0
    assert [h["epoch"] for h in saved["history"]] == [0, 1, 2]
    assert {"reward", "fm_loss", "w2_loss", "total_loss", "eval_reward", "eval_diversity"} <= set(saved["history"][1])
    assert 0.0 <= saved["final_reward"] <= 1.0 and saved["final_diversity"] > 0
    assert saved["base_reward"] == saved["history"][0]["eval_reward"]
    assert metrics["final_reward"] == saved["final_reward"]
    assert saved["cached"] == {"unet": False, "classifier": False}

    # A second run reuses both cached models and rewrites neither.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert any(n.startswith("digits-unet-") for n in mtimes) and any(n.startswith("digits-classifier-") for n in mtimes)
    again = run_demo(
        tmp_path / "out2", target_digit=3, epochs=1, steps_per_epoch=1, batch_size=16, device="cpu",
        cache_dir=tmp_path / "cache", seed=0, pretrain_steps=30, classifier_steps=30, eval_samples=24,
        progress=False,
    )
    assert again["cached"] == {"unet": True, "classifier": True}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes
