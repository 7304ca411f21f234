"""Build and install orwcfm_fast.

The package is pure Python plus the optional extension ``orwcfm_fast._C``: fused C++ (CPU)
and CUDA kernels of the library's ops, registered as ``torch.ops.orwcfm_fast.*`` (sources
in csrc/ and kernels/, listed in csrc/sources.txt). Building it imports torch, so install
with ``pip install --no-build-isolation -e .`` into an environment that has torch.

Environment variables:

- ``ORWCFM_FAST_NO_EXT=1``: skip the extension (pure-Python install; the ops use torch).
- ``ORWCFM_FAST_NO_CUDA=1``: build only the C++ (CPU) kernels. Without it the CUDA kernels
  are built whenever torch is a CUDA build and nvcc is found (``CUDA_HOME``, else the
  toolkit around ``nvcc`` on PATH, else /usr/local/cuda).
- ``TORCH_CUDA_ARCH_LIST``: target GPUs; default: the visible GPUs, or "9.0" (H100) if none.
- ``MAX_JOBS``: parallel compile jobs for ninja (default 2).
- ``ORWCFM_FAST_CPU_ARCH``: ``-march`` of the C++ kernels (default x86-64-v3 on x86_64; empty: none).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
SOURCES_LIST = "csrc/sources.txt"  # the one list of extension sources (CMakeLists.txt reads it too)
DEFAULT_CUDA_ARCH = "9.0"
DEFAULT_MAX_JOBS = "2"


def _version() -> str:
    for line in (ROOT / "orwcfm_fast" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _log(message: str) -> None:
    print(f"orwcfm_fast setup: {message}", file=sys.stderr)


def _sources() -> tuple[list[str], list[str]]:
    """``(cpp_sources, cuda_sources)`` from csrc/sources.txt, paths relative to this directory."""
    cpp, cuda = [], []
    for raw in (ROOT / SOURCES_LIST).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not (ROOT / line).is_file():
            raise FileNotFoundError(f"{SOURCES_LIST} lists {line}, which does not exist")
        (cuda if line.endswith(".cu") else cpp).append(line)
    return cpp, cuda


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with, or None; sets CUDA_HOME for torch.utils.cpp_extension.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc); pick a directory that really has the toolkit.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if (Path(explicit) / "bin" / "nvcc").exists() else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return str(home)
    return None


def _put_ninja_on_path() -> None:
    """Let torch find a pip-installed ninja even when the venv is not activated."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def _cpu_arch_flags() -> list[str]:
    """``-march`` for the C++ kernels: x86-64-v3 (AVX2 + FMA, any x86 CPU since 2013) on x86_64.

    GCC vectorises the kernels' loops to the target's vector width: with AVX2 the CPU RK4 update
    of 128x3x32x32 floats took 0.45 ms instead of 0.61 (2 cores). ``ORWCFM_FAST_CPU_ARCH`` overrides the
    value (empty: the compiler's default, for older CPUs).
    """
    arch = os.environ.get("ORWCFM_FAST_CPU_ARCH")
    if arch is None:
        arch = "x86-64-v3" if platform.machine().lower() in {"x86_64", "amd64"} else ""
    return [f"-march={arch}"] if arch.strip() else []


def _cpu_parallel_flags(torch) -> list[str]:
    """``-fopenmp`` when torch's intra-op parallel backend is OpenMP (Linux builds); else none.

    ``at::parallel_for`` is a header template: with the OpenMP backend its parallel region is
    an ``#pragma omp parallel`` compiled into the extension, which without ``-fopenmp`` is
    ignored and every "parallel" kernel runs on one thread. The OpenMP runtime is the one torch
    already loaded (libgomp.so.1, matched by soname), so the thread pool and
    ``torch.set_num_threads`` are shared with torch's own ops.
    """
    if sys.platform == "win32" or not getattr(torch._C, "has_openmp", False):
        return []
    return ["-fopenmp"]


def _extension():
    """``(ext_modules, cmdclass)`` for orwcfm_fast._C, or ``([], {})`` with ORWCFM_FAST_NO_EXT=1."""
    if _flag("ORWCFM_FAST_NO_EXT"):
        _log("ORWCFM_FAST_NO_EXT is set: pure-Python install, no orwcfm_fast._C")
        return [], {}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            "orwcfm_fast setup: building orwcfm_fast._C needs torch at build time. Install torch first and "
            "run pip with --no-build-isolation, or set ORWCFM_FAST_NO_EXT=1 for a pure-Python install."
        ) from e

    os.environ.setdefault("MAX_JOBS", DEFAULT_MAX_JOBS)
    _put_ninja_on_path()
    cuda_home = None if _flag("ORWCFM_FAST_NO_CUDA") else _cuda_home()
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported before CUDA_HOME was set
    if not cpp_extension.is_ninja_available():
        raise SystemExit(
            "orwcfm_fast setup: ninja is required to build orwcfm_fast._C (parallel builds). "
            "Run `pip install ninja`, or set ORWCFM_FAST_NO_EXT=1 for a pure-Python install."
        )

    cpp_sources, cuda_sources = _sources()
    with_cuda = bool(cuda_sources) and not _flag("ORWCFM_FAST_NO_CUDA") and torch.version.cuda is not None
    if with_cuda and cuda_home is None:
        _log("no CUDA toolkit (nvcc) found: building the C++ kernels only")
        with_cuda = False
    elif not with_cuda:
        reason = "ORWCFM_FAST_NO_CUDA is set" if _flag("ORWCFM_FAST_NO_CUDA") else "torch is not a CUDA build"
        _log(f"{reason}: building the C++ kernels only")

    include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]
    # Only method operators and per-op headers (ATen/ops/*.h) are used: keeps compiles short.
    macros = ["-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
    parallel_flags = _cpu_parallel_flags(torch)
    extra_compile_args = {"cxx": ["-O3", *_cpu_arch_flags(), *parallel_flags, *macros]}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
        _log(f"building C++ and CUDA kernels with {cuda_home} for TORCH_CUDA_ARCH_LIST="
             f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", *macros]
        ext = cpp_extension.CUDAExtension(
            "orwcfm_fast._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=parallel_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "orwcfm_fast._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=parallel_flags,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="orwcfm_fast",
    version=_version(),
    description="Fast, correct ORW-CFM-W2: online reward-weighted flow matching fine-tuning with W2 regularisation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["orwcfm_fast", "orwcfm_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "numpy",
        "scipy",
        "pot",
        "torchcfm",
        "open_clip_torch",
        "pillow",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "wandb": ["wandb"],
        "test": ["pytest", "hypothesis", "torchdiffeq"],
        # text-to-image flows (SD3 / SD3.5 / Flux with LoRA); imported only when a pipeline is used
        "diffusers": ["diffusers>=0.35", "transformers>=5", "peft>=0.17", "accelerate", "safetensors"],
        # TensorBoard logging (config use_tensorboard): scalars and sample grids each epoch
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["orwcfm-fast=orwcfm_fast.cli:main"]},
)
