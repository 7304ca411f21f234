"""``make gpu-check`` (benchmarks/gpu_check.py): the CPU dry run end to end, the no-GPU exit, and the GPU-only parsing.

The GPU run itself needs a GPU machine; what CI can check is that the dry run (the same driver,
tiny sizes on the CPU) still runs every step and writes the documented results, that without a GPU
the real run stops at once with a clear message, and that the parts only a GPU run reaches
(compute-sanitizer's verdict, JUnit counts, the wheel stamp, the report's tables) read their inputs
right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def _results_state() -> tuple:
    results = ROOT / "benchmarks" / "results"
    return (sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir()),
            (ROOT / "benchmarks" / "RESULTS.md").exists())


@pytest.mark.slow
def test_dry_run_writes_the_results_and_passes(tmp_path):
    before = _results_state()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert lines[-1].startswith("gpu-check: pass"), lines[-1]
    assert _results_state() == before, "the dry run must not write into benchmarks/results or benchmarks/RESULTS.md"

    (json_path,) = out.glob("*.json")
    result = json.loads(json_path.read_text())
    for key in ("device", "date", "commit", "torch", "status", "last_line", "dry_run", "environment", "steps",
                "figures", "wall_s"):
        assert key in result, key
    assert result["dry_run"] is True and result["status"] == "pass" and result["last_line"] == lines[-1]
    assert list(result["steps"]) == ["wheels", "build", "backends", "pytest", "memcheck", "op_benchmarks", "throughput"]
    assert all(s["status"] == "pass" for n, s in result["steps"].items() if n not in ("wheels", "build"))
    assert result["steps"]["pytest"]["tests"] > 0 and result["steps"]["pytest"]["failed"] == 0
    assert result["steps"]["memcheck"]["cases"] > 0
    ops = result["figures"]["ops"]
    assert set(ops) == {"orw_cfm_w2_loss", "conditional_path", "ode_step"}
    for data in ops.values():
        assert {r["provider"] for r in data["rows"]} == {"torch", "cpp"}
        assert all(r["fraction_of_copy"] > 0 for r in data["rows"])
    tp = result["figures"]["throughput"]
    assert tp["speedup"] == pytest.approx(tp["reference_s_per_step"] / tp["fast_s_per_step"])
    assert set(tp["modes"]) == {"reference", "fast_fp32"}

    md = (out / "RESULTS.md").read_text()
    assert "DRY RUN" in md and result["commit"] in md and result["torch"] in md
    for heading in ("## Steps", "## Fused ops", "### orw_cfm_w2_loss", "### conditional_path", "### ode_step",
                    "## Training-step throughput"):
        assert heading in md, heading
    assert md.strip().splitlines()[-1] == lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "make gpu-check DRY_RUN=1" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu-check: fail (no CUDA device")
    assert not any(tmp_path.iterdir()), "nothing is written without a GPU"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_target_runs_the_script_with_the_right_python():
    # Under `make test` this make is a sub-make: MAKEFLAGS/MAKELEVEL come from the parent, which adds
    # "Entering/Leaving directory" lines; run it as a top-level make and read the recipe lines only.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}

    def recipe(*args):
        out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        return [line.strip() for line in out.splitlines() if "gpu_check.py" in line]

    dry = recipe("DRY_RUN=1", "GPU_CHECK_OUT=/tmp/somewhere")
    assert any(".venv/bin/python benchmarks/gpu_check.py --dry-run --out-dir /tmp/somewhere" in line for line in dry)
    assert recipe("GPU_PYTHON=/opt/x/python3") == ["/opt/x/python3 benchmarks/gpu_check.py"]


# ----------------------------------------------------------------------------- GPU-only paths, on canned inputs


def test_slugify(gpu_check):
    assert gpu_check.slugify("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slugify("cpu (dry run)") == "cpu-dry-run"


def test_memcheck_verdict(gpu_check):
    verdict = gpu_check.memcheck_verdict
    ok = "memcheck cases: 24 of 24 matched the reference\n========= ERROR SUMMARY: 0 errors\n"
    assert verdict(0, ok)[0] == "pass"
    bad = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 16 bytes\n"
           "=========     at loss_kernel+0x1d0\n========= ERROR SUMMARY: 3 errors\n")
    status, detail = verdict(86, bad)
    assert status == "fail" and "3 memcheck errors" in detail and "Invalid __global__ read" in detail
    assert verdict(0, bad)[0] == "fail"  # errors found decide, whatever the exit status
    refused = "========= Error: Device not supported\nRuntimeError: CUDA error: unknown error (999)\n"
    assert verdict(1, refused)[0] == "skipped"
    cases_failed = "memcheck cases: 23 of 24 matched the reference; 1 failed\n========= ERROR SUMMARY: 0 errors\n"
    status, detail = verdict(1, cases_failed)
    assert status == "fail" and "1 failed" in detail
    assert verdict(0, ok, timed_out=True)[0] == "fail"
    assert verdict(1, "Traceback ...\nImportError: no module\n")[0] == "fail"


def test_parse_junit(gpu_check, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_ok2"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x">boom</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>")
    counts = gpu_check.parse_junit(xml)
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 5, "passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    assert counts["failing"] == ["tests.test_a::test_bad", "tests.test_b::test_err"]


def test_verdict_last_line(gpu_check):
    verdict = gpu_check.verdict
    assert verdict({"a": {"status": "pass"}, "b": {"status": "pass"}}) == ("pass", "gpu-check: pass")
    assert verdict({"a": {"status": "pass"}, "memcheck": {"status": "skipped", "detail": "x"}}) == (
        "pass", "gpu-check: pass (skipped: memcheck)")
    status, line = verdict({"build": {"status": "fail", "detail": "nvcc died"}, "pytest": {"status": "not run"}})
    assert status == "fail" and line == "gpu-check: fail (build: nvcc died; not run: pytest)"


def test_wheels_step_is_idempotent(gpu_check, tmp_path):
    runner = gpu_check.Runner(tmp_path, 60, {})
    assert gpu_check.install_wheels(runner, sys.executable, tmp_path / "none", tmp_path / "site")["status"] == "skipped"
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    site.mkdir()
    (wheels / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"not really a wheel")
    listing = [[w.name, w.stat().st_size] for w in sorted(wheels.glob("*.whl"))]
    (site / ".gpu-check-wheels.json").write_text(json.dumps(listing))
    step = gpu_check.install_wheels(runner, sys.executable, wheels, site)  # no pip run: the same set is installed
    assert step["status"] == "pass" and "already installed" in step["detail"]
    (wheels / "other-2.0-py3-none-any.whl").write_bytes(b"x")
    step = gpu_check.install_wheels(runner, sys.executable, wheels, site)  # a new wheel: pip runs (and fails here)
    assert step["status"] == "fail" and "pip install" in step["detail"]


def test_find_sanitizer(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    tool = home / "bin" / "compute-sanitizer"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert gpu_check.find_sanitizer() == str(tool)


def test_report_of_a_gpu_run(gpu_check):
    rows = [{"shape": [512, 3, 64, 64], "provider": p, "ms": 0.1, "GB/s": 3000.0, "fraction_of_copy": f}
            for p, f in (("torch", 0.31), ("torch.compile", 0.7), ("triton", 0.88), ("cpp", 0.86))]
    result = {
        "device": "NVIDIA H200", "date": "2026-12-02", "commit": "abc1234", "torch": "2.11.0+cu130", "status": "pass",
        "dry_run": False, "budget_s": 480, "wall_s": 400.0, "last_line": "gpu-check: pass",
        "environment": {"python": "3.12.3", "torch_cuda": "13.0", "triton": "3.6.0", "host_cpus": 16,
                        "gpu": {"memory_GiB": 139.8, "multiprocessors": 132, "capability": "9.0"},
                        "nvidia_smi": {"driver": "580.159.04"}, "sanitizer": "Version 2025.3"},
        "steps": {"pytest": {"status": "pass", "seconds": 100.0, "detail": "500 passed"}},
        "figures": {
            "ops": {"orw_cfm_w2_loss": {"copy_GBps": 4300.0, "dtype": "float32", "rows": rows, "skipped": {}}},
            "throughput": {"config": {"unet_parameters": 35.7e6, "batch_size": 128, "ode_steps": 100,
                                      "reward": "CLIP ViT-B-32 (random weights)", "timed_steps": 5,
                                      "warmup_steps_untimed": 1},
                           "matmul_peak_TFLOPs": 780.0, "matmul_peak_measured_with": "bf16 8192^2",
                           "reference_s_per_step": 2.0, "fast_s_per_step": 0.5, "speedup": 4.0,
                           "best_mode": "fast_recommended", "best_speedup": 12.0,
                           "modes": {"reference": {"s_per_step": 2.0, "phases_s": {"sample": 1.5, "reward": 0.1,
                                                                                  "update": 0.4},
                                                   "samples_per_s": 64.0, "speedup": 1.0},
                                     "fast_overlapped": {"s_per_step": 0.2, "phases_s": None, "samples_per_s": 640.0,
                                                         "speedup": 10.0}}},
        },
    }
    md = gpu_check.render_markdown(result, "benchmarks/results/nvidia-h200.json")
    assert md.startswith("# GPU check: NVIDIA H200") and "DRY RUN" not in md
    assert "580.159.04" in md and "2.11.0+cu130" in md and "abc1234" in md and "139.8 GiB" in md
    assert "| shape | torch | torch.compile | triton | cpp |" in md
    assert "| 512x3x64x64 | 0.31 (0.1000 ms) | 0.70 (0.1000 ms) | 0.88 (0.1000 ms) | 0.86 (0.1000 ms) |" in md
    assert "| fast_overlapped | 0.200 |  |  |  | 640.0 |" in md
    assert "4.00x at identical math (fast_fp32), 12.00x with fast_recommended" in md
    assert md.strip().splitlines()[-1] == "gpu-check: pass"


def test_backend_verdict(gpu_check):
    ext = str(ROOT / "orwcfm_fast" / "_C.cpython-312-x86_64-linux-gnu.so")
    gpu = {"extension": ext, "missing_modules": [], "triton_cuda": "CUDA tensors: yes, compiled for the GPU",
           "backends": {"torch": {"devices": ["cpu", "cuda"], "reason": ""},
                        "cpp": {"devices": ["cpu", "cuda"], "reason": ""},
                        "triton": {"devices": ["cuda"], "reason": "CPU tensors: no"}}}
    status, detail = gpu_check.backend_verdict(gpu, dry_run=False)
    assert status == "pass" and "cpp: cpu, cuda" in detail
    no_cuda_kernels = {**gpu, "backends": {**gpu["backends"], "cpp": {"devices": ["cpu"], "reason": "no CUDA kernels"}}}
    status, detail = gpu_check.backend_verdict(no_cuda_kernels, dry_run=False)
    assert status == "fail" and "cpp cannot run cuda tensors: no CUDA kernels" in detail
    assert gpu_check.backend_verdict(no_cuda_kernels, dry_run=True)[0] == "pass"
    interpreted = {**gpu, "triton_cuda": "CUDA tensors: yes, interpreted (TRITON_INTERPRET=1) (correct but slow)"}
    assert "interpreted, not compiled" in gpu_check.backend_verdict(interpreted, dry_run=False)[1]
    elsewhere = {**gpu, "extension": "/usr/lib/python3/site-packages/orwcfm_fast/_C.so", "missing_modules": ["ot"]}
    status, detail = gpu_check.backend_verdict(elsewhere, dry_run=False)
    assert status == "fail" and "not from this tree" in detail and "missing python modules: ot" in detail
    unbuilt = {**gpu, "extension": None, "extension_error": "ModuleNotFoundError: orwcfm_fast._C"}
    assert "does not load" in gpu_check.backend_verdict(unbuilt, dry_run=True)[1]


def test_each_memcheck_process_has_its_own_limit(gpu_check, tmp_path, monkeypatch):
    """A slow first sanitizer process times out at its own limit: the captured-graph one still gets its time."""
    calls = []

    def fake_run(name, cmd, limit_s, env=None):
        calls.append((name, limit_s))
        return {"rc": 0, "timed_out": False, "seconds": limit_s, "output": "ERROR SUMMARY: 0 errors\nmemcheck cases: ok",
                "log": str(tmp_path / f"{name}.log")}

    runner = gpu_check.Runner(tmp_path, 1e6, {})
    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: "/bin/true")
    gpu_check.run_memcheck(runner, sys.executable, dry_run=False)
    limits = dict(calls)
    assert limits == {"memcheck_large_misaligned": gpu_check.MEMCHECK_PROCESS_S["large,misaligned"],
                      "memcheck_captured": gpu_check.MEMCHECK_PROCESS_S["captured"]}
    assert sum(gpu_check.MEMCHECK_PROCESS_S.values()) <= gpu_check.STEP_LIMIT_S["memcheck"]
