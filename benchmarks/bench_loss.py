"""Benchmark the ORW-CFM-W2 loss, forward and backward (what a training step runs).

One call: ``(loss, fm, w2) = orw_cfm_w2_loss(v, u, v_ref, weights, alpha)`` and the gradient
in ``v``. The minimum traffic is 3 reads of ``[B, D]`` in the forward, 3 reads and 1 write
in the backward: 7 * B * D elements. Providers: torch (eager reference), torch.compile (of
the reference), triton, cpp; and ``<provider>+w2_weights`` for torch, triton and cpp: the same
call with per-sample W2 coefficients (``w2_weights``, ADRPO's ``alpha_i = alpha * c_i``), whose
``[B]`` vector adds no traffic to count, so its time should match the scalar-``alpha`` call's.
Run: ``python benchmarks/bench_loss.py [--device cpu] [--quick]``.
"""

from __future__ import annotations

import torch
from _harness import OpBench, library_providers, main

from orwcfm_fast import ops

# [B, D]-shaped problems we meet: 2-D toys, 8x8 digits, CIFAR 3x32x32, 3x64x64.
SIZES = {
    "cpu": [(256, 2), (128, 1, 8, 8), (128, 3, 32, 32), (32, 3, 64, 64)],
    "cuda": [(512, 2), (128, 1, 8, 8), (128, 3, 32, 32), (512, 3, 32, 32), (128, 3, 64, 64), (512, 3, 64, 64)],
}
#: the providers that also run with per-sample W2 coefficients, as ``<provider>+w2_weights``
PER_SAMPLE_PROVIDERS = ("torch", "triton", "cpp")
PER_SAMPLE_SUFFIX = "+w2_weights"


def _inputs(shape, dtype, device):
    """``(v, u, v_ref, weights, w2_weights)``; the scalar-alpha providers ignore ``w2_weights``."""
    g = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
    u = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v_ref = torch.randn(shape, generator=g, device=device, dtype=dtype)
    weights = torch.rand(shape[0], generator=g, device=device)
    w2_weights = torch.rand(shape[0], generator=g, device=device)
    return v, u, v_ref, weights, w2_weights


def _fwd_bwd(loss_fn, per_sample: bool = False):
    def run(inputs):
        v, u, v_ref, weights, w2_weights = inputs
        if per_sample:
            loss, _, _ = loss_fn(v, u, v_ref, weights, 1.0, w2_weights)
        else:
            loss, _, _ = loss_fn(v, u, v_ref, weights, 1.0)
        return torch.autograd.grad(loss, v)[0]

    return run


def _bytes(shape, dtype):
    n = 1
    for d in shape:
        n *= d
    return 7 * n * torch.empty((), dtype=dtype).element_size()


def make_bench(device: torch.device) -> OpBench:
    providers = library_providers(
        device,
        lambda backend: _fwd_bwd(lambda *a: ops.orw_cfm_w2_loss(*a, backend=backend)),
        _fwd_bwd(ops.orw_cfm_w2_loss_reference),
    )
    per_sample = library_providers(
        device,
        lambda backend: _fwd_bwd(lambda *a: ops.orw_cfm_w2_loss(*a[:5], backend=backend, w2_weights=a[5]), True),
        _fwd_bwd(ops.orw_cfm_w2_loss_reference, True),
    )
    for name in PER_SAMPLE_PROVIDERS:
        providers[name + PER_SAMPLE_SUFFIX] = per_sample[name]
    return OpBench("orw_cfm_w2_loss", _inputs, _bytes, providers)


if __name__ == "__main__":
    main(make_bench, SIZES)
