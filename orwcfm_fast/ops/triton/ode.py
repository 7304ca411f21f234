"""Triton ODE step: ``x + dt * sum_j coeffs[j] * ks[j]`` in one pass, rounded once.

Op (``torch.library.triton_op``, visible to ``torch.compile``):

- ``orwcfm_fast::ode_step_triton(x, ks, coeffs, dt) -> Tensor`` for 0 to 4 stage values (the
  RK4 tableau's largest row)

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
    elementwise_block,
    float_bits,
    keep_opaque_if_interpreted,
    require_mode,
    round_to,
    should_launch,
)

__all__ = ["MAX_STAGES", "ode_step_op"]

MAX_STAGES = 4
"""Most stage values one fused pass takes (RK4's update row)."""


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
        x: ``[B, ...]`` state. ks: 0 to 4 stage values shaped like ``x`` (same device, any
        float dtypes). coeffs: one float per stage value. dt: step size. Non-contiguous inputs
        are copied.

    Returns:
        A new contiguous tensor shaped like ``x`` in ``x``'s dtype, accumulated in the
        accumulation dtype of ``x`` (float64 for float64, else float32) and rounded once.

    Raises:
        ValueError: ``len(ks) != len(coeffs)``, more than 4 stage values, or a mismatched ``k``.
    """
    if len(ks) != len(coeffs):
        raise ValueError(f"ode_step: got {len(coeffs)} coefficients for {len(ks)} stage values")
    if len(ks) > MAX_STAGES:
        raise ValueError(
            f"ode_step: the Triton kernel fuses at most {MAX_STAGES} stage values (RK4), got {len(ks)}; "
            "split the sum into several calls"
        )
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
    if n > 0 and should_launch(_ode_step_kernel, x):
        ptrs = ks + [x] * (MAX_STAGES - len(ks))
        bits = [float_bits(dt * c) for c in coeffs] + [0] * (MAX_STAGES - len(coeffs))
        block, num_warps = elementwise_block(n)
        wrap_triton(_ode_step_kernel)[(triton.cdiv(n, block),)](
            x, ptrs[0], ptrs[1], ptrs[2], ptrs[3], out, n, bits[0], bits[1], bits[2], bits[3],
            NUM_K=len(ks), ACC_F64=acc == torch.float64, BLOCK=block, num_warps=num_warps,
        )
    return out


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
