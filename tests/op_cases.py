"""Shared cases and float64 oracles for the op tests of every backend (torch, cpp, triton, cuda).

The expected values here are written out independently of ``orwcfm_fast.ops.reference``
(float64, per-sample sums), so a bug in the reference cannot hide a bug in a kernel.

Tolerances, and why:

- Loss, ``fm``, ``w2`` in float32: sums of non-negative squares. With float32 accumulation
  in blocks (or pairwise), the relative rounding error is ~ log2(D) * 2^-24 plus the
  rounding of the inputs' differences, far below ``FP32_RTOL = 1e-5`` for D <= 3*64*64.
- Gradients and elementwise outputs (``x_t``, ``u_t``, ODE steps): where terms cancel a
  relative bound is meaningless, so the error is bounded by ``ELEMENTWISE_ULPS`` float32
  ulps of the *magnitudes* of the terms (:func:`assert_elementwise_close`).
- bf16/fp16: a kernel's error against float64 must be at most twice the torch backend's
  error at the same precision (flash-attention's rule), see :func:`assert_low_precision_ok`.
"""

from __future__ import annotations

import copy
import math
import random

import torch

__all__ = [
    "FP32_RTOL",
    "ELEMENTWISE_ULPS",
    "random_shapes",
    "loss_inputs",
    "W2_WEIGHT_KINDS",
    "w2_weight_inputs",
    "expected_loss",
    "expected_loss_grad",
    "expected_loss_input_grads",
    "expected_model_loss",
    "expected_path",
    "dopri5_fixed_tableau",
    "expected_ode_step",
    "assert_rel_close",
    "assert_elementwise_close",
    "assert_low_precision_ok",
]

FP32_RTOL = 1e-5
ELEMENTWISE_ULPS = 8  # float32 ulps (2^-24 each) of the terms' magnitudes
_EPS32 = 2.0**-24

# Shapes every backend must get right, whatever the random draw.
FIXED_SHAPES = [
    (1, 1),  # B = 1, D = 1
    (1, 2),
    (7, 1),  # D = 1
    (5, 2),  # 2-D points
    (3, 1, 8, 8),  # the demo's digits
    (2, 3, 32, 32),  # CIFAR
    (1, 3, 64, 64),  # largest D we meet, B = 1
    (512, 2),  # largest B, tiny D
    (5, 123, 123),  # Liger's odd shape
    (4, 13),
    (6, 3, 5, 7),
]


def random_shapes(n: int, seed: int = 0, max_numel: int = 3 * 64 * 64 * 8) -> list[tuple[int, ...]]:
    """``FIXED_SHAPES`` plus random ``[B, ...]`` shapes, ``n`` in all.

    B is drawn log-uniformly in [1, 512], D log-uniformly in [1, 3*64*64] (odd sizes
    included), split into 1-3 non-batch dims; shapes over ``max_numel`` elements shrink B.
    """
    rng = random.Random(seed)
    shapes = list(FIXED_SHAPES[:n])
    while len(shapes) < n:
        b = int(round(math.exp(rng.uniform(0, math.log(512)))))
        d = int(round(math.exp(rng.uniform(0, math.log(3 * 64 * 64)))))
        b = max(1, min(b, max_numel // max(d, 1)))
        ndim = rng.choice([1, 1, 2, 3])
        dims = [d]
        if ndim >= 2 and d >= 4:
            c = rng.choice([1, 2, 3, 4])
            if d % c == 0:
                dims = [c, d // c]
        if ndim == 3 and len(dims) == 2:
            rest = dims[1]
            side = int(math.isqrt(rest))
            if side * side == rest and side > 1:
                dims = [dims[0], side, side]
        shapes.append((b, *dims))
    return shapes


def loss_inputs(shape, *, seed: int, dtype=torch.float32, device="cpu", weight_kind: str = "uniform"):
    """``(v, u, v_ref, weights)`` for the loss; ``weight_kind``: uniform, zero, huge or mixed."""
    g = torch.Generator().manual_seed(seed)
    v, u, v_ref = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    b = shape[0]
    if weight_kind == "uniform":
        w = torch.rand(b, generator=g, dtype=torch.float64) * 3
    elif weight_kind == "zero":
        w = torch.zeros(b, dtype=torch.float64)
    elif weight_kind == "huge":
        w = torch.exp(torch.rand(b, generator=g, dtype=torch.float64) * 80)  # up to e^80 ~ 5.5e34 < float32 max
    elif weight_kind == "mixed":
        w = torch.where(torch.rand(b, generator=g) < 0.5, 0.0, torch.exp(torch.randn(b, generator=g) * 10).double())
    else:
        raise ValueError(weight_kind)
    return tuple(a.to(dtype=dtype, device=device) for a in (v, u, v_ref)) + (w.to(dtype=torch.float32, device=device),)


W2_WEIGHT_KINDS = ("uniform", "spread", "sparse")


def w2_weight_inputs(b: int, *, seed: int, kind: str = "uniform", dtype=torch.float32, device="cpu"):
    """``[B]`` per-sample W2 coefficients ``c >= 0`` (the op's ``w2_weights``).

    ``kind``: ``uniform`` (U[0, 2)), ``spread`` (log-uniform over 1e-3..1e3: advantages of very
    different sizes), ``sparse`` (half exact zeros, the rest U[0, 4): clipped advantages).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        c = torch.rand(b, generator=g, dtype=torch.float64) * 2
    elif kind == "spread":
        c = 10.0 ** (torch.rand(b, generator=g, dtype=torch.float64) * 6 - 3)
    elif kind == "sparse":
        c = torch.where(torch.rand(b, generator=g) < 0.5, 0.0, torch.rand(b, generator=g, dtype=torch.float64) * 4)
    else:
        raise ValueError(kind)
    return c.to(dtype=dtype, device=device)


def expected_loss(v, u, v_ref, weights, alpha: float, w2_weights=None):
    """Float64 ``(loss, fm, w2)``: per-sample sums of squares over the sample's elements.

    ``loss = sum_i (weights[i] fm[i] + alpha c[i] w2[i]) / B`` with ``c = w2_weights`` (ones when ``None``).
    """
    v, u, v_ref, w = (a.detach().double().cpu() for a in (v, u, v_ref, weights))
    b = v.shape[0]
    d = v[0].numel()
    fm = torch.stack([((v[i] - u[i]) ** 2).sum() / d for i in range(b)]) if b <= 64 else ((v - u) ** 2).reshape(b, -1).sum(1) / d
    w2 = torch.stack([((v[i] - v_ref[i]) ** 2).sum() / d for i in range(b)]) if b <= 64 else ((v - v_ref) ** 2).reshape(b, -1).sum(1) / d
    c = torch.ones(b, dtype=torch.float64) if w2_weights is None else w2_weights.detach().double().cpu()
    loss = (w * fm + alpha * c * w2).sum() / b
    return loss, fm, w2


def expected_loss_grad(v, u, v_ref, weights, alpha: float, g_loss: float = 1.0, g_fm=None, g_w2=None,
                       w2_weights=None):
    """Float64 gradient of ``g_loss * loss + <g_fm, fm> + <g_w2, w2>`` in ``v``, and its term scale.

    ``d/dv[i] = 2/D (c_fm[i] (v[i] - u[i]) + c_w2[i] (v[i] - v_ref[i]))`` with
    ``c_fm = g_loss weights / B + g_fm`` and ``c_w2 = g_loss alpha c / B + g_w2`` (``c = w2_weights``, 1 if ``None``).

    Returns:
        ``(grad, scale)``: ``scale`` is the elementwise sum of the terms' magnitudes, for
        :func:`assert_elementwise_close`.
    """
    v, u, v_ref, w = (a.detach().double().cpu() for a in (v, u, v_ref, weights))
    b, d = v.shape[0], v[0].numel()
    shape = (b,) + (1,) * (v.ndim - 1)
    c = 1.0 if w2_weights is None else w2_weights.detach().double().cpu()
    c_fm = g_loss * w / b + (g_fm.double().cpu() if g_fm is not None else 0.0)
    c_w2 = g_loss * alpha * c / b + (g_w2.double().cpu() if g_w2 is not None else 0.0)
    c_fm = torch.as_tensor(c_fm, dtype=torch.float64).expand(b).reshape(shape) * 2.0 / d
    c_w2 = torch.as_tensor(c_w2, dtype=torch.float64).expand(b).reshape(shape) * 2.0 / d
    t_fm, t_w2 = c_fm * (v - u), c_w2 * (v - v_ref)
    return t_fm + t_w2, t_fm.abs() + t_w2.abs()


def expected_loss_input_grads(v, u, v_ref, weights, alpha: float, g_loss: float = 1.0, w2_weights=None):
    """Float64 gradients of ``g_loss * loss`` in the ``[B]`` inputs: ``(d/dweights, d/dw2_weights)``.

    ``d/dweights[i] = g_loss fm[i] / B`` and ``d/dw2_weights[i] = g_loss alpha w2[i] / B`` (the
    upstream gradients of ``fm`` and ``w2`` do not reach them: those outputs do not depend on them).
    """
    _, fm, w2 = expected_loss(v, u, v_ref, weights, alpha, w2_weights)
    b = fm.shape[0]
    return g_loss * fm / b, g_loss * alpha * w2 / b


def expected_model_loss(policy, reference, x_0, x_1, t, weights, alpha: float, sigma: float = 0.0, noise=None):
    """Float64 ORW-CFM-W2 loss of two velocity models ``model(t, x)`` on the straight path, and its policy gradient.

    Everything is recomputed here in float64 from the raw draws: ``x_t``, ``u_t`` by
    :func:`expected_path`, ``v = policy(t, x_t)`` and ``v_ref = reference(t, x_t)`` by float64
    copies of the modules (the modules themselves are left untouched), then
    ``fm[i] = mean_D (v[i] - u_t[i])^2``, ``w2[i] = mean_D (v[i] - v_ref[i])^2`` and
    ``loss = mean_i (weights[i] fm[i] + alpha w2[i])``, differentiated by autograd in float64.

    Args:
        policy, reference: CPU modules called as ``module(t, x)``.
        x_0, x_1: ``[B, ...]`` noise and samples after the coupling.
        t: ``[B]`` loss times.
        weights: ``[B]`` per-pair weights.
        alpha: W2 coefficient.
        sigma, noise: the path's Gaussian std and its ``[B, ...]`` draws (``noise`` unused for ``sigma == 0``).

    Returns:
        ``(loss, fm, w2, grads)``: 0-dim ``loss``, ``[B]`` ``fm`` and ``w2`` (detached), and
        ``grads``, ``{name: gradient}`` of ``loss`` in each of the policy's trainable parameters.
    """
    policy64 = copy.deepcopy(policy).double()
    reference64 = copy.deepcopy(reference).double()
    x_t, u_t, _ = expected_path(x_0, x_1, t, sigma, noise)
    t, w = t.detach().double().cpu(), weights.detach().double().cpu()
    named = [(name, p) for name, p in policy64.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        v = policy64(t, x_t)
    with torch.no_grad():
        v_ref = reference64(t, x_t)
    b = v.shape[0]
    fm = (v - u_t).pow(2).reshape(b, -1).mean(1)
    w2 = (v - v_ref).pow(2).reshape(b, -1).mean(1)
    loss = (w * fm + alpha * w2).mean()
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss.detach(), fm.detach(), w2.detach(), {name: g for (name, _), g in zip(named, grads)}


def expected_path(x_0, x_1, t, sigma: float = 0.0, noise=None):
    """Float64 ``(x_t, u_t, scale_x_t)`` of the straight conditional path."""
    x_0, x_1, t = (a.detach().double().cpu() for a in (x_0, x_1, t))
    tb = t.reshape((-1,) + (1,) * (x_1.ndim - 1))
    x_t = tb * x_1 + (1 - tb) * x_0
    scale = (tb * x_1).abs() + ((1 - tb) * x_0).abs()
    if sigma > 0:
        n = noise.detach().double().cpu()
        x_t = x_t + sigma * n
        scale = scale + (sigma * n).abs()
    u_t = x_1 - x_0
    return x_t, u_t, scale


def expected_ode_step(x, ks, coeffs, dt: float):
    """Float64 ``(x + dt * sum_j coeffs[j] ks[j], scale)``."""
    out = x.detach().double().cpu().clone()
    scale = out.abs()
    for c, k in zip(coeffs, ks):
        term = dt * c * k.detach().double().cpu()
        out = out + term
        scale = scale + term.abs()
    return out, scale


def _where(err: torch.Tensor) -> str:
    idx = int(err.flatten().argmax())
    return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape)))


def assert_rel_close(actual, expected, rtol: float, name: str = "value") -> None:
    """``|actual - expected| <= rtol * |expected|`` elementwise (float64 ``expected``); says where and how far."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = (a - e).abs()
    bound = rtol * e.abs()
    bad = ~(err <= bound)
    if bad.any():
        rel = err / e.abs().clamp_min(1e-300)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{e.numel()} elements off; worst relative error {float(rel.max()):.3g} "
            f"at {_where(rel)} (rtol {rtol:g}); actual {float(a.flatten()[rel.flatten().argmax()]):.9g} "
            f"expected {float(e.flatten()[rel.flatten().argmax()]):.9g}"
        )


def assert_elementwise_close(actual, expected, scale, name: str = "value", ulps: float = ELEMENTWISE_ULPS,
                             eps: float = _EPS32) -> None:
    """``|actual - expected| <= ulps * eps * scale`` elementwise, with ``scale`` the terms' magnitudes."""
    a = actual.detach().double().cpu()
    assert a.shape == expected.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(expected.shape)}"
    err = (a - expected).abs()
    bound = ulps * eps * scale + 1e-300
    ratio = err / bound
    if (ratio > 1).any():
        raise AssertionError(
            f"{name}: {int((ratio > 1).sum())}/{a.numel()} elements off; worst error {float(ratio.max()):.3g}x the "
            f"bound ({ulps} ulps of the terms) at {_where(ratio)}"
        )


def assert_low_precision_ok(actual, torch_actual, expected, name: str = "value", floor: float = 0.0) -> None:
    """Max error of ``actual`` vs float64 ``expected`` is at most 2x that of the torch backend's ``torch_actual``.

    ``floor`` (absolute) covers the case where the torch backend happens to be exact.
    """
    e = expected.detach().double().cpu()
    err = float((actual.detach().double().cpu() - e).abs().max())
    torch_err = float((torch_actual.detach().double().cpu() - e).abs().max())
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch backend's {torch_err:.3g} (+{floor:g})"


def dopri5_fixed_tableau():
    """Dormand-Prince 5(4)'s 7-stage tableau as a fixed-step method: rows of 5 and 6 stage values
    (more than one fused pass of the Triton ``ode_step``)."""
    from orwcfm_fast.sampling import ButcherTableau

    a = (
        (0,) * 7,
        (1 / 5, 0, 0, 0, 0, 0, 0),
        (3 / 40, 9 / 40, 0, 0, 0, 0, 0),
        (44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0),
        (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
    )
    b = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0)
    return ButcherTableau("dopri5_fixed", a, b, tuple(sum(row) for row in a), 5)
