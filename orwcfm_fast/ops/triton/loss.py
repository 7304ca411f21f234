"""Triton ORW-CFM-W2 loss: one fused pass for ``fm`` and ``w2``, one fused pass for ``grad_v``.

Ops (``torch.library.triton_op``, visible to ``torch.compile``):

- ``orwcfm_fast::orw_cfm_w2_loss_triton(v, u, v_ref, weights, alpha, w2_weights=None) -> (loss, fm, w2)``
- ``orwcfm_fast::orw_cfm_w2_loss_backward_triton(v, u, v_ref, c_fm, c_w2) -> grad_v``

The forward op has autograd: gradients for ``v`` (the backward kernel), ``u``, ``v_ref``,
``weights`` and ``w2_weights`` (small torch expressions, computed only when asked for). The
kernels compute the per-sample ``fm`` and ``w2``; the ``[B]`` combination into the loss, where
``weights`` and the optional per-sample W2 coefficients ``w2_weights`` enter, is a torch
expression in the op (so ``w2_weights`` adds no kernel and no pass over ``[B, D]``). The backward op has
autograd too (torch expressions), so double backward works. Semantics are those of
:func:`orwcfm_fast.ops.reference.orw_cfm_w2_loss_reference` and
:func:`orwcfm_fast.ops.reference.orw_cfm_w2_loss_backward_reference`.

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
    check_runnable,
    device_guard,
    keep_opaque_if_interpreted,
    require_mode,
    round_to,
    row_tile,
    should_launch,
)

__all__ = ["MIN_SPLIT_TILES", "TARGET_PROGRAMS", "forward_splits", "orw_cfm_w2_loss_backward_op", "orw_cfm_w2_loss_op"]


@triton.jit
def _orw_cfm_w2_loss_fwd_kernel(
    v_ptr, u_ptr, v_ref_ptr,  # [B, D] contiguous, any float dtype
    fm_ptr, w2_ptr,  # [B, NUM_SPLITS] in the accumulation dtype
    B, D,
    split_d,  # columns per split (a multiple of BLOCK_D)
    NUM_SPLITS,
    ACC_F64: tl.constexpr,  # accumulate in float64 (float64 inputs) instead of float32
    MEAN: tl.constexpr,  # divide by D (one split: the outputs are fm and w2 themselves)
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-(row, split) sums of ``(v - u)^2`` and ``(v - v_ref)^2`` (means when ``MEAN``).

    Program ``(p, s)`` owns rows ``p * ROWS ..`` and columns ``s * split_d ..`` of them, and walks
    them in ``[ROWS, BLOCK_D]`` blocks, adding squares into per-lane accumulators that are reduced
    once at the end: deterministic, no atomics, and each lane sums only ``split_d / BLOCK_D``
    terms before the tree reduction. Splitting long rows gives small batches of large samples
    (B = 1 to 16 latents of 64k elements) enough programs to fill the GPU.
    """
    ACC = tl.float64 if ACC_F64 else tl.float32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    row_ok = rows < B
    row_start = rows.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    col_begin = split.to(tl.int64) * split_d
    col_end = tl.minimum(col_begin + split_d, D)
    acc_fm = tl.zeros([ROWS, BLOCK_D], dtype=ACC)
    acc_w2 = tl.zeros([ROWS, BLOCK_D], dtype=ACC)
    for start in range(0, split_d, BLOCK_D):
        c = col_begin + start + cols
        mask = row_ok[:, None] & (c < col_end)[None, :]
        offs = row_start[:, None] + c[None, :]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
        v_ref = tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(ACC)
        d_fm = v - u
        d_w2 = v - v_ref
        acc_fm += d_fm * d_fm
        acc_w2 += d_w2 * d_w2
    fm = tl.sum(acc_fm, axis=1)
    w2 = tl.sum(acc_w2, axis=1)
    if MEAN:
        fm = fm / D
        w2 = w2 / D
    out = rows.to(tl.int64) * NUM_SPLITS + split
    tl.store(fm_ptr + out, fm, mask=row_ok)
    tl.store(w2_ptr + out, w2, mask=row_ok)


TARGET_PROGRAMS = 1024
"""Programs the forward aims for when it splits rows: several waves on any current GPU (an H100
has 132 SMs), fixed here so the launch does not depend on querying the device."""

MIN_SPLIT_TILES = 4
"""A split covers at least this many ``BLOCK_D`` tiles, so short rows are never split."""


def forward_splits(b: int, d: int) -> tuple[int, int]:
    """``(splits, split_d)``: how many column pieces each row of the forward is cut into, and their length.

    Rows of at most ``MIN_SPLIT_TILES * MAX_TILE`` elements stay whole (one program per row tile,
    as before); longer ones are split until the launch has about :data:`TARGET_PROGRAMS`
    programs, each piece a whole number of tiles. Depends on ``B`` too, so ``torch.compile``
    guards on the batch size (the trainer's is fixed).
    """
    rows, block_d, _ = row_tile(d)
    tiles = triton.cdiv(d, block_d)
    row_tiles = triton.cdiv(b, rows)
    splits = min(max(1, tiles // MIN_SPLIT_TILES), max(1, triton.cdiv(TARGET_PROGRAMS, row_tiles)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_d


@triton.jit
def _orw_cfm_w2_loss_bwd_kernel(
    v_ptr, u_ptr, v_ref_ptr,  # [B, D] contiguous
    c_fm_ptr, c_w2_ptr,  # [B] in the accumulation dtype
    grad_ptr,  # [B, D] in v's dtype
    B, D,
    ACC_F64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``grad[i, j] = c_fm[i] * (v - u)[i, j] + c_w2[i] * (v - v_ref)[i, j]``, rounded once.

    Program ``p`` handles the ``[ROWS, BLOCK_D]`` block at row tile ``p // n_col``, column tile
    ``p % n_col`` (a 1-D grid, so no grid-dimension limits).
    """
    ACC = tl.float64 if ACC_F64 else tl.float32
    n_col = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    rows = (pid // n_col) * ROWS + tl.arange(0, ROWS)
    cols = (pid % n_col) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    c_fm = tl.load(c_fm_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    c_w2 = tl.load(c_w2_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    v_ref = tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad = c_fm[:, None] * (v - u) + c_w2[:, None] * (v - v_ref)
    tl.store(grad_ptr + offs, round_to(grad, grad_ptr.dtype.element_ty), mask=mask)


require_mode(_orw_cfm_w2_loss_fwd_kernel, _orw_cfm_w2_loss_bwd_kernel)


def _check_inputs(name: str, v: torch.Tensor, u: torch.Tensor, v_ref: torch.Tensor, per_sample: dict) -> None:
    """Shape/device checks that keep the kernels in bounds (the dispatcher's messages are friendlier)."""
    if v.ndim < 2:
        raise ValueError(f"{name}: v must be [B, ...] with at least one non-batch dim, got shape {tuple(v.shape)}")
    for other_name, other in (("u", u), ("v_ref", v_ref)):
        if other.shape != v.shape or other.device != v.device:
            raise ValueError(
                f"{name}: {other_name} is {tuple(other.shape)} on {other.device} but v is {tuple(v.shape)} "
                f"on {v.device}; they must match"
            )
    for vec_name, vec in per_sample.items():
        if vec.shape != (v.shape[0],) or vec.device != v.device:
            raise ValueError(
                f"{name}: {vec_name} must be [B] = [{v.shape[0]}] on {v.device}, got {tuple(vec.shape)} on {vec.device}"
            )
    for t_name, t in (("v", v), ("u", u), ("v_ref", v_ref), *per_sample.items()):
        if not t.is_floating_point():
            raise TypeError(f"{name}: {t_name} must be a floating-point tensor, got {t.dtype}")


@triton_op("orwcfm_fast::orw_cfm_w2_loss_triton", mutates_args=())
def orw_cfm_w2_loss_op(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    w2_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORW-CFM-W2 loss with Triton's fused per-sample reduction.

    Args:
        v, u, v_ref: ``[B, ...]``, same shape and device (any float dtypes; ``v``'s sets the
            accumulation dtype: float64 for float64, else float32). Non-contiguous inputs are copied.
        weights: ``[B]`` per-sample weights, any float dtype.
        alpha: W2 coefficient.
        w2_weights: ``[B]`` per-sample W2 coefficients ``c``, any float dtype, or ``None`` (``c = 1``).

    Returns:
        ``(loss, fm, w2)`` in the accumulation dtype: 0-dim ``mean_i(weights[i] * fm[i] +
        alpha * c[i] * w2[i])`` and the ``[B]`` per-sample means of ``(v - u)^2`` and ``(v - v_ref)^2``.
    """
    per_sample = {"weights": weights} if w2_weights is None else {"weights": weights, "w2_weights": w2_weights}
    _check_inputs("orw_cfm_w2_loss", v, u, v_ref, per_sample)
    check_runnable("orw_cfm_w2_loss", _orw_cfm_w2_loss_fwd_kernel, v)
    v, u, v_ref = v.contiguous(), u.contiguous(), v_ref.contiguous()
    acc = accumulation_dtype(v.dtype)
    b = v.shape[0]
    d = math.prod(v.shape[1:])
    if d == 0:  # the mean over no elements, as torch gives it
        fm = torch.full((b,), float("nan"), dtype=acc, device=v.device)
        w2 = torch.full((b,), float("nan"), dtype=acc, device=v.device)
    else:
        splits, split_d = forward_splits(b, d) if b > 0 else (1, d)
        # One split: the kernel writes the means. More: per-split sums, added in a fixed order below.
        fm = torch.empty((b, splits), dtype=acc, device=v.device)
        w2 = torch.empty((b, splits), dtype=acc, device=v.device)
        if b > 0 and should_launch(_orw_cfm_w2_loss_fwd_kernel, v):
            rows, block_d, num_warps = row_tile(d)
            with device_guard(v):  # Triton launches on the current device: make it the tensors'
                wrap_triton(_orw_cfm_w2_loss_fwd_kernel)[(triton.cdiv(b, rows), splits)](
                    v, u, v_ref, fm, w2, b, d, split_d, splits,
                    ACC_F64=acc == torch.float64, MEAN=splits == 1, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
                )
        if splits == 1:
            fm, w2 = fm.reshape(b), w2.reshape(b)
        else:  # float64 sums of the pieces (deterministic: a fixed-shape reduction), then the mean
            fm = (fm.sum(1, dtype=torch.float64) / d).to(acc)
            w2 = (w2.sum(1, dtype=torch.float64) / d).to(acc)
    # The reference's expression, term for term (so the two backends agree to the last bit given fm and w2).
    w2_term = alpha * w2 if w2_weights is None else alpha * w2_weights.to(acc) * w2
    loss = (weights.to(acc) * fm + w2_term).mean()
    return loss, fm, w2


@triton_op("orwcfm_fast::orw_cfm_w2_loss_backward_triton", mutates_args=())
def orw_cfm_w2_loss_backward_op(
    v: torch.Tensor, u: torch.Tensor, v_ref: torch.Tensor, c_fm: torch.Tensor, c_w2: torch.Tensor
) -> torch.Tensor:
    """``grad_v[i] = c_fm[i] * (v[i] - u[i]) + c_w2[i] * (v[i] - v_ref[i])`` in one pass.

    Args:
        v, u, v_ref: ``[B, ...]``, same shape and device.
        c_fm, c_w2: ``[B]`` per-sample coefficients, any float dtype.

    Returns:
        A contiguous ``[B, ...]`` tensor in ``v``'s dtype, computed in the accumulation dtype and
        rounded once.
    """
    _check_inputs("orw_cfm_w2_loss_backward", v, u, v_ref, {"c_fm": c_fm, "c_w2": c_w2})
    check_runnable("orw_cfm_w2_loss_backward", _orw_cfm_w2_loss_bwd_kernel, v)
    v, u, v_ref = v.contiguous(), u.contiguous(), v_ref.contiguous()
    acc = accumulation_dtype(v.dtype)
    c_fm = c_fm.to(acc).contiguous()
    c_w2 = c_w2.to(acc).contiguous()
    grad = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    b = v.shape[0]
    d = math.prod(v.shape[1:])
    if grad.numel() > 0 and should_launch(_orw_cfm_w2_loss_bwd_kernel, v):
        rows, block_d, num_warps = row_tile(d)
        grid = (triton.cdiv(b, rows) * triton.cdiv(d, block_d),)
        with device_guard(v):  # Triton launches on the current device: make it the tensors'
            wrap_triton(_orw_cfm_w2_loss_bwd_kernel)[grid](
                v, u, v_ref, c_fm, c_w2, grad, b, d,
                ACC_F64=acc == torch.float64, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
            )
    return grad


def _setup_context(ctx, inputs, output) -> None:
    # Defaults are filled in: inputs always has w2_weights (None when not given).
    v, u, v_ref, weights, alpha, w2_weights = inputs
    _, fm, w2 = output
    # Inputs and [B] outputs only: no new full-size tensors are kept alive for the backward.
    ctx.per_sample_w2 = w2_weights is not None
    if ctx.per_sample_w2:
        ctx.save_for_backward(v, u, v_ref, weights, fm, w2_weights, w2)
    else:
        ctx.save_for_backward(v, u, v_ref, weights, fm)
    ctx.alpha = alpha


def _backward(ctx, g_loss, g_fm, g_w2):
    """Gradients of ``g_loss * loss + <g_fm, fm> + <g_w2, w2>``.

    ``c_fm = 2/D * (g_loss * weights / B + g_fm)`` and ``c_w2 = 2/D * (g_loss * alpha * c / B + g_w2)``
    (``c``: the ``w2_weights``, 1 without them) are formed in float64 (``[B]`` vectors: free) and
    rounded once, so ``grad_v`` carries only the kernel's few roundings. ``d/dweights = g_loss fm / B``,
    ``d/dw2_weights = g_loss alpha w2 / B``.
    """
    v, u, v_ref, weights, fm, *per_sample = ctx.saved_tensors
    # needs_input_grad has no entry for w2_weights when it was left at its default (None).
    needs = tuple(ctx.needs_input_grad) + (False,) * (6 - len(ctx.needs_input_grad))
    need_v, need_u, need_v_ref, need_w, _, need_c = needs
    acc = fm.dtype
    b = v.shape[0]
    d = math.prod(v.shape[1:])
    f64 = torch.float64
    zeros = torch.zeros((b,), dtype=f64, device=v.device)
    g_loss = g_loss.to(f64) if g_loss is not None else torch.zeros((), dtype=f64, device=v.device)
    g_fm = g_fm.to(f64) if g_fm is not None else zeros
    g_w2 = g_w2.to(f64) if g_w2 is not None else zeros
    scale = 2.0 / d if d > 0 else 0.0
    c_fm = ((g_loss * weights.to(f64) / b + g_fm) * scale).to(acc)
    if per_sample:
        w2_weights, w2 = per_sample
        c_w2 = ((g_loss * ctx.alpha / b * w2_weights.to(f64) + g_w2) * scale).to(acc)
    else:
        c_w2 = ((g_loss * ctx.alpha / b + g_w2) * scale).to(acc)

    grad_v = grad_u = grad_v_ref = grad_w = None
    if need_v:
        grad_v = orw_cfm_w2_loss_backward_op(v, u, v_ref, c_fm, c_w2)
    shape = (b,) + (1,) * (v.ndim - 1)
    if need_u:
        grad_u = (-c_fm.reshape(shape) * (v.to(acc) - u.to(acc))).to(u.dtype)
    if need_v_ref:
        grad_v_ref = (-c_w2.reshape(shape) * (v.to(acc) - v_ref.to(acc))).to(v_ref.dtype)
    if need_w:
        grad_w = (g_loss * fm.to(f64) / b).to(weights.dtype)
    grad_c = (g_loss * ctx.alpha / b * w2.to(f64)).to(w2_weights.dtype) if need_c else None
    return grad_v, grad_u, grad_v_ref, grad_w, None, grad_c


def _setup_context_backward_op(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward_backward_op(ctx, g):
    """Gradients of ``<g, grad_v>`` (the backward op is linear in each input): double backward."""
    v, u, v_ref, c_fm, c_w2 = ctx.saved_tensors
    need_v, need_u, need_v_ref, need_c_fm, need_c_w2 = ctx.needs_input_grad
    acc = accumulation_dtype(v.dtype)
    shape = (v.shape[0],) + (1,) * (v.ndim - 1)
    g = g.to(acc)
    c_fm_b, c_w2_b = c_fm.to(acc).reshape(shape), c_w2.to(acc).reshape(shape)
    grad_v = (g * (c_fm_b + c_w2_b)).to(v.dtype) if need_v else None
    grad_u = (-g * c_fm_b).to(u.dtype) if need_u else None
    grad_v_ref = (-g * c_w2_b).to(v_ref.dtype) if need_v_ref else None
    rows = (v.shape[0], math.prod(v.shape[1:]))
    v_acc = v.to(acc)
    grad_c_fm = (g * (v_acc - u.to(acc))).reshape(rows).sum(1).to(c_fm.dtype) if need_c_fm else None
    grad_c_w2 = (g * (v_acc - v_ref.to(acc))).reshape(rows).sum(1).to(c_w2.dtype) if need_c_w2 else None
    return grad_v, grad_u, grad_v_ref, grad_c_fm, grad_c_w2


orw_cfm_w2_loss_op.register_autograd(_backward, setup_context=_setup_context)
orw_cfm_w2_loss_backward_op.register_autograd(_backward_backward_op, setup_context=_setup_context_backward_op)
keep_opaque_if_interpreted(orw_cfm_w2_loss_op, _orw_cfm_w2_loss_fwd_kernel)
keep_opaque_if_interpreted(orw_cfm_w2_loss_backward_op, _orw_cfm_w2_loss_bwd_kernel)
