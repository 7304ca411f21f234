"""Triton ODE step: ``x + dt * sum_j coeffs[j] * ks[j]`` in one pass, rounded once.

Op (``torch.library.triton_op``, visible to ``torch.compile``):

- ``orwcfm_fast::ode_step_triton(x, ks, coeffs, dt) -> Tensor`` for any number of stage values:
  one pass per :data:`MAX_STAGES` of them (RK4's update row is one pass; a 7-stage dopri5 row
  two), the partial sums kept in the accumulation dtype between passes and rounded once, as the
  CUDA kernel does

with autograd (``grad_x = g``, ``grad_k_j = dt * coeffs[j] * g``). Semantics are those of
:func:`orwcfm_fast.ops.reference.ode_step_reference`.

Imported lazily by :mod:`orwcfm_fast.ops.triton` (defining the kernels reads ``TRITON_INTERPRET``).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from orwcfm_fast.ops.reference import accumulation_dtype
from orwcfm_fast.ops.triton._common import (
    bits_to_float,
    check_runnable,
    device_guard,
    elementwise_block,
    float_bits,
    keep_opaque_if_interpreted,
    require_mode,
    round_to,
    should_launch,
)

__all__ = ["MAX_STAGES", "ode_step_op"]

MAX_STAGES = 4
"""Most stage values one fused pass takes (RK4's update row); more take further passes."""


@triton.jit(do_not_specialize=["c0_bits", "c1_bits", "c2_bits", "c3_bits"])
def _ode_step_kernel(
    x_ptr, k0_ptr, k1_ptr, k2_ptr, k3_ptr,  # N contiguous elements each; unused k's point at x
    out_ptr,  # N elements in x's dtype
    N,
    c0_bits: tl.int64, c1_bits: tl.int64, c2_bits: tl.int64, c3_bits: tl.int64,  # float64 bits of dt * coeffs[j]
    NUM_K: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = x + sum_{j < NUM_K} c_j * k_j`` over a flat ``BLOCK``-element slice per program."""
    ACC = tl.float64 if ACC_F64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    out = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NUM_K > 0:
        out += bits_to_float(c0_bits).to(ACC) * tl.load(k0_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NUM_K > 1:
        out += bits_to_float(c1_bits).to(ACC) * tl.load(k1_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NUM_K > 2:
        out += bits_to_float(c2_bits).to(ACC) * tl.load(k2_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NUM_K > 3:
        out += bits_to_float(c3_bits).to(ACC) * tl.load(k3_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, round_to(out, out_ptr.dtype.element_ty), mask=mask)


require_mode(_ode_step_kernel)


@triton_op("orwcfm_fast::ode_step_triton", mutates_args=())
def ode_step_op(x: torch.Tensor, ks: list[torch.Tensor], coeffs: list[float], dt: float) -> torch.Tensor:
    """One Runge-Kutta combination ``x + dt * sum_j coeffs[j] * ks[j]``, fused.

    Args:
        x: ``[B, ...]`` state. ks: stage values shaped like ``x`` (same device, any float
        dtypes), any number of them. coeffs: one float per stage value. dt: step size.
        Non-contiguous inputs are copied.

    Returns:
        A new contiguous tensor shaped like ``x`` in ``x``'s dtype, accumulated in the
        accumulation dtype of ``x`` (float64 for float64, else float32) and rounded once. Up to
        :data:`MAX_STAGES` stage values take one pass; each further group of up to
        ``MAX_STAGES`` adds one pass that reads and writes the running sum in the accumulation
        dtype (the output itself for float32/float64, a float32 buffer for bf16/fp16, which the
        last pass rounds into the output), so the terms are added in the reference's order.

    Raises:
        ValueError: ``len(ks) != len(coeffs)`` or a mismatched ``k``.
    """
    if len(ks) != len(coeffs):
        raise ValueError(f"ode_step: got {len(coeffs)} coefficients for {len(ks)} stage values")
    for j, k in enumerate(ks):
        if k.shape != x.shape or k.device != x.device:
            raise ValueError(
                f"ode_step: ks[{j}] is {tuple(k.shape)} on {k.device} but x is {tuple(x.shape)} on {x.device}; "
                "they must match"
            )
    check_runnable("ode_step", _ode_step_kernel, x)
    acc = accumulation_dtype(x.dtype)
    x = x.contiguous()
    ks = [k.contiguous() for k in ks]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0 or not should_launch(_ode_step_kernel, x):
        return out
    scales = [dt * c for c in coeffs]
    groups = [range(first, min(first + MAX_STAGES, len(ks))) for first in range(0, max(len(ks), 1), MAX_STAGES)]
    # The running sum between passes: the output when it has the accumulation dtype, else a buffer.
    partial = out if len(groups) == 1 or x.dtype == acc else torch.empty(x.shape, dtype=acc, device=x.device)
    source = x
    for g, group in enumerate(groups):
        target = out if g == len(groups) - 1 else partial
        _launch(source, [ks[j] for j in group], [scales[j] for j in group], target, acc)
        source = target  # each element is read and written by the same program: in place is safe
    return out


def _launch(source: torch.Tensor, ks: list[torch.Tensor], scales: list[float], out: torch.Tensor,
            acc: torch.dtype) -> None:
    """``out = source + sum_j scales[j] * ks[j]`` for up to :data:`MAX_STAGES` stage values (one kernel)."""
    n = source.numel()
    ptrs = ks + [source] * (MAX_STAGES - len(ks))
    bits = [float_bits(s) for s in scales] + [0] * (MAX_STAGES - len(scales))
    block, num_warps = elementwise_block(n)
    with device_guard(out):  # Triton launches on the current device: make it the tensors'
        wrap_triton(_ode_step_kernel)[(triton.cdiv(n, block),)](
            source, ptrs[0], ptrs[1], ptrs[2], ptrs[3], out, n, bits[0], bits[1], bits[2], bits[3],
            NUM_K=len(ks), ACC_F64=acc == torch.float64, BLOCK=block, num_warps=num_warps,
        )


def _setup_context(ctx, inputs, output) -> None:
    x, ks, coeffs, dt = inputs
    ctx.scales = [float(dt) * float(c) for c in coeffs]
    ctx.k_dtypes = [k.dtype for k in ks]
    ctx.acc = accumulation_dtype(x.dtype)


def _backward(ctx, g):
    """``grad_x = g`` and ``grad_k_j = dt * coeffs[j] * g`` (in each input's dtype)."""
    need_x, need_ks, _, _ = ctx.needs_input_grad
    grad_x = g if need_x else None
    g_acc = g.to(ctx.acc)
    grad_ks = [
        (scale * g_acc).to(dtype) if need else None
        for scale, dtype, need in zip(ctx.scales, ctx.k_dtypes, need_ks)
    ]
    # An empty ``coeffs`` list is flattened like an (empty) tensor list, so its "gradient" must be
    # an empty list rather than None for autograd's structure check.
    grad_coeffs = [] if not ctx.scales else None
    return grad_x, grad_ks, grad_coeffs, None


ode_step_op.register_autograd(_backward, setup_context=_setup_context)
keep_opaque_if_interpreted(ode_step_op, _ode_step_kernel)
