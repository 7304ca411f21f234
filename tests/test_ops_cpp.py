"""The C++ (CPU) and CUDA kernels of ``orwcfm_fast._C`` against the float64 oracles of op_cases.

Skipped as a whole when the extension is not built (``ORWCFM_FAST_NO_EXT=1``). The CUDA
tests (marked ``cuda``) also need a GPU and the extension's CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

from op_cases import (
    FP32_RTOL,
    W2_WEIGHT_KINDS,
    assert_elementwise_close,
    assert_low_precision_ok,
    assert_rel_close,
    expected_loss,
    expected_loss_grad,
    expected_loss_input_grads,
    expected_ode_step,
    expected_path,
    loss_inputs,
    random_shapes,
    w2_weight_inputs,
)
from orwcfm_fast.ops import _cpp
from orwcfm_fast.ops import reference as ref

_AVAILABLE, _WHY = _cpp.is_available()
if not _AVAILABLE:
    pytest.skip(f"orwcfm_fast._C is not usable: {_WHY}", allow_module_level=True)

OPS = torch.ops.orwcfm_fast
LOSS_SHAPES = random_shapes(200, seed=20240611)
SHAPES = random_shapes(60, seed=7)
ALPHAS = (0.0, 0.7, 3.0)
WEIGHT_KINDS = ("uniform", "zero", "huge", "mixed")
LOW_PRECISION = (torch.bfloat16, torch.float16)
EPS64 = 2.0**-53
FP64_RTOL = 1e-12
FP32_NOISE = 8 * 2.0**-24  # a few float32 ulps, relative: floor for float32-returned values


def _ids(shapes):
    return [f"{i}-{'x'.join(map(str, s))}" for i, s in enumerate(shapes)]


def _loss_case(i: int) -> tuple[tuple[int, ...], float, str]:
    """Shape, alpha and weight kind of loss case i: every (alpha, kind) pair recurs every 12 cases."""
    return LOSS_SHAPES[i], ALPHAS[i % 3], WEIGHT_KINDS[(i // 3) % 4]


def _upstream(i: int, b: int, dtype=torch.float32):
    """Upstream gradients (g_loss, g_fm, g_w2): only the loss for even cases, all three for odd."""
    if i % 2 == 0:
        return 1.0, None, None
    g = torch.Generator().manual_seed(10_000 + i)
    return 0.5, torch.randn(b, generator=g).to(dtype), torch.randn(b, generator=g).to(dtype)


def _loss_and_grad(fn, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2):
    """``fn``'s (loss, fm, w2) and d/dv of g_loss * loss + <g_fm, fm> + <g_w2, w2>."""
    v = v.detach().clone().requires_grad_(True)
    loss, fm, w2 = fn(v, u, v_ref, w, alpha)
    outputs, grads = [loss], [torch.full_like(loss, g_loss)]
    if g_fm is not None:
        outputs += [fm, w2]
        grads += [g_fm.to(fm), g_w2.to(w2)]
    (grad_v,) = torch.autograd.grad(outputs, [v], grads)
    return loss.detach(), fm.detach(), w2.detach(), grad_v


def _path_inputs(shape, seed: int, dtype=torch.float32, sigma: float = 0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_0, x_1, noise = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
                       for _ in range(3))
    t = torch.rand(shape[0], generator=g).to(device)
    return x_0, x_1, t, (noise if sigma > 0 else None)


def _ode_inputs(shape, seed: int, n_ks: int, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    ks = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) for _ in range(n_ks)]
    coeffs = [float(c) for c in torch.randn(n_ks, generator=g, dtype=torch.float64)]
    dt = 0.01 + float(torch.rand((), generator=g, dtype=torch.float64))
    return x, ks, coeffs, dt


def _unaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``x`` starting ``offset`` elements into its storage (not 16-byte aligned)."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    out = buf[offset:].view(x.shape)
    out.copy_(x)
    return out


# ============================================================================ loss: CPU accuracy


@pytest.mark.parametrize("i", range(len(LOSS_SHAPES)), ids=_ids(LOSS_SHAPES))
def test_loss_fp32(i):
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, weight_kind=kind)
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    loss, fm, w2, grad_v = _loss_and_grad(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    assert loss.shape == () and fm.shape == w2.shape == (shape[0],)
    assert loss.dtype == fm.dtype == w2.dtype == torch.float32
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, alpha)
    tag = f"{shape} alpha={alpha} weights={kind}"
    assert_rel_close(loss, e_loss, FP32_RTOL, f"loss {tag}")
    assert_rel_close(fm, e_fm, FP32_RTOL, f"fm {tag}")
    assert_rel_close(w2, e_w2, FP32_RTOL, f"w2 {tag}")
    e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    assert grad_v.dtype == torch.float32
    assert_elementwise_close(grad_v, e_grad, scale, f"grad_v {tag}")


@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 4), ids=_ids(LOSS_SHAPES)[::4])
def test_loss_fp64(i):
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=torch.float64, weight_kind=kind)
    g_loss, g_fm, g_w2 = _upstream(i, shape[0], torch.float64)
    loss, fm, w2, grad_v = _loss_and_grad(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    assert loss.dtype == fm.dtype == w2.dtype == grad_v.dtype == torch.float64
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, alpha)
    assert_rel_close(loss, e_loss, FP64_RTOL, f"loss {shape}")
    assert_rel_close(fm, e_fm, FP64_RTOL, f"fm {shape}")
    assert_rel_close(w2, e_w2, FP64_RTOL, f"w2 {shape}")
    e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    assert_elementwise_close(grad_v, e_grad, scale, f"grad_v {shape}", eps=EPS64)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 5), ids=_ids(LOSS_SHAPES)[::5])
def test_loss_low_precision(i, dtype):
    """At most twice the torch backend's error (float64 oracle of the same rounded inputs)."""
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=dtype, weight_kind=kind)
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    ours = _loss_and_grad(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    torch_ = _loss_and_grad(ref.orw_cfm_w2_loss_reference, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    assert ours[0].dtype == torch.float32 and ours[3].dtype == dtype
    expected = (*expected_loss(v, u, v_ref, w, alpha), expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2))
    for name, a, t, e in zip(("loss", "fm", "w2"), ours[:3], torch_[:3], expected[:3]):
        # The reductions are returned in float32: a few float32 ulps are irreducible.
        assert_low_precision_ok(a, t, e, f"{name} {shape} {dtype}", floor=FP32_NOISE * float(e.abs().max()))
    e_grad, scale = expected[3]
    assert_low_precision_ok(ours[3], torch_[3], e_grad, f"grad_v {shape} {dtype}",
                            floor=FP32_NOISE * float(scale.max()))


def test_loss_long_rows_fp32():
    """Accurate sums far beyond the random shapes' D (blocked float sums added in double)."""
    v, u, v_ref, w = loss_inputs((2, 1 << 20), seed=3)
    loss, fm, w2 = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, 0.5)
    assert_rel_close(loss, e_loss, FP32_RTOL, "loss")
    assert_rel_close(fm, e_fm, FP32_RTOL, "fm")
    assert_rel_close(w2, e_w2, FP32_RTOL, "w2")


def test_loss_independent_of_thread_count():
    """The CPU summation order is fixed, so results are bitwise equal for any number of threads."""
    v, u, v_ref, w = loss_inputs((3, 70_001), seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 1.5)
        torch.set_num_threads(max(2, threads))
        many = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 1.5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("w_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_loss_weight_dtypes(w_dtype):
    v, u, v_ref, w = loss_inputs((6, 3, 7), seed=11)
    w = w.to(w_dtype)
    loss, fm, w2 = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.25)
    e_loss, _, _ = expected_loss(v, u, v_ref, w, 0.25)
    assert loss.dtype == torch.float32
    assert_rel_close(loss, e_loss, FP32_RTOL, "loss")


@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 10), ids=_ids(LOSS_SHAPES)[::10])
def test_loss_grads_of_all_inputs(i):
    """Gradients of u, v_ref and weights (the rarely used paths) against float64 autograd of the reference."""
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, weight_kind=kind)
    ins = [a.clone().requires_grad_(True) for a in (v, u, v_ref, w)]
    ins64 = [a.double().requires_grad_(True) for a in (v, u, v_ref, w)]
    g_loss, g_fm, g_w2 = _upstream(i + 1, shape[0])  # odd: all three outputs
    outs = _cpp.orw_cfm_w2_loss(*ins, alpha)
    outs64 = ref.orw_cfm_w2_loss_reference(*ins64, alpha)
    grads = [torch.tensor(g_loss), g_fm, g_w2]
    got = torch.autograd.grad(outs, ins, grads)
    exp = torch.autograd.grad(outs64, ins64, [g.double() for g in grads])
    for name, a, e in zip(("v", "u", "v_ref"), got, exp):
        assert a.dtype == torch.float32
        # u and v_ref get one term each: a few ulps of the expected magnitude (plus the v-term's scale for v).
        scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)[1] if name == "v" else e.abs()
        assert_elementwise_close(a, e, scale, f"grad_{name} {shape}")
    assert got[3].dtype == w.dtype
    assert_rel_close(got[3], exp[3], FP32_RTOL, f"grad_weights {shape}")


def test_loss_backward_op_direct():
    """orw_cfm_w2_loss_backward(v, u, v_ref, c_fm, c_w2) is c_fm (v-u) + c_w2 (v-v_ref) per sample."""
    g = torch.Generator().manual_seed(2)
    v, u, v_ref = (torch.randn(5, 4, 9, generator=g) for _ in range(3))
    c_fm, c_w2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g)
    got = OPS.orw_cfm_w2_loss_backward(v, u, v_ref, c_fm, c_w2)
    shape = (5, 1, 1)
    t_fm = c_fm.reshape(shape) * (v.double() - u.double())
    t_w2 = c_w2.double().reshape(shape) * (v.double() - v_ref.double())
    assert got.dtype == v.dtype and got.is_contiguous()
    assert_elementwise_close(got, t_fm + t_w2, t_fm.abs() + t_w2.abs(), "grad_v")
    torch.testing.assert_close(got, ref.orw_cfm_w2_loss_backward_reference(v, u, v_ref, c_fm, c_w2))


# ============================================================================ loss: per-sample W2 coefficients


C_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _w2_weights_case(i: int, b: int, device="cpu") -> torch.Tensor:
    """w2_weights of loss case i: kind and dtype cycle independently of (alpha, weight kind)."""
    return w2_weight_inputs(b, seed=20_000 + i, kind=W2_WEIGHT_KINDS[i % 3], dtype=C_DTYPES[(i // 3) % 3],
                            device=device)


def _loss_and_grads_c(fn, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2):
    """``fn(v, u, v_ref, w, alpha, c)``'s (loss, fm, w2) and the gradients in v, w and c of
    g_loss * loss + <g_fm, fm> + <g_w2, w2>."""
    v, w, c = (a.detach().clone().requires_grad_(True) for a in (v, w, c))
    loss, fm, w2 = fn(v, u, v_ref, w, alpha, c)
    outputs, grads = [loss], [torch.full_like(loss, g_loss)]
    if g_fm is not None:
        outputs += [fm, w2]
        grads += [g_fm.to(fm), g_w2.to(w2)]
    grad_v, grad_w, grad_c = torch.autograd.grad(outputs, [v, w, c], grads)
    return loss.detach(), fm.detach(), w2.detach(), grad_v, grad_w, grad_c


def _check_w2_weights_case(got, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2, rtol, eps, tag):
    """(loss, fm, w2, grad_v, grad_w, grad_c) of one case against the float64 formulas of op_cases."""
    loss, fm, w2, grad_v, grad_w, grad_c = got
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, alpha, c)
    assert_rel_close(loss, e_loss, rtol, f"loss {tag}")
    assert_rel_close(fm, e_fm, rtol, f"fm {tag}")
    assert_rel_close(w2, e_w2, rtol, f"w2 {tag}")
    e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2, w2_weights=c)
    assert grad_v.dtype == v.dtype
    assert_elementwise_close(grad_v, e_grad, scale, f"grad_v {tag}", eps=eps)
    e_grad_w, e_grad_c = expected_loss_input_grads(v, u, v_ref, w, alpha, g_loss, w2_weights=c)
    assert grad_w.dtype == w.dtype and grad_c.dtype == c.dtype, "[B] gradients come back in their inputs' dtypes"
    # grad_c = g_loss alpha w2 / B: w2's own error, then one rounding to c's dtype (2^-8 relative for bf16).
    c_rtol = max(rtol, torch.finfo(c.dtype).eps / 2 * 1.01)
    assert_rel_close(grad_w, e_grad_w, max(rtol, torch.finfo(w.dtype).eps / 2 * 1.01), f"grad_weights {tag}")
    assert_rel_close(grad_c, e_grad_c, c_rtol, f"grad_w2_weights {tag}")


@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 5), ids=_ids(LOSS_SHAPES)[::5])
def test_loss_w2_weights_fp32(i):
    """loss = mean_i (w_i fm_i + alpha c_i w2_i): values and gradients in v, weights and w2_weights vs float64."""
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, weight_kind=kind)
    c = _w2_weights_case(i, shape[0])
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    got = _loss_and_grads_c(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    _check_w2_weights_case(got, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2, FP32_RTOL, 2.0**-24,
                           f"{shape} alpha={alpha} weights={kind} c={W2_WEIGHT_KINDS[i % 3]}/{c.dtype}")


@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 20), ids=_ids(LOSS_SHAPES)[::20])
def test_loss_w2_weights_fp64(i):
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=torch.float64, weight_kind=kind)
    w, c = w.double(), _w2_weights_case(i, shape[0]).double()
    g_loss, g_fm, g_w2 = _upstream(i, shape[0], torch.float64)
    got = _loss_and_grads_c(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2)
    assert all(t.dtype == torch.float64 for t in got)
    _check_w2_weights_case(got, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2, FP64_RTOL, EPS64, f"{shape}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 25), ids=_ids(LOSS_SHAPES)[::25])
def test_loss_w2_weights_low_precision(i, dtype):
    """bf16/fp16 samples with w2_weights: at most twice the torch backend's error (float64 oracle)."""
    shape, alpha, kind = _loss_case(i)
    kind = "uniform" if kind == "huge" else kind  # huge weights overflow an fp16 gradient
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=dtype, weight_kind=kind)
    c = _w2_weights_case(i, shape[0])
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    ours = _loss_and_grads_c(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2)
    theirs = _loss_and_grads_c(ref.orw_cfm_w2_loss_reference, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2)
    expected = expected_loss(v, u, v_ref, w, alpha, c)
    for name, a, t, e in zip(("loss", "fm", "w2"), ours[:3], theirs[:3], expected):
        assert_low_precision_ok(a, t, e, f"{name} {shape} {dtype}", floor=FP32_NOISE * float(e.abs().max()))
    e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2, w2_weights=c)
    assert ours[3].dtype == dtype
    assert_low_precision_ok(ours[3], theirs[3], e_grad, f"grad_v {shape} {dtype}", floor=FP32_NOISE * float(scale.max()))


def test_loss_w2_weights_none_and_ones():
    """None runs the scalar-alpha path (bitwise the 5-argument call); c = 1 gives the same bits here, since
    alpha * 1.0 is exact in the float64 loss sum and in the float64 backward coefficients."""
    v, u, v_ref, w = loss_inputs((6, 3, 7), seed=4)
    g_loss, g_fm, g_w2 = _upstream(1, 6)

    def run(*extra):
        vv, ww = v.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, fm, w2 = OPS.orw_cfm_w2_loss(vv, u, v_ref, ww, 0.7, *extra)
        grads = torch.autograd.grad([loss, fm, w2], [vv, ww], [torch.tensor(g_loss), g_fm, g_w2])
        return (loss, fm, w2, *grads)

    plain = run()
    for got in (run(None), run(torch.ones(6)), run(torch.ones(6, dtype=torch.float64))):
        assert all(torch.equal(a, b) for a, b in zip(plain, got))


def test_loss_w2_weights_gradcheck():
    """Every input's gradient (v, u, v_ref, weights, w2_weights; all three outputs) against finite differences."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    w = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_(True)
    c = (torch.rand(3, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, u, r, w, c: _cpp.orw_cfm_w2_loss(v, u, r, w, 0.7, c),
                                    (rnd(3, 2, 5), rnd(3, 2, 5), rnd(3, 2, 5), w, c))
    u, v_ref = rnd(1, 7).detach(), rnd(1, 7).detach()
    assert torch.autograd.gradcheck(lambda v, c: _cpp.orw_cfm_w2_loss(v, u, v_ref, w[:1].detach(), 1.3, c),
                                    (rnd(1, 7), c[:1].detach().clone().requires_grad_(True)))  # B = 1


def test_loss_w2_weights_layouts_and_saved_tensors():
    """Strided w2_weights give the contiguous result; the backward keeps no new full-size tensor."""
    v, u, v_ref, w = loss_inputs((4, 3, 8), seed=1)
    c_strided = torch.rand(8, generator=torch.Generator().manual_seed(0))[::2]
    got = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, c_strided)
    assert all(torch.equal(a, b) for a, b in zip(got, _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, c_strided.contiguous())))
    v.requires_grad_(True)
    loss, _, _ = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 1.0, c_strided)
    ptrs = {v.data_ptr(), u.data_ptr(), v_ref.data_ptr(), w.data_ptr()}
    full = [t for t in loss.grad_fn.saved_tensors if t.numel() == v.numel()]
    assert all(t.data_ptr() in ptrs for t in full), "backward saved a new full-size intermediate"


def test_loss_w2_weights_errors():
    v = torch.randn(4, 3)
    ones = torch.ones(4)
    loss = OPS.orw_cfm_w2_loss
    _raises(lambda: loss(v, v, v, ones, 1.0, torch.ones(3)), "orw_cfm_w2_loss", "w2_weights must have shape [B] = [4]")
    _raises(lambda: loss(v, v, v, ones, 1.0, torch.ones(4, 1)), "w2_weights must have shape [B] = [4]")
    _raises(lambda: loss(v, v, v, ones, 1.0, torch.ones(4, dtype=torch.int32)), "w2_weights must be a float32")
    _raises(lambda: loss(v, v, v, ones, 1.0, ones.to("meta")), "w2_weights is on meta but v is on cpu")


# ============================================================================ conditional_path: CPU accuracy


def _check_path(x_t, u_t, x_0, x_1, t, sigma, noise, eps=2.0**-24, tag=""):
    e_xt, e_ut, scale = expected_path(x_0, x_1, t, sigma, noise)
    assert x_t.dtype == u_t.dtype == x_1.dtype and x_t.shape == u_t.shape == x_1.shape
    assert_elementwise_close(x_t, e_xt, scale, f"x_t {tag}", eps=eps)
    assert_elementwise_close(u_t, e_ut, x_0.double().abs() + x_1.double().abs(), f"u_t {tag}", eps=eps)


@pytest.mark.parametrize("sigma", [0.0, 0.35])
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=_ids(SHAPES))
def test_path_fp32(i, sigma):
    x_0, x_1, t, noise = _path_inputs(SHAPES[i], seed=i, sigma=sigma)
    x_t, u_t = _cpp.conditional_path(x_0, x_1, t, sigma, noise)
    _check_path(x_t, u_t, x_0, x_1, t, sigma, noise, tag=f"{SHAPES[i]} sigma={sigma}")


@pytest.mark.parametrize("i", range(0, len(SHAPES), 3), ids=_ids(SHAPES)[::3])
def test_path_fp64(i):
    sigma = 0.35 * (i % 2)
    x_0, x_1, t, noise = _path_inputs(SHAPES[i], seed=i, dtype=torch.float64, sigma=sigma)
    t = t.double()
    x_t, u_t = _cpp.conditional_path(x_0, x_1, t, sigma, noise)
    _check_path(x_t, u_t, x_0, x_1, t, sigma, noise, eps=EPS64, tag=str(SHAPES[i]))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("i", range(0, len(SHAPES), 3), ids=_ids(SHAPES)[::3])
def test_path_low_precision(i, dtype):
    sigma = 0.35 * (i % 2)
    x_0, x_1, t, noise = _path_inputs(SHAPES[i], seed=i, dtype=dtype, sigma=sigma)
    ours = _cpp.conditional_path(x_0, x_1, t, sigma, noise)
    theirs = ref.conditional_path_reference(x_0, x_1, t, sigma, noise)
    e_xt, e_ut, scale = expected_path(x_0, x_1, t, sigma, noise)
    assert ours[0].dtype == ours[1].dtype == dtype
    assert_low_precision_ok(ours[0], theirs[0], e_xt, f"x_t {SHAPES[i]}", floor=FP32_NOISE * float(scale.max()))
    assert_low_precision_ok(ours[1], theirs[1], e_ut, f"u_t {SHAPES[i]}", floor=FP32_NOISE * float(e_ut.abs().max()))


def test_path_noise_ignored_without_sigma():
    x_0, x_1, t, _ = _path_inputs((4, 6), seed=1)
    noise = torch.randn(4, 6)
    for sigma in (0.0, -0.5):  # the reference adds noise only for sigma > 0
        got = _cpp.conditional_path(x_0, x_1, t, sigma, noise)
        plain = _cpp.conditional_path(x_0, x_1, t, 0.0, None)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


def test_path_t_dtype_and_empty_batch():
    x_0, x_1, t, _ = _path_inputs((3, 5), seed=4)
    x_t, _ = _cpp.conditional_path(x_0, x_1, t.double(), 0.0, None)
    _check_path(x_t, x_1 - x_0, x_0, x_1, t.double(), 0.0, None)
    empty = torch.empty(0, 5)
    x_t, u_t = _cpp.conditional_path(empty, empty, torch.empty(0), 0.0, None)
    assert x_t.shape == u_t.shape == (0, 5)


# ============================================================================ ode_step: CPU accuracy


@pytest.mark.parametrize("i", range(len(SHAPES)), ids=_ids(SHAPES))
def test_ode_step_fp32(i):
    n_ks = i % 5
    x, ks, coeffs, dt = _ode_inputs(SHAPES[i], seed=i, n_ks=n_ks)
    out = _cpp.ode_step(x, ks, coeffs, dt)
    assert out.dtype == x.dtype and out.shape == x.shape
    expected, scale = expected_ode_step(x, ks, coeffs, dt)
    assert_elementwise_close(out, expected, scale, f"ode_step {SHAPES[i]} with {n_ks} ks")


@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("i", range(0, len(SHAPES), 3), ids=_ids(SHAPES)[::3])
def test_ode_step_other_dtypes(i, dtype):
    n_ks = i % 5
    x, ks, coeffs, dt = _ode_inputs(SHAPES[i], seed=i, n_ks=n_ks, dtype=dtype)
    out = _cpp.ode_step(x, ks, coeffs, dt)
    assert out.dtype == dtype
    expected, scale = expected_ode_step(x, ks, coeffs, dt)
    if dtype == torch.float64:
        assert_elementwise_close(out, expected, scale, f"ode_step {SHAPES[i]}", eps=EPS64)
    else:
        theirs = ref.ode_step_reference(x, ks, coeffs, dt)
        assert_low_precision_ok(out, theirs, expected, f"ode_step {SHAPES[i]} {dtype}",
                                floor=FP32_NOISE * float(scale.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ode_step_many_stages(dtype):
    x, ks, coeffs, dt = _ode_inputs((3, 5, 7), seed=9, n_ks=11, dtype=dtype)
    out = _cpp.ode_step(x, ks, coeffs, dt)
    expected, scale = expected_ode_step(x, ks, coeffs, dt)
    if dtype == torch.float32:
        assert_elementwise_close(out, expected, scale, "ode_step 11 ks", ulps=16)
    else:
        assert_low_precision_ok(out, ref.ode_step_reference(x, ks, coeffs, dt), expected, "ode_step 11 ks",
                                floor=FP32_NOISE * float(scale.max()))


def test_ode_step_returns_new_tensor():
    x, ks, coeffs, dt = _ode_inputs((2, 3), seed=0, n_ks=0)
    out = _cpp.ode_step(x, ks, coeffs, dt)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ============================================================================ autograd formulas


def test_gradcheck_all_ops():
    f64 = dict(dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    w = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: _cpp.orw_cfm_w2_loss(*a, 0.7), (rnd(3, 2, 4), rnd(3, 2, 4),
                                                                             rnd(3, 2, 4), w))
    t = torch.rand(3, generator=g, **f64)
    assert torch.autograd.gradcheck(lambda a, b, tt, n: _cpp.conditional_path(a, b, tt, 0.3, n),
                                    (rnd(3, 5), rnd(3, 5), t, rnd(3, 5)))
    assert torch.autograd.gradcheck(lambda a, b, tt: _cpp.conditional_path(a, b, tt), (rnd(3, 2, 2), rnd(3, 2, 2), t))
    assert torch.autograd.gradcheck(lambda x, k1, k2: _cpp.ode_step(x, [k1, k2], [0.3, -1.2], 0.25),
                                    (rnd(2, 3), rnd(2, 3), rnd(2, 3)))
    assert torch.autograd.gradcheck(lambda x: _cpp.ode_step(x, [], [], 0.25), (rnd(2, 3),))


def test_loss_backward_saves_no_new_full_size_tensors():
    v, u, v_ref, w = loss_inputs((4, 3, 8), seed=1)
    v.requires_grad_(True)
    loss, _, _ = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 1.0)
    saved = [t for t in loss.grad_fn.saved_tensors]
    ptrs = {v.data_ptr(), u.data_ptr(), v_ref.data_ptr(), w.data_ptr()}
    full = [t for t in saved if t.numel() == v.numel()]
    assert all(t.data_ptr() in ptrs for t in full), "backward saved a new full-size intermediate"


# ============================================================================ layouts and errors


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(6, 8, 5, generator=g) for _ in range(4)]
    tr = [b.transpose(1, 2) for b in base]  # [6, 5, 8] non-contiguous
    sl = [torch.randn(6, 10, 8, generator=g)[:, ::2] for _ in range(4)]  # [6, 5, 8] strided
    w = torch.rand(12, generator=g)[::2]
    for v, u, v_ref in ((tr[0], sl[1], tr[2]), (sl[0], tr[1], sl[2])):
        got = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
        exp = _cpp.orw_cfm_w2_loss(v.contiguous(), u.contiguous(), v_ref.contiguous(), w.contiguous(), 0.5)
        assert all(torch.equal(a, b) for a, b in zip(got, exp))
        c = torch.rand(12, generator=g)[::2]
        assert torch.equal(OPS.orw_cfm_w2_loss_backward(v, u, v_ref, c, w),
                           OPS.orw_cfm_w2_loss_backward(v.contiguous(), u.contiguous(), v_ref.contiguous(),
                                                        c.contiguous(), w.contiguous()))
    got = _cpp.conditional_path(tr[0], sl[1], w, 0.2, tr[3])
    exp = _cpp.conditional_path(tr[0].contiguous(), sl[1].contiguous(), w.contiguous(), 0.2, tr[3].contiguous())
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(got, exp))
    got = _cpp.ode_step(tr[0], [sl[1], tr[2]], [0.5, 2.0], 0.1)
    exp = _cpp.ode_step(tr[0].contiguous(), [sl[1].contiguous(), tr[2].contiguous()], [0.5, 2.0], 0.1)
    assert torch.equal(got, exp)


def test_unaligned_storage_offsets():
    """Contiguous views starting mid-allocation (the CUDA kernels' scalar/misaligned paths; plain on CPU)."""
    v, u, v_ref, w = loss_inputs((3, 1031), seed=8)
    got = _cpp.orw_cfm_w2_loss(_unaligned(v, 1), _unaligned(u, 3), _unaligned(v_ref, 1), w, 0.5)
    exp = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, exp))


def _raises(fn, *patterns):
    with pytest.raises(RuntimeError) as info:
        fn()
    for p in patterns:
        assert p in str(info.value), f"{p!r} not in {str(info.value)!r}"


def test_loss_errors():
    v = torch.randn(4, 3)
    ones = torch.ones(4)
    loss = OPS.orw_cfm_w2_loss
    _raises(lambda: loss(v, torch.randn(4, 2), v, ones, 1.0), "orw_cfm_w2_loss", "u has shape [4, 2] but v has [4, 3]")
    _raises(lambda: loss(v, v, torch.randn(5, 3), ones, 1.0), "v_ref has shape [5, 3]")
    _raises(lambda: loss(v, v.double(), v, ones, 1.0), "u has dtype", "they must match")
    _raises(lambda: loss(v, v, v, torch.ones(3), 1.0), "weights must have shape [B] = [4]")
    _raises(lambda: loss(v, v, v, torch.ones(4, 1), 1.0), "weights must have shape [B] = [4]")
    _raises(lambda: loss(v, v, v, torch.ones(4, dtype=torch.int64), 1.0), "weights must be a float32")
    _raises(lambda: loss(v.long(), v.long(), v.long(), ones, 1.0), "v must be a float32")
    _raises(lambda: loss(torch.randn(4), torch.randn(4), torch.randn(4), ones, 1.0), "v must be [B, ...]")
    _raises(lambda: loss(torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3), torch.ones(0), 1.0), "B >= 1")
    _raises(lambda: loss(v, v, v, ones, -1.0), "alpha must be >= 0")
    # Mixed devices (a meta tensor stands in for a second device on a CPU-only machine).
    _raises(lambda: loss(v, v.to("meta"), v, ones, 1.0), "u is on meta but v is on cpu")
    _raises(lambda: OPS.orw_cfm_w2_loss_backward(v, v, v, torch.ones(3), ones), "c_fm must have shape [B] = [4]")


def test_path_and_ode_step_errors():
    x = torch.randn(4, 3)
    t = torch.rand(4)
    path = OPS.conditional_path
    _raises(lambda: path(torch.randn(4, 2), x, t, 0.0, None), "conditional_path", "x_0 has shape [4, 2] but x_1 has [4, 3]")
    _raises(lambda: path(x.double(), x, t, 0.0, None), "x_0 has dtype")
    _raises(lambda: path(x, x, torch.rand(3), 0.0, None), "t must have shape [B] = [4]")
    _raises(lambda: path(x, x, t, 0.5, None), "sigma = 0.5 > 0 needs `noise`")
    _raises(lambda: path(x, x, t, 0.5, torch.randn(4, 4)), "noise has shape [4, 4]")
    _raises(lambda: path(x, x, t.to("meta"), 0.0, None), "t is on meta but x_1 is on cpu")
    step = OPS.ode_step
    _raises(lambda: step(x, [x], [1.0, 2.0], 0.1), "ode_step", "got 2 coefficients for 1 stage values")
    _raises(lambda: step(x, [x, torch.randn(4, 2)], [1.0, 2.0], 0.1), "ks[1] has shape [4, 2] but x has [4, 3]")
    _raises(lambda: step(x, [x.half()], [1.0], 0.1), "ks[0] has dtype")
    _raises(lambda: step(x.int(), [], [], 0.1), "x must be a float32")


# ============================================================================ PT2: opcheck and torch.compile


def _opcheck_cases(requires_grad: bool):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    w = torch.rand(5, generator=g).requires_grad_(requires_grad)
    t = torch.rand(5, generator=g).requires_grad_(requires_grad)
    yield OPS.orw_cfm_w2_loss, (rnd(5, 3, 4), rnd(5, 3, 4), rnd(5, 3, 4), w, 0.5)
    yield OPS.orw_cfm_w2_loss, (rnd(2, 7), rnd(2, 7), rnd(2, 7), w[:2], 0.0)
    c = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_(requires_grad)  # another dtype than v's
    yield OPS.orw_cfm_w2_loss, (rnd(5, 3, 4), rnd(5, 3, 4), rnd(5, 3, 4), w, 0.5, c)
    yield OPS.orw_cfm_w2_loss, (rnd(1, 9), rnd(1, 9), rnd(1, 9), w[:1], 2.0, c[:1])
    yield OPS.conditional_path, (rnd(5, 6), rnd(5, 6), t, 0.3, rnd(5, 6))
    yield OPS.conditional_path, (rnd(5, 2, 3), rnd(5, 2, 3), t, 0.0, None)
    yield OPS.ode_step, (rnd(4, 3), [rnd(4, 3), rnd(4, 3)], [0.5, -1.0], 0.2)
    yield OPS.ode_step, (rnd(4, 3), [], [], 0.2)
    if not requires_grad:  # the backward op has no autograd formula of its own
        yield OPS.orw_cfm_w2_loss_backward, (rnd(5, 3), rnd(5, 3), rnd(5, 3), torch.rand(5), torch.rand(5))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for op, args in _opcheck_cases(requires_grad):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) with inductor gives the eager values, forward and backward."""
    v, u, v_ref, w = loss_inputs((4, 3, 6), seed=0)
    x_0, x_1, t, noise = _path_inputs((4, 3, 6), seed=1, sigma=0.2)
    x, ks, coeffs, dt = _ode_inputs((4, 3, 6), seed=2, n_ks=3)

    def fn(v, u, v_ref, w, x_0, x_1, t, noise, x, k0, k1, k2):
        loss, fm, w2 = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
        x_t, u_t = _cpp.conditional_path(x_0, x_1, t, 0.2, noise)
        return loss, fm, w2, x_t, u_t, _cpp.ode_step(x, [k0, k1, k2], coeffs, dt)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    args = (v, u, v_ref, w, x_0, x_1, t, noise, x, *ks)
    for a, b in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    vg, vg2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    compiled(vg, *args[1:])[0].backward()
    fn(vg2, *args[1:])[0].backward()
    torch.testing.assert_close(vg.grad, vg2.grad, rtol=1e-6, atol=0)


# ============================================================================ CUDA

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cuda_kernels():
    ok, why = _cpp.cuda_available()
    if not ok:
        pytest.skip(why)


def _cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 5), ids=_ids(LOSS_SHAPES)[::5])
def test_cuda_loss(cuda_kernels, i, dtype):
    shape, alpha, kind = _loss_case(i)
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=dtype, weight_kind=kind)
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    ours = _loss_and_grad(_cpp.orw_cfm_w2_loss, *_cuda(v, u, v_ref, w), alpha, g_loss, *_cuda(g_fm, g_w2))
    assert all(o.is_cuda for o in ours)
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, alpha)
    e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
    if dtype in (torch.float32, torch.float64):
        rtol, eps = (FP32_RTOL, 2.0**-24) if dtype == torch.float32 else (FP64_RTOL, EPS64)
        for name, a, e in zip(("loss", "fm", "w2"), ours[:3], (e_loss, e_fm, e_w2)):
            assert a.dtype == ref.accumulation_dtype(dtype)
            assert_rel_close(a, e, rtol, f"{name} {shape}")
        assert_elementwise_close(ours[3], e_grad, scale, f"grad_v {shape}", eps=eps)
        cpu = _loss_and_grad(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, g_loss, g_fm, g_w2)
        for a, b in zip(ours[:3], cpu[:3]):  # CUDA and CPU sum in different orders: both accurate
            assert_rel_close(a, b.double(), 2 * rtol, f"cuda vs cpu {shape}")
    else:
        theirs = _loss_and_grad(ref.orw_cfm_w2_loss_reference, *_cuda(v, u, v_ref, w), alpha, g_loss,
                                *_cuda(g_fm, g_w2))
        for name, a, t, e in zip(("loss", "fm", "w2"), ours[:3], theirs[:3], (e_loss, e_fm, e_w2)):
            assert_low_precision_ok(a, t, e, f"{name} {shape}", floor=FP32_NOISE * float(e.abs().max()))
        assert_low_precision_ok(ours[3], theirs[3], e_grad, f"grad_v {shape}", floor=FP32_NOISE * float(scale.max()))


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 1_000_003), (1, 4_000_000), (3000, 4), (2500, 1500), (5, 1025)], ids=str)
def test_cuda_loss_large(cuda_kernels, shape, dtype):
    """Chunked rows (many blocks per row), lane-group rows with B > 1024 (three-kernel finalize), odd sizes."""
    v, u, v_ref, w = loss_inputs(shape, seed=1, dtype=dtype)
    loss, fm, w2 = _cpp.orw_cfm_w2_loss(*_cuda(v, u, v_ref, w), 0.5)
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, 0.5)
    for name, a, e in zip(("loss", "fm", "w2"), (loss, fm, w2), (e_loss, e_fm, e_w2)):
        assert_rel_close(a, e, FP32_RTOL, f"{name} {shape}")
    again = _cpp.orw_cfm_w2_loss(*_cuda(v, u, v_ref, w), 0.5)
    assert torch.equal(loss, again[0]) and torch.equal(fm, again[1]), "CUDA loss is not deterministic"


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("i", range(0, len(LOSS_SHAPES), 10), ids=_ids(LOSS_SHAPES)[::10])
def test_cuda_loss_w2_weights(cuda_kernels, i, dtype):
    """The CUDA finalize kernel's per-sample W2 coefficients: values and gradients vs float64 and the CPU kernel."""
    shape, alpha, kind = _loss_case(i)
    kind = "uniform" if kind == "huge" and dtype == torch.float16 else kind  # huge weights overflow an fp16 gradient
    v, u, v_ref, w = loss_inputs(shape, seed=i, dtype=dtype, weight_kind=kind)
    c = _w2_weights_case(i, shape[0])
    g_loss, g_fm, g_w2 = _upstream(i, shape[0])
    ours = _loss_and_grads_c(_cpp.orw_cfm_w2_loss, *_cuda(v, u, v_ref, w), alpha, c.cuda(), g_loss, *_cuda(g_fm, g_w2))
    assert all(o.is_cuda for o in ours)
    if dtype in (torch.float32, torch.float64):
        rtol, eps = (FP32_RTOL, 2.0**-24) if dtype == torch.float32 else (FP64_RTOL, EPS64)
        _check_w2_weights_case(ours, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2, rtol, eps, f"{shape} {dtype}")
        cpu = _loss_and_grads_c(_cpp.orw_cfm_w2_loss, v, u, v_ref, w, alpha, c, g_loss, g_fm, g_w2)
        for a, b in zip(ours[:3], cpu[:3]):  # CUDA and CPU sum in different orders: both accurate
            assert_rel_close(a, b.double(), 2 * rtol, f"cuda vs cpu {shape}")
    else:
        theirs = _loss_and_grads_c(ref.orw_cfm_w2_loss_reference, *_cuda(v, u, v_ref, w), alpha, c.cuda(), g_loss,
                                   *_cuda(g_fm, g_w2))
        for name, a, t, e in zip(("loss", "fm", "w2"), ours[:3], theirs[:3], expected_loss(v, u, v_ref, w, alpha, c)):
            assert_low_precision_ok(a, t, e, f"{name} {shape}", floor=FP32_NOISE * float(e.abs().max()))
        e_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, g_loss, g_fm, g_w2, w2_weights=c)
        assert_low_precision_ok(ours[3], theirs[3], e_grad, f"grad_v {shape}", floor=FP32_NOISE * float(scale.max()))


@cuda
@needs_gpu
@pytest.mark.parametrize("shape", [(3, 1_000_003), (3000, 4), (2500, 1500)], ids=str)
def test_cuda_loss_w2_weights_large(cuda_kernels, shape):
    """Chunked rows, and B > 1024 (several finalize blocks, each reading its rows' coefficients); deterministic;
    None and all-ones coefficients give the same bits (alpha * 1.0 is exact in the float64 sum)."""
    v, u, v_ref, w = _cuda(*loss_inputs(shape, seed=1))
    c = w2_weight_inputs(shape[0], seed=2, kind="spread", device="cuda")
    got = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, c)
    for name, a, e in zip(("loss", "fm", "w2"), got, expected_loss(v, u, v_ref, w, 0.5, c)):
        assert_rel_close(a, e, FP32_RTOL, f"{name} {shape}")
    again = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, c)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "CUDA loss with w2_weights is not deterministic"
    plain = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    ones = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, torch.ones_like(c))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))


@cuda
@needs_gpu
def test_cuda_w2_weights_graph_capture_and_errors(cuda_kernels):
    def inputs(seed):
        return list(_cuda(*loss_inputs((2500, 3), seed=seed))) + [w2_weight_inputs(2500, seed=seed, device="cuda")]

    _graph_replay_matches(inputs, lambda v, u, v_ref, w, c: _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, c))
    # No host synchronisation in the public op with w2_weights, forward and backward (the training hot loop).
    v, u, v_ref, w, c = inputs(2)
    v.requires_grad_(True)
    c.requires_grad_(True)
    from orwcfm_fast import ops

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.5, backend="cpp", w2_weights=c)
        torch.autograd.grad(loss, [v, c])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    v = torch.randn(4, 3, device="cuda")
    ones = torch.ones(4, device="cuda")
    _raises(lambda: OPS.orw_cfm_w2_loss(v, v, v, ones, 1.0, torch.ones(4)), "w2_weights is on cpu but v is on cuda")
    _raises(lambda: OPS.orw_cfm_w2_loss(v, v, v, ones, 1.0, torch.ones(5, device="cuda")),
            "w2_weights must have shape [B] = [4]")


@cuda
@needs_gpu
def test_cuda_unaligned_and_non_contiguous(cuda_kernels):
    v, u, v_ref, w = _cuda(*loss_inputs((3, 5000), seed=2))
    exp = _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5)
    for offsets in ((1, 1, 1), (1, 2, 3), (0, 0, 5)):  # same phase (vector + head) and mixed (scalar)
        views = [_unaligned(a, o) for a, o in zip((v, u, v_ref), offsets)]
        got = _cpp.orw_cfm_w2_loss(*views, w, 0.5)
        for a, b in zip(got, exp):
            assert_rel_close(a, b.double(), 1e-6, f"loss with offsets {offsets}")
        grad = OPS.orw_cfm_w2_loss_backward(*views, w, w)
        torch.testing.assert_close(grad, OPS.orw_cfm_w2_loss_backward(v, u, v_ref, w, w), rtol=2e-6, atol=1e-6)
    x_0, x_1, t, noise = _path_inputs((4, 1001), seed=3, sigma=0.3, device="cuda")
    exp = _cpp.conditional_path(x_0, x_1, t, 0.3, noise)
    got = _cpp.conditional_path(_unaligned(x_0, 1), x_1.t().contiguous().t(), t, 0.3, _unaligned(noise, 2))
    for a, b in zip(got, exp):  # scalar vs vector kernel: same formula, possibly other FMA contraction
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    x, ks, coeffs, dt = _ode_inputs((7, 333), seed=4, n_ks=3, device="cuda")
    exp = _cpp.ode_step(x, ks, coeffs, dt)
    got = _cpp.ode_step(_unaligned(x, 1), [ks[0], _unaligned(ks[1], 3), ks[2]], coeffs, dt)
    torch.testing.assert_close(got, exp, rtol=2e-6, atol=1e-6)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("i", range(0, len(SHAPES), 3), ids=_ids(SHAPES)[::3])
def test_cuda_path_and_ode_step(cuda_kernels, i, dtype):
    shape = SHAPES[i]
    sigma = 0.35 * (i % 2)
    x_0, x_1, t, noise = _path_inputs(shape, seed=i, dtype=dtype, sigma=sigma)
    ours = _cpp.conditional_path(*_cuda(x_0, x_1, t), sigma, *_cuda(noise))
    x, ks, coeffs, dt = _ode_inputs(shape, seed=i, n_ks=i % 5, dtype=dtype)
    step = _cpp.ode_step(x.cuda(), [k.cuda() for k in ks], coeffs, dt)
    e_step, s_step = expected_ode_step(x, ks, coeffs, dt)
    if dtype in (torch.float32, torch.float64):
        eps = 2.0**-24 if dtype == torch.float32 else EPS64
        _check_path(ours[0], ours[1], x_0, x_1, t, sigma, noise, eps=eps, tag=str(shape))
        assert_elementwise_close(step, e_step, s_step, f"ode_step {shape}", eps=eps)
    else:
        theirs = ref.conditional_path_reference(*_cuda(x_0, x_1, t), sigma, *_cuda(noise))
        e_xt, e_ut, scale = expected_path(x_0, x_1, t, sigma, noise)
        assert_low_precision_ok(ours[0], theirs[0], e_xt, f"x_t {shape}", floor=FP32_NOISE * float(scale.max()))
        assert_low_precision_ok(ours[1], theirs[1], e_ut, f"u_t {shape}",
                                floor=FP32_NOISE * float(e_ut.abs().max()))
        theirs_step = ref.ode_step_reference(x.cuda(), [k.cuda() for k in ks], coeffs, dt)
        assert_low_precision_ok(step, theirs_step, e_step, f"ode_step {shape}", floor=FP32_NOISE * float(s_step.max()))


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_ode_step_many_stages(cuda_kernels, dtype):
    x, ks, coeffs, dt = _ode_inputs((5, 1003), seed=6, n_ks=19, dtype=dtype, device="cuda")
    out = _cpp.ode_step(x, ks, coeffs, dt)
    expected, scale = expected_ode_step(x, ks, coeffs, dt)
    if dtype == torch.float32:
        assert_elementwise_close(out, expected, scale, "ode_step 19 ks", ulps=24)
    else:
        assert_low_precision_ok(out, ref.ode_step_reference(x, ks, coeffs, dt), expected, "ode_step 19 ks",
                                floor=FP32_NOISE * float(scale.max()))


@cuda
@needs_gpu
def test_cuda_errors(cuda_kernels):
    v = torch.randn(4, 3, device="cuda")
    _raises(lambda: OPS.orw_cfm_w2_loss(v, v.cpu(), v, torch.ones(4, device="cuda"), 1.0), "u is on cpu but v is on cuda")
    _raises(lambda: OPS.orw_cfm_w2_loss(v.cpu(), v.cpu(), v.cpu(), torch.ones(4, device="cuda"), 1.0),
            "weights is on cuda")
    _raises(lambda: OPS.conditional_path(v, v, torch.rand(4), 0.0, None), "t is on cpu but x_1 is on cuda")
    _raises(lambda: OPS.ode_step(v, [v.cpu()], [1.0], 0.1), "ks[0] is on cpu but x is on cuda")


def _graph_replay_matches(make_inputs, run):
    """Capture run(*static_inputs) in a CUDA graph, refill the inputs, replay, compare with eager."""
    static = make_inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(*static)
    fresh = make_inputs(1)
    for s, f in zip(static, fresh):
        if isinstance(s, torch.Tensor):
            s.copy_(f)
        elif isinstance(s, list):
            for a, b in zip(s, f):
                a.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    expected = run(*fresh)
    out = out if isinstance(out, (tuple, list)) else (out,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


@cuda
@needs_gpu
@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (2500, 2), (1, 200_000)], ids=str)
def test_cuda_graph_capture(cuda_kernels, shape):
    def loss_inputs_cuda(seed):
        return list(_cuda(*loss_inputs(shape, seed=seed)))

    _graph_replay_matches(loss_inputs_cuda, lambda v, u, v_ref, w: _cpp.orw_cfm_w2_loss(v, u, v_ref, w, 0.5))
    _graph_replay_matches(loss_inputs_cuda, lambda v, u, v_ref, w: OPS.orw_cfm_w2_loss_backward(v, u, v_ref, w, w))
    _graph_replay_matches(lambda seed: list(_path_inputs(shape, seed=seed, sigma=0.3, device="cuda")),
                          lambda x_0, x_1, t, n: _cpp.conditional_path(x_0, x_1, t, 0.3, n))

    def ode_inputs_cuda(seed):
        x, ks, _, _ = _ode_inputs(shape, seed=seed, n_ks=4, device="cuda")
        return [x, ks]

    _graph_replay_matches(ode_inputs_cuda, lambda x, ks: _cpp.ode_step(x, ks, [0.1, 0.2, 0.3, 0.4], 0.05))
