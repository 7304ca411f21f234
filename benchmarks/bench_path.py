"""Benchmark the fused conditional path: ``x_t = t x_1 + (1 - t) x_0``, ``u_t = x_1 - x_0``.

Minimum traffic: read ``x_0``, ``x_1``, write ``x_t``, ``u_t``: 4 * B * D elements (sigma = 0,
the trainer's default). Providers: torch (eager reference), torch.compile, triton, cpp.
Run: ``python benchmarks/bench_path.py [--device cpu] [--quick]``.
"""

from __future__ import annotations

import torch
from _harness import OpBench, library_providers, main

from orwcfm_fast import ops

SIZES = {
    "cpu": [(256, 2), (128, 1, 8, 8), (128, 3, 32, 32), (32, 3, 64, 64)],
    "cuda": [(512, 2), (128, 1, 8, 8), (128, 3, 32, 32), (512, 3, 32, 32), (128, 3, 64, 64), (512, 3, 64, 64)],
}


def _inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x_0 = torch.randn(shape, generator=g, device=device, dtype=dtype)
    x_1 = torch.randn(shape, generator=g, device=device, dtype=dtype)
    t = torch.rand(shape[0], generator=g, device=device)
    return x_0, x_1, t


def _bytes(shape, dtype):
    n = 1
    for d in shape:
        n *= d
    return 4 * n * torch.empty((), dtype=dtype).element_size()


def make_bench(device: torch.device) -> OpBench:
    providers = library_providers(
        device,
        lambda backend: lambda inputs: ops.conditional_path(*inputs, backend=backend),
        lambda inputs: ops.conditional_path_reference(*inputs),
    )
    return OpBench("conditional_path", _inputs, _bytes, providers)


if __name__ == "__main__":
    main(make_bench, SIZES)
