"""The Triton backend (:mod:`orwcfm_fast.ops.triton`) against float64 oracles, plus its op plumbing.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``);
those tests skip themselves when CPU tensors cannot run (a GPU run with ``TRITON_INTERPRET=0``).
The ``cuda`` tests need a GPU and compiled kernels::

    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q -m cuda tests/test_ops_triton.py

Tolerances are those of ``op_cases.py``: float32 reductions within ``FP32_RTOL`` of float64,
elementwise results within ``ELEMENTWISE_ULPS`` ulps of the terms' magnitudes (float32 ulps for
float32, float64 ulps for float64), and bf16/fp16 results at most twice as far from float64 as
the torch backend's (:mod:`orwcfm_fast.ops.reference`).
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from op_cases import (  # noqa: E402
    FP32_RTOL,
    W2_WEIGHT_KINDS,
    assert_elementwise_close,
    assert_low_precision_ok,
    assert_rel_close,
    expected_loss,
    expected_loss_grad,
    expected_loss_input_grads,
    expected_ode_step,
    dopri5_fixed_tableau,
    expected_path,
    loss_inputs,
    random_shapes,
    w2_weight_inputs,
)

import orwcfm_fast.ops.triton as T  # noqa: E402
from orwcfm_fast.ops.reference import (  # noqa: E402
    accumulation_dtype,
    conditional_path_reference,
    ode_step_reference,
    orw_cfm_w2_loss_reference,
)

ANY_OK, ANY_WHY = T.is_available()
CPU_OK, CPU_WHY = T.is_available("cpu")
INTERPRETED = bool(triton.knobs.runtime.interpret)

pytestmark = pytest.mark.skipif(not ANY_OK, reason=f"the Triton ops cannot run here: {ANY_WHY}")
cpu = pytest.mark.skipif(not CPU_OK, reason=f"the Triton ops cannot run on CPU tensors: {CPU_WHY}")
_CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 interprets the kernels; run with TRITON_INTERPRET=0"),
)


def cuda(fn):
    """Mark a test as CUDA-only: skipped without a GPU, and under the interpreter."""
    for mark in _CUDA_MARKS:
        fn = mark(fn)
    return fn


# The interpreter runs each program's block ops in numpy: keep the random shapes modest (the
# fixed shapes, up to 5*123*123 elements, are always included). The file takes ~1-2 min on 2 cores.
MAX_NUMEL = 3 * 64 * 64 * 2
LOSS_SHAPES = random_shapes(200, seed=11, max_numel=MAX_NUMEL)
PATH_SHAPES = random_shapes(60, seed=12, max_numel=MAX_NUMEL)
ODE_SHAPES = random_shapes(60, seed=13, max_numel=MAX_NUMEL)
LOWP_N = 24  # low-precision cases per op and dtype
ALPHAS = (0.0, 0.5, 3.0)
WEIGHT_KINDS = ("uniform", "zero", "huge", "mixed")  # with 3 alphas, i cycles through all 12 pairs
FP = {"fp32": torch.float32, "fp64": torch.float64}
LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _eps(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation dtype (the ``eps`` of assert_elementwise_close)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def _rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else FP32_RTOL


def _half_ulp_floor(dtype: torch.dtype, expected: torch.Tensor) -> float:
    """Half an ulp of ``dtype`` at the largest expected value: one correct rounding's error."""
    return torch.finfo(dtype).eps / 2 * float(expected.abs().max()) if expected.numel() else 0.0


def _randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Checks shared by the CPU (interpreter) and CUDA tests
# --------------------------------------------------------------------------------------------


def check_loss(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """Forward vs float64 and ``grad_v`` (with random ``g_fm``, ``g_w2`` on odd ``i``) vs float64."""
    alpha, kind = ALPHAS[i % 3], WEIGHT_KINDS[i % 4]
    v, u, v_ref, w = loss_inputs(shape, seed=1000 + i, dtype=dtype, device=device, weight_kind=kind)
    v.requires_grad_()
    loss, fm, w2 = T.orw_cfm_w2_loss(v, u, v_ref, w, alpha)
    acc = accumulation_dtype(dtype)
    assert loss.shape == () and fm.shape == w2.shape == (shape[0],)
    assert loss.dtype == fm.dtype == w2.dtype == acc and loss.device == v.device
    exp_loss, exp_fm, exp_w2 = expected_loss(v, u, v_ref, w, alpha)
    where = f"shape {shape}, {dtype}, alpha {alpha}, {kind} weights"
    assert_rel_close(loss, exp_loss, _rtol(dtype), f"loss ({where})")
    assert_rel_close(fm, exp_fm, _rtol(dtype), f"fm ({where})")
    assert_rel_close(w2, exp_w2, _rtol(dtype), f"w2 ({where})")

    gen = torch.Generator().manual_seed(i)
    g_fm = g_w2 = None
    outs, grads = [loss], [torch.ones((), dtype=acc, device=device)]
    if i % 2:
        g_fm, g_w2 = (torch.randn(shape[0], generator=gen, dtype=acc).to(device) for _ in range(2))
        outs, grads = [loss, fm, w2], grads + [g_fm, g_w2]
    torch.autograd.backward(outs, grads)
    assert v.grad.dtype == dtype and v.grad.shape == v.shape
    exp_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, 1.0, g_fm, g_w2)
    assert_elementwise_close(v.grad, exp_grad, scale, f"grad_v ({where})", eps=_eps(dtype))


def check_loss_low_precision(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """bf16/fp16 inputs: float32 results within FP32_RTOL; ``grad_v`` at most 2x the torch backend's error."""
    alpha, kind = ALPHAS[i % 3], ("uniform", "zero")[i % 2]  # huge weights overflow an fp16 gradient
    v, u, v_ref, w = loss_inputs(shape, seed=2000 + i, dtype=dtype, device=device, weight_kind=kind)
    v_tri, v_torch = v.clone().requires_grad_(), v.clone().requires_grad_()
    out = T.orw_cfm_w2_loss(v_tri, u, v_ref, w, alpha)
    ref = orw_cfm_w2_loss_reference(v_torch, u, v_ref, w, alpha)
    for name, a, r, e in zip(("loss", "fm", "w2"), out, ref, expected_loss(v, u, v_ref, w, alpha)):
        assert a.dtype == r.dtype == torch.float32
        assert_rel_close(a, e, FP32_RTOL, f"{name} (shape {shape}, {dtype})")
    out[0].backward()
    ref[0].backward()
    assert v_tri.grad.dtype == dtype
    exp_grad, _ = expected_loss_grad(v, u, v_ref, w, alpha)
    assert_low_precision_ok(v_tri.grad, v_torch.grad, exp_grad, f"grad_v (shape {shape}, {dtype})",
                            floor=_half_ulp_floor(dtype, exp_grad))


C_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def check_loss_w2_weights(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """Per-sample W2 coefficients ``c``: ``loss = mean_i(w_i fm_i + alpha c_i w2_i)`` and the gradients in ``v``,
    ``weights`` and ``c`` (with random ``g_fm``, ``g_w2`` on odd ``i``) vs float64."""
    alpha, kind = ALPHAS[i % 3], WEIGHT_KINDS[i % 4]
    v, u, v_ref, w = loss_inputs(shape, seed=7000 + i, dtype=dtype, device=device, weight_kind=kind)
    c = w2_weight_inputs(shape[0], seed=7000 + i, kind=W2_WEIGHT_KINDS[i % 3], dtype=C_DTYPES[(i // 3) % 3],
                         device=device)
    for leaf in (v, w, c):
        leaf.requires_grad_()
    loss, fm, w2 = T.orw_cfm_w2_loss(v, u, v_ref, w, alpha, c)
    acc = accumulation_dtype(dtype)
    assert loss.dtype == fm.dtype == w2.dtype == acc
    where = f"shape {shape}, {dtype}, alpha {alpha}, {kind} weights, c {W2_WEIGHT_KINDS[i % 3]}/{c.dtype}"
    for name, got, exp in zip(("loss", "fm", "w2"), (loss, fm, w2), expected_loss(v, u, v_ref, w, alpha, c)):
        assert_rel_close(got, exp, _rtol(dtype), f"{name} ({where})")
    g_fm = g_w2 = None
    outs, grads = [loss], [torch.ones((), dtype=acc, device=device)]
    if i % 2:
        gen = torch.Generator().manual_seed(i)
        g_fm, g_w2 = (torch.randn(shape[0], generator=gen, dtype=acc).to(device) for _ in range(2))
        outs, grads = [loss, fm, w2], grads + [g_fm, g_w2]
    torch.autograd.backward(outs, grads)
    exp_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, 1.0, g_fm, g_w2, w2_weights=c)
    assert_elementwise_close(v.grad, exp_grad, scale, f"grad_v ({where})", eps=_eps(dtype))
    exp_grad_w, exp_grad_c = expected_loss_input_grads(v, u, v_ref, w, alpha, 1.0, w2_weights=c)
    assert w.grad.dtype == w.dtype and c.grad.dtype == c.dtype
    # The [B] gradients are float64 formulas of fm / w2, rounded once to their inputs' dtype (2^-8 for bf16 c).
    assert_rel_close(w.grad, exp_grad_w, max(_rtol(dtype), 2.0**-24), f"grad_weights ({where})")
    assert_rel_close(c.grad, exp_grad_c, max(_rtol(dtype), torch.finfo(c.dtype).eps / 2 * 1.01),
                     f"grad_w2_weights ({where})")


def check_loss_w2_weights_low_precision(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """bf16/fp16 samples with ``w2_weights``: float32 results within FP32_RTOL; ``grad_v`` at most 2x torch's error."""
    alpha, kind = ALPHAS[i % 3], ("uniform", "zero")[i % 2]
    v, u, v_ref, w = loss_inputs(shape, seed=8000 + i, dtype=dtype, device=device, weight_kind=kind)
    c = w2_weight_inputs(shape[0], seed=8000 + i, kind=W2_WEIGHT_KINDS[i % 3], device=device)
    v_tri, v_torch = v.clone().requires_grad_(), v.clone().requires_grad_()
    out = T.orw_cfm_w2_loss(v_tri, u, v_ref, w, alpha, c)
    ref = orw_cfm_w2_loss_reference(v_torch, u, v_ref, w, alpha, c)
    for name, a, e in zip(("loss", "fm", "w2"), out, expected_loss(v, u, v_ref, w, alpha, c)):
        assert_rel_close(a, e, FP32_RTOL, f"{name} (shape {shape}, {dtype})")
    out[0].backward()
    ref[0].backward()
    exp_grad, _ = expected_loss_grad(v, u, v_ref, w, alpha, w2_weights=c)
    assert_low_precision_ok(v_tri.grad, v_torch.grad, exp_grad, f"grad_v (shape {shape}, {dtype})",
                            floor=_half_ulp_floor(dtype, exp_grad))


def _path_inputs(shape, i: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(3000 + i)
    x_0, x_1, noise = (_randn(shape, gen, dtype, device) for _ in range(3))
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(dtype=t_dtype, device=device)
    sigma = (0.0, 0.3)[i % 2]
    # sigma = 0 with noise given must ignore it; sigma > 0 always gets noise.
    return x_0, x_1, t, sigma, (noise if sigma > 0 or i % 4 == 0 else None)


def _expected_path_grads(x_0, x_1, t, sigma, noise, g_x_t, g_u_t):
    """Float64 autograd of the path written out: grads of ``<g_x_t, x_t> + <g_u_t, u_t>``."""
    leaves = [a.detach().double().cpu().requires_grad_() for a in (x_0, x_1, t)]
    x0, x1, tt = leaves
    tb = tt.reshape((-1,) + (1,) * (x1.ndim - 1))
    x_t = tb * x1 + (1 - tb) * x0
    if noise is not None:
        n = noise.detach().double().cpu().requires_grad_()
        leaves.append(n)
        if sigma > 0:
            x_t = x_t + sigma * n
    u_t = x1 - x0
    g_x_t, g_u_t = g_x_t.double().cpu(), g_u_t.double().cpu()
    grads = torch.autograd.grad([x_t, u_t], leaves, [g_x_t, g_u_t], allow_unused=True)
    grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads)]
    b, d = x1.shape[0], x1[0].numel()
    scales = [
        ((1 - tb) * g_x_t).abs().detach() + g_u_t.abs(),
        (tb * g_x_t).abs().detach() + g_u_t.abs(),
        # d/dt = sum (x_1 - x_0) g: the terms are x_1 g and x_0 g (their difference may cancel).
        ((x1 * g_x_t).abs() + (x0 * g_x_t).abs()).detach().reshape(b, d).sum(1),
    ]
    if noise is not None:
        scales.append((sigma * g_x_t).abs() if sigma > 0 else torch.zeros_like(g_x_t))
    return grads, scales


def check_path(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """``(x_t, u_t)`` and the four input gradients vs float64."""
    x_0, x_1, t, sigma, noise = _path_inputs(shape, i, dtype, device)
    leaves = [x_0, x_1, t] + ([noise] if noise is not None else [])
    for leaf in leaves:
        leaf.requires_grad_()
    x_t, u_t = T.conditional_path(x_0, x_1, t, sigma, noise)
    assert x_t.dtype == u_t.dtype == dtype and x_t.shape == u_t.shape == x_1.shape
    where = f"shape {shape}, {dtype}, sigma {sigma}"
    exp_x_t, exp_u_t, scale = expected_path(x_0, x_1, t, sigma, noise)
    eps = _eps(dtype)
    assert_elementwise_close(x_t, exp_x_t, scale, f"x_t ({where})", eps=eps)
    assert_elementwise_close(u_t, exp_u_t, (x_0.double().abs() + x_1.double().abs()).detach().cpu(),
                             f"u_t ({where})", eps=eps)

    gen = torch.Generator().manual_seed(4000 + i)
    g_x_t, g_u_t = _randn(shape, gen, dtype, device), _randn(shape, gen, dtype, device)
    grads = torch.autograd.grad([x_t, u_t], leaves, [g_x_t, g_u_t])
    exp_grads, scales = _expected_path_grads(x_0, x_1, t, sigma, noise, g_x_t, g_u_t)
    d = max(x_1[0].numel(), 1)
    for name, leaf, got, exp, sc in zip(("x_0", "x_1", "t", "noise"), leaves, grads, exp_grads, scales):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        # grad_t sums D products: allow the float32 summation's log2(D) growth on top.
        ulps = 8 * (1 + math.log2(d)) if name == "t" else 8
        assert_elementwise_close(got, exp, sc, f"grad_{name} ({where})", ulps=ulps, eps=eps)


def check_path_low_precision(shape, i: int, dtype: torch.dtype, device: str) -> None:
    x_0, x_1, t, sigma, noise = _path_inputs(shape, i, dtype, device)
    x_t, u_t = T.conditional_path(x_0, x_1, t, sigma, noise)
    ref_x_t, ref_u_t = conditional_path_reference(x_0, x_1, t, sigma, noise)
    exp_x_t, exp_u_t, _ = expected_path(x_0, x_1, t, sigma, noise)
    assert x_t.dtype == u_t.dtype == dtype
    for name, got, ref, exp in (("x_t", x_t, ref_x_t, exp_x_t), ("u_t", u_t, ref_u_t, exp_u_t)):
        assert_low_precision_ok(got, ref, exp, f"{name} (shape {shape}, {dtype})", floor=_half_ulp_floor(dtype, exp))


def _ode_inputs(shape, i: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(5000 + i)
    n_k = i % 10  # 0..9 stage values: one, two and three passes of MAX_STAGES (4)
    x = _randn(shape, gen, dtype, device)
    ks = [_randn(shape, gen, dtype, device) for _ in range(n_k)]
    coeffs = [float(c) for c in torch.rand(n_k, generator=gen, dtype=torch.float64) * 2 - 0.5]
    dt = (0.1, 1 / 3, -0.05)[i % 3]
    return x, ks, coeffs, dt


def check_ode_step(shape, i: int, dtype: torch.dtype, device: str) -> None:
    """``x + dt * sum_j c_j k_j`` and its gradients vs float64."""
    x, ks, coeffs, dt = _ode_inputs(shape, i, dtype, device)
    leaves = [x] + ks
    for leaf in leaves:
        leaf.requires_grad_()
    out = T.ode_step(x, ks, coeffs, dt)
    assert out.dtype == dtype and out.shape == x.shape
    where = f"shape {shape}, {dtype}, {len(ks)} stages"
    exp, scale = expected_ode_step(x, ks, coeffs, dt)
    assert_elementwise_close(out, exp, scale, f"ode_step ({where})", eps=_eps(dtype))

    g = _randn(shape, torch.Generator().manual_seed(6000 + i), dtype, device)
    grads = torch.autograd.grad(out, leaves, g)
    g64 = g.double().cpu()
    assert torch.equal(grads[0], g), f"grad_x ({where})"
    for j, (got, c) in enumerate(zip(grads[1:], coeffs)):
        assert got.dtype == dtype
        exp_k = dt * c * g64
        assert_elementwise_close(got, exp_k, exp_k.abs(), f"grad_k{j} ({where})", eps=_eps(dtype))


def check_ode_step_low_precision(shape, i: int, dtype: torch.dtype, device: str) -> None:
    x, ks, coeffs, dt = _ode_inputs(shape, i, dtype, device)
    out = T.ode_step(x, ks, coeffs, dt)
    ref = ode_step_reference(x, ks, coeffs, dt)
    exp, _ = expected_ode_step(x, ks, coeffs, dt)
    assert out.dtype == dtype
    assert_low_precision_ok(out, ref, exp, f"ode_step (shape {shape}, {dtype})", floor=_half_ulp_floor(dtype, exp))


# --------------------------------------------------------------------------------------------
# CPU: the interpreter
# --------------------------------------------------------------------------------------------


@cpu
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", range(len(LOSS_SHAPES)))
def test_loss_random_shapes(i, dtype):
    check_loss(LOSS_SHAPES[i], i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
@pytest.mark.parametrize("i", range(LOWP_N))
def test_loss_low_precision(i, dtype):
    check_loss_low_precision(LOSS_SHAPES[i], i, dtype, "cpu")


W2_WEIGHTS_IDX = list(range(0, len(LOSS_SHAPES), 10))  # 20 shapes: 1x1, 6x3x5x7, 3x6311, 433x10, odd D, ...


@cpu
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", W2_WEIGHTS_IDX)
def test_loss_w2_weights(i, dtype):
    check_loss_w2_weights(LOSS_SHAPES[i], i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
@pytest.mark.parametrize("i", range(0, LOWP_N, 4))
def test_loss_w2_weights_low_precision(i, dtype):
    check_loss_w2_weights_low_precision(LOSS_SHAPES[i], i, dtype, "cpu")


@cpu
def test_loss_w2_weights_split_rows_and_ones():
    """Split rows (per-split sums added before c enters) vs float64; None is the 5-argument call bit for bit, and
    all-ones c is the same loss within a float32 rounding of alpha * c (fm and w2 are the same kernels' outputs)."""
    check_loss_w2_weights(SPLIT_SHAPES[1], 1, torch.float32, "cpu")
    v, u, v_ref, w = loss_inputs(SPLIT_SHAPES[1], seed=2)
    plain = T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    for a, b in zip(plain, T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, None)):
        assert torch.equal(a, b)
    ones = T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, torch.ones(SPLIT_SHAPES[1][0]))
    assert torch.equal(plain[1], ones[1]) and torch.equal(plain[2], ones[2])
    torch.testing.assert_close(ones[0], plain[0], rtol=2.0**-22, atol=0)


@cpu
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", range(len(PATH_SHAPES)))
def test_conditional_path_random_shapes(i, dtype):
    check_path(PATH_SHAPES[i], i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
@pytest.mark.parametrize("i", range(LOWP_N))
def test_conditional_path_low_precision(i, dtype):
    check_path_low_precision(PATH_SHAPES[i], i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", range(len(ODE_SHAPES)))
def test_ode_step_random_shapes(i, dtype):
    check_ode_step(ODE_SHAPES[i], i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
@pytest.mark.parametrize("i", range(LOWP_N))
def test_ode_step_low_precision(i, dtype):
    check_ode_step_low_precision(ODE_SHAPES[i], i, dtype, "cpu")


def _bf16_rounding_cases() -> torch.Tensor:
    """float32 values whose bf16 rounding is delicate: ties both ways, carries, overflow, NaN, inf."""
    patterns = []
    for hi in (0x3F80, 0x3F81, 0x4049, 0x7F7F, 0x0001, 0x0080, 0xBF80, 0xBF81, 0xFF7F):
        for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            patterns.append((hi << 16) | lo)
    floats = [struct.unpack("<f", struct.pack("<I", p))[0] for p in patterns]
    floats += [float("inf"), float("-inf"), float("nan"), 3.4028234663852886e38, 1e-40, -1e-40]
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(floats, dtype=torch.float32), torch.randn(4000, generator=gen) * 100])
    return values[values != 0]  # the path kernel computes 0*x_1 + 1*x_0, which drops the sign of -0.0


@cpu
def test_bf16_outputs_round_to_nearest_even():
    """float32 -> bf16 rounding in the kernels matches torch's (the interpreter's own cast truncates)."""
    x_0 = _bf16_rounding_cases().reshape(-1, 1)
    # float32 x_0 and bf16 x_1 = 0: x_t = 0 * x_1 + (1 - 0) * x_0 = x_0 in float32, then rounded to bf16.
    x_t, _ = T.conditional_path(x_0, torch.zeros_like(x_0, dtype=torch.bfloat16), torch.zeros(x_0.shape[0]))
    assert x_t.dtype == torch.bfloat16
    torch.testing.assert_close(x_t, x_0.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


@cpu
def test_non_contiguous_inputs_give_the_same_values():
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(6, 5, 8, generator=gen) for _ in range(5)]
    nc = [b.transpose(1, 2) for b in base]  # [6, 8, 5], non-contiguous
    assert not any(t.is_contiguous() for t in nc)
    c = [t.contiguous() for t in nc]
    w_base = torch.rand(12, generator=gen)
    w_nc, w_c = w_base[::2], w_base[::2].contiguous()
    for a, b in zip(T.orw_cfm_w2_loss(nc[0], nc[1], nc[2], w_nc, 0.7), T.orw_cfm_w2_loss(c[0], c[1], c[2], w_c, 0.7)):
        assert torch.equal(a, b)
    t_nc = torch.rand(12, generator=gen)[::2]
    path_nc = T.conditional_path(nc[0], nc[1], t_nc, 0.2, nc[2])
    path_c = T.conditional_path(c[0], c[1], t_nc.contiguous(), 0.2, c[2])
    for a, b in zip(path_nc, path_c):
        assert torch.equal(a, b)
    coeffs = [0.5, -0.25, 1.0, 2.0]
    assert torch.equal(T.ode_step(nc[0], nc[1:], coeffs, 0.1), T.ode_step(c[0], c[1:], coeffs, 0.1))
    # The ops themselves (not only the wrappers) accept non-contiguous tensors.
    from orwcfm_fast.ops.triton.ode import ode_step_op

    assert torch.equal(ode_step_op(nc[0], nc[1:], coeffs, 0.1), T.ode_step(c[0], c[1:], coeffs, 0.1))
    # The backward of a non-contiguous v goes through the same kernel.
    v_nc = nc[0].clone().requires_grad_()  # clone keeps the transposed strides
    v_c = c[0].clone().requires_grad_()
    T.orw_cfm_w2_loss(v_nc, nc[1], nc[2], w_nc, 0.7)[0].backward()
    T.orw_cfm_w2_loss(v_c, c[1], c[2], w_c, 0.7)[0].backward()
    assert torch.equal(v_nc.grad, v_c.grad)


def _op_cases():
    """``(op, args)`` for opcheck/gradcheck: every op, with and without its optional parts."""
    from orwcfm_fast.ops.triton.loss import orw_cfm_w2_loss_backward_op, orw_cfm_w2_loss_op
    from orwcfm_fast.ops.triton.ode import ode_step_op
    from orwcfm_fast.ops.triton.path import conditional_path_op

    gen = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    def w(b):
        return (torch.rand(b, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()

    return {
        "loss": (orw_cfm_w2_loss_op, (r(3, 2, 3), r(3, 2, 3), r(3, 2, 3), w(3), 0.7)),
        "loss_alpha0": (orw_cfm_w2_loss_op, (r(2, 5), r(2, 5), r(2, 5), w(2), 0.0)),
        "loss_w2_weights": (orw_cfm_w2_loss_op, (r(3, 2, 3), r(3, 2, 3), r(3, 2, 3), w(3), 0.7, w(3))),
        "loss_backward": (orw_cfm_w2_loss_backward_op, (r(3, 4), r(3, 4), r(3, 4), r(3), r(3))),
        "path": (conditional_path_op, (r(3, 4), r(3, 4), w(3))),
        "path_noise": (conditional_path_op, (r(3, 2, 2), r(3, 2, 2), w(3), 0.3, r(3, 2, 2))),
        "ode_step_0": (ode_step_op, (r(2, 3), [], [], 0.1)),
        "ode_step_4": (ode_step_op, (r(2, 3), [r(2, 3) for _ in range(4)], [0.5, -1.0, 0.25, 2.0], 0.1)),
    }


OP_CASES = ["loss", "loss_alpha0", "loss_w2_weights", "loss_backward", "path", "path_noise", "ode_step_0",
            "ode_step_4"]


def _is_tensor_list(a) -> bool:
    return isinstance(a, list) and bool(a) and all(isinstance(x, torch.Tensor) for x in a)


def _flatten(args) -> list[torch.Tensor]:
    """The tensors of an op's arguments, tensor-list members included, in order."""
    return [x for a in args for x in (a if _is_tensor_list(a) else [a]) if isinstance(x, torch.Tensor)]


def _unflatten(args, flat):
    """``args`` with its tensors replaced, in order, by ``flat``."""
    it = iter(flat)
    out = []
    for a in args:
        if _is_tensor_list(a):
            out.append([next(it) for _ in a])
        else:
            out.append(next(it) if isinstance(a, torch.Tensor) else a)
    return out


@cpu
@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck(case):
    """All of opcheck's checks (schema, autograd registration, fake tensors, AOT dispatch with
    dynamic shapes) pass under the interpreter: during fake-tensor propagation the op bodies skip
    the interpreted launch, and AOTAutograd keeps the ops opaque instead of tracing the kernels."""
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


@cpu
@pytest.mark.parametrize("case", ["loss", "loss_alpha0", "loss_w2_weights", "loss_backward", "path", "path_noise",
                                  "ode_step_4"])
def test_gradcheck_float64(case):
    """The registered autograd formulas against finite differences (every differentiable input)."""
    op, args = _op_cases()[case]
    flat = _flatten(args)

    def fn(*inputs):
        return op(*_unflatten(args, inputs))

    assert torch.autograd.gradcheck(fn, flat, eps=1e-6, atol=1e-8)


@cpu
@pytest.mark.parametrize("case", ["loss", "loss_w2_weights", "loss_backward"])
def test_gradgradcheck_loss_float64(case):
    """The loss's backward op is differentiable too (double backward, e.g. for gradient penalties)."""
    op, args = _op_cases()[case]

    def fn(*inputs):
        out = op(*_unflatten(args, inputs))
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradgradcheck(fn, _flatten(args), eps=1e-6, atol=1e-8)


@cpu
def test_torch_compile_fullgraph_matches_eager():
    """``torch.compile(fullgraph=True)`` traces the wrappers and ops (forward and backward).

    On CPU Inductor cannot generate Triton, so the graph runs with ``aot_eager``; this still
    proves the ops, their fake implementations and autograd formulas are traceable. Inductor
    itself is exercised by the CUDA test.
    """
    gen = torch.Generator().manual_seed(9)
    v, u, v_ref, noise = (torch.randn(5, 3, 4, generator=gen) for _ in range(4))
    w, t = torch.rand(5, generator=gen), torch.rand(5, generator=gen)

    def step(v, u, v_ref, w, t, noise):
        x_t, u_t = T.conditional_path(u, v_ref, t, 0.1, noise)
        x_next = T.ode_step(x_t, [v, u_t], [0.5, 0.5], 0.2)
        loss, fm, w2 = T.orw_cfm_w2_loss(v, u_t, x_next, w, 0.5)
        return loss + fm.sum() + w2.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [a.clone().requires_grad_() for a in (v, u, v_ref, w, t, noise)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves)
        results.append((out, grads))
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch.equal(out_e, out_c)
    for a, b in zip(grads_e, grads_c):
        assert torch.equal(a, b)


@cpu
def test_empty_inputs_match_the_reference():
    for shape in [(0, 3), (3, 0), (2, 0, 4)]:
        v, u, v_ref = (torch.randn(shape) for _ in range(3))
        w = torch.rand(shape[0])
        for a, b in zip(T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5), orw_cfm_w2_loss_reference(v, u, v_ref, w, 0.5)):
            torch.testing.assert_close(a, b, equal_nan=True)
        t = torch.rand(shape[0])
        for a, b in zip(T.conditional_path(v, u, t, 0.1, v_ref), conditional_path_reference(v, u, t, 0.1, v_ref)):
            assert a.shape == b.shape and a.dtype == b.dtype
        assert T.ode_step(v, [u], [1.0], 0.1).shape == v.shape


SPLIT_SHAPES = [(1, 16, 64, 64), (3, 20001), (2, 4, 97, 99), (5, 8193 * 2)]
"""Small batches of long rows: the forward splits each row over several programs."""


def test_forward_splits_policy():
    from orwcfm_fast.ops.triton.loss import MIN_SPLIT_TILES, TARGET_PROGRAMS, forward_splits

    tile = 2048  # MAX_TILE
    assert forward_splits(128, 3072) == (1, 4096)  # CIFAR rows stay whole (the one-pass path)
    assert forward_splits(512, 2) == (1, 2)
    assert forward_splits(1, MIN_SPLIT_TILES * tile) == (1, MIN_SPLIT_TILES * tile)  # not long enough to split
    assert forward_splits(1, 16 * 64 * 64) == (8, 8192)  # one 64x64x16 latent: 8 programs, not 1
    assert forward_splits(16, 16 * 64 * 64) == (8, 8192)  # 128 programs instead of 16
    splits, split_d = forward_splits(4096, 16 * 64 * 64)  # a big batch fills the GPU alone: no split
    assert (splits, split_d) == (1, 16 * 64 * 64)
    for b, d in [(1, 10**6), (3, 20001), (7, 123457), (100, 50000), (2000, 9000)]:
        splits, split_d = forward_splits(b, d)
        assert split_d % tile == 0 and (splits - 1) * split_d < d <= splits * split_d  # no empty split
        assert splits == 1 or b * splits <= 2 * TARGET_PROGRAMS


@cpu
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", range(len(SPLIT_SHAPES)))
def test_loss_split_rows(i, dtype):
    from orwcfm_fast.ops.triton.loss import forward_splits

    shape = SPLIT_SHAPES[i]
    assert forward_splits(shape[0], math.prod(shape[1:]))[0] > 1
    check_loss(shape, i, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
def test_loss_split_rows_low_precision(dtype):
    check_loss_low_precision(SPLIT_SHAPES[0], 0, dtype, "cpu")


@cpu
def test_loss_split_rows_deterministic():
    v, u, v_ref, w = loss_inputs(SPLIT_SHAPES[1], seed=3, weight_kind="mixed")
    first = T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    for a, b in zip(first, T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)):
        assert torch.equal(a, b)


@cpu
def test_integrate_with_a_seven_stage_tableau():
    """dopri5's coefficients as a fixed-step method: rows of 5 and 6 stage values take two passes."""
    from orwcfm_fast.sampling import integrate

    tableau = dopri5_fixed_tableau()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, generator=gen, dtype=torch.float64) / 3

    def model(t, x):
        return torch.tanh(x @ weight.to(x.dtype)) * (1 + t[:, None].to(x.dtype))

    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        x_0 = torch.randn(37, 6, generator=gen, dtype=torch.float64).to(dtype)
        got = integrate(model, x_0, solver=tableau, steps=3, backend="triton")
        want = integrate(model, x_0, solver=tableau, steps=3, backend="torch")
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)


@cpu
def test_input_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="2 coefficients for 1 stage values"):
        T.ode_step(x, [x], [1.0, 2.0], 0.1)
    with pytest.raises(ValueError, match=r"ks\[0\] is \(3, 2\)"):
        T.ode_step(x, [torch.randn(3, 2)], [1.0], 0.1)
    with pytest.raises(ValueError, match="sigma > 0 needs `noise`"):
        T.conditional_path(x, x, torch.rand(2), 0.5)
    with pytest.raises(ValueError, match="u is"):
        T.orw_cfm_w2_loss(x, torch.randn(2, 4), x, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match=r"weights must be \[B\] = \[2\]"):
        T.orw_cfm_w2_loss(x, x, x, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"w2_weights must be \[B\] = \[2\] on cpu, got \(3,\)"):
        T.orw_cfm_w2_loss(x, x, x, torch.ones(2), 1.0, torch.ones(3))
    with pytest.raises(TypeError, match="w2_weights must be a floating-point tensor"):
        T.orw_cfm_w2_loss(x, x, x, torch.ones(2), 1.0, torch.ones(2, dtype=torch.int64))


def test_is_available_reports_devices():
    ok, why = T.is_available("cpu")
    assert ok == CPU_OK and why
    ok, why = T.is_available("mps")
    assert not ok and "mps" in why
    ok, why = T.is_available("cuda")
    assert ok == (torch.cuda.is_available()) and why


def test_import_is_lazy():
    """Importing the package imports neither triton nor a kernel module (and so queries no GPU)."""
    code = (
        "import sys, orwcfm_fast.ops.triton as T; "
        "bad = [m for m in ('triton', 'orwcfm_fast.ops.triton.loss', 'orwcfm_fast.ops.triton._common') "
        "if m in sys.modules]; assert not bad, bad; "
        "assert callable(T.ode_step) and callable(T.orw_cfm_w2_loss) and callable(T.conditional_path)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# CUDA: compiled kernels, Inductor, CUDA graphs
# --------------------------------------------------------------------------------------------

CUDA_IDX = list(range(11)) + list(range(11, 200, 9))  # the fixed shapes and a spread of random ones


@cuda
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", CUDA_IDX)
def test_cuda_values_vs_float64(i, dtype):
    check_loss(LOSS_SHAPES[i], i, dtype, "cuda")
    j = i % len(PATH_SHAPES)
    check_path(PATH_SHAPES[j], j, dtype, "cuda")
    check_ode_step(ODE_SHAPES[j], j, dtype, "cuda")


@cuda
@pytest.mark.parametrize("dtype", FP.values(), ids=FP.keys())
@pytest.mark.parametrize("i", W2_WEIGHTS_IDX + [len(LOSS_SHAPES) + j for j in range(len(SPLIT_SHAPES))])
def test_cuda_loss_w2_weights(i, dtype):
    """Compiled kernels with per-sample W2 coefficients (the random shapes, then the split-row shapes)."""
    shape = LOSS_SHAPES[i] if i < len(LOSS_SHAPES) else SPLIT_SHAPES[i - len(LOSS_SHAPES)]
    check_loss_w2_weights(shape, i, dtype, "cuda")
    if i < LOWP_N:
        check_loss_w2_weights_low_precision(shape, i, torch.bfloat16, "cuda")


@cuda
def test_cuda_w2_weights_no_host_sync():
    """The public op with w2_weights, forward and backward, never synchronises with the host."""
    from orwcfm_fast import ops

    v, u, v_ref, w = loss_inputs((64, 3, 16, 16), seed=3, device="cuda")
    c = w2_weight_inputs(64, seed=3, device="cuda")
    v.requires_grad_()
    c.requires_grad_()
    warm_up, _, _ = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, backend="triton", w2_weights=c)
    torch.autograd.grad(warm_up, [v, c])  # the kernels' JIT compiles happen outside the check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, backend="triton", w2_weights=c)
        torch.autograd.grad(loss, [v, c])
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@cuda
@pytest.mark.parametrize("dtype", LOWP.values(), ids=LOWP.keys())
@pytest.mark.parametrize("i", range(LOWP_N))
def test_cuda_low_precision(i, dtype):
    check_loss_low_precision(LOSS_SHAPES[i], i, dtype, "cuda")
    check_path_low_precision(PATH_SHAPES[i], i, dtype, "cuda")
    check_ode_step_low_precision(ODE_SHAPES[i], i, dtype, "cuda")


@cuda
@pytest.mark.parametrize("case", OP_CASES)
def test_cuda_opcheck(case):
    """opcheck with compiled kernels: here AOTAutograd decomposes the ops into their kernels."""
    op, args = _op_cases()[case]
    flat = [a.detach().cuda().requires_grad_(a.requires_grad) for a in _flatten(args)]
    torch.library.opcheck(op, tuple(_unflatten(args, flat)))


@cuda
@pytest.mark.parametrize("i", range(len(SPLIT_SHAPES)))
def test_cuda_loss_split_rows(i):
    check_loss(SPLIT_SHAPES[i], i, torch.float32, "cuda")
    v, u, v_ref, w = loss_inputs(SPLIT_SHAPES[i], seed=i, device="cuda")
    first = T.orw_cfm_w2_loss(v, u, v_ref, w, 1.0)
    for a, b in zip(first, T.orw_cfm_w2_loss(v, u, v_ref, w, 1.0)):
        assert torch.equal(a, b)


@cuda
def test_cuda_deterministic():
    v, u, v_ref, w = loss_inputs((64, 3, 64, 64), seed=1, device="cuda")
    first = T.orw_cfm_w2_loss(v, u, v_ref, w, 1.0)
    for _ in range(3):
        for a, b in zip(first, T.orw_cfm_w2_loss(v, u, v_ref, w, 1.0)):
            assert torch.equal(a, b)


@cuda
def test_cuda_inductor_fullgraph_matches_eager():
    """Full Inductor: the ``triton_op`` bodies are traced and their kernels inlined into the graph."""
    gen = torch.Generator().manual_seed(9)
    v, u, v_ref, noise = (torch.randn(16, 3, 8, 8, generator=gen).cuda() for _ in range(4))
    w, t = torch.rand(16, generator=gen).cuda(), torch.rand(16, generator=gen).cuda()

    def step(v, u, v_ref, w, t, noise):
        x_t, u_t = T.conditional_path(u, v_ref, t, 0.1, noise)
        x_next = T.ode_step(x_t, [v, u_t, x_t, v_ref], [0.5, 0.5, 0.25, 1.0], 0.2)
        loss, fm, w2 = T.orw_cfm_w2_loss(v, u_t, x_next, w, 0.5)
        return loss + fm.sum() + w2.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [a.clone().requires_grad_() for a in (v, u, v_ref, w, t, noise)]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out, leaves)))
    (out_e, grads_e), (out_c, grads_c) = results
    # Inductor may fuse the surrounding torch ops differently: float32 rounding-level differences only.
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    for a, b in zip(grads_c, grads_e):  # grad_t sums 192 products: an absolute floor for cancellation
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _capture_and_replay(fn, static_inputs, new_values):
    """Capture ``fn(*static_inputs)`` in a CUDA graph, load ``new_values`` in place, replay; return
    (replayed outputs, eager outputs on the new values)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compiles the kernels outside the capture
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)
    for dst, src in zip(static_inputs, new_values):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    return static_out, fn(*new_values)


@cuda
def test_cuda_graph_capture_and_replay():
    from orwcfm_fast.ops.triton.loss import orw_cfm_w2_loss_backward_op

    gen = torch.Generator().manual_seed(4)

    def fresh(*shapes):
        return [torch.randn(s, generator=gen).cuda() for s in shapes]

    shape = (32, 3, 32, 32)
    cases = [
        (lambda v, u, r, w: T.orw_cfm_w2_loss(v, u, r, w, 0.5), [shape] * 3 + [(32,)]),
        (lambda v, u, r, w, c: T.orw_cfm_w2_loss(v, u, r, w, 0.5, c), [shape] * 3 + [(32,), (32,)]),
        (lambda v, u, r, c1, c2: (orw_cfm_w2_loss_backward_op(v, u, r, c1, c2),), [shape] * 3 + [(32,), (32,)]),
        (lambda x0, x1, t, n: T.conditional_path(x0, x1, t, 0.1, n), [shape, shape, (32,), shape]),
        (lambda x, k0, k1, k2, k3: (T.ode_step(x, [k0, k1, k2, k3], [1 / 6, 1 / 3, 1 / 3, 1 / 6], 0.05),), [shape] * 5),
    ]
    for fn, shapes in cases:
        replayed, eager = _capture_and_replay(fn, fresh(*shapes), fresh(*shapes))
        for a, b in zip(replayed, eager):
            assert torch.equal(a, b)
