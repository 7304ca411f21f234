"""``make gpu-check``: validate the library on a fresh GPU machine and record every figure.

A lent GPU machine runs one command for at most 600 s and has about 15 minutes in all, start-up
included, so the work is split in two stages (``--stage``, ``make gpu-check GPU_CHECK_STAGE=...``),
one command each, every step a subprocess with its own time limit inside the stage's budget
(``--budget-s``; :data:`DEFAULT_BUDGET_S`):

- ``check`` (the default; 540 s): wheels, build, backends, pytest, memcheck;
- ``bench`` (300 s): wheels, build, backends, op_benchmarks, throughput; on the machine the first
  call left warm, the wheels and the build are reused (stamps), so it spends its time measuring;
  on a fresh one it installs and builds again (give it ``--budget-s 540`` then);
- ``all``: every step in one command (a machine of your own; the dry run's default).

Steps:

1. ``wheels``: install the wheels carried in ``.whl/`` (``../shared/device/fetch-wheels.sh``:
   torchcfm, POT, open_clip, diffusers, ... which the GPU image lacks) into ``--site`` (default
   ``/tmp/site``), put on ``PYTHONPATH`` of every later step; no pip run when the same set is
   installed already. Then every module in :data:`NEEDED_MODULES` must be found: a missing one is a
   **setup error** that names the modules and says whether ``.whl/`` was empty or lacked them.
2. ``build``: ``python setup.py build_ext --inplace`` with ``MAX_JOBS`` = the CPU count, so
   ``orwcfm_fast/_C*.so`` is built against this python's torch, inside this tree; not run again
   when ``build/gpu-check-build.json`` says the present ``.so`` was built from the same sources
   with the same torch (a copied tree's new file times would make ninja rebuild everything).
3. ``backends``: ``orwcfm_fast.ops.available_backends()`` under ``TRITON_INTERPRET=0`` must list
   ``cuda`` for ``cpp`` and ``triton`` (compiled, not interpreted), and ``orwcfm_fast._C`` must
   be loaded from this tree; otherwise the check stops here.
4. ``pytest``: ``python -m pytest -q -m cuda FILE`` once per file with CUDA tests
   (:func:`cuda_test_files`), each with its own limit (:data:`CUDA_TEST_FILES`), so one slow file
   cannot eat the others' time and one file that fails to import does not stop the rest. Counts
   from each file's JUnit XML, or, for a file killed at its limit, from pytest's progress output.
   At least one test must pass. A file that cannot be collected is a **collection error** naming
   the file and the error (e.g. ``ModuleNotFoundError: No module named 'torchcfm'``).
5. ``memcheck``: ``compute-sanitizer --tool memcheck`` over ``benchmarks/memcheck_cases.py``
   (large, misaligned and graph-captured cases of every op on both backends; two processes: one
   with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so overruns leave their allocation, one with the
   caching allocator that capture needs). Pass: exit status 0 and ``ERROR SUMMARY: 0 errors``.
   Skipped (not passed) when compute-sanitizer is not found or refuses this device ("Device not
   supported", e.g. a sandboxed runtime; :func:`memcheck_verdict`).
6. ``op_benchmarks``: ``bench_loss.py``, ``bench_path.py``, ``bench_ode_step.py`` (one process):
   each provider's time and fraction of the device's copy bandwidth.
7. ``throughput``: ``benchmarks/throughput.py`` at its GPU default, the paper's configuration
   (CIFAR UNet, batch 128, Euler 100, CLIP ViT-B/32 with random weights): seconds per step of the
   reference-style baseline and each fast mode, and the speedups.

A step that runs past its limit, or that the budget leaves no time to start, is **timed out** /
**not run**: the run is incomplete, which says nothing about the code, and the report keeps what
had finished (e.g. the tests that ran before the limit).

It writes ``<out>/<device>.json`` (every step and figure; default ``benchmarks/results/``, the
device name slugified, e.g. ``nvidia-h200.json``) and a report, ``benchmarks/RESULTS.md`` (or
``<out>/RESULTS.md`` with ``--out-dir``), with device, date, commit, torch, driver (nvidia-smi) and
every figure; logs and each step's raw output go to ``--work-dir`` (default ``build/gpu-check``).
A stage's report also carries the other stage's steps and figures from an earlier call at the same
commit when that call's record is in the work folder (the machine stayed warm) or is given with
``--merge FILE``. The last line printed is one of (exit status in brackets):

- ``gpu-check: pass`` [0], with ``(skipped: ...)`` when a step could not run here;
- ``gpu-check: fail (...)`` [1]: a step found a fault (a test, memcheck, the build, a benchmark);
- ``gpu-check: incomplete (timed out: ...; not run: ...)`` [3]: nothing failed, but not all ran;
- ``gpu-check: setup error (...)`` [4]: the machine lacks what the check needs (modules, wheels);
- ``gpu-check: collection error (...)`` [5]: pytest could not import a test file.

Without a CUDA device it stops at once with exit status 2.

``--dry-run`` (``make gpu-check DRY_RUN=1``, CI): the same steps on the CPU, tiny sizes, under
``TRITON_INTERPRET=1`` and with no GPU visible: no wheels installed or build (the ``.venv``'s
editable install; the needed modules are still looked for), the ``cpp`` CPU backend required,
``-m cuda`` on ``tests/test_ops_cpp.py`` (which skips them all), the memcheck cases on the CPU
without the sanitizer, ``--quick`` CPU benchmarks. Its outputs go to ``--out-dir`` (default: a new
temporary folder), never to ``benchmarks/results/``: its numbers measure nothing.

Run: ``python benchmarks/gpu_check.py [--dry-run] [--stage check|bench|all] [--out-dir DIR] [--skip STEP,...]``.
"""

from __future__ import annotations

import argparse
import hashlib
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
#: the steps of each stage (one command of a lent machine each; see the module docstring)
STAGES = {"check": ("wheels", "build", "backends", "pytest", "memcheck"),
          "bench": ("wheels", "build", "backends", "op_benchmarks", "throughput"),
          "all": STEPS}
#: each stage's default budget: "check" fills a 600 s command less ~60 s for the python start, the report and the
#: transfers; "bench" is what ~15 minutes of device time leaves after the machine's start-up and the first call
DEFAULT_BUDGET_S = {"check": 540, "bench": 300, "all": 840}
# Time estimates on an H100/H200 host (16 CPUs). No GPU run has been timed yet: these are reasoned from what each
# step does; each limit is ~1.5-2x its estimate, so a slow step reads "timed out" instead of starving the later ones.
#   wheels         cold ~15 s: pip --no-index --no-deps of 11 wheels (diffusers, ~3 MB, the largest), no bytecode;
#                  warm ~1 s: the site folder's stamp matches, no pip; then a find_spec of NEEDED_MODULES (~1 s)
#   build          cold ~90-150 s: nvcc of 3 .cu files (ATen headers, one arch: the visible GPU's) and g++ of 5 .cpp
#                  files in parallel (MAX_JOBS=16): the slowest nvcc file sets the time; warm ~0 s (source stamp)
#   backends       ~10-20 s: python, torch and triton imports, CUDA initialisation, the extension's load
#   pytest         ~300 s cold (CUDA_TEST_FILES: per file), less when warm (Triton's and Inductor's caches)
#   memcheck       ~60-120 s: two sanitizer processes (MEMCHECK_PROCESS_S); memcheck slows kernels 10-100x and
#                  tracks every allocation, and Triton compiles its kernels again under it
#   op_benchmarks  ~60-120 s: 3 ops x 6 shapes x 4 providers at ~0.3 s of timing each (the loss: 3 more, its
#                  w2_weights variants, no new compile), plus one Inductor compile (torch.compile provider) per op
#                  and shape and the Triton JIT
#   throughput     ~120-180 s: 4-5 modes x (1 untimed + 5 timed) steps of batch 128 x Euler 100 on the CIFAR UNet
#                  (~1-3 s a step), CUDA-graph captures, the random-weight CLIP
# So "check" cold: ~15 + 120 + 15 + 300 + 90 = ~540 s, the budget: the last test files may time out on a fresh
# machine (reported as such, with the files and tests that finished); "bench" warm: ~20 + 90 + 150 = ~260 s.
#: each step's own limit in seconds (GPU run); a step also stops when its stage's budget is spent
STEP_LIMIT_S = {"wheels": 60, "build": 240, "backends": 60, "pytest": 480, "memcheck": 150, "op_benchmarks": 150,
                "throughput": 240}
#: time kept back for each later step of the stage (the least it is useful with): a slow step times out rather than
#: starve the ones after it
STEP_RESERVE_S = {"wheels": 5, "build": 60, "backends": 15, "pytest": 120, "memcheck": 120, "op_benchmarks": 45,
                  "throughput": 90}
#: memcheck's two sanitizer processes, each with its own limit inside the step's: the first (no caching
#: allocator, large and misaligned cases) must not spend the time of the second (graph-captured cases)
MEMCHECK_PROCESS_S = {"large,misaligned": 90, "captured": 60}
#: the files of CUDA tests (``pytest.mark.cuda``) in the order they run, the library's own ops first, each with its
#: limit in seconds (~1.5x the estimate; every file also pays ~5-10 s of python, torch and collection); a file not
#: listed that has CUDA tests runs after these with :data:`PYTEST_FILE_DEFAULT_S`
CUDA_TEST_FILES = {
    "tests/test_ops_cpp.py": 90,        # 257 tests, kernels prebuilt, fp64 references on the CPU, 1 Inductor: ~45 s
    "tests/test_ops_triton.py": 150,    # 126 tests, ~40-60 Triton JIT compiles cold (~1-2 s each), 1 Inductor: ~90 s
    "tests/test_graph_sampler.py": 60,  # 22 tests: small models, CUDA-graph captures: ~30 s
    "tests/test_overlap.py": 60,        # 3 tests: short overlapped training runs: ~30 s
    "tests/test_t2i_cuda.py": 150,      # 12 tests: tiny SD3.5 / Flux written once, 2 Inductor-compiled LoRA: ~100 s
}
PYTEST_FILE_DEFAULT_S = 60
#: the dry run's limit for every step: tiny sizes, but a loaded 2-core CI machine (imports alone can take a minute)
DRY_RUN_LIMIT_S = 300
#: a test file holds CUDA tests when its source applies this marker (the ``cuda`` marker of pyproject.toml)
CUDA_MARK = re.compile(r"\bpytest\.mark\.cuda\b")
#: op name -> benchmark script (module in benchmarks/)
OP_BENCHES = {"orw_cfm_w2_loss": "bench_loss", "conditional_path": "bench_path", "ode_step": "bench_ode_step"}
#: the wheels ../shared/device/fetch-wheels.sh carries (the GPU image lacks them): distribution -> import name
CARRIED_WHEELS = {"torchcfm": "torchcfm", "torchdyn": "torchdyn", "torchsde": "torchsde", "torchcde": "torchcde",
                  "trampoline": "trampoline", "POT": "ot", "open_clip_torch": "open_clip", "ftfy": "ftfy",
                  "wcwidth": "wcwidth", "diffusers": "diffusers", "importlib_metadata": "importlib_metadata"}
#: what the tests and benchmarks import beyond torch: first what the carried wheels provide, then what the GPU image
#: has itself (fetch-wheels.sh's list; the test extra and the text-to-image extra included)
NEEDED_MODULES = ("torchcfm", "ot", "open_clip", "ftfy", "diffusers",
                  "pytest", "hypothesis", "torchdiffeq", "transformers", "peft", "safetensors", "tqdm", "sklearn",
                  "PIL", "scipy", "matplotlib")
#: the dry run's ``-m cuda`` subset: a file of CUDA tests (each skips on the CPU); the JUnit path is what it checks
DRY_RUN_TESTS = ("tests/test_ops_cpp.py",)
DRY_RUN_THROUGHPUT = ["--device", "cpu", "--quick", "--batch-size", "2", "--ode-steps", "2", "--steps", "1",
                      "--warmup", "0", "--modes", "reference,fast_fp32"]
DRY_RUN_OP_BENCH = ["--device", "cpu", "--quick", "--providers", "torch,cpp"]
MEMCHECK_EXIT = 86  # compute-sanitizer's exit status when it found errors (--error-exitcode)
PROBE_TAG = "GPU_CHECK_PROBE "
MODULES_TAG = "GPU_CHECK_MISSING_MODULES "
#: the last line's verdict -> exit status (2: no CUDA device, before any step)
EXIT_STATUS = {"pass": 0, "fail": 1, "incomplete": 3, "setup error": 4, "collection error": 5}
#: where the build step records what the present orwcfm_fast/_C*.so was built from
BUILD_STAMP = Path("build") / "gpu-check-build.json"


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


def step_limit(name: str, dry_run: bool) -> float:
    """A step's own time limit: :data:`STEP_LIMIT_S` on a GPU, :data:`DRY_RUN_LIMIT_S` in the dry run."""
    return DRY_RUN_LIMIT_S if dry_run else STEP_LIMIT_S[name]


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


def missing_modules() -> list[str]:
    """:data:`NEEDED_MODULES` that this process cannot find (``importlib.util.find_spec``; nothing is imported)."""
    import importlib.util

    return [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]


def wheels_verdict(missing: list[str], wheels: list[str], wheel_dir: Path, done: str | None = None,
                   dry_run: bool = False) -> tuple[str, str]:
    """``(status, detail)`` of the wheels step from the modules still missing after it and the wheels it had.

    Missing modules are a setup error, never "skipped": the tests that need them would skip or fail to
    import, and the run would report the code for what the machine lacks. ``done``: what the step did.
    """
    if done is None:
        done = f"{len(wheels)} wheels from {wheel_dir}" if wheels else f"no wheels ({wheel_dir} is empty or absent)"
    if not missing:
        return "pass", f"{done}; all {len(NEEDED_MODULES)} needed modules found"
    carried = [m for m in missing if m in CARRIED_WHEELS.values()]
    image = [m for m in missing if m not in carried]
    parts = [f"modules missing after the wheels step: {', '.join(missing)}"]
    if dry_run:
        parts.append("the .venv lacks them (make venv installs them)")
    elif wheels:
        parts.append(f"{wheel_dir} has {len(wheels)} wheels but none provides them")
    else:
        parts.append(f"{wheel_dir} was empty or absent")
    if carried and not dry_run:
        parts.append(f"{', '.join(carried)}: the GPU image lacks them; fetch their wheels with "
                     "../shared/device/fetch-wheels.sh into .whl/ and carry .whl")
    if image and not dry_run:
        parts.append(f"{', '.join(image)}: expected in this python's image; add their wheels to .whl/")
    return "setup error", "; ".join(parts) + f" ({done})"


def find_missing_modules(runner: Runner, python: str, env: dict | None = None) -> tuple[list[str] | None, dict]:
    """:func:`missing_modules` in a fresh process with the steps' environment (``env`` on top): ``(missing, run)``;
    ``missing`` is None when the process did not say."""
    result = runner.run("wheels_modules", [python, str(Path(__file__).resolve()), "--missing-modules"], 60, env=env)
    lines = [line for line in result["output"].splitlines() if line.startswith(MODULES_TAG)]
    return (json.loads(lines[-1][len(MODULES_TAG):]) if lines else None), result


def install_wheels(runner: Runner, python: str, wheel_dir: Path, site: Path, dry_run: bool = False) -> dict:
    """Install ``wheel_dir/*.whl`` into ``site`` (``--no-index --no-deps``) unless the same set already is, then
    check that every needed module is found (:func:`wheels_verdict`). The dry run installs nothing and checks."""
    wheels = [] if dry_run else (sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else [])
    step: dict = {"wheels": [w.name for w in wheels], "seconds": 0.0}
    note = "dry run: nothing installed (the .venv's packages)" if dry_run else ""
    env = None
    if wheels:
        step["site"] = str(site)
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site), *runner.env.get("PYTHONPATH", "").split(
            os.pathsep)[1:]])}
        listing = [[w.name, w.stat().st_size] for w in wheels]
        stamp = site / ".gpu-check-wheels.json"
        try:
            same = stamp.is_file() and json.loads(stamp.read_text()) == listing
        except json.JSONDecodeError:
            same = False
        if same:
            note = f"{len(wheels)} wheels already installed in {site}"
        else:
            result = runner.run("wheels", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                           *map(str, wheels)], STEP_LIMIT_S["wheels"])
            step.update(seconds=result["seconds"], log=result["log"])
            if result["rc"] != 0 or result["timed_out"]:
                return {**step, "status": "setup error", "detail": _failed_run(result, "pip install") +
                        f" (installing {len(wheels)} wheels from {wheel_dir} into {site})",
                        "tail": _tail(result["output"])}
            stamp.write_text(json.dumps(listing) + "\n")
            note = f"{len(wheels)} wheels installed into {site}"
    missing, result = find_missing_modules(runner, python, env)
    step["seconds"] += result["seconds"]
    if missing is None:
        return {**step, "status": "setup error", "detail": _failed_run(result, "the module check") +
                f" ({note or 'no wheels'})", "tail": _tail(result["output"])}
    status, detail = wheels_verdict(missing, step["wheels"], wheel_dir, note or None, dry_run)
    return {**step, "status": status, "detail": detail, "missing_modules": missing}


# ----------------------------------------------------------------------------- step 2: build


def source_digest(root: Path = ROOT) -> str:
    """sha256 of what ``orwcfm_fast._C`` is built from: setup.py and every file under csrc/ and kernels/."""
    h = hashlib.sha256()
    files = [root / "setup.py", *sorted(p for d in ("csrc", "kernels") for p in (root / d).rglob("*") if p.is_file())]
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _built(root: Path) -> list[list]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted((root / "orwcfm_fast").glob("_C*.so"))]


def build_extension(runner: Runner, python: str, toolchain: dict | None = None, root: Path = ROOT) -> dict:
    """``setup.py build_ext --inplace`` (``MAX_JOBS`` = CPU count), unless :data:`BUILD_STAMP` says the present
    ``orwcfm_fast/_C*.so`` was built from the same sources (:func:`source_digest`) with the same ``toolchain``
    (python, torch, CUDA, GPU)."""
    jobs = str(os.cpu_count() or 2)
    stamp_path = root / BUILD_STAMP
    wanted = {"sources": source_digest(root), **(toolchain or {})}
    try:
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    except json.JSONDecodeError:
        stamp = {}
    built = _built(root)
    if built and stamp.get("built_from") == wanted and stamp.get("so") == built:
        return {"status": "pass", "seconds": 0.0, "max_jobs": int(jobs), "rebuilt": False,
                "detail": f"{', '.join(b[0] for b in built)} already built from these sources with this torch "
                          f"({stamp_path.relative_to(root)}): not rebuilt"}
    result = runner.run("build", [python, "setup.py", "build_ext", "--inplace"], STEP_LIMIT_S["build"],
                        env={"MAX_JOBS": jobs})
    step = {"seconds": result["seconds"], "log": result["log"], "max_jobs": int(jobs), "rebuilt": True}
    if result["timed_out"]:
        return {**step, "status": "timed out", "detail": _failed_run(result, "setup.py build_ext --inplace"),
                "tail": _tail(result["output"])}
    if result["rc"] != 0:
        return {**step, "status": "fail", "detail": _failed_run(result, "setup.py build_ext --inplace"),
                "tail": _tail(result["output"])}
    built = _built(root)
    if not built:
        return {**step, "status": "fail", "detail": "setup.py build_ext --inplace left no orwcfm_fast/_C*.so",
                "tail": _tail(result["output"])}
    stamp_path.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps({"built_from": wanted, "so": built}, indent=1) + "\n")
    return {**step, "status": "pass", "detail": f"built {', '.join(b[0] for b in built)} with MAX_JOBS={jobs}"}


def toolchain_identity(torch) -> dict:
    """What a built extension depends on besides its sources: python, torch and its CUDA, the GPU, the arch list."""
    gpu = None
    if torch.cuda.is_available():
        gpu = "%s sm_%d%d" % (torch.cuda.get_device_name(0), *torch.cuda.get_device_capability(0))
    return {"python": sys.executable, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": gpu,
            "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}


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
    result = runner.run("backends", [python, str(Path(__file__).resolve()), "--probe"], step_limit("backends", dry_run))
    step = {"seconds": result["seconds"], "log": result["log"]}
    lines = [line for line in result["output"].splitlines() if line.startswith(PROBE_TAG)]
    if result["rc"] != 0 or not lines:
        return {**step, "status": "timed out" if result["timed_out"] else "fail",
                "detail": _failed_run(result, "the backend probe"),
                "tail": _tail(result["output"])}
    info = json.loads(lines[-1][len(PROBE_TAG):])
    status, detail = backend_verdict(info, dry_run)
    return {**step, "probe": info, "status": status, "detail": detail}


# ----------------------------------------------------------------------------- step 4: pytest


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """``tests/test_*.py`` whose source applies the ``cuda`` marker: :data:`CUDA_TEST_FILES` order, then by name.

    Read from the sources, not from a pytest collection, which would import every test module (and
    the optional packages they use) and take as long as a small test file run.
    """
    found = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                   if CUDA_MARK.search(p.read_text(errors="replace")))
    order = list(CUDA_TEST_FILES)
    return sorted(found, key=lambda f: (order.index(f) if f in order else len(order), f))


def _module_file(dotted: str) -> str:
    """JUnit's name of an uncollectable module, ``tests.test_trainer``, -> ``tests/test_trainer.py``."""
    return dotted.replace(".", "/") + ".py"


def parse_junit(path: Path) -> dict:
    """Counts (``tests``, ``passed``, ``failed``, ``errors``, ``skipped``), failing test ids, skip reasons and
    collection errors (``[{file, reason}]``, not counted as tests) from JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing, collection_errors, skip_reasons = [], [], {}
    for case in root.iter("testcase"):
        children = {child.tag: child for child in case}
        error = children.get("error")
        if error is not None and error.get("message") == "collection failure":
            lines = [ln[1:].strip() for ln in (error.text or "").splitlines() if ln.startswith("E ")]
            collection_errors.append({"file": _module_file(case.get("name", "")),
                                      "reason": lines[-1] if lines else (error.text or "").strip()[-200:]})
            continue
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in children:
            counts["failed"] += 1
            failing.append(name)
        elif error is not None:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in children:
            counts["skipped"] += 1
            why = children["skipped"].get("message", "")
            skip_reasons[why] = skip_reasons.get(why, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing, "collection_errors": collection_errors, "skip_reasons": skip_reasons}


#: pytest -q's progress lines: one character per finished test (then ``[ NN%]``, absent on a line cut short)
_PROGRESS = re.compile(r"^([.FEsxX]+)(?:\s+\[\s*\d+%\])?\s*$")
_PROGRESS_KIND = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "skipped", "X": "passed"}


def progress_counts(output: str) -> dict:
    """What ``pytest -q`` had finished, from its progress characters (before its first ``====`` section): the
    counts of a run killed before it could write its JUnit XML."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for line in output.splitlines():
        if line.startswith("====="):
            break
        m = _PROGRESS.match(line)
        if m:
            for ch in m.group(1):
                counts[_PROGRESS_KIND[ch]] += 1
                counts["tests"] += 1
    return counts


_COLLECTING = re.compile(r"^_+ ERROR collecting (\S+) _+$")
_SUMMARY_ERROR = re.compile(r"^ERROR (\S+\.py)(?: - (.+))?$")


def collection_errors(output: str) -> list[dict]:
    """``[{file, reason}]`` of the test files pytest could not collect, from its output: each ``ERROR collecting
    FILE`` section's last ``E`` line (e.g. ``ModuleNotFoundError: No module named 'torchcfm'``), and any file only
    the short summary names (``ERROR tests/x.py - reason``)."""
    found: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        m = _COLLECTING.match(line)
        if m:
            current = m.group(1)
            found[current] = ""
            continue
        if line.startswith("=" * 5) or re.match(r"^_{5,} ", line):
            current = None
        elif current and line.startswith("E "):
            found[current] = line[1:].strip()
        s = _SUMMARY_ERROR.match(line)
        if s and "::" not in s.group(1) and not found.get(s.group(1)):
            found[s.group(1)] = s.group(2) or found.get(s.group(1), "")
    return [{"file": f, "reason": why or "(no error line)"} for f, why in found.items()]


def pytest_file_result(file: str, result: dict, xml: Path | None) -> dict:
    """One file's ``pytest -q -m cuda`` from its run (:meth:`Runner.run`) and JUnit XML: status and counts.

    pass; ``fail`` (a test failed or errored, also before a time-out); ``collection error`` (the file
    could not be imported: :func:`collection_errors`); ``timed out`` (killed at its limit: the counts
    are what had finished, from the progress output).
    """
    row = {"file": file, "seconds": round(result["seconds"], 1), "limit_s": round(result["limit_s"]),
           "rc": result["rc"]}
    junit = parse_junit(xml) if xml is not None and xml.is_file() and not result["timed_out"] else None
    counts = junit or progress_counts(result["output"])
    row.update({k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")})
    row["failing"] = (junit or {}).get("failing", [])[:30]
    row["skip_reasons"] = (junit or {}).get("skip_reasons", {})
    errors = (junit or {}).get("collection_errors") or []
    from_output = collection_errors(result["output"])
    by_file = {e["file"]: e for e in errors}
    for e in from_output:  # the output's E line is the telling one; JUnit may only say "collection failure"
        if e["reason"] != "(no error line)" or e["file"] not in by_file:
            by_file[e["file"]] = e
    row["collection_errors"] = list(by_file.values())
    done = f"{row['passed']} passed, {row['failed']} failed, {row['errors']} errors, {row['skipped']} skipped"
    if row["failed"] or row["errors"]:
        first = f"; first: {row['failing'][0]}" if row["failing"] else ""
        cut = f", then ran past its {row['limit_s']} s limit" if result["timed_out"] else ""
        row.update(status="fail", detail=f"{file}: {done}{first}{cut}")
    elif row["collection_errors"]:
        row.update(status="collection error", detail="; ".join(
            f"collection error in {e['file']}: {e['reason']}" for e in row["collection_errors"]))
    elif result["timed_out"]:
        row.update(status="timed out", detail=f"{file} ran past its {row['limit_s']} s limit after {row['tests']} "
                                              f"tests ({done})")
    elif result["rc"] not in (0, 5):  # 5: no test collected (the file's CUDA tests were all deselected)
        row.update(status="fail", detail=f"{file}: pytest exited with status {result['rc']} ({done}): "
                                         f"{_last_error_line(result['output'])}")
    else:
        row.update(status="pass", detail=f"{file}: {done}")
    if row["status"] != "pass":
        row["tail"] = _tail(result["output"])
    return row


def _files(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


def pytest_step(files: list[dict], dry_run: bool) -> dict:
    """The pytest step from its files' rows (:func:`pytest_file_result`; ``status: not run`` for a file the budget
    left no time for): fail > collection error > timed out > pass; on a GPU at least one test must pass."""
    counts = {k: sum(f.get(k, 0) for f in files) for k in ("tests", "passed", "failed", "errors", "skipped")}
    done = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped in {_files(sum(f['status'] != 'not run' for f in files))}")
    by_status = {}
    for f in files:
        by_status.setdefault(f["status"], []).append(f)
    problems = [f["detail"] for status in ("fail", "collection error", "timed out") for f in by_status.get(status, [])]
    if by_status.get("not run"):
        problems.append("not run (budget spent): " + ", ".join(f["file"] for f in by_status["not run"]))
    step = {**counts, "seconds": sum(f.get("seconds", 0.0) for f in files), "files": files,
            "failing": [t for f in files for t in f.get("failing", [])][:30],
            "collection_errors": [e for f in files for e in f.get("collection_errors", [])]}
    for status in ("fail", "collection error"):
        if by_status.get(status):
            tail = next(f["tail"] for f in by_status[status] if f.get("tail"))
            return {**step, "status": status, "detail": "; ".join(problems) + f" ({done})", "tail": tail}
    if by_status.get("timed out") or by_status.get("not run"):
        return {**step, "status": "timed out", "detail": "; ".join(problems) + f" ({done})"}
    if not dry_run and counts["passed"] == 0:
        return {**step, "status": "fail", "detail": f"no CUDA test ran ({done})"}
    all_skipped = [f["file"] for f in files if f["tests"] and f["skipped"] == f["tests"]]
    note = f"; every test skipped in {', '.join(all_skipped)}" if all_skipped and not dry_run else ""
    return {**step, "status": "pass", "detail": done + note}


def run_pytest(runner: Runner, python: str, dry_run: bool, files: list[str] | None = None) -> dict:
    """``pytest -q -m cuda FILE`` for each of ``files`` (default :func:`cuda_test_files`; the dry run:
    :data:`DRY_RUN_TESTS`), one process each with its own limit, then :func:`pytest_step`."""
    if files is None:
        files = list(DRY_RUN_TESTS) if dry_run else cuda_test_files()
    rows, t_step = [], time.monotonic()
    for file in files:
        left = step_limit("pytest", dry_run) - (time.monotonic() - t_step)
        if runner.remaining() - runner.reserve_s < 10 or left < 10:
            rows.append({"file": file, "status": "not run", "detail": f"{file}: no time left in the budget",
                         "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0})
            continue
        tag = Path(file).stem
        xml = runner.work_dir / f"pytest_{tag}.xml"
        if xml.exists():
            xml.unlink()
        cmd = [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", file]
        # the dry run's files skip every CUDA test, but a loaded CI machine may take a while to import them
        limit = left if dry_run else min(left, CUDA_TEST_FILES.get(file, PYTEST_FILE_DEFAULT_S))
        result = runner.run(f"pytest_{tag}", cmd, limit)
        rows.append({**pytest_file_result(file, result, xml), "log": result["log"]})
    return pytest_step(rows, dry_run)


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


#: what compute-sanitizer prints (``========= Error: ...``) when it cannot instrument this device or setup; it then
#: counts the refused first CUDA call (e.g. ``cudaErrorNoDevice`` on ``cudaMalloc``) in its ERROR SUMMARY
SANITIZER_REFUSALS = (
    "Device not supported",  # ... Please refer to the "Supported Devices" section of the sanitizer documentation
    "Failed to initialize WDDM debugger interface",  # WSL without the debugger interface enabled
    "Unable to find injection library",  # a toolkit without the sanitizer's libsanitizer-collection.so
)
#: the sanitizer's line when the program never made a CUDA call it could instrument (exit status 255)
SANITIZER_NOTHING_RAN = "Target application terminated before first instrumented API call"
_REFUSAL = re.compile(r"^=*\s*Error: .*(?:%s).*$" % "|".join(map(re.escape, SANITIZER_REFUSALS)), re.MULTILINE)
#: an access error memcheck found in a kernel: a real finding, whatever else the output says
_ACCESS_ERROR = re.compile(r"^=========\s+(Invalid (?:__global__|__shared__|__local__|__generic__)? ?\w+ .*"
                           r"|.*(?:is out of bounds|is misaligned|Misaligned).*)$", re.MULTILINE)
_CASE_LINE = re.compile(r"^\s+(ok|FAIL)\s", re.MULTILINE)


def memcheck_verdict(rc: int, output: str, timed_out: bool = False) -> tuple[str, str]:
    """``(status, detail)`` of one compute-sanitizer run from its exit status and output.

    In this order: an access error in a kernel (``Invalid __global__ read``, out of bounds,
    misaligned) is ``fail``; the sanitizer refusing the device or setup (:data:`SANITIZER_REFUSALS`)
    is ``skipped``, although its ERROR SUMMARY counts the refused first call as an error; a program
    that made no CUDA call under it (:data:`SANITIZER_NOTHING_RAN`) is ``skipped`` unless it crashed
    (a traceback: ``fail``); a case that did not match the reference is ``fail``; killed at its limit
    is ``timed out`` (with the cases done); ``pass`` needs status 0 and ``ERROR SUMMARY: 0 errors``.
    """
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    errors = int(summary[-1]) if summary else None
    access = _ACCESS_ERROR.search(output)
    if access:
        count = f"{errors} memcheck errors" if errors else "memcheck errors"
        return "fail", f"{count} (first: {access.group(1).strip()[:200]})"
    refusal = _REFUSAL.search(output)
    if refusal:
        counted = f"; its ERROR SUMMARY counts the refused calls: {errors}" if errors else ""
        return "skipped", f"compute-sanitizer cannot run here: {refusal.group(0).strip(' =')[:200]}{counted}"
    cases = _CASE_LINE.findall(output)
    failed_cases = cases.count("FAIL")
    if SANITIZER_NOTHING_RAN in output:
        own = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith("=====")]
        if "Traceback" in output:
            return "fail", f"the cases stopped before their first CUDA call: {_last_error_line(chr(10).join(own))}"
        return "skipped", (f"compute-sanitizer checked nothing: {SANITIZER_NOTHING_RAN}"
                           + (f" (the program's last line: {own[-1][:200]})" if own else ""))
    if failed_cases:
        return "fail", f"{failed_cases} of {len(cases)} cases did not match the reference"
    if timed_out:
        return "timed out", (f"ran past its time limit after {len(cases)} cases (no access error before; "
                             "ERROR SUMMARY not reached)")
    if errors:
        first = re.search(r"^=========\s+(Program hit .*|Error: .*)$", output, re.MULTILINE)
        return "fail", f"{errors} memcheck errors" + (f" (first: {first.group(1).strip()[:200]})" if first else "")
    if rc == 0 and errors == 0:
        return "pass", "ERROR SUMMARY: 0 errors"
    summary_line = re.search(r"^memcheck cases: .*$", output, re.MULTILINE)
    if errors == 0:
        what = summary_line.group(0) if summary_line else _last_error_line(output)
        return "fail", f"no memcheck errors, but the cases failed (status {rc}): {what}"
    return "fail", f"no ERROR SUMMARY (status {rc}): {_last_error_line(output)}"


def run_memcheck(runner: Runner, python: str, dry_run: bool) -> dict:
    """The memcheck cases under compute-sanitizer (two processes), or on the CPU without it (dry run)."""
    script = str(BENCH / "memcheck_cases.py")
    if dry_run:
        out = runner.work_dir / "memcheck_cases.json"
        result = runner.run("memcheck", [python, script, "--device", "cpu", "--small", "--json", str(out)],
                            step_limit("memcheck", dry_run))
        step = {"seconds": result["seconds"], "log": result["log"], "sanitizer": None}
        n = len(json.loads(out.read_text())["cases"]) if out.is_file() else 0
        if result["timed_out"]:
            return {**step, "status": "timed out", "detail": _failed_run(result, "memcheck_cases.py") +
                    f" after {len(_CASE_LINE.findall(result['output']))} cases"}
        if result["rc"] != 0:
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
    status = next(s for s in ("fail", "timed out", "skipped", "pass") if s in statuses)
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
    result = runner.run("op_benchmarks", cmd + (["--dry-run"] if dry_run else []), step_limit("op_benchmarks", dry_run))
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
    if result["timed_out"]:  # the ops that finished keep their figures
        problems = [p for p in problems if not p.endswith(": no results")]
        if not problems:
            unfinished = [op for op in OP_BENCHES if op not in step["ops"]]
            return {**step, "status": "timed out", "detail": _failed_run(result, "the op benchmarks") +
                    f"; finished: {', '.join(step['ops']) or 'none'}; not finished: {', '.join(unfinished)}"}
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
    result = runner.run("throughput", cmd, step_limit("throughput", dry_run))
    step = {"seconds": result["seconds"], "log": result["log"]}
    if result["timed_out"]:
        return {**step, "status": "timed out", "detail": _failed_run(result, "throughput.py") + " (no figures)",
                "tail": _tail(result["output"])}
    if result["rc"] != 0 or not out.is_file():
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
    """``(status, last line)`` from the steps' statuses: the first of ``setup error``, ``fail``,
    ``collection error``, ``incomplete`` (a step timed out, or was not run) and ``pass``; the last line
    names every other step that did not pass (exit statuses: :data:`EXIT_STATUS`)."""
    by_status: dict[str, list[str]] = {}
    for name, step in steps.items():
        by_status.setdefault(step["status"], []).append(name)
    unfinished = [f"{status}: {', '.join(by_status[status])}" for status in ("timed out", "not run")
                  if by_status.get(status)]
    problems = ("setup error", "fail", "collection error")
    for status in problems:
        if by_status.get(status):
            parts = [f"{name}: {steps[name]['detail']}" for name in by_status[status]]
            parts += [f"also {other}: {', '.join(by_status[other])}" for other in problems
                      if other != status and by_status.get(other)]
            return status, f"gpu-check: {status} ({'; '.join(parts + unfinished)})"
    if unfinished:
        return "incomplete", f"gpu-check: incomplete ({'; '.join(unfinished)})"
    skipped = by_status.get("skipped")
    return "pass", "gpu-check: pass" + (f" (skipped: {', '.join(skipped)})" if skipped else "")


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def _steps_table(steps: dict) -> list[str]:
    """A markdown table of the steps, then one of the CUDA test files when the pytest step has them."""
    lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in steps.items():
        detail = str(step.get("detail", "")).replace("|", "\\|")
        lines.append(f"| {name} | {step['status']} | {_fmt(step.get('seconds'), '.1f')} | {detail} |")
    files = (steps.get("pytest") or {}).get("files") or []
    if files:
        lines += ["", "| CUDA test file | status | passed | failed | errors | skipped | seconds (limit) |",
                  "|---|---|---|---|---|---|---|"]
        for f in files:
            cells = [str(f.get(k, "")) for k in ("passed", "failed", "errors", "skipped")]
            lines.append(f"| {f['file']} | {f['status']} | " + " | ".join(cells) +
                         f" | {_fmt(f.get('seconds'), '.0f')} ({_fmt(f.get('limit_s'), '.0f')}) |")
    return lines


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
    lines += [f"`make gpu-check` (`benchmarks/gpu_check.py`, stage `{result.get('stage', 'all')}`) on {result['date']} "
              f"at commit {result['commit']}: **{result['status']}**. Raw numbers: `{json_name}`.", "",
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
              "## Steps", ""]
    lines += _steps_table(result["steps"])
    for stage, earlier in (result.get("earlier") or {}).items():
        lines += ["", f"## Steps of the earlier `--stage {stage}` call ({earlier.get('date')}, "
                      f"{earlier.get('wall_s', 0):.0f} s): **{earlier.get('status')}**", ""]
        lines += _steps_table(earlier.get("steps") or {})
        lines += ["", f"Its last line: `{earlier.get('last_line')}`"]
    figures_from = result.get("figures_from") or {}
    ops = result["figures"].get("ops") or {}
    if ops:
        lines += ["", "## Fused ops: fraction of the device's copy bandwidth" +
                  (f" (the earlier `{figures_from['ops']}` call)" if "ops" in figures_from else ""), "",
                  "Each cell: fraction of a device-to-device copy's bandwidth (bytes the op must move / time, "
                  "against `dst.copy_(src)` measured in the same process), then ms per call. "
                  "`benchmarks/bench_<op>.py`; minimum traffic as each script's docstring counts it."]
        for op, data in ops.items():
            ran = {r["provider"] for r in data["rows"]}
            known = ("torch", "torch.compile", "triton", "cpp")
            # then any further providers in the benchmark's order (bench_loss's "<provider>+w2_weights")
            providers = [p for p in known if p in ran] + [p for p in dict.fromkeys(r["provider"] for r in data["rows"])
                                                          if p not in known]
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
        lines += ["", "## Training-step throughput (`benchmarks/throughput.py`)" +
                  (f" (the earlier `{figures_from['throughput']}` call)" if "throughput" in figures_from else ""), "",
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
    lines = [f"gpu-check on {result['device']} (stage "
             f"{result.get('stage', 'all')}, {result['wall_s']:.0f} s of {result['budget_s']:.0f}):"]
    for name, step in result["steps"].items():
        lines.append(f"  {name:<14} {step['status']:<9} {step.get('detail', '')}")
        for f in step.get("files") or []:
            if f["status"] != "pass" or len(step["files"]) > 1:
                lines.append(f"    {f['status']:<9} {f.get('detail', f['file'])} ({_fmt(f.get('seconds'), '.0f')} s)")
    for stage, earlier in (result.get("earlier") or {}).items():
        lines.append(f"  earlier --stage {stage} call ({earlier.get('date')}): {earlier.get('last_line')}")
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


def earlier_calls(stage: str, commit: str, device: str, paths: list[Path]) -> tuple[dict, list[str]]:
    """The records of other stages' calls (``{stage: record}``) at this ``commit`` on this ``device``, from ``paths``
    (a call's own ``stage-<stage>.json`` in the work folder, or a report's JSON, with the calls it merged), and notes
    on what was not merged."""
    earlier: dict[str, dict] = {}
    notes = []
    if stage == "all":
        return earlier, notes
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            notes.append(f"{path}: not merged, unreadable ({err})")
            continue
        for record in [data, *(data.get("earlier") or {}).values()]:
            other = record.get("stage")
            if other in (None, stage, "all") or other in earlier:
                continue
            if record.get("commit") != commit or record.get("device") != device:
                notes.append(f"{path}: stage {other} not merged: commit {record.get('commit')} on "
                             f"{record.get('device')}, this call {commit} on {device}")
                continue
            earlier[other] = {k: record.get(k) for k in ("stage", "date", "commit", "device", "status", "last_line",
                                                         "wall_s", "budget_s", "steps", "figures")}
    return earlier, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU version: tiny sizes, outputs to --out-dir")
    parser.add_argument("--stage", choices=list(STAGES), default=None,
                        help="check: wheels, build, backends, pytest, memcheck (the GPU default); bench: wheels, "
                             "build, backends, op_benchmarks, throughput; all: every step (the dry run's default)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <device>.json and RESULTS.md go (default: benchmarks/results/ and "
                             "benchmarks/RESULTS.md; dry run: a new temporary folder)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="logs and raw outputs (default: build/gpu-check; dry run: <out-dir>/work)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time for all the stage's steps together (default: " +
                             ", ".join(f"{k} {v:.0f} s" for k, v in DEFAULT_BUDGET_S.items()) + ")")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of carried wheels")
    parser.add_argument("--site", type=Path, default=Path(os.environ.get("GPU_CHECK_SITE", "/tmp/site")),
                        help="where the wheels are installed (put on PYTHONPATH)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="timed steps per throughput mode")
    parser.add_argument("--commit", default=None,
                        help="commit to record, for a copied tree that is not a git checkout (default: git's)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="a JSON of an earlier call (other stage, same commit and device) to report with this one; "
                             "the work folder's records of earlier calls are merged without it")
    parser.add_argument("--skip", default="", help=f"comma-separated steps not to run (reported as skipped): "
                                                   f"{', '.join(STEPS)}")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--missing-modules", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op-benchmarks-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        print(PROBE_TAG + json.dumps(probe()), flush=True)
        return 0
    if args.missing_modules:
        print(MODULES_TAG + json.dumps(missing_modules()), flush=True)
        return 0
    if args.op_benchmarks_child:
        return op_benchmarks_child(args.work_dir, args.dry_run)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"--skip: unknown steps {', '.join(sorted(skip - set(STEPS)))} (known: {', '.join(STEPS)})")
    stage = args.stage or ("all" if args.dry_run else "check")
    stage_steps = STAGES[stage]
    budget_s = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[stage]

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
    runner = Runner(work_dir, budget_s, env)
    print(f"gpu-check{' (dry run on the CPU)' if args.dry_run else ''}, stage {stage} ({', '.join(stage_steps)}): "
          f"python {python}, torch {torch.__version__}; budget {budget_s:.0f} s; logs in {work_dir}", flush=True)

    steps: dict[str, dict] = {}
    stop_reason = None
    for i, name in enumerate(stage_steps, 1):
        t0 = time.monotonic()
        runner.reserve_s = 0.0 if args.dry_run else sum(STEP_RESERVE_S[s] for s in stage_steps[i:] if s not in skip)
        if stop_reason:
            step = {"status": "not run", "detail": stop_reason}
        elif name in skip:
            step = {"status": "skipped", "detail": "--skip"}
        elif runner.remaining() - runner.reserve_s < 5:
            step = {"status": "not run", "detail": f"the {budget_s:.0f} s budget was spent"}
        elif name == "wheels":
            step = install_wheels(runner, python, args.wheels, args.site, args.dry_run)
            if step.get("site"):  # also after a setup error: what was installed is used
                runner.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), step["site"]] + paths[1:])
        elif name == "build":
            step = ({"status": "skipped", "detail": "dry run: the .venv's editable install built orwcfm_fast._C"}
                    if args.dry_run else build_extension(runner, python, toolchain_identity(torch)))
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
        print(f"[{i}/{len(stage_steps)}] {name}: {step['status']} ({step['seconds']:.1f} s) {step.get('detail', '')}",
              flush=True)
        if step["status"] != "pass" and step.get("tail"):
            print("    " + step["tail"].replace("\n", "\n    "), flush=True)
        if step["status"] in ("fail", "timed out") and name in ("build", "backends"):
            stop_reason = f"stopped: {name} {'failed' if step['status'] == 'fail' else 'timed out'}"

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
        "stage": stage,
        "status": status,
        "last_line": last_line,
        "exit_status": EXIT_STATUS[status],
        "dry_run": args.dry_run,
        "budget_s": budget_s,
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
    (work_dir / f"stage-{stage}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    candidates = [work_dir / f"stage-{other}.json" for other in STAGES if other != stage] + list(args.merge)
    earlier, notes = earlier_calls(stage, result["commit"], device, candidates)
    if earlier:
        result["earlier"] = earlier
        for record in earlier.values():  # figures this call did not measure come from the earlier one
            for key in ("ops", "throughput"):
                if not result["figures"][key] and (record.get("figures") or {}).get(key):
                    result["figures"][key] = record["figures"][key]
                    result.setdefault("figures_from", {})[key] = record["stage"]
    if notes:
        result["merge_notes"] = notes
    json_path = out_dir / f"{slugify(device)}.json"
    result["json_path"], result["md_path"] = str(json_path), str(md_path)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        json_name = str(json_path.relative_to(ROOT))
    except ValueError:
        json_name = json_path.name
    md_path.write_text(render_markdown(result, json_name))
    for line in summary_lines(result) + [f"  note: {n}" for n in notes]:
        print(line)
    print(last_line, flush=True)
    return EXIT_STATUS[status]


if __name__ == "__main__":
    sys.exit(main())
