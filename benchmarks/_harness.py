"""Shared machinery of the per-op benchmarks (bench_loss.py, bench_path.py, bench_ode_step.py).

Each script describes its op as a :class:`OpBench` (how to build inputs of a size, how many
bytes one call must move, and one callable per provider); :func:`main` times every provider
at every size, reports milliseconds and achieved GB/s, and on CUDA the fraction of a
device-to-device copy's bandwidth measured in the same process (the ops are memory-bound:
the copy is their ceiling).

Providers: ``torch`` (the eager reference, :mod:`orwcfm_fast.ops.reference`),
``torch.compile`` (the same reference through Inductor), ``triton`` and ``cpp`` (the
library's kernels). Providers that cannot run here are listed with the reason. On CPU the
Triton interpreter is a correctness tool, not a timing, so ``triton`` is skipped there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _meta import provenance  # noqa: E402

from orwcfm_fast import ops  # noqa: E402

__all__ = ["OpBench", "time_call", "copy_bandwidth", "library_providers", "main"]


@dataclass
class OpBench:
    """One op to benchmark.

    Attributes:
        name: the op's name (results file ``benchmarks/results/bench_<name>_<device>.json``).
        make_inputs: ``(shape, dtype, device) -> inputs`` (anything the providers accept).
        bytes_moved: ``(shape, dtype) -> int``: the minimum bytes one call reads and writes.
        providers: ``{provider: fn(inputs)}``; a provider whose fn is a ``str`` is unavailable
            here and the string says why.
    """

    name: str
    make_inputs: Callable[[tuple, torch.dtype, torch.device], Any]
    bytes_moved: Callable[[tuple, torch.dtype], int]
    providers: dict[str, Callable[[Any], Any] | str]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, min_time: float = 0.2, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` over repeats filling about ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max(5, min_time / once), 1000))
    samples = []
    if device.type == "cuda":
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Achieved bytes/s of ``dst.copy_(src)`` (read + write) for ``nbytes`` buffers on ``device``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / seconds


def library_providers(device: torch.device, backend_call: Callable[[str], Callable[[Any], Any]],
                      reference: Callable[[Any], Any]) -> dict[str, Callable[[Any], Any] | str]:
    """The four providers for one op: eager reference, compiled reference, triton, cpp.

    Args:
        device: where the benchmark runs.
        backend_call: ``backend -> fn(inputs)`` calling the public op with that backend.
        reference: ``fn(inputs)`` calling the pure-PyTorch reference.
    """
    compiled = torch.compile(reference, dynamic=False)
    providers: dict[str, Callable[[Any], Any] | str] = {"torch": reference, "torch.compile": compiled}
    status = ops.available_backends()
    for name in ("triton", "cpp"):
        if device.type == "cpu" and name == "triton":
            providers[name] = "the Triton interpreter is a correctness tool on CPU, not a timing"
        elif device.type in status[name].devices:
            providers[name] = backend_call(name)
        else:
            providers[name] = f"unavailable: {status[name].reason}"
    return providers


def _fmt_shape(shape: tuple) -> str:
    return "x".join(str(d) for d in shape)


def main(bench_factory: Callable[[torch.device], OpBench], sizes: dict[str, list[tuple]], argv=None) -> dict:
    """Parse the common flags, time every provider at every size, print a table, write JSON.

    Args:
        bench_factory: ``device -> OpBench``.
        sizes: ``{"cpu": [...], "cuda": [...]}`` shapes ``[B, ...]`` per device type.
    """
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--quick", action="store_true", help="first two sizes only")
    parser.add_argument("--providers", default=None, help="comma-separated subset of providers")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bench = bench_factory(device)
    shapes = sizes["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        shapes = shapes[:2]
    wanted = set(args.providers.split(",")) if args.providers else set(bench.providers)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    copy_bps = copy_bandwidth(device, nbytes=(1 << 28) if device.type == "cuda" else (1 << 26))
    print(f"{bench.name} on {device_name}, {args.dtype}; device copy: {copy_bps / 1e9:.1f} GB/s")

    rows = []
    skipped = {name: fn for name, fn in bench.providers.items() if isinstance(fn, str) and name in wanted}
    for shape in shapes:
        inputs = bench.make_inputs(shape, dtype, device)
        nbytes = bench.bytes_moved(shape, dtype)
        for name, fn in bench.providers.items():
            if name not in wanted or isinstance(fn, str):
                continue
            seconds = time_call(lambda: fn(inputs), device)
            gbps = nbytes / seconds / 1e9
            rows.append({"shape": list(shape), "provider": name, "ms": seconds * 1e3, "GB/s": gbps,
                         "fraction_of_copy": nbytes / seconds / copy_bps})
            print(f"  {_fmt_shape(shape):>16}  {name:>18}  {seconds * 1e3:9.4f} ms  {gbps:8.2f} GB/s"
                  f"  {100 * nbytes / seconds / copy_bps:5.1f}% of copy")
    for name, why in skipped.items():
        print(f"  {name}: skipped ({why})")

    result = {**provenance(device_name), "op": bench.name, "dtype": args.dtype, "copy_GBps": copy_bps / 1e9,
              "rows": rows, "skipped": skipped}
    path = args.json or ROOT / "benchmarks" / "results" / f"bench_{bench.name}_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result
