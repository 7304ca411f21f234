"""The benchmark scripts run end to end (tiny sizes): they are how speed is reported, so they must not rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.slow
def test_throughput_quick_writes_the_documented_keys(tmp_path, bench_path):
    import throughput

    out = tmp_path / "tp.json"
    result = throughput.main(["--device", "cpu", "--quick", "--batch-size", "2", "--ode-steps", "2", "--steps", "1",
                              "--warmup", "0", "--modes", "reference,fast_fp32,fast_recommended,fast_overlapped",
                              "--recommended", "midpoint:1", "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("device", "date", "commit", "torch", "config", "reference_s_per_step", "fast_s_per_step", "speedup"):
        assert key in saved, key
    assert saved["speedup"] == pytest.approx(saved["reference_s_per_step"] / saved["fast_s_per_step"])
    for mode in ("reference", "fast_fp32", "fast_recommended"):
        row = saved["modes"][mode]
        assert set(row["phases_s"]) == {"sample", "reward", "update"}
        assert row["s_per_step"] >= sum(row["phases_s"].values()) * 0.99
    assert result["modes"]["fast_recommended"]["config"]["ode_solver"] == "midpoint"
    # The recommended modes run what the device computes natively (this CPU's probe), and the output says why.
    from orwcfm_fast.precision import native_low_precision

    native = native_low_precision("cpu")
    assert saved["precision"]["dtype_name"] == native.dtype_name and saved["precision"]["reason"] == native.reason
    for mode in ("fast_recommended", "fast_overlapped"):
        assert saved["modes"][mode]["config"]["precision"] == native.dtype_name, mode
    assert saved["skipped_modes"] == {}  # --modes named them all
    overlapped = saved["modes"]["fast_overlapped"]
    assert overlapped["config"]["overlap_sampling"] is True and overlapped["phases_s"] is None
    assert overlapped["s_per_step"] > 0


@pytest.mark.parametrize("script", ["bench_loss", "bench_path", "bench_ode_step"])
def test_op_benchmarks_run(tmp_path, bench_path, script, monkeypatch):
    module = __import__(script)
    out = tmp_path / f"{script}.json"
    result = module.main(module.make_bench, {"cpu": [(3, 5)], "cuda": [(3, 5)]},
                         ["--device", "cpu", "--providers", "torch,cpp", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] and all(r["ms"] > 0 for r in saved["rows"])
    assert {r["provider"] for r in saved["rows"]} <= {"torch", "cpp"}
    assert result["op"] == saved["op"]
    sys.modules.pop(script, None)


def test_loss_benchmark_times_the_w2_weights_variant(tmp_path, bench_path, monkeypatch):
    """bench_loss's ``<provider>+w2_weights`` providers call the op with per-sample W2 coefficients and get rows."""
    import bench_loss

    from orwcfm_fast import ops

    calls = []
    real = ops.orw_cfm_w2_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("w2_weights") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "orw_cfm_w2_loss", spy)
    out = tmp_path / "loss.json"
    bench_loss.main(bench_loss.make_bench, {"cpu": [(3, 5)], "cuda": [(3, 5)]},
                    ["--device", "cpu", "--providers", "cpp,cpp+w2_weights,torch+w2_weights", "--json", str(out)])
    sys.modules.pop("bench_loss", None)
    saved = json.loads(out.read_text())
    assert {r["provider"] for r in saved["rows"]} == {"cpp", "cpp+w2_weights", "torch+w2_weights"}
    assert all(r["ms"] > 0 for r in saved["rows"])
    assert True in calls and False in calls  # the variant passes w2_weights, the plain provider does not


@pytest.mark.slow
def test_t2i_throughput_quick_writes_both_modes_and_phases(tmp_path, bench_path, monkeypatch):
    pytest.importorskip("diffusers", reason="the text-to-image benchmark needs the 'diffusers' extra")
    pytest.importorskip("peft", reason="the text-to-image benchmark needs the 'diffusers' extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    import t2i_throughput

    threads = torch.get_num_threads()
    out = tmp_path / "t2i.json"
    result = t2i_throughput.main(["--device", "cpu", "--quick", "--ode-steps", "2", "--steps", "1", "--warmup", "0",
                                  "--json", str(out)])
    assert torch.get_num_threads() == threads  # the benchmark's one thread is not left behind
    saved = json.loads(out.read_text())
    for key in ("device", "date", "commit", "torch", "config", "memory_measured", "speedup", "images_per_s_ratio",
                "model_memory_ratio", "identical_math"):
        assert key in saved, key
    assert set(saved["modes"]) == {"baseline", "orwcfm_fast"}
    batch = saved["config"]["batch_size"]
    for row in saved["modes"].values():
        assert set(row["phases_s"]) == {"sample", "decode", "reward", "update"}
        assert row["s_per_step"] >= sum(row["phases_s"].values()) * 0.99
        assert row["images_per_s"] == pytest.approx(batch / row["s_per_step"])
        assert row["model_memory_GiB"] > 0 and row["process_peak_rss_GiB"] > 0
        # Euler 2 with CFG (2B rows per call), then the policy and reference forwards (B rows each).
        assert row["transformer_forwards_per_step"]["rows_per_call"] == [2 * batch] * 2 + [batch, batch]
    base, fast = saved["modes"]["baseline"], saved["modes"]["orwcfm_fast"]
    assert saved["images_per_s_ratio"] == pytest.approx(fast["images_per_s"] / base["images_per_s"])
    assert saved["model_memory_ratio"] < 1  # one transformer, no reference copy
    assert saved["identical_math"]["same_transformer_forwards"] is True
    assert saved["identical_math"]["sampler_vs_pipeline_max_abs_diff"] < 1e-4  # fp32: the pipeline's own latents
    assert result["modes"]["baseline"]["mode"] == "baseline"
    sys.modules.pop("t2i_throughput", None)
