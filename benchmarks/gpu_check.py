"""``make gpu-check``: validate the library on a fresh GPU machine and record every figure, in one run.

Steps, each a subprocess with a time limit, all inside one budget (``--budget-s``, default 8 minutes):

1. ``wheels``: install the wheels carried in ``.whl/`` (``../shared/device/fetch-wheels.sh``:
   torchcfm, POT, open_clip, ... which the GPU image lacks) into ``--site`` (default
   ``/tmp/site``), put on ``PYTHONPATH`` of every later step; skipped when already installed.
2. ``build``: ``python setup.py build_ext --inplace`` with ``MAX_JOBS`` = the CPU count, so
   ``orwcfm_fast/_C*.so`` is built against this python's torch, inside this tree.
3. ``backends``: ``orwcfm_fast.ops.available_backends()`` under ``TRITON_INTERPRET=0`` must list
   ``cuda`` for ``cpp`` and ``triton`` (compiled, not interpreted), and ``orwcfm_fast._C`` must
   be loaded from this tree; otherwise the check stops here.
4. ``pytest``: ``python -m pytest -q -m cuda`` (counts from its JUnit XML; at least one test must run).
5. ``memcheck``: ``compute-sanitizer --tool memcheck`` over ``benchmarks/memcheck_cases.py``
   (large, misaligned and graph-captured cases of every op on both backends; two processes: one
   with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so overruns leave their allocation, one with the
   caching allocator that capture needs). Pass: exit status 0 and ``ERROR SUMMARY: 0 errors``.
   Skipped (not passed) when compute-sanitizer is not found or cannot run on this device.
6. ``op_benchmarks``: ``bench_loss.py``, ``bench_path.py``, ``bench_ode_step.py`` (one process):
   each provider's time and fraction of the device's copy bandwidth.
7. ``throughput``: ``benchmarks/throughput.py`` at its GPU default, the paper's configuration
   (CIFAR UNet, batch 128, Euler 100, CLIP ViT-B/32 with random weights): seconds per step of the
   reference-style baseline and each fast mode, and the speedups.

It writes ``<out>/<device>.json`` (every step and figure; default ``benchmarks/results/``, the
device name slugified, e.g. ``nvidia-h200.json``) and a report, ``benchmarks/RESULTS.md`` (or
``<out>/RESULTS.md`` with ``--out-dir``), with device, date, commit, torch, driver (nvidia-smi) and
every figure; logs and each step's raw output go to ``--work-dir`` (default ``build/gpu-check``).
The last line printed is ``gpu-check: pass`` (with ``(skipped: ...)`` when a step could not run
here) or ``gpu-check: fail (...)``; the exit status is 0 only on pass. Without a CUDA device it
stops at once with exit status 2.

``--dry-run`` (``make gpu-check DRY_RUN=1``, CI): the same steps on the CPU, tiny sizes, under
``TRITON_INTERPRET=1`` and with no GPU visible: no wheels or build (the ``.venv``'s editable
install), the ``cpp`` CPU backend required, ``-m cuda`` on ``tests/test_ops_cpp.py`` (which skips them all),
the memcheck cases on the CPU without the sanitizer, ``--quick`` CPU benchmarks. Its outputs go
to ``--out-dir`` (default: a new temporary folder), never to ``benchmarks/results/``: its numbers
measure nothing.

Run: ``python benchmarks/gpu_check.py [--dry-run] [--out-dir DIR] [--skip STEP,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

STEPS = ("wheels", "build", "backends", "pytest", "memcheck", "op_benchmarks", "throughput")
#: Each step's own limit in seconds (GPU run); a step also stops when the whole budget is spent.
STEP_LIMIT_S = {"wheels": 120, "build": 300, "backends": 90, "pytest": 240, "memcheck": 240, "op_benchmarks": 240,
                "throughput": 300}
#: Time kept back for each later step: a slow step times out rather than starve the ones after it.
STEP_RESERVE_S = {"wheels": 10, "build": 45, "backends": 10, "pytest": 60, "memcheck": 45, "op_benchmarks": 60,
                  "throughput": 90}
DEFAULT_BUDGET_S = 480
#: memcheck's two sanitizer processes, each with its own limit inside the step's: the first (no caching
#: allocator, large and misaligned cases) must not spend the time of the second (graph-captured cases)
MEMCHECK_PROCESS_S = {"large,misaligned": 150, "captured": 90}
#: op name -> benchmark script (module in benchmarks/)
OP_BENCHES = {"orw_cfm_w2_loss": "bench_loss", "conditional_path": "bench_path", "ode_step": "bench_ode_step"}
#: what the tests and benchmarks import beyond torch; the GPU image lacks the first ones (carry .whl/)
NEEDED_MODULES = ("torchcfm", "ot", "open_clip", "ftfy", "pytest", "hypothesis", "torchdiffeq", "tqdm", "sklearn",
                  "PIL", "scipy", "matplotlib")
#: the dry run's ``-m cuda`` subset: a file of CUDA tests (each skips on the CPU); the JUnit path is what it checks
DRY_RUN_TESTS = ("tests/test_ops_cpp.py",)
DRY_RUN_THROUGHPUT = ["--device", "cpu", "--quick", "--batch-size", "2", "--ode-steps", "2", "--steps", "1",
                      "--warmup", "0", "--modes", "reference,fast_fp32"]
DRY_RUN_OP_BENCH = ["--device", "cpu", "--quick", "--providers", "torch,cpp"]
MEMCHECK_EXIT = 86  # compute-sanitizer's exit status when it found errors (--error-exitcode)
PROBE_TAG = "GPU_CHECK_PROBE "


def slugify(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: lower case, runs of other characters -> ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------- running steps


class Runner:
    """Runs commands with time limits inside one budget, logging each to ``work_dir/<name>.log``."""

    def __init__(self, work_dir: Path, budget_s: float, env: dict):
        self.work_dir = work_dir
        self.budget_s = budget_s
        self.env = env
        self.reserve_s = 0.0  # kept back for the steps after the current one
        self.t0 = time.monotonic()

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
        """Run ``cmd`` in the repository root; returns ``{rc, timed_out, seconds, output, log}``.

        The command gets ``min(limit_s, what is left of the budget less the later steps' reserve)``;
        on time-out its whole process group (e.g. compute-sanitizer and the python under it) is killed.
        """
        limit = max(1.0, min(limit_s, self.remaining() - self.reserve_s))
        log = self.work_dir / f"{name}.log"
        t0 = time.monotonic()
        with open(log, "w") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            except BaseException:  # Ctrl-C: its own session does not get the SIGINT, so end it here
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        seconds = time.monotonic() - t0
        output = log.read_text(errors="replace")
        if timed_out:
            with open(log, "a") as out:
                out.write(f"\n[gpu-check: killed after {limit:.0f} s]\n")
        return {"rc": rc, "timed_out": timed_out, "seconds": seconds, "limit_s": limit, "output": output,
                "log": str(log)}


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _last_error_line(text: str) -> str:
    """The most telling line of a failed command's output: the last one naming an error, else the last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|ERROR|FAILED|Traceback|Exception|killed", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def _failed_run(result: dict, what: str) -> str:
    if result["timed_out"]:
        return f"{what} ran past its {result['limit_s']:.0f} s limit"
    return f"{what} exited with status {result['rc']}: {_last_error_line(result['output'])}"


# ----------------------------------------------------------------------------- step 1: wheels


def install_wheels(runner: Runner, python: str, wheel_dir: Path, site: Path) -> dict:
    """Install ``wheel_dir/*.whl`` into ``site`` (``--no-index --no-deps``), unless the same set already is."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return {"status": "skipped", "detail": f"no wheels in {wheel_dir}: using this python's packages"}
    listing = [[w.name, w.stat().st_size] for w in wheels]
    stamp = site / ".gpu-check-wheels.json"
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == listing:
                return {"status": "pass", "detail": f"{len(wheels)} wheels already installed in {site}",
                        "site": str(site), "wheels": [w.name for w in wheels]}
        except json.JSONDecodeError:
            pass
    result = runner.run("wheels", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                        STEP_LIMIT_S["wheels"])
    step = {"seconds": result["seconds"], "log": result["log"], "site": str(site), "wheels": [w.name for w in wheels]}
    if result["rc"] != 0 or result["timed_out"]:
        return {**step, "status": "fail", "detail": _failed_run(result, "pip install"), "tail": _tail(result["output"])}
    stamp.write_text(json.dumps(listing) + "\n")
    return {**step, "status": "pass", "detail": f"{len(wheels)} wheels installed into {site}"}


# ----------------------------------------------------------------------------- step 2: build


def build_extension(runner: Runner, python: str) -> dict:
    """``setup.py build_ext --inplace`` (ninja: incremental), ``MAX_JOBS`` = CPU count."""
    jobs = str(os.cpu_count() or 2)
    result = runner.run("build", [python, "setup.py", "build_ext", "--inplace"], STEP_LIMIT_S["build"],
                        env={"MAX_JOBS": jobs})
    step = {"seconds": result["seconds"], "log": result["log"], "max_jobs": int(jobs)}
    if result["rc"] != 0 or result["timed_out"]:
        return {**step, "status": "fail", "detail": _failed_run(result, "setup.py build_ext --inplace"),
                "tail": _tail(result["output"])}
    built = sorted(p.name for p in (ROOT / "orwcfm_fast").glob("_C*.so"))
    if not built:
        return {**step, "status": "fail", "detail": "setup.py build_ext --inplace left no orwcfm_fast/_C*.so",
                "tail": _tail(result["output"])}
    return {**step, "status": "pass", "detail": f"built {', '.join(built)} with MAX_JOBS={jobs}"}


# ----------------------------------------------------------------------------- step 3: backends


def probe() -> dict:
    """What this process sees: versions, the GPU, the backends, where orwcfm_fast._C came from, missing modules."""
    import importlib.util

    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001 - reported, not fatal here
        info["triton"] = f"unavailable: {type(err).__name__}: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_GiB": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                       "count": torch.cuda.device_count()}
    from orwcfm_fast.ops import available_backends

    info["backends"] = {name: {"devices": list(s.devices), "reason": s.reason}
                        for name, s in available_backends().items()}
    if "cuda" in info["backends"]["triton"]["devices"]:
        from orwcfm_fast.ops.triton import is_available as triton_available

        info["triton_cuda"] = triton_available("cuda")[1]  # says "compiled" or "interpreted"
    try:
        import orwcfm_fast._C as ext

        info["extension"] = str(Path(ext.__file__).resolve())
    except Exception as err:  # noqa: BLE001 - reported by the caller
        info["extension"] = None
        info["extension_error"] = f"{type(err).__name__}: {err}"
    info["missing_modules"] = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    return info


def backend_verdict(info: dict, dry_run: bool) -> tuple[str, str]:
    """``(status, detail)`` of a :func:`probe` result: does this run have what it needs?

    GPU run: ``cpp`` and ``triton`` both run CUDA tensors, Triton's kernels compiled (not
    interpreted), and ``orwcfm_fast._C`` loaded from this tree. Dry run: ``cpp`` on the CPU.
    """
    problems = []
    ext = info.get("extension")
    if ext is None:
        problems.append(f"orwcfm_fast._C does not load: {info.get('extension_error')}")
    elif not Path(ext).is_relative_to(ROOT):
        problems.append(f"orwcfm_fast._C was loaded from {ext}, not from this tree ({ROOT})")
    backends = info["backends"]
    needed = {"cpp": "cpu"} if dry_run else {"cpp": "cuda", "triton": "cuda"}
    for name, device in needed.items():
        if device not in backends[name]["devices"]:
            problems.append(f"{name} cannot run {device} tensors: {backends[name]['reason']}")
    if not dry_run and "interpreted" in info.get("triton_cuda", ""):
        problems.append(f"triton runs CUDA tensors interpreted, not compiled: {info['triton_cuda']}")
    missing = info.get("missing_modules") or []
    note = (f"; missing python modules: {', '.join(missing)} (carry the wheels of ../shared/device/fetch-wheels.sh "
            "in .whl/)") if missing else ""
    if problems:
        return "fail", "; ".join(problems) + note
    summary = "; ".join(f"{name}: {', '.join(s['devices']) or 'none'}" for name, s in backends.items())
    return "pass", f"{summary}; extension {Path(ext).relative_to(ROOT)}{note}"


def check_backends(runner: Runner, python: str, dry_run: bool) -> dict:
    """Run :func:`probe` in a fresh process (the steps' environment) and check it (:func:`backend_verdict`)."""
    result = runner.run("backends", [python, str(Path(__file__).resolve()), "--probe"], STEP_LIMIT_S["backends"])
    step = {"seconds": result["seconds"], "log": result["log"]}
    lines = [line for line in result["output"].splitlines() if line.startswith(PROBE_TAG)]
    if result["rc"] != 0 or not lines:
        return {**step, "status": "fail", "detail": _failed_run(result, "the backend probe"),
                "tail": _tail(result["output"])}
    info = json.loads(lines[-1][len(PROBE_TAG):])
    status, detail = backend_verdict(info, dry_run)
    return {**step, "probe": info, "status": status, "detail": detail}


# ----------------------------------------------------------------------------- step 4: pytest


def parse_junit(path: Path) -> dict:
    """Counts (``tests``, ``passed``, ``failed``, ``errors``, ``skipped``) and failing test ids from JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing}


def run_pytest(runner: Runner, python: str, dry_run: bool) -> dict:
    """``pytest -q -m cuda`` (the dry run: on :data:`DRY_RUN_TESTS`); at least one test must pass on a GPU."""
    xml = runner.work_dir / "pytest_cuda.xml"
    if xml.exists():
        xml.unlink()
    cmd = [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if dry_run:
        cmd += list(DRY_RUN_TESTS)
    result = runner.run("pytest", cmd, STEP_LIMIT_S["pytest"])
    step = {"seconds": result["seconds"], "log": result["log"], "rc": result["rc"]}
    if not xml.is_file():
        return {**step, "status": "fail", "detail": _failed_run(result, "pytest") + " (no JUnit XML written)",
                "tail": _tail(result["output"])}
    counts = parse_junit(xml)
    step.update(counts)
    step["failing"] = counts["failing"][:30]
    detail = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped")
    if result["timed_out"]:
        return {**step, "status": "fail", "detail": f"ran past its {result['limit_s']:.0f} s limit ({detail} so far)"}
    if counts["failed"] or counts["errors"] or result["rc"] != 0:
        first = f"; first: {counts['failing'][0]}" if counts["failing"] else ""
        return {**step, "status": "fail", "detail": f"{detail}{first} (pytest status {result['rc']})",
                "tail": _tail(result["output"])}
    if not dry_run and counts["passed"] == 0:
        return {**step, "status": "fail", "detail": f"no CUDA test ran ({detail})"}
    return {**step, "status": "pass", "detail": detail}


# ----------------------------------------------------------------------------- step 5: memcheck


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else under $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def memcheck_verdict(rc: int, output: str, timed_out: bool = False) -> tuple[str, str]:
    """``(status, detail)`` of one compute-sanitizer run from its exit status and output.

    pass: status 0 and ``ERROR SUMMARY: 0 errors``; skipped: the sanitizer cannot run on this
    device (e.g. "Device not supported" in a sandboxed runtime) and found nothing; else fail.
    """
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    errors = int(summary[-1]) if summary else None
    if timed_out:
        return "fail", "ran past its time limit"
    if errors:
        first = re.search(r"^=========\s+(Invalid .*|.*(?:out of bounds|misaligned|Program hit).*)$", output,
                          re.MULTILINE)
        return "fail", f"{errors} memcheck errors" + (f" (first: {first.group(1).strip()[:200]})" if first else "")
    if rc == 0 and errors == 0:
        return "pass", "ERROR SUMMARY: 0 errors"
    unsupported = re.search(r"^.*(?:Device not supported|not supported on this|Unable to find injection).*$", output,
                            re.MULTILINE | re.IGNORECASE)
    if unsupported:
        return "skipped", f"compute-sanitizer cannot run here: {unsupported.group(0).strip()[:200]}"
    cases = re.search(r"^memcheck cases: .*$", output, re.MULTILINE)
    if errors == 0:
        what = cases.group(0) if cases else _last_error_line(output)
        return "fail", f"no memcheck errors, but the cases failed (status {rc}): {what}"
    return "fail", f"no ERROR SUMMARY (status {rc}): {_last_error_line(output)}"


def run_memcheck(runner: Runner, python: str, dry_run: bool) -> dict:
    """The memcheck cases under compute-sanitizer (two processes), or on the CPU without it (dry run)."""
    script = str(BENCH / "memcheck_cases.py")
    if dry_run:
        out = runner.work_dir / "memcheck_cases.json"
        result = runner.run("memcheck", [python, script, "--device", "cpu", "--small", "--json", str(out)],
                            STEP_LIMIT_S["memcheck"])
        step = {"seconds": result["seconds"], "log": result["log"], "sanitizer": None}
        n = len(json.loads(out.read_text())["cases"]) if out.is_file() else 0
        if result["rc"] != 0 or result["timed_out"]:
            return {**step, "status": "fail", "detail": _failed_run(result, "memcheck_cases.py"),
                    "tail": _tail(result["output"])}
        return {**step, "status": "pass", "cases": n,
                "detail": f"dry run: {n} cases on the CPU, without compute-sanitizer"}
    sanitizer = find_sanitizer()
    if sanitizer is None:
        return {"status": "skipped", "sanitizer": None,
                "detail": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
    try:
        version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        version = []
    runs, seconds, t_step = [], 0.0, time.monotonic()
    for cases, env in (("large,misaligned", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}), ("captured", {})):
        left = min(MEMCHECK_PROCESS_S[cases], STEP_LIMIT_S["memcheck"] - (time.monotonic() - t_step))
        tag = cases.replace(",", "_")
        out = runner.work_dir / f"memcheck_{tag}.json"
        result = runner.run(f"memcheck_{tag}", [sanitizer, "--tool", "memcheck", "--error-exitcode", str(MEMCHECK_EXIT),
                                                "--print-limit", "20", python, script, "--cases", cases,
                                                "--json", str(out)], left, env=env)
        status, detail = memcheck_verdict(result["rc"], result["output"], result["timed_out"])
        n = len(json.loads(out.read_text())["cases"]) if out.is_file() else 0
        runs.append({"cases": cases, "env": env, "status": status, "detail": detail, "rc": result["rc"],
                     "n_cases": n, "seconds": result["seconds"], "log": result["log"]})
        seconds += result["seconds"]
        if status == "skipped":  # the device refuses the sanitizer: the second run would say the same
            break
    statuses = {r["status"] for r in runs}
    status = "fail" if "fail" in statuses else ("skipped" if "skipped" in statuses else "pass")
    detail = "; ".join(f"{r['cases']} ({r['n_cases']} cases): {r['detail']}" for r in runs)
    step = {"status": status, "detail": detail, "seconds": seconds, "sanitizer": sanitizer,
            "sanitizer_version": version[-1] if version else None, "runs": runs}
    if status == "fail":
        failed = next(r for r in runs if r["status"] == "fail")
        step["tail"] = _tail(Path(failed["log"]).read_text(errors="replace"))
    return step


# ----------------------------------------------------------------------------- step 6: op benchmarks


def op_benchmarks_child(work_dir: Path, dry_run: bool) -> int:
    """Run the three op benchmarks in this process (one torch and Inductor start-up), each to its JSON."""
    failed = []
    for op, module_name in OP_BENCHES.items():
        print(f"== {module_name} ({op})", flush=True)
        try:
            module = __import__(module_name)
            argv = (DRY_RUN_OP_BENCH if dry_run else []) + ["--json", str(work_dir / f"bench_{op}.json")]
            module.main(module.make_bench, module.SIZES, argv)
        except Exception:  # noqa: BLE001 - the next benchmark still runs; the exit status says
            traceback.print_exc()
            failed.append(module_name)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def run_op_benchmarks(runner: Runner, python: str, dry_run: bool) -> dict:
    """``bench_loss``/``bench_path``/``bench_ode_step``: rows of ms, GB/s and fraction of copy per provider."""
    for op in OP_BENCHES:
        stale = runner.work_dir / f"bench_{op}.json"
        if stale.exists():
            stale.unlink()
    cmd = [python, str(Path(__file__).resolve()), "--op-benchmarks-child", "--work-dir", str(runner.work_dir)]
    result = runner.run("op_benchmarks", cmd + (["--dry-run"] if dry_run else []), STEP_LIMIT_S["op_benchmarks"])
    step = {"seconds": result["seconds"], "log": result["log"], "ops": {}}
    problems = []
    for op in OP_BENCHES:
        path = runner.work_dir / f"bench_{op}.json"
        if not path.is_file():
            problems.append(f"{op}: no results")
            continue
        data = json.loads(path.read_text())
        step["ops"][op] = {"copy_GBps": data["copy_GBps"], "dtype": data["dtype"], "rows": data["rows"],
                           "skipped": data["skipped"], "device": data["device"]}
        ran = {r["provider"] for r in data["rows"]}
        wanted = {"torch", "cpp"} if dry_run else {"torch", "triton", "cpp"}
        if not wanted <= ran:
            problems.append(f"{op}: {', '.join(sorted(wanted - ran))} did not run ({data['skipped']})")
    if result["rc"] != 0 or result["timed_out"]:
        problems.insert(0, _failed_run(result, "the op benchmarks"))
    if problems:
        return {**step, "status": "fail", "detail": "; ".join(problems), "tail": _tail(result["output"])}
    best = []
    for op, data in step["ops"].items():
        largest = max((r["shape"] for r in data["rows"]), key=_numel)
        cells = [f"{r['provider']} {r['fraction_of_copy']:.2f}" for r in data["rows"] if r["shape"] == largest]
        best.append(f"{op} at {'x'.join(map(str, largest))}: {', '.join(cells)}")
    return {**step, "status": "pass", "detail": "fraction of copy bandwidth, " + "; ".join(best)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------- step 7: throughput


def run_throughput(runner: Runner, python: str, dry_run: bool, steps: int | None) -> dict:
    """``benchmarks/throughput.py`` (GPU default: the paper's configuration); speedups over the baseline."""
    out = runner.work_dir / "throughput.json"
    if out.exists():
        out.unlink()
    cmd = [python, str(BENCH / "throughput.py"), "--json", str(out)]
    if dry_run:
        cmd += DRY_RUN_THROUGHPUT
    if steps:
        cmd += ["--steps", str(steps)]
    result = runner.run("throughput", cmd, STEP_LIMIT_S["throughput"])
    step = {"seconds": result["seconds"], "log": result["log"]}
    if result["rc"] != 0 or result["timed_out"] or not out.is_file():
        return {**step, "status": "fail", "detail": _failed_run(result, "throughput.py"),
                "tail": _tail(result["output"])}
    data = json.loads(out.read_text())
    ref = data.get("reference_s_per_step")
    modes = {}
    for name, row in data["modes"].items():
        modes[name] = {"s_per_step": row["s_per_step"], "phases_s": row["phases_s"],
                       "samples_per_s": row["samples_per_s"],
                       "sampling_TFLOPs": row.get("sampling_TFLOPs"),
                       "sampling_fraction_of_peak": row.get("sampling_fraction_of_peak"),
                       "peak_memory_GiB": row.get("peak_gpu_memory_GiB", row.get("peak_rss_GiB")),
                       "speedup": ref / row["s_per_step"] if ref else None, "config": row.get("config")}
    step["result"] = {key: data.get(key) for key in ("config", "matmul_peak_TFLOPs", "matmul_peak_measured_with",
                                                     "reference_s_per_step", "fast_s_per_step", "speedup", "best_mode",
                                                     "best_speedup", "precision", "skipped_modes")}
    step["result"]["modes"] = modes
    if "speedup" not in data:
        return {**step, "status": "fail", "detail": "no speedup in the results (reference and fast_fp32 must run)"}
    return {**step, "status": "pass",
            "detail": f"reference {ref:.3f} s/step; {data['speedup']:.2f}x at identical math (fast_fp32), "
                      f"{data['best_speedup']:.2f}x with {data['best_mode']}"}


# ----------------------------------------------------------------------------- reporting


def nvidia_smi() -> dict | None:
    """``{'name', 'driver', 'memory'}`` of GPU 0 from nvidia-smi, or None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        line = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (subprocess.SubprocessError, IndexError, OSError):
        return None
    name, driver, memory = ([p.strip() for p in line.split(",")] + ["", "", ""])[:3]
    return {"name": name, "driver": driver, "memory": memory}


def verdict(steps: dict) -> tuple[str, str]:
    """``("pass"|"fail", last line)`` from the steps' statuses."""
    failed = [name for name, s in steps.items() if s["status"] == "fail"]
    not_run = [name for name, s in steps.items() if s["status"] == "not run"]
    skipped = [name for name, s in steps.items() if s["status"] == "skipped"]
    if failed or not_run:
        parts = [f"{name}: {steps[name]['detail']}" for name in failed]
        if not_run:
            parts.append(f"not run: {', '.join(not_run)}")
        return "fail", f"gpu-check: fail ({'; '.join(parts)})"
    return "pass", "gpu-check: pass" + (f" (skipped: {', '.join(skipped)})" if skipped else "")


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def render_markdown(result: dict, json_name: str) -> str:
    """RESULTS.md: provenance, the steps, every op and throughput figure."""
    env = result["environment"]
    gpu = env.get("gpu") or {}
    smi = env.get("nvidia_smi") or {}
    lines = []
    if result["dry_run"]:
        lines += ["# GPU check: DRY RUN on the CPU", "",
                  "**Dry run** (`make gpu-check DRY_RUN=1`): tiny sizes on the CPU, to keep the script working. "
                  "No figure below measures a GPU.", ""]
    else:
        lines += [f"# GPU check: {result['device']}", ""]
    lines += [f"`make gpu-check` (`benchmarks/gpu_check.py`) on {result['date']} at commit {result['commit']}: "
              f"**{result['status']}**. Raw numbers: `{json_name}`.", "",
              "| | |", "|---|---|",
              f"| device | {result['device']}" + (f" ({gpu.get('memory_GiB')} GiB, {gpu.get('multiprocessors')} SMs, "
                                                  f"compute capability {gpu.get('capability')})" if gpu else "") + " |",
              f"| driver (nvidia-smi) | {smi.get('driver') or 'n/a'} |",
              f"| torch | {result['torch']} (CUDA {env.get('torch_cuda') or 'none'}) |",
              f"| triton | {env.get('triton') or 'n/a'} |",
              f"| python | {env.get('python')} |",
              f"| compute-sanitizer | {env.get('sanitizer') or 'n/a'} |",
              f"| host | {env.get('host_cpus')} CPUs |",
              f"| wall time | {result['wall_s']:.0f} s (budget {result['budget_s']:.0f} s) |", "",
              "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in result["steps"].items():
        detail = str(step.get("detail", "")).replace("|", "\\|")
        lines.append(f"| {name} | {step['status']} | {_fmt(step.get('seconds'), '.1f')} | {detail} |")
    ops = result["figures"].get("ops") or {}
    if ops:
        lines += ["", "## Fused ops: fraction of the device's copy bandwidth", "",
                  "Each cell: fraction of a device-to-device copy's bandwidth (bytes the op must move / time, "
                  "against `dst.copy_(src)` measured in the same process), then ms per call. "
                  "`benchmarks/bench_<op>.py`; minimum traffic as each script's docstring counts it."]
        for op, data in ops.items():
            ran = {r["provider"] for r in data["rows"]}
            providers = [p for p in ("torch", "torch.compile", "triton", "cpp") if p in ran]
            lines += ["", f"### {op} ({data['dtype']}; copy {data['copy_GBps']:.1f} GB/s)", "",
                      "| shape | " + " | ".join(providers) + " |", "|---|" + "---|" * len(providers)]
            shapes = []
            for r in data["rows"]:
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
            for shape in shapes:
                cells = []
                for p in providers:
                    row = next((r for r in data["rows"] if r["shape"] == shape and r["provider"] == p), None)
                    cells.append("" if row is None else f"{row['fraction_of_copy']:.2f} ({row['ms']:.4f} ms)")
                lines.append(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
            for p, why in (data.get("skipped") or {}).items():
                lines.append(f"\n{p}: not run ({why})")
    tp = result["figures"].get("throughput")
    if tp:
        cfg = tp.get("config") or {}
        unet = cfg.get("unet_parameters")
        lines += ["", "## Training-step throughput (`benchmarks/throughput.py`)", "",
                  f"UNet {unet / 1e6:.1f}M parameters, batch {cfg.get('batch_size')}, Euler {cfg.get('ode_steps')}, "
                  f"{cfg.get('reward')}; {cfg.get('timed_steps')} timed steps per mode after "
                  f"{cfg.get('warmup_steps_untimed')} untimed; matmul peak {_fmt(tp.get('matmul_peak_TFLOPs'), '.1f')} "
                  f"TFLOP/s ({tp.get('matmul_peak_measured_with')}).", "",
                  "| mode | s/step | sample | reward | update | samples/s | sampling TFLOP/s | peak memory GiB "
                  "| speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in tp["modes"].items():
            ph = row.get("phases_s") or {}
            cells = [f"{row['s_per_step']:.3f}", _fmt(ph.get("sample")), _fmt(ph.get("reward")),
                     _fmt(ph.get("update")), f"{row['samples_per_s']:.1f}", _fmt(row.get("sampling_TFLOPs"), ".3g"),
                     _fmt(row.get("peak_memory_GiB"), ".2f"),
                     f"{row['speedup']:.2f}x" if row.get("speedup") is not None else ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if tp.get("precision"):
            lines += ["", f"Precision of fast_recommended / fast_overlapped: {tp['precision']['reason']}."]
        for name, why in (tp.get("skipped_modes") or {}).items():
            lines.append(f"\n{name}: not run ({why})")
        if tp.get("speedup") is not None:
            lines += ["", f"Speedup over the reference-style baseline: {tp['speedup']:.2f}x at identical math "
                          f"(fast_fp32), {tp['best_speedup']:.2f}x with {tp['best_mode']}."]
    lines += ["", result["last_line"], ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """The short summary printed at the end (the last line comes after these)."""
    lines = [f"gpu-check on {result['device']} ({'dry run, ' if result['dry_run'] else ''}{result['wall_s']:.0f} s):"]
    for name, step in result["steps"].items():
        lines.append(f"  {name:<14} {step['status']:<8} {step.get('detail', '')}")
    tp = result["figures"].get("throughput")
    if tp and tp.get("speedup") is not None:
        lines.append(f"  throughput: reference {tp['reference_s_per_step']:.3f} s/step, fast_fp32 "
                     f"{tp['fast_s_per_step']:.3f} s/step ({tp['speedup']:.2f}x), best {tp['best_mode']} "
                     f"({tp['best_speedup']:.2f}x)")
    lines += [f"  wrote {result['json_path']}", f"  wrote {result['md_path']}"]
    return lines


# ----------------------------------------------------------------------------- main


def _no_gpu(message: str) -> int:
    print(f"gpu-check: {message}. `make gpu-check` validates a GPU machine (H100/H200); "
          "on a machine without one run the CPU dry run instead: `make gpu-check DRY_RUN=1`.", file=sys.stderr,
          flush=True)
    print(f"gpu-check: fail ({message})", flush=True)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU version: tiny sizes, outputs to --out-dir")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <device>.json and RESULTS.md go (default: benchmarks/results/ and "
                             "benchmarks/RESULTS.md; dry run: a new temporary folder)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="logs and raw outputs (default: build/gpu-check; dry run: <out-dir>/work)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all steps together")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of carried wheels")
    parser.add_argument("--site", type=Path, default=Path(os.environ.get("GPU_CHECK_SITE", "/tmp/site")),
                        help="where the wheels are installed (put on PYTHONPATH)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="timed steps per throughput mode")
    parser.add_argument("--commit", default=None,
                        help="commit to record, for a copied tree that is not a git checkout (default: git's)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps not to run (reported as skipped): "
                                                   f"{', '.join(STEPS)}")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op-benchmarks-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        print(PROBE_TAG + json.dumps(probe()), flush=True)
        return 0
    if args.op_benchmarks_child:
        return op_benchmarks_child(args.work_dir, args.dry_run)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"--skip: unknown steps {', '.join(sorted(skip - set(STEPS)))} (known: {', '.join(STEPS)})")

    t_start = time.monotonic()
    try:  # here, not at the top: a python without torch gets the message, not a traceback
        import torch
        from _meta import provenance
    except ImportError as err:
        return _no_gpu(f"{sys.executable} cannot import torch ({err}); set GPU_PYTHON to a python with torch")
    if not args.dry_run and not torch.cuda.is_available():
        return _no_gpu(f"no CUDA device is visible to torch {torch.__version__} "
                       f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'})")

    python = sys.executable
    if args.dry_run:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="orwcfm-gpu-check-dry-"))
        work_dir = args.work_dir or out_dir / "work"
    else:
        out_dir = args.out_dir or BENCH / "results"
        work_dir = args.work_dir or ROOT / "build" / "gpu-check"
    md_path = out_dir / "RESULTS.md" if (args.out_dir or args.dry_run) else BENCH / "RESULTS.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1" if args.dry_run else "0"}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path everywhere, also on a machine with a GPU
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    runner = Runner(work_dir, args.budget_s, env)
    print(f"gpu-check{' (dry run on the CPU)' if args.dry_run else ''}: python {python}, torch {torch.__version__}; "
          f"budget {args.budget_s:.0f} s; logs in {work_dir}", flush=True)

    steps: dict[str, dict] = {}
    stop_reason = None
    for i, name in enumerate(STEPS, 1):
        t0 = time.monotonic()
        runner.reserve_s = 0.0 if args.dry_run else sum(STEP_RESERVE_S[s] for s in STEPS[i:] if s not in skip)
        if stop_reason:
            step = {"status": "not run", "detail": stop_reason}
        elif name in skip:
            step = {"status": "skipped", "detail": "--skip"}
        elif runner.remaining() < 5:
            step = {"status": "not run", "detail": f"the {args.budget_s:.0f} s budget was spent"}
        elif name == "wheels":
            step = ({"status": "skipped", "detail": "dry run: the .venv has the packages"} if args.dry_run
                    else install_wheels(runner, python, args.wheels, args.site))
            if step["status"] == "pass":
                runner.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(args.site)] + paths[1:])
        elif name == "build":
            step = ({"status": "skipped", "detail": "dry run: the .venv's editable install built orwcfm_fast._C"}
                    if args.dry_run else build_extension(runner, python))
        elif name == "backends":
            step = check_backends(runner, python, args.dry_run)
        elif name == "pytest":
            step = run_pytest(runner, python, args.dry_run)
        elif name == "memcheck":
            step = run_memcheck(runner, python, args.dry_run)
        elif name == "op_benchmarks":
            step = run_op_benchmarks(runner, python, args.dry_run)
        else:
            step = run_throughput(runner, python, args.dry_run, args.throughput_steps)
        step.setdefault("seconds", time.monotonic() - t0)
        steps[name] = step
        print(f"[{i}/{len(STEPS)}] {name}: {step['status']} ({step['seconds']:.1f} s) {step.get('detail', '')}",
              flush=True)
        if step["status"] == "fail" and step.get("tail"):
            print("    " + step["tail"].replace("\n", "\n    "), flush=True)
        if step["status"] == "fail" and name in ("wheels", "build", "backends"):
            stop_reason = f"stopped: {name} failed"

    probe_info = steps.get("backends", {}).get("probe") or {}
    smi = None if args.dry_run else nvidia_smi()
    if args.dry_run:
        device = "cpu (dry run)"
    else:
        device = (probe_info.get("gpu") or {}).get("name") or (smi or {}).get("name") or "cuda device"
    status, last_line = verdict(steps)
    memcheck = steps.get("memcheck", {})
    result = {
        **provenance(device),
        "status": status,
        "last_line": last_line,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "wall_s": time.monotonic() - t_start,
        "environment": {"python": probe_info.get("python", platform.python_version()), "python_executable": python,
                        "torch_cuda": torch.version.cuda, "triton": probe_info.get("triton"),
                        "gpu": probe_info.get("gpu"), "nvidia_smi": smi, "host_cpus": os.cpu_count(),
                        "sanitizer": memcheck.get("sanitizer_version") or memcheck.get("sanitizer")},
        "steps": {name: {k: v for k, v in step.items() if k not in ("probe", "ops", "result")}
                  for name, step in steps.items()},
        "figures": {"ops": steps.get("op_benchmarks", {}).get("ops") or {},
                    "throughput": steps.get("throughput", {}).get("result")},
        "probe": probe_info,
    }
    if args.commit:
        result["commit"] = args.commit
    json_path = out_dir / f"{slugify(device)}.json"
    result["json_path"], result["md_path"] = str(json_path), str(md_path)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        json_name = str(json_path.relative_to(ROOT))
    except ValueError:
        json_name = json_path.name
    md_path.write_text(render_markdown(result, json_name))
    for line in summary_lines(result):
        print(line)
    print(last_line, flush=True)
    return 0 if status == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
