"""Benchmark the fused ODE step ``x + dt * sum_j b_j k_j`` with RK4's four stage values.

The update that ends an RK4 step reads ``x`` and four ``k`` and writes one result:
6 * B * D elements at least. The eager reference makes one pass per term. Providers:
torch (eager reference), torch.compile, triton, cpp.
Run: ``python benchmarks/bench_ode_step.py [--device cpu] [--quick]``.
"""

from __future__ import annotations

import torch
from _harness import OpBench, library_providers, main

from orwcfm_fast import ops

SIZES = {
    "cpu": [(256, 2), (128, 1, 8, 8), (128, 3, 32, 32), (32, 3, 64, 64)],
    "cuda": [(512, 2), (128, 1, 8, 8), (128, 3, 32, 32), (512, 3, 32, 32), (128, 3, 64, 64), (512, 3, 64, 64)],
}
RK4_B = [1 / 6, 1 / 3, 1 / 3, 1 / 6]
DT = 0.01


def _inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    ks = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in RK4_B]
    return x, ks


def _bytes(shape, dtype):
    n = 1
    for d in shape:
        n *= d
    return (2 + len(RK4_B)) * n * torch.empty((), dtype=dtype).element_size()


def make_bench(device: torch.device) -> OpBench:
    providers = library_providers(
        device,
        lambda backend: lambda inputs: ops.ode_step(inputs[0], inputs[1], RK4_B, DT, backend=backend),
        lambda inputs: ops.ode_step_reference(inputs[0], inputs[1], RK4_B, DT),
    )
    return OpBench("ode_step", _inputs, _bytes, providers)


if __name__ == "__main__":
    main(make_bench, SIZES)
