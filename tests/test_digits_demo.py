"""The offline digits demo: data, metrics, plots, caching, and an end-to-end smoke run."""

import json

import pytest
import torch

from orwcfm_fast.data import load_digits_images
from orwcfm_fast.metrics import mean_pairwise_distance, mode_histogram
from orwcfm_fast.tasks.plots import save_curves, save_sample_grid

PNG = b"\x89PNG\r\n\x1a\n"


def test_digits_data():
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_mean_pairwise_distance_against_double_loop():
    x = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(0))
    flat = x.flatten(1).double()
    pairs = [(flat[i] - flat[j]).norm().item() for i in range(7) for j in range(7) if i != j]
    assert mean_pairwise_distance(x) == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)


def test_mode_histogram():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    points = torch.tensor([[0.1, 0.0], [9.0, 1.0], [11.0, 0.0], [-1.0, 0.5]])
    torch.testing.assert_close(mode_histogram(points, centers).double(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_plots_write_png(tmp_path):
    save_sample_grid(torch.rand(12, 1, 8, 8) * 2 - 1, tmp_path / "grid.png", nrow=4)
    save_curves([{"epoch": i, "reward": 0.1 * i, "diversity": 5 - 0.1 * i} for i in range(1, 4)],
                ["reward", "diversity"], tmp_path / "curves.png", "t")
    for name in ("grid.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000


@pytest.mark.slow
def test_run_demo_smoke_and_cache(tmp_path):
    """Tiny end to end: files and metrics written; a second run reuses the cached models."""
    from orwcfm_fast.tasks.demo import run_demo

    kwargs = dict(epochs=2, steps_per_epoch=2, batch_size=16, cache_dir=tmp_path / "cache", device="cpu",
                  pretrain_steps=20, classifier_steps=20, eval_samples=32, progress=False)
    metrics = run_demo(tmp_path / "demo", **kwargs)
    out = tmp_path / "demo"
    for name in ("samples_before.png", "samples_after.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("base_reward", "final_reward", "base_diversity", "final_diversity", "target_digit",
                "classifier_accuracy", "history"):
        assert key in saved
    assert 0.0 <= saved["base_reward"] <= 1.0 and 0.0 <= saved["final_reward"] <= 1.0
    assert saved["base_diversity"] > 0
    assert [h["epoch"] for h in saved["history"]] == [0, 1, 2]  # epoch 0 is the pretrained model
    assert metrics["final_reward"] == saved["final_reward"]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.startswith("digits-unet-") for n in cached) and any(n.startswith("digits-classifier-") for n in cached)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    again = run_demo(tmp_path / "demo2", **kwargs)
    assert again["cached"] == {"unet": True, "classifier": True}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes


def test_cli_demo_help():
    from orwcfm_fast.cli import main

    with pytest.raises(SystemExit) as err:
        main(["demo", "--help"])
    assert err.value.code == 0
