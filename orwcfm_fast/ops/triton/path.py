"""Triton conditional path: ``x_t`` and ``u_t`` of the straight path in one pass.

Op (``torch.library.triton_op``, visible to ``torch.compile``):

- ``orwcfm_fast::conditional_path_triton(x_0, x_1, t, sigma=0.0, noise=None) -> (x_t, u_t)``

with autograd (linear, torch expressions). Semantics are those of
:func:`orwcfm_fast.ops.reference.conditional_path_reference`, except that the arithmetic runs in
the accumulation dtype (float32 for half/bf16) and rounds once, and the outputs are in ``x_1``'s
dtype.

Imported lazily by :mod:`orwcfm_fast.ops.triton` (defining the kernels reads ``TRITON_INTERPRET``).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from orwcfm_fast.ops.reference import accumulation_dtype
from orwcfm_fast.ops.triton._common import (
    bits_to_float,
    check_runnable,
    device_guard,
    float_bits,
    keep_opaque_if_interpreted,
    require_mode,
    round_to,
    row_tile,
    should_launch,
)

__all__ = ["conditional_path_op"]


@triton.jit(do_not_specialize=["sigma_bits"])
def _conditional_path_kernel(
    x_0_ptr, x_1_ptr, noise_ptr,  # [B, D] contiguous (noise_ptr is x_1_ptr when HAS_NOISE is false)
    t_ptr,  # [B] times, any float dtype
    x_t_ptr, u_t_ptr,  # [B, D] outputs in x_1's dtype
    B, D,
    sigma_bits: tl.int64,  # float64 bit pattern of sigma (see _common.float_bits)
    HAS_NOISE: tl.constexpr,
    ACC_F64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``x_t = t * x_1 + (1 - t) * x_0 (+ sigma * noise)``, ``u_t = x_1 - x_0``, per row ``t``.

    Program ``p`` handles the ``[ROWS, BLOCK_D]`` block at row tile ``p // n_col``, column tile
    ``p % n_col``.
    """
    ACC = tl.float64 if ACC_F64 else tl.float32
    n_col = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    rows = (pid // n_col) * ROWS + tl.arange(0, ROWS)
    cols = (pid % n_col) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    t = tl.load(t_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    x_0 = tl.load(x_0_ptr + offs, mask=mask, other=0.0).to(ACC)
    x_1 = tl.load(x_1_ptr + offs, mask=mask, other=0.0).to(ACC)
    x_t = t * x_1 + (1.0 - t) * x_0
    if HAS_NOISE:
        sigma = bits_to_float(sigma_bits).to(ACC)
        x_t += sigma * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(x_t_ptr + offs, round_to(x_t, x_t_ptr.dtype.element_ty), mask=mask)
    tl.store(u_t_ptr + offs, round_to(x_1 - x_0, u_t_ptr.dtype.element_ty), mask=mask)


require_mode(_conditional_path_kernel)


def _accumulation(x_0: torch.Tensor, x_1: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x_0.dtype, x_1.dtype)
    if noise is not None:
        dtype = torch.promote_types(dtype, noise.dtype)
    return accumulation_dtype(dtype)


@triton_op("orwcfm_fast::conditional_path_triton", mutates_args=())
def conditional_path_op(
    x_0: torch.Tensor,
    x_1: torch.Tensor,
    t: torch.Tensor,
    sigma: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point and target velocity on the straight conditional path, fused.

    Args:
        x_0: ``[B, ...]`` source samples. x_1: ``[B, ...]`` target samples (same shape/device).
        t: ``[B]`` times, any float dtype.
        sigma: std of the Gaussian around the path; ``noise`` is used only when ``sigma > 0``.
        noise: ``[B, ...]`` standard normal draws, required when ``sigma > 0``.
        Non-contiguous inputs are copied.

    Returns:
        ``(x_t, u_t)``, contiguous ``[B, ...]`` tensors in ``x_1``'s dtype, computed in the
        accumulation dtype of the inputs (float64 if any is float64, else float32).
    """
    has_noise = sigma > 0
    if has_noise and noise is None:
        raise ValueError("conditional path: sigma > 0 needs `noise`")
    if x_0.shape != x_1.shape or x_0.device != x_1.device:
        raise ValueError(
            f"conditional_path: x_0 is {tuple(x_0.shape)} on {x_0.device} but x_1 is {tuple(x_1.shape)} "
            f"on {x_1.device}; they must match"
        )
    if x_1.ndim < 1 or t.shape != (x_1.shape[0],) or t.device != x_1.device:
        raise ValueError(f"conditional_path: t must be [B] on {x_1.device}, got {tuple(t.shape)} on {t.device}")
    if noise is not None and (noise.shape != x_1.shape or noise.device != x_1.device):
        raise ValueError(
            f"conditional_path: noise is {tuple(noise.shape)} on {noise.device} but x_1 is {tuple(x_1.shape)} "
            f"on {x_1.device}; they must match"
        )
    check_runnable("conditional_path", _conditional_path_kernel, x_1)
    acc = _accumulation(x_0, x_1, noise if has_noise else None)
    x_0, x_1, t = x_0.contiguous(), x_1.contiguous(), t.contiguous()
    noise_arg = noise.contiguous() if has_noise else x_1
    x_t = torch.empty(x_1.shape, dtype=x_1.dtype, device=x_1.device)
    u_t = torch.empty(x_1.shape, dtype=x_1.dtype, device=x_1.device)
    b = x_1.shape[0]
    d = math.prod(x_1.shape[1:])
    if x_1.numel() > 0 and should_launch(_conditional_path_kernel, x_1):
        rows, block_d, num_warps = row_tile(d)
        grid = (triton.cdiv(b, rows) * triton.cdiv(d, block_d),)
        with device_guard(x_1):  # Triton launches on the current device: make it the tensors'
            wrap_triton(_conditional_path_kernel)[grid](
                x_0, x_1, noise_arg, t, x_t, u_t, b, d, float_bits(sigma),
                HAS_NOISE=has_noise, ACC_F64=acc == torch.float64,
                ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
            )
    return x_t, u_t


def _setup_context(ctx, inputs, output) -> None:
    # Trailing defaulted arguments may be left out of ``inputs`` (e.g. under AOTAutograd).
    x_0, x_1, t = inputs[:3]
    sigma = inputs[3] if len(inputs) > 3 else 0.0
    noise = inputs[4] if len(inputs) > 4 else None
    ctx.save_for_backward(x_0, x_1, t)
    ctx.sigma = float(sigma)
    ctx.has_noise = noise is not None
    ctx.acc = _accumulation(x_0, x_1, noise if sigma > 0 else None)
    ctx.noise_dtype = noise.dtype if noise is not None else None


def _backward(ctx, g_x_t, g_u_t):
    """``d x_0 = (1 - t) g_x_t - g_u_t``, ``d x_1 = t g_x_t + g_u_t``,
    ``d t[i] = sum_j (x_1 - x_0)[i, j] g_x_t[i, j]``, ``d noise = sigma g_x_t`` (0 if sigma <= 0)."""
    x_0, x_1, t = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad) + (False,) * 5
    need_x_0, need_x_1, need_t, need_noise = need[0], need[1], need[2], need[4]
    acc = ctx.acc
    shape = (t.shape[0],) + (1,) * (x_1.ndim - 1)
    g_x_t = g_x_t.to(acc) if g_x_t is not None else torch.zeros(x_1.shape, dtype=acc, device=x_1.device)
    g_u_t = g_u_t.to(acc) if g_u_t is not None else torch.zeros(x_1.shape, dtype=acc, device=x_1.device)
    tb = t.to(acc).reshape(shape)
    grad_x_0 = grad_x_1 = grad_t = grad_noise = None
    if need_x_0:
        grad_x_0 = ((1 - tb) * g_x_t - g_u_t).to(x_0.dtype)
    if need_x_1:
        grad_x_1 = (tb * g_x_t + g_u_t).to(x_1.dtype)
    if need_t:
        rows = (t.shape[0], math.prod(x_1.shape[1:]))
        grad_t = ((x_1.to(acc) - x_0.to(acc)) * g_x_t).reshape(rows).sum(dim=1).to(t.dtype)
    if need_noise and ctx.has_noise:
        grad_noise = (ctx.sigma * g_x_t if ctx.sigma > 0 else torch.zeros_like(g_x_t)).to(ctx.noise_dtype)
    return grad_x_0, grad_x_1, grad_t, None, grad_noise


conditional_path_op.register_autograd(_backward, setup_context=_setup_context)
keep_opaque_if_interpreted(conditional_path_op, _conditional_path_kernel)
