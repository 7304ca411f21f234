"""``make gpu-check`` (benchmarks/gpu_check.py): the CPU dry run end to end, the no-GPU exit, and the GPU-only parsing.

The GPU run itself needs a GPU machine; what CI can check is that the dry run (the same driver,
tiny sizes on the CPU) still runs every step and writes the documented results, that without a GPU
the real run stops at once with a clear message, that ``pytest -m cuda`` collects every test file on
a machine without the optional packages (the GPU image), and that the parts only a GPU run reaches
(compute-sanitizer's verdict, JUnit and progress counts, collection errors, time-outs, the wheel and
build stamps, the stages' budgets, the verdict and its exit status, the report's tables) read their
inputs right, each against the output it must recognise.
"""

from __future__ import annotations

import json
import os
import re
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
    assert result["stage"] == "all" and result["exit_status"] == 0
    assert all(s["status"] == "pass" for n, s in result["steps"].items() if n != "build")
    assert "needed modules found" in result["steps"]["wheels"]["detail"]  # the module check runs in the dry run too
    assert result["steps"]["pytest"]["tests"] > 0 and result["steps"]["pytest"]["failed"] == 0
    assert [f["file"] for f in result["steps"]["pytest"]["files"]] == ["tests/test_ops_cpp.py"]
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
    staged = recipe("GPU_PYTHON=/opt/x/python3", "GPU_CHECK_STAGE=bench", "GPU_CHECK_OUT=/o",
                    "GPU_CHECK_ARGS=--commit a")
    assert staged == ["/opt/x/python3 benchmarks/gpu_check.py --stage bench --out-dir /o --commit a"]


# ----------------------------------------------------------------------------- GPU-only paths, on canned inputs


def test_slugify(gpu_check):
    assert gpu_check.slugify("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slugify("cpu (dry run)") == "cpu-dry-run"


def test_memcheck_verdict(gpu_check):
    verdict = gpu_check.memcheck_verdict
    ok = "memcheck cases: 24 of 24 matched the reference\n========= ERROR SUMMARY: 0 errors\n"
    assert verdict(0, ok) == ("pass", "ERROR SUMMARY: 0 errors")
    bad = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 16 bytes\n"
           "=========     at loss_kernel+0x1d0\n========= ERROR SUMMARY: 3 errors\n")
    status, detail = verdict(86, bad)
    assert status == "fail" and "3 memcheck errors" in detail and "Invalid __global__ read" in detail
    assert verdict(0, bad)[0] == "fail"  # errors found decide, whatever the exit status
    cases_failed = "memcheck cases: 23 of 24 matched the reference; 1 failed\n========= ERROR SUMMARY: 0 errors\n"
    status, detail = verdict(1, cases_failed)
    assert status == "fail" and "1 failed" in detail
    assert verdict(1, "Traceback ...\nImportError: no module\n")[0] == "fail"
    # on a device it runs on, a CUDA API error is a real finding
    api_error = ("========= Program hit cudaErrorInvalidValue (error 1) due to \"invalid argument\" on CUDA API "
                 "call to cudaMemcpyAsync.\n========= ERROR SUMMARY: 1 error\n")
    status, detail = verdict(86, api_error)
    assert status == "fail" and "1 memcheck errors (first: Program hit cudaErrorInvalidValue" in detail


# What compute-sanitizer prints when it cannot instrument the device or setup (public reports of each wording).
# In each, its ERROR SUMMARY counts the refused call(s): before, that count made the verdict "fail".
SANITIZER_REFUSED = {
    "sandboxed runtime": (
        "========= COMPUTE-SANITIZER\n"
        "========= Error: Device not supported. Please refer to the \"Supported Devices\" section of the sanitizer "
        "documentation\n"
        "========= Program hit cudaErrorNoDevice (error 100) due to \"no CUDA-capable device is detected\" on CUDA API "
        "call to cudaMalloc.\n"
        "=========     Saved host backtrace up to driver entry point at error\n"
        "...\n"
        "========= ERROR SUMMARY: 1 error\n", 86, "Device not supported"),
    "WSL": (
        "========= COMPUTE-SANITIZER\n"
        "========= Error: Failed to initialize WDDM debugger interface. Please run EnableDebuggerInterface.bat as an "
        "administrator\n=========\n"
        "========= Error: Device not supported. Please refer to the \"Supported Devices\" section of the sanitizer "
        "documentation\n=========\n"
        "memcheck cases: 24 of 24 matched the reference\n"
        "========= ERROR SUMMARY: 2 errors\n", 86, "Failed to initialize WDDM debugger interface"),
    "no injection library": (
        "========= COMPUTE-SANITIZER\n"
        "========= Error: Unable to find injection library libsanitizer-collection.so\n", 1,
        "Unable to find injection library"),
}


@pytest.mark.parametrize("case", list(SANITIZER_REFUSED))
def test_memcheck_verdict_skips_a_sanitizer_that_refuses_the_device(gpu_check, case):
    output, rc, wording = SANITIZER_REFUSED[case]
    status, detail = gpu_check.memcheck_verdict(rc, output)
    assert status == "skipped", detail
    assert detail.startswith("compute-sanitizer cannot run here: Error: ") and wording in detail
    # a real access error still fails, whatever the sanitizer said before it
    found = output + "========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n"
    assert gpu_check.memcheck_verdict(rc, found)[0] == "fail"


def test_memcheck_verdict_when_nothing_was_instrumented(gpu_check):
    verdict = gpu_check.memcheck_verdict
    # the program made no CUDA call under the sanitizer (exit status 255): nothing was checked, nothing found
    no_device = ("========= COMPUTE-SANITIZER\nmemcheck_cases: no CUDA device\n"
                 "========= Error: Target application terminated before first instrumented API call\n")
    status, detail = verdict(255, no_device)
    assert status == "skipped" and "checked nothing" in detail and "memcheck_cases: no CUDA device" in detail
    crashed = ("========= COMPUTE-SANITIZER\nTraceback (most recent call last):\n  File \"memcheck_cases.py\"\n"
               "ModuleNotFoundError: No module named 'orwcfm_fast'\n"
               "========= Error: Target application terminated before first instrumented API call\n")
    status, detail = verdict(255, crashed)  # the cases crashed before their first CUDA call: that is a failure
    assert status == "fail" and "No module named 'orwcfm_fast'" in detail


def test_memcheck_verdict_after_a_time_out(gpu_check):
    verdict = gpu_check.memcheck_verdict
    partial = ("========= COMPUTE-SANITIZER\nmemcheck cases on cuda: backends cpp, triton; cases large\n"
               "  ok      cpp orw_cfm_w2_loss     large          3x1000003\n"
               "  ok   triton orw_cfm_w2_loss     large          3x1000003\n")
    status, detail = verdict(-9, partial, timed_out=True)
    assert status == "timed out" and "after 2 cases" in detail
    found_first = partial + "========= Invalid __global__ read of size 4 bytes\n"
    assert verdict(-9, found_first, timed_out=True)[0] == "fail"  # what it found before the limit still counts
    mismatch = partial.replace("  ok   triton", "  FAIL triton")
    status, detail = verdict(-9, mismatch, timed_out=True)
    assert status == "fail" and "1 of 2 cases did not match" in detail


def test_parse_junit(gpu_check, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="6">'
        '<testcase classname="" name="tests.test_trainer"><error message="collection failure">ImportError while '
        "importing test module\ntests/test_trainer.py:10: in &lt;module&gt;\n"
        "E   ModuleNotFoundError: No module named 'torchcfm'</error></testcase>"
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
    assert counts["collection_errors"] == [{"file": "tests/test_trainer.py",
                                            "reason": "ModuleNotFoundError: No module named 'torchcfm'"}]
    assert counts["skip_reasons"] == {"needs CUDA": 1}


# pytest 9's output for `pytest -q -m cuda tests/test_trainer.py tests/test_ops_cpp.py` without torchcfm (abridged)
COLLECTION_ERROR_OUTPUT = """\
$ python -m pytest -q -m cuda -p no:cacheprovider tests/test_trainer.py
ssssssssssssssssssssssssssssssssssssssssssss                             [100%]
==================================== ERRORS ====================================
____________________ ERROR collecting tests/test_trainer.py ____________________
ImportError while importing test module '/work/main/tests/test_trainer.py'.
Hint: make sure your test modules/packages have valid Python names.
Traceback:
/usr/lib/python3.12/importlib/__init__.py:126: in import_module
    return _bootstrap._gcd_import(name[level:], package, level)
tests/test_trainer.py:10: in <module>
    from torchcfm.models.unet.unet import UNetModelWrapper
E   ModuleNotFoundError: No module named 'torchcfm'
=========================== short test summary info ============================
ERROR tests/test_trainer.py
!!!!!!!!!!!!!!!!!!!! Interrupted: 1 error during collection !!!!!!!!!!!!!!!!!!!!
44 skipped, 670 deselected, 1 error in 21.43s
"""


def _run(output, rc=0, timed_out=False, seconds=3.0, limit_s=90.0):
    return {"rc": rc, "timed_out": timed_out, "seconds": seconds, "limit_s": limit_s, "output": output, "log": "x.log"}


def test_a_collection_error_reads_as_one_naming_the_file(gpu_check):
    assert gpu_check.collection_errors(COLLECTION_ERROR_OUTPUT) == [
        {"file": "tests/test_trainer.py", "reason": "ModuleNotFoundError: No module named 'torchcfm'"}]
    assert gpu_check.collection_errors("ERROR tests/test_x.py - SyntaxError: invalid syntax\n") == [
        {"file": "tests/test_x.py", "reason": "SyntaxError: invalid syntax"}]
    assert gpu_check.collection_errors("FAILED tests/test_a.py::test_x - AssertionError\n"
                                       "ERROR tests/test_a.py::test_y - RuntimeError: in a fixture\n") == []
    row = gpu_check.pytest_file_result("tests/test_trainer.py", _run(COLLECTION_ERROR_OUTPUT, rc=2), None)
    assert row["status"] == "collection error", row
    assert row["detail"] == ("collection error in tests/test_trainer.py: "
                             "ModuleNotFoundError: No module named 'torchcfm'")
    step = gpu_check.pytest_step([row, {**row, "file": "tests/test_ok.py", "status": "pass", "detail": "ok",
                                        "collection_errors": [], "passed": 5, "skipped": 0, "tests": 5}], False)
    assert step["status"] == "collection error" and "tests/test_trainer.py" in step["detail"]
    status, line = gpu_check.verdict({"backends": {"status": "pass"}, "pytest": step, "memcheck": {"status": "pass"}})
    assert status == "collection error" and gpu_check.EXIT_STATUS[status] == 5
    assert line.startswith("gpu-check: collection error (pytest: collection error in tests/test_trainer.py: "
                           "ModuleNotFoundError: No module named 'torchcfm'")


def test_a_file_killed_at_its_limit_reads_as_timed_out_with_what_finished(gpu_check, tmp_path):
    """A real process killed by the runner: its progress output gives the counts JUnit never got to write."""
    runner = gpu_check.Runner(tmp_path, 60, {**os.environ})
    script = "import time; print('..s.', flush=True); print('.F', end='', flush=True); time.sleep(30)"
    result = runner.run("slow", [sys.executable, "-c", script], limit_s=2)
    assert result["timed_out"] and result["seconds"] < 20
    assert gpu_check.progress_counts(result["output"]) == {"tests": 6, "passed": 4, "failed": 1, "errors": 0,
                                                           "skipped": 1}
    row = gpu_check.pytest_file_result("tests/test_slow.py", result, tmp_path / "never-written.xml")
    assert row["status"] == "fail" and "then ran past its 2 s limit" in row["detail"]  # a failure before the limit
    quiet = runner.run("slow2", [sys.executable, "-c", script.replace(".F", "..")], limit_s=2)
    row = gpu_check.pytest_file_result("tests/test_slow.py", quiet, tmp_path / "never-written.xml")
    assert row["status"] == "timed out" and row["passed"] == 5 and row["skipped"] == 1
    assert row["detail"] == ("tests/test_slow.py ran past its 2 s limit after 6 tests "
                             "(5 passed, 0 failed, 0 errors, 1 skipped)")
    ok = {**row, "file": "tests/test_ops_cpp.py", "status": "pass", "passed": 200, "tests": 200, "skipped": 0}
    not_run = {"file": "tests/test_t2i_cuda.py", "status": "not run", "detail": "no time left",
               "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    step = gpu_check.pytest_step([ok, row, not_run], dry_run=False)
    assert step["status"] == "timed out" and step["passed"] == 205
    assert "tests/test_slow.py ran past its 2 s limit" in step["detail"]
    assert "not run (budget spent): tests/test_t2i_cuda.py" in step["detail"]
    status, line = gpu_check.verdict({"build": {"status": "pass"}, "pytest": step, "memcheck": {"status": "pass"}})
    assert (status, line) == ("incomplete", "gpu-check: incomplete (timed out: pytest)")
    assert gpu_check.EXIT_STATUS[status] == 3


def test_pytest_step_needs_a_passing_test_on_a_gpu(gpu_check):
    skipped = {"file": "tests/test_ops_cpp.py", "status": "pass", "detail": "x", "tests": 4, "passed": 0, "failed": 0,
               "errors": 0, "skipped": 4}
    assert gpu_check.pytest_step([skipped], dry_run=True)["status"] == "pass"
    step = gpu_check.pytest_step([skipped], dry_run=False)
    assert step["status"] == "fail" and step["detail"].startswith("no CUDA test ran")
    some = {**skipped, "file": "tests/test_ops_triton.py", "passed": 3, "skipped": 1}
    step = gpu_check.pytest_step([skipped, some], dry_run=False)
    assert step["status"] == "pass" and "every test skipped in tests/test_ops_cpp.py" in step["detail"]


def test_cuda_test_files_finds_the_marked_files_in_order(gpu_check):
    files = gpu_check.cuda_test_files()
    assert files[:len(gpu_check.CUDA_TEST_FILES)] == list(gpu_check.CUDA_TEST_FILES)  # every listed file exists
    for f in files:
        assert gpu_check.CUDA_MARK.search((ROOT / f).read_text())
    assert "tests/test_trainer.py" not in files and "tests/test_gpu_check.py" not in files


# The packages the GPU image lacks (the wheels ../shared/device/fetch-wheels.sh carries), and the test extra, which a
# GPU image may lack too: `pytest -m cuda` must still collect every test file without them.
HIDDEN_TEST_EXTRA = ("hypothesis", "torchdiffeq")


@pytest.mark.slow
def test_cuda_tests_collect_without_the_optional_packages(gpu_check):
    hidden = sorted({*gpu_check.CARRIED_WHEELS.values(), *HIDDEN_TEST_EXTRA})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_hidden_modules.py"), ",".join(hidden), "-m", "pytest",
                           "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "No module named 'torchcfm'" in proc.stdout  # they were hidden (tests/test_models.py skips on it)
    errors = gpu_check.collection_errors(proc.stdout)
    assert not errors, f"without {', '.join(hidden)} these test files do not collect: " + "; ".join(
        f"{e['file']}: {e['reason']}" for e in errors)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert "tests/test_ops_cpp.py" in collected  # the op tests need none of the hidden packages
    assert collected <= set(gpu_check.cuda_test_files())  # and the GPU run's list of files misses none


def test_verdict_last_line(gpu_check):
    verdict = gpu_check.verdict
    assert verdict({"a": {"status": "pass"}, "b": {"status": "pass"}}) == ("pass", "gpu-check: pass")
    assert verdict({"a": {"status": "pass"}, "memcheck": {"status": "skipped", "detail": "x"}}) == (
        "pass", "gpu-check: pass (skipped: memcheck)")
    status, line = verdict({"build": {"status": "fail", "detail": "nvcc died"}, "pytest": {"status": "not run"}})
    assert status == "fail" and line == "gpu-check: fail (build: nvcc died; not run: pytest)"
    # a time-out, or a step the budget left no time for, is not a failure of the code: the run is incomplete
    status, line = verdict({"pytest": {"status": "timed out", "detail": "t2i ran past 150 s"},
                            "memcheck": {"status": "pass"}, "throughput": {"status": "not run", "detail": "budget"}})
    assert (status, line) == ("incomplete", "gpu-check: incomplete (timed out: pytest; not run: throughput)")
    status, line = verdict({"pytest": {"status": "fail", "detail": "1 failed"}, "memcheck": {"status": "timed out"}})
    assert (status, line) == ("fail", "gpu-check: fail (pytest: 1 failed; timed out: memcheck)")
    status, line = verdict({"wheels": {"status": "setup error", "detail": "modules missing: ot"},
                            "pytest": {"status": "fail", "detail": "1 failed"}})
    assert (status, line) == ("setup error", "gpu-check: setup error (wheels: modules missing: ot; also fail: pytest)")
    assert {gpu_check.EXIT_STATUS[s] for s in ("pass", "fail", "incomplete", "setup error", "collection error")} == {
        0, 1, 3, 4, 5}  # each its own, and none is 2 (no CUDA device)


def test_wheels_verdict_names_what_is_missing(gpu_check, tmp_path):
    whl = tmp_path / ".whl"
    status, detail = gpu_check.wheels_verdict(["torchcfm", "ot", "hypothesis"], [], whl)
    assert status == "setup error"
    assert detail.startswith("modules missing after the wheels step: torchcfm, ot, hypothesis; "
                             f"{whl} was empty or absent; torchcfm, ot: the GPU image lacks them; fetch their wheels "
                             "with ../shared/device/fetch-wheels.sh")
    assert "hypothesis: expected in this python's image; add their wheels to .whl/" in detail
    status, detail = gpu_check.wheels_verdict(["ot"], ["torchcfm-1.0.7-py3-none-any.whl"], whl)
    assert status == "setup error" and f"{whl} has 1 wheels but none provides them" in detail
    assert gpu_check.wheels_verdict([], [], whl)[0] == "pass"
    assert gpu_check.wheels_verdict(["ot"], [], whl, dry_run=True)[1].startswith(
        "modules missing after the wheels step: ot; the .venv lacks them")


def test_an_empty_wheel_folder_is_a_setup_error_naming_the_missing_modules(gpu_check, tmp_path):
    """The GPU image without the carried wheels, played by this python with torchcfm and POT hidden."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / '_hidden_modules.py'} torchcfm,ot \"$@\"\n")
    python.chmod(0o755)
    (tmp_path / "whl").mkdir()
    runner = gpu_check.Runner(tmp_path, 60, {**os.environ})
    step = gpu_check.install_wheels(runner, str(python), tmp_path / "whl", tmp_path / "site")
    assert step["status"] == "setup error" and step["missing_modules"] == ["torchcfm", "ot"]
    assert step["detail"].startswith(f"modules missing after the wheels step: torchcfm, ot; {tmp_path / 'whl'} was "
                                     "empty or absent")
    step = gpu_check.install_wheels(runner, sys.executable, tmp_path / "whl", tmp_path / "site")  # nothing hidden
    assert step["status"] == "pass" and "all 16 needed modules found" in step["detail"]


def test_wheels_step_is_idempotent(gpu_check, tmp_path):
    runner = gpu_check.Runner(tmp_path, 60, {**os.environ})
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    site.mkdir()
    (wheels / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"not really a wheel")
    listing = [[w.name, w.stat().st_size] for w in sorted(wheels.glob("*.whl"))]
    (site / ".gpu-check-wheels.json").write_text(json.dumps(listing))
    step = gpu_check.install_wheels(runner, sys.executable, wheels, site)  # no pip run: the same set is installed
    assert step["status"] == "pass" and "already installed" in step["detail"] and "log" not in step
    (wheels / "other-2.0-py3-none-any.whl").write_bytes(b"x")
    step = gpu_check.install_wheels(runner, sys.executable, wheels, site)  # a new wheel: pip runs (and fails here)
    assert step["status"] == "setup error" and "pip install" in step["detail"]


def test_carried_wheels_match_fetch_wheels(gpu_check):
    script = ROOT.parent / "shared" / "device" / "fetch-wheels.sh"
    if not script.is_file():
        pytest.skip("no ../shared/device/fetch-wheels.sh beside this checkout")
    pins = re.findall(r"([A-Za-z0-9_.-]+)==", script.read_text().split("pins=(", 1)[1].split(")", 1)[0])
    assert sorted(pins) == sorted(gpu_check.CARRIED_WHEELS)


def test_build_is_not_run_again_for_the_same_sources(gpu_check, tmp_path):
    root = tmp_path / "tree"
    for path, text in (("setup.py", "x"), ("csrc/sources.txt", "kernels/k.cu\n"), ("kernels/k.cu", "__global__"),
                       ("orwcfm_fast/__init__.py", "")):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    calls = []

    def fake_run(name, cmd, limit_s, env=None):
        calls.append(cmd)
        (root / "orwcfm_fast" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"built %d" % len(calls))
        return {"rc": 0, "timed_out": False, "seconds": 1.0, "limit_s": limit_s, "output": "ok", "log": "build.log"}

    runner = gpu_check.Runner(tmp_path, 1e6, {})
    runner.run = fake_run
    tools = {"torch": "2.11.0+cu130", "gpu": "NVIDIA H200 sm_90"}
    assert gpu_check.build_extension(runner, "py", tools, root)["rebuilt"] is True and len(calls) == 1
    step = gpu_check.build_extension(runner, "py", tools, root)  # a warm machine: same sources, same torch
    assert step["status"] == "pass" and step["rebuilt"] is False and "not rebuilt" in step["detail"]
    assert len(calls) == 1
    (root / "kernels" / "k.cu").write_text("__global__ // changed")
    assert gpu_check.build_extension(runner, "py", tools, root)["rebuilt"] is True and len(calls) == 2
    assert gpu_check.build_extension(runner, "py", {**tools, "torch": "2.12.0"}, root)["rebuilt"] is True
    (root / "orwcfm_fast" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"replaced by hand")
    assert gpu_check.build_extension(runner, "py", {**tools, "torch": "2.12.0"}, root)["rebuilt"] is True
    assert len(calls) == 4
    runner.run = lambda name, cmd, limit_s, env=None: {"rc": -9, "timed_out": True, "seconds": limit_s,
                                                       "limit_s": limit_s, "output": "[1/8] nvcc", "log": "b.log"}
    (root / "kernels" / "k.cu").write_text("__global__ // changed again")
    step = gpu_check.build_extension(runner, "py", tools, root)
    assert step["status"] == "timed out" and "ran past its" in step["detail"]


def test_stages_fit_a_lent_machine(gpu_check):
    stages, budget = gpu_check.STAGES, gpu_check.DEFAULT_BUDGET_S
    assert set(stages["check"]) | set(stages["bench"]) == set(gpu_check.STEPS) == set(stages["all"])
    assert budget["check"] <= 600 - 60  # one command of at most 600 s, with time to start python and report
    assert budget["check"] + budget["bench"] <= 15 * 60 - 60  # ~15 minutes of device time, start-up included
    for stage, steps in stages.items():  # the first step keeps its whole limit after the later steps' reserves
        assert budget[stage] - sum(gpu_check.STEP_RESERVE_S[s] for s in steps[1:]) >= gpu_check.STEP_LIMIT_S[steps[0]]
    assert sum(gpu_check.MEMCHECK_PROCESS_S.values()) <= gpu_check.STEP_LIMIT_S["memcheck"]


class _Clock:
    """``time.monotonic`` for :mod:`gpu_check` alone, advanced by the fake steps."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def _fake_gpu_run(gpu_check, monkeypatch, tmp_path, clock, seconds: dict, statuses: dict | None = None):
    """Run :func:`gpu_check.main` as on a GPU with every step faked: each takes ``seconds[step]`` (None: all it may
    have) of the fake clock and records the time it was given."""
    import torch

    given = {}
    statuses = statuses or {}

    def fake(name):
        def step(runner, *args, **kwargs):
            given[name] = runner.remaining() - runner.reserve_s
            took = given[name] if seconds.get(name) is None else seconds[name]
            clock.now += took
            status = statuses.get(name, "timed out" if seconds.get(name) is None else "pass")
            out = {"status": status, "detail": f"{name} {status}", "seconds": took}
            if name == "backends":
                out["probe"] = {"gpu": {"name": "NVIDIA H200", "memory_GiB": 139.8, "multiprocessors": 132,
                                        "capability": "9.0"}, "python": "3.12.3", "triton": "3.6.0"}
            if name == "throughput":
                out["result"] = {"config": {"unet_parameters": 35.7e6, "batch_size": 128, "ode_steps": 100},
                                 "reference_s_per_step": 2.0, "fast_s_per_step": 0.5, "speedup": 4.0,
                                 "best_mode": "fast_fp32", "best_speedup": 4.0,
                                 "modes": {"reference": {"s_per_step": 2.0, "phases_s": None, "samples_per_s": 64.0,
                                                         "speedup": 1.0}}}
            return out
        return step

    monkeypatch.setattr(gpu_check, "time", clock)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "nvidia_smi", lambda: {"name": "NVIDIA H200", "driver": "580", "memory": "x"})
    monkeypatch.setattr(gpu_check, "toolchain_identity", lambda torch: {})
    for name, function in (("wheels", "install_wheels"), ("build", "build_extension"), ("backends", "check_backends"),
                           ("pytest", "run_pytest"), ("memcheck", "run_memcheck"),
                           ("op_benchmarks", "run_op_benchmarks"), ("throughput", "run_throughput")):
        monkeypatch.setattr(gpu_check, function, fake(name))
    return given


def test_check_stage_budget_leaves_pytest_and_memcheck_their_time(gpu_check, tmp_path, monkeypatch, capsys):
    """A fresh machine's realistic set-up (wheels 15 s, a cold nvcc build of 150 s, backends 15 s), and CUDA tests
    that would run longer than the budget: pytest gets at least 240 s, memcheck still its 120 s, and the run reads
    "incomplete (timed out: pytest)" with its own exit status, in the JSON, RESULTS.md and the last line."""
    clock = _Clock()
    given = _fake_gpu_run(gpu_check, monkeypatch, tmp_path, clock,
                          {"wheels": 15, "build": 150, "backends": 15, "pytest": None, "memcheck": 100})
    out, work = tmp_path / "out", tmp_path / "work"
    rc = gpu_check.main(["--out-dir", str(out), "--work-dir", str(work), "--commit", "abc1234"])
    assert set(given) == set(gpu_check.STAGES["check"])  # the benchmarks wait for the second call
    assert given["pytest"] >= 240 and given["memcheck"] >= 120, given
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "gpu-check: incomplete (timed out: pytest)" and rc == gpu_check.EXIT_STATUS["incomplete"] == 3
    result = json.loads((out / "nvidia-h200.json").read_text())
    assert result["stage"] == "check" and result["status"] == "incomplete" and result["last_line"] == last
    assert result["steps"]["pytest"]["status"] == "timed out" and result["budget_s"] == 540
    md = (out / "RESULTS.md").read_text()
    assert "stage `check`" in md and "**incomplete**" in md and "| pytest | timed out |" in md

    # the second call on the same (warm) machine: the benchmarks, reported with the first call's steps
    given = _fake_gpu_run(gpu_check, monkeypatch, tmp_path, clock, {"wheels": 1, "build": 0, "backends": 15,
                                                                     "op_benchmarks": 90, "throughput": 150})
    rc = gpu_check.main(["--stage", "bench", "--out-dir", str(out), "--work-dir", str(work), "--commit", "abc1234"])
    assert set(given) == set(gpu_check.STAGES["bench"]) and rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "gpu-check: pass"
    result = json.loads((out / "nvidia-h200.json").read_text())
    assert result["stage"] == "bench" and result["budget_s"] == 300
    assert result["earlier"]["check"]["status"] == "incomplete"
    assert result["earlier"]["check"]["steps"]["pytest"]["status"] == "timed out"
    md = (out / "RESULTS.md").read_text()
    assert "## Steps of the earlier `--stage check` call" in md and "gpu-check: incomplete (timed out: pytest)" in md
    assert "## Training-step throughput" in md
    # another commit's record is not merged
    gpu_check.main(["--stage", "bench", "--out-dir", str(out), "--work-dir", str(work), "--commit", "fff0000"])
    assert "earlier" not in json.loads((out / "nvidia-h200.json").read_text())


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


def test_report_lists_further_providers_after_the_known_ones(gpu_check):
    """bench_loss's w2_weights variants get their own columns, after torch / torch.compile / triton / cpp."""
    rows = [{"shape": [512, 2], "provider": p, "ms": 0.01, "GB/s": 1.0, "fraction_of_copy": f}
            for p, f in (("torch", 0.1), ("cpp", 0.5), ("torch+w2_weights", 0.09), ("cpp+w2_weights", 0.49))]
    result = {"device": "NVIDIA H200", "date": "2026-12-02", "commit": "abc1234", "torch": "2.11.0+cu130",
              "status": "pass", "dry_run": False, "budget_s": 300, "wall_s": 100.0, "last_line": "gpu-check: pass",
              "environment": {}, "steps": {},
              "figures": {"ops": {"orw_cfm_w2_loss": {"copy_GBps": 4300.0, "dtype": "float32", "rows": rows,
                                                      "skipped": {}}}}}
    md = gpu_check.render_markdown(result, "benchmarks/results/nvidia-h200.json")
    assert "| shape | torch | cpp | torch+w2_weights | cpp+w2_weights |" in md
    assert "| 512x2 | 0.10 (0.0100 ms) | 0.50 (0.0100 ms) | 0.09 (0.0100 ms) | 0.49 (0.0100 ms) |" in md


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


def test_each_cuda_test_file_runs_alone_with_its_own_limit(gpu_check, tmp_path, monkeypatch):
    """One process per file, in order, each limited by its own entry; a file the budget leaves no time is not run."""
    calls = []
    runner = gpu_check.Runner(tmp_path, 1e6, {})
    clock = _Clock()
    monkeypatch.setattr(gpu_check, "time", clock)
    runner.t0 = clock.now

    def fake_run(name, cmd, limit_s, env=None):
        calls.append((cmd[-1], limit_s, cmd.count("-m"), "--junitxml" in " ".join(cmd)))
        clock.now += limit_s  # every file takes all its time: the budget runs out
        return {"rc": 0, "timed_out": False, "seconds": limit_s, "limit_s": limit_s,
                "output": "..s  [100%]\n3 passed", "log": "x.log"}

    runner.run = fake_run
    files = list(gpu_check.CUDA_TEST_FILES)
    runner.budget_s = sum(gpu_check.CUDA_TEST_FILES[f] for f in files[:2]) + 5  # time for the first two files only
    step = gpu_check.run_pytest(runner, sys.executable, dry_run=False, files=files)
    assert calls == [(f, gpu_check.CUDA_TEST_FILES[f], 2, True) for f in files[:2]]  # -m pytest, -m cuda
    assert [f["status"] for f in step["files"]] == ["pass", "pass"] + ["not run"] * (len(files) - 2)
    assert step["status"] == "timed out" and step["passed"] == 4 and step["skipped"] == 2
    assert step["detail"].startswith("not run (budget spent): " + ", ".join(files[2:]))
