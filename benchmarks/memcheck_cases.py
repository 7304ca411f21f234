"""The workload ``make gpu-check`` runs under ``compute-sanitizer --tool memcheck``: every fused op, every backend.

Each op (``orw_cfm_w2_loss`` forward and backward, ``conditional_path`` with and without path
noise, ``ode_step`` with RK4's four stages) runs on each library backend (``cpp``, ``triton``) in
three kinds of case, the ones that reach the kernels' edge paths:

- ``large``: rows of 1,000,003 elements (many blocks per row, an odd tail) and 2500 short rows
  (more rows than one block reduces); float32 and bfloat16.
- ``misaligned``: every input starts one element into its own allocation (storage offset 1,
  not 16-byte aligned) and ends exactly at the allocation's end, so a vector load that runs past
  the last element leaves the allocation; plus mixed offsets (1, 2, 3) across the inputs.
- ``captured``: the call (for the loss: forward and ``autograd.grad``) captured in a
  ``torch.cuda.graph``, its inputs refilled, the graph replayed.

Every result is compared with the PyTorch reference (:mod:`orwcfm_fast.ops.reference`) on the
same device, loosely (relative to the result's largest magnitude: 1e-4 for float32, 2e-2 for
bfloat16): the sanitizer is the check, the comparison catches garbage that stays in bounds.

For memcheck to see an overrun at a tensor's end, each tensor must be its own allocation:
run the ``large`` and ``misaligned`` cases with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``. Graph
capture needs the caching allocator, so the ``captured`` cases run in a second process
without it (``benchmarks/gpu_check.py`` does both)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITON_INTERPRET=0 compute-sanitizer --tool memcheck \\
        --error-exitcode 1 python benchmarks/memcheck_cases.py --cases large,misaligned
    TRITON_INTERPRET=0 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/memcheck_cases.py --cases captured

``--device cpu --small`` runs the same cases, CPU-sized and without capture, on the backends
that run CPU tensors here (``make gpu-check DRY_RUN=1``). Exit status 0 when every case ran
and matched; ``--json PATH`` writes the list of cases with their results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orwcfm_fast import ops  # noqa: E402

CASE_KINDS = ("large", "misaligned", "captured")
RK4_B = [1 / 6, 1 / 3, 1 / 3, 1 / 6]
DT = 0.01
ALPHA = 0.5
SIGMA = 0.3
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Mismatch(AssertionError):
    """A backend's result is not close to the reference's."""


def _unaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``x`` starting ``offset`` elements into its own allocation, ending at its end."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    out = buf[offset:].view(x.shape)
    out.copy_(x)
    return out


def _randn(shape, gen, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _rand(n, gen, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``max |actual - expected| <= tol * max |expected|`` (NaN or Inf anywhere fails)."""
    tol = TOLERANCE.get(expected.dtype, 1e-4)
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise Mismatch(f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    if not (err <= tol * scale):  # also catches NaN
        raise Mismatch(f"{what}: max error {err:.3g} > {tol:g} x max |expected| {scale:.3g}")


# ----------------------------------------------------------------------------- the three ops


def _loss_inputs(shape, seed, device, dtype):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [_randn(shape, gen, device, dtype), _randn(shape, gen, device, dtype), _randn(shape, gen, device, dtype),
            _rand(shape[0], gen, device)]


def _loss_run(backend):
    def run(v, u, v_ref, w):
        v = v.detach().requires_grad_(True)
        fn = ops.orw_cfm_w2_loss_reference if backend == "torch" else (
            lambda *a: ops.orw_cfm_w2_loss(*a, backend=backend))
        loss, fm, w2 = fn(v, u, v_ref, w, ALPHA)
        (grad,) = torch.autograd.grad(loss, v)
        return [loss.detach(), fm.detach(), w2.detach(), grad]

    return run


def _path_inputs(shape, seed, device, dtype):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [_randn(shape, gen, device, dtype), _randn(shape, gen, device, dtype), _rand(shape[0], gen, device),
            _randn(shape, gen, device, dtype)]


def _path_run(backend, sigma):
    def run(x_0, x_1, t, noise):
        noise = noise if sigma > 0 else None
        if backend == "torch":
            return list(ops.conditional_path_reference(x_0, x_1, t, sigma, noise))
        return list(ops.conditional_path(x_0, x_1, t, sigma, noise, backend=backend))

    return run


def _ode_inputs(shape, seed, device, dtype):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [_randn(shape, gen, device, dtype)] + [_randn(shape, gen, device, dtype) for _ in RK4_B]


def _ode_run(backend):
    def run(x, *ks):
        if backend == "torch":
            return [ops.ode_step_reference(x, list(ks), RK4_B, DT)]
        return [ops.ode_step(x, list(ks), RK4_B, DT, backend=backend)]

    return run


#: op -> (make_inputs(shape, seed, device, dtype) -> list of tensors, backend -> run(*inputs) -> list of outputs)
OPS = {
    "orw_cfm_w2_loss": (_loss_inputs, _loss_run),
    "conditional_path": (_path_inputs, lambda b: _path_run(b, 0.0)),
    "conditional_path_noise": (_path_inputs, lambda b: _path_run(b, SIGMA)),
    "ode_step": (_ode_inputs, _ode_run),
}


def _shapes(kind: str, small: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of each case of ``kind``."""
    if kind == "large":
        if small:
            return [((3, 10_003), torch.float32), ((1100, 7), torch.float32), ((2, 10_001), torch.bfloat16)]
        return [((3, 1_000_003), torch.float32), ((2500, 37), torch.float32), ((2, 1_000_001), torch.bfloat16)]
    if kind == "misaligned":
        return [((3, 5003), torch.float32), ((4, 1001), torch.bfloat16)]
    return [((8, 3, 32, 32), torch.float32)]


def _check(name: str, backend: str, inputs: list, what: str) -> None:
    _, runner = OPS[name]
    got = runner(backend)(*inputs)
    expected = runner("torch")(*inputs)
    for i, (a, e) in enumerate(zip(got, expected)):
        _close(a, e, f"{what} output {i}")


def _misaligned(name: str, backend: str, shape, dtype, device) -> None:
    make, _ = OPS[name]
    base = make(shape, 3, device, dtype)
    _check(name, backend, [_unaligned(x, 1) for x in base], "offset 1")
    offsets = [1 + (j % 3) for j in range(len(base))]  # 1, 2, 3, ...: inputs in different phases
    mixed = [_unaligned(x, o) for x, o in zip(base, offsets)]
    _check(name, backend, mixed, f"offsets {offsets}")


def _captured(name: str, backend: str, shape, dtype, device) -> None:
    make, runner = OPS[name]
    run = runner(backend)
    static = make(shape, 0, device, dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the capture: JIT compiles, autograd and allocator state
            run(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(*static)
    fresh = make(shape, 1, device, dtype)
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    expected = runner("torch")(*fresh)
    for i, (a, e) in enumerate(zip(out, expected)):
        _close(a, e, f"graph replay output {i}")
    eager = run(*fresh)
    for i, (a, e) in enumerate(zip(out, eager)):
        if not torch.equal(a, e):
            raise Mismatch(f"graph replay output {i} differs from the eager call on the same inputs")


def run_cases(device: torch.device, backends: list[str], kinds: list[str], small: bool) -> list[dict]:
    """Run every (backend, op, kind, shape) case; returns one record per case (``ok``, ``error``)."""
    records = []
    for backend in backends:
        for name in OPS:
            for kind in kinds:
                for shape, dtype in _shapes(kind, small):
                    t0 = time.perf_counter()
                    record = {"backend": backend, "op": name, "kind": kind, "shape": list(shape),
                              "dtype": str(dtype).removeprefix("torch."), "ok": True, "error": None}
                    try:
                        if kind == "large":
                            make, _ = OPS[name]
                            _check(name, backend, make(shape, 2, device, dtype), "large")
                        elif kind == "misaligned":
                            _misaligned(name, backend, shape, dtype, device)
                        else:
                            _captured(name, backend, shape, dtype, device)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                    except Exception as err:  # noqa: BLE001 - every case is reported, then the exit status says
                        record.update(ok=False, error=f"{type(err).__name__}: {err}")
                    record["seconds"] = time.perf_counter() - t0
                    records.append(record)
                    shape_s = "x".join(map(str, shape))
                    print(f"  {'ok  ' if record['ok'] else 'FAIL'} {backend:>6} {name:<22} {kind:<10} {shape_s:>12}"
                          f" {record['dtype']:<8} {record['seconds']:6.2f} s"
                          + ("" if record["ok"] else f"  {record['error']}"), flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: cpp,triton on CUDA; those that run CPU tensors on CPU)")
    parser.add_argument("--cases", default=None, help=f"comma-separated of {', '.join(CASE_KINDS)} "
                        "(default: all on CUDA; large,misaligned on CPU, which has no graphs)")
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--json", type=Path, default=None, help="write the case records here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("memcheck_cases: no CUDA device", file=sys.stderr)
        return 2
    status = ops.available_backends()
    if args.backends:
        backends = args.backends.split(",")
    elif device.type == "cuda":
        backends = ["cpp", "triton"]
    else:
        backends = [b for b in ("cpp", "triton") if "cpu" in status[b].devices]
    unavailable = [b for b in backends if device.type not in status[b].devices]
    if unavailable:
        for b in unavailable:
            print(f"memcheck_cases: backend {b} cannot run {device.type} tensors: {status[b].reason}", file=sys.stderr)
        return 2
    kinds = args.cases.split(",") if args.cases else (list(CASE_KINDS) if device.type == "cuda"
                                                      else ["large", "misaligned"])
    unknown = [k for k in kinds if k not in CASE_KINDS]
    if unknown or ("captured" in kinds and device.type != "cuda"):
        print(f"memcheck_cases: bad --cases {args.cases!r} (known: {', '.join(CASE_KINDS)}; captured needs CUDA)",
              file=sys.stderr)
        return 2

    print(f"memcheck cases on {device.type}: backends {', '.join(backends)}; cases {', '.join(kinds)}", flush=True)
    records = run_cases(device, backends, kinds, args.small)
    failed = [r for r in records if not r["ok"]]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device.type, "backends": backends, "kinds": kinds,
                                         "cases": records}, indent=2) + "\n")
    print(f"memcheck cases: {len(records) - len(failed)} of {len(records)} matched the reference"
          + (f"; {len(failed)} failed" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
