"""The loss and path arithmetic against independent float64 computations."""

import pytest
import torch

from orwcfm_fast.ops import conditional_path, orw_cfm_w2_loss

SHAPES = [(1, 1), (5, 2), (7, 3, 5, 5), (3, 1, 8, 8), (2, 3, 32, 32), (4, 13)]


def _expected(v, u, v_ref, w, alpha):
    """Loop over samples in float64: the published compute_loss, written out."""
    v, u, v_ref, w = (a.double() for a in (v, u, v_ref, w))
    fm = torch.stack([((v[i] - u[i]) ** 2).sum() / v[i].numel() for i in range(v.shape[0])])
    w2 = torch.stack([((v[i] - v_ref[i]) ** 2).sum() / v[i].numel() for i in range(v.shape[0])])
    return sum(w[i] * fm[i] + alpha * w2[i] for i in range(v.shape[0])) / v.shape[0], fm, w2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.5])
def test_loss_values_and_gradient(shape, alpha):
    g = torch.Generator().manual_seed(hash((shape, alpha)) % 2**31)
    v = torch.randn(shape, generator=g, requires_grad=True)
    u, v_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.rand(shape[0], generator=g) * 3
    loss, fm, w2 = orw_cfm_w2_loss(v, u, v_ref, w, alpha)
    exp_loss, exp_fm, exp_w2 = _expected(v.detach(), u, v_ref, w, alpha)
    # float32 sums of at most 3*32*32 squares: relative error well under 1e-5.
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fm.double(), exp_fm, rtol=1e-5, atol=0)
    torch.testing.assert_close(w2.double(), exp_w2, rtol=1e-5, atol=0)
    loss.backward()
    b, d = shape[0], v[0].numel()
    wb = w.double().reshape(-1, *([1] * (len(shape) - 1)))
    fm_term = wb * (v.detach().double() - u.double())
    w2_term = alpha * (v.detach().double() - v_ref.double())
    exp_grad = 2.0 / (b * d) * (fm_term + w2_term)
    # Where the two terms cancel, an elementwise relative bound is meaningless; float32 rounding
    # is bounded by a few ulps of the terms' magnitudes instead (8 * 2^-24 ~ 5e-7 of them).
    scale = 2.0 / (b * d) * (fm_term.abs() + w2_term.abs())
    err = (v.grad.double() - exp_grad).abs()
    assert (err <= 8 * 2.0**-24 * scale + 1e-30).all(), f"max err/scale {(err / scale.clamp_min(1e-30)).max():.3g}"


def test_loss_input_errors():
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match="u has shape"):
        orw_cfm_w2_loss(v, torch.randn(4, 2), v, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[4\]"):
        orw_cfm_w2_loss(v, v, v, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), -1.0)
    with pytest.raises(ValueError, match="at least one non-batch dim"):
        orw_cfm_w2_loss(torch.randn(4), torch.randn(4), torch.randn(4), torch.ones(4), 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_path(shape):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    x_t, u_t = conditional_path(x0, x1, t)
    for i in range(shape[0]):
        torch.testing.assert_close(x_t[i], t[i] * x1[i] + (1 - t[i]) * x0[i])
        torch.testing.assert_close(u_t[i], x1[i] - x0[i])
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    x_s, _ = conditional_path(x0, x1, t, sigma=0.1, noise=noise)
    torch.testing.assert_close(x_s, x_t + 0.1 * noise)
    with pytest.raises(ValueError, match="noise"):
        conditional_path(x0, x1, t, sigma=0.1)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        conditional_path(x0, x1, t[:1] if shape[0] > 1 else t.repeat(2))


# ---------------------------------------------------------------------------- per-sample W2 coefficients


def _expected_per_sample(v, u, v_ref, w, alpha, c):
    """Float64, sample by sample: loss = sum_i (w_i fm_i + alpha c_i w2_i) / B and its gradients, from the formula."""
    v, u, v_ref, w, c = (a.detach().double() for a in (v, u, v_ref, w, c))
    b = v.shape[0]
    fm = [((v[i] - u[i]) ** 2).sum() / v[i].numel() for i in range(b)]
    w2 = [((v[i] - v_ref[i]) ** 2).sum() / v[i].numel() for i in range(b)]
    loss = sum(w[i] * fm[i] + alpha * c[i] * w2[i] for i in range(b)) / b
    fm_terms = [2.0 / (b * v[i].numel()) * w[i] * (v[i] - u[i]) for i in range(b)]
    w2_terms = [2.0 / (b * v[i].numel()) * alpha * c[i] * (v[i] - v_ref[i]) for i in range(b)]
    grad_v = torch.stack([f + t for f, t in zip(fm_terms, w2_terms)])
    scale = torch.stack([f.abs() + t.abs() for f, t in zip(fm_terms, w2_terms)])
    grad_w = torch.stack([fm[i] / b for i in range(b)])
    grad_c = torch.stack([alpha * w2[i] / b for i in range(b)])
    return loss, torch.stack(fm), torch.stack(w2), grad_v, scale, grad_w, grad_c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_loss_w2_weights_values_and_gradients(shape, c_dtype):
    """loss = mean_i (w_i fm_i + alpha c_i w2_i) on the torch backend; gradients in v, weights and w2_weights."""
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    v = torch.randn(shape, generator=g, requires_grad=True)
    u, v_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = (torch.rand(shape[0], generator=g) * 3).requires_grad_(True)
    c = (torch.rand(shape[0], generator=g) * 2).to(c_dtype).requires_grad_(True)
    alpha = 1.5
    loss, fm, w2 = orw_cfm_w2_loss(v, u, v_ref, w, alpha, backend="torch", w2_weights=c)
    e_loss, e_fm, e_w2, e_grad_v, scale, e_grad_w, e_grad_c = _expected_per_sample(v, u, v_ref, w, alpha, c)
    # float32 sums of non-negative terms (at most 3*32*32 squares, B <= 7 samples): relative error well under 1e-5.
    torch.testing.assert_close(loss.double(), e_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fm.double(), e_fm, rtol=1e-5, atol=0)
    torch.testing.assert_close(w2.double(), e_w2, rtol=1e-5, atol=0)
    grad_v, grad_w, grad_c = torch.autograd.grad(loss, [v, w, c])
    # As above: a few float32 ulps of the two terms' magnitudes where they cancel.
    err = (grad_v.double() - e_grad_v).abs()
    assert (err <= 8 * 2.0**-24 * scale + 1e-30).all(), f"max err/scale {(err / scale.clamp_min(1e-30)).max():.3g}"
    torch.testing.assert_close(grad_w.double(), e_grad_w, rtol=1e-5, atol=0)
    assert grad_c.dtype == c_dtype, "the gradient of w2_weights comes back in their dtype, like that of weights"
    # bf16 w2_weights get a bf16 gradient: one bf16 rounding (2^-8 relative) on top of the float32 value.
    torch.testing.assert_close(grad_c.double(), e_grad_c, rtol=2.0**-8 if c_dtype == torch.bfloat16 else 1e-5, atol=0)


def test_loss_w2_weights_none_and_ones():
    """None is the scalar-alpha loss (bitwise the call without the argument); all-ones c equals it within rounding."""
    g = torch.Generator().manual_seed(5)
    v, u, v_ref = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    w = torch.rand(3, generator=g)
    plain = orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend="torch")
    for a, b in zip(plain, orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend="torch", w2_weights=None)):
        assert torch.equal(a, b)
    # alpha * c is rounded to float32 once before the product with w2: at most an ulp of the W2 term apart.
    for a, b in zip(plain, orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend="torch", w2_weights=torch.ones(3))):
        torch.testing.assert_close(a, b, rtol=2.0**-22, atol=0)


def test_loss_w2_weights_errors():
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"w2_weights must have shape \[B\] = \[4\], got \(3,\)"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"w2_weights must have shape \[B\] = \[4\], got \(4, 1\)"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(4, 1))
    with pytest.raises(TypeError, match="w2_weights must be float16, bfloat16, float32 or float64"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="w2_weights must be a torch.Tensor"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=[1.0] * 4)
    with pytest.raises(ValueError, match="w2_weights is on meta but the samples are on cpu"):
        orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(4, device="meta"))
