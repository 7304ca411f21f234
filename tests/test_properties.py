"""Property-based tests (hypothesis) of the reward weighting and of the loss / path ops.

The other test modules check fixed cases against float64 oracles; these check algebraic laws
that must hold for *any* input in a domain: shift invariance of the batch weights, linearity
of the loss in the weights and in ``alpha``, equivariance under permuting the batch, the exact
endpoints of the conditional path, the messages of the input checks, and so on.

Every op property runs on each backend usable on CPU here (``torch``; ``cpp`` when the
extension is built; ``triton`` under ``TRITON_INTERPRET=1``, which ``conftest.py`` sets) and
skips the others. The Triton interpreter costs ~0.05 s a call, so it gets fewer examples:
each such test defines its ``@given`` property inside the test body, with the example count
of its backend (:func:`backend_settings`), and calls it.

Determinism: every property runs with ``derandomize=True, database=None`` (the same examples
on every run, nothing read from or written to ``.hypothesis/``), and tensor contents come
from ``torch.Generator`` seeds drawn by hypothesis.

Tolerances (``u`` = unit roundoff, 2^-24 for float32 and 2^-53 for float64):

- Loss / ``fm`` / ``w2`` against float64: ``op_cases.FP32_RTOL`` (float32) or 1e-12
  (float64), the bounds of the backend tests (sums of non-negative terms; see op_cases.py).
  A law relating two op outputs (e.g. ``loss(c w) = c loss(w)``) adds the bounds of both.
- Elementwise results and gradients: ``op_cases.ELEMENTWISE_ULPS`` ulps of the magnitudes of
  the terms (:func:`op_cases.assert_elementwise_close`).
- Weights: ``logits = beta * r`` is rounded (absolute error ``u L``, ``L = beta max|r|``), the
  softmax subtracts the max (``2 u L``), ``exp`` is faithful (a couple of ulps), the division
  by the sum and the product with ``B`` round once each, and the sum itself carries at most
  ``(B - 1) u``. See :func:`_log_weight_tol` and :func:`_sum_rtol`.
"""

from __future__ import annotations

import math

import pytest
import torch

# hypothesis is a test extra, not a dependency: a machine without it (e.g. a GPU image running `pytest -m cuda`)
# skips this module instead of failing the whole collection.
pytest.importorskip("hypothesis", reason="the property tests need the 'test' extra (hypothesis)")

from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from op_cases import (  # noqa: E402
    ELEMENTWISE_ULPS,
    FP32_RTOL,
    assert_elementwise_close,
    assert_rel_close,
    expected_loss,
    expected_loss_grad,
    expected_path,
    loss_inputs,
)
from orwcfm_fast.ops import BACKENDS, available_backends, conditional_path, orw_cfm_w2_loss  # noqa: E402
from orwcfm_fast.ops.reference import accumulation_dtype  # noqa: E402
from orwcfm_fast.weighting import effective_sample_size, reward_weights  # noqa: E402

# ----------------------------------------------------------------------------- settings

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_STATUS = available_backends()
CPU_BACKENDS = [name for name in BACKENDS if "cpu" in _STATUS[name].devices]
BACKEND_PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in CPU_BACKENDS,
            reason=f"backend {name!r} cannot run on CPU tensors here: {_STATUS[name].reason}",
        ),
    )
    for name in BACKENDS
]


def backend_settings(backend: str, fast: int, triton: int):
    """``SETTINGS`` with ``fast`` examples for torch/cpp and ``triton`` for the interpreted Triton backend."""
    return settings(SETTINGS, max_examples=triton if backend == "triton" else fast)


def _u(dtype: torch.dtype) -> float:
    """Unit roundoff of ``dtype`` (float32 for anything narrower: the weights are never narrower)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def _eps(dtype: torch.dtype) -> float:
    """The ``eps`` of :func:`op_cases.assert_elementwise_close` for outputs of ``dtype``."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def _rtol(dtype: torch.dtype) -> float:
    """Relative bound of a reduction (loss, fm, w2) against float64, as in the backend tests."""
    return 1e-12 if dtype == torch.float64 else FP32_RTOL


# ----------------------------------------------------------------------------- strategies

FLOAT_DTYPES = (torch.float32, torch.float64)


@st.composite
def sample_shapes(draw, max_b: int = 17):
    """``[B, ...]``: B in 1..17, then 1-3 trailing dims of size 1..9."""
    b = draw(st.integers(1, max_b))
    rest = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    return (b, *rest)


@st.composite
def loss_cases(draw, weight_kinds=("uniform", "zero", "huge", "mixed")):
    """``(v, u, v_ref, weights, alpha)`` from ``op_cases.loss_inputs`` with a drawn shape, dtype and seed."""
    shape = draw(sample_shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(weight_kinds))
    # alpha >= 1e-6: the float32 kernels take alpha as float32, so a denormal-small alpha (1e-308)
    # rounds to 0 there; that is the accumulation dtype's range, not an error of the op.
    alpha = draw(st.one_of(st.just(0.0), st.sampled_from([0.5, 1.0, 3.0]), st.floats(1e-6, 10.0)))
    v, u, v_ref, w = loss_inputs(shape, seed=seed, dtype=dtype, weight_kind=kind)
    return v, u, v_ref, w, alpha


def _randn(shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def path_cases(draw):
    """``(x_0, x_1)`` of a drawn shape and dtype."""
    shape = draw(sample_shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return _randn(shape, seed, dtype), _randn(shape, seed + 1, dtype) * 3


def _f32(x: float) -> float:
    """``x`` rounded to float32 (hypothesis wants width-32 bounds exactly representable)."""
    return float(torch.tensor(x, dtype=torch.float32))


def rewards_lists(max_abs: float = 100.0, max_size: int = 64, width: int = 32):
    """Lists of 1..64 finite rewards in ``[-max_abs, max_abs]`` (float32 values by default)."""
    m = _f32(max_abs) if width == 32 else max_abs
    return st.lists(
        st.floats(-m, m, allow_nan=False, allow_infinity=False, width=width),
        min_size=1,
        max_size=max_size,
    )


temperatures = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 20.0))
normalizations = st.sampled_from(["none", "batch"])
reward_dtypes = st.sampled_from(FLOAT_DTYPES)


# ----------------------------------------------------------------------------- weighting helpers


def _logit_scale(rewards: torch.Tensor, beta: float) -> float:
    """``L = beta * max|r|``: the magnitude of the logits, which sets their absolute rounding error."""
    return beta * float(rewards.double().abs().max())


def _log_weight_tol(L: float, dtype: torch.dtype) -> float:
    """Bound on ``|log w_i - log w_j - beta (r_i - r_j)|``.

    Per weight: the logit's rounding (``u L``), the subtraction of the max (``2 u L``; the max's
    own rounding is common to all weights and cancels in a ratio), ``exp`` (<= 2 ulps), the
    division by the sum and the product with ``B`` (1 ulp each): ``3 u L + 4 u``. Two weights,
    and a factor ~1.3 of margin: ``8 u (L + 2)``.
    """
    return 8 * _u(dtype) * (L + 2)


def _sum_rtol(b: int, dtype: torch.dtype) -> float:
    """Relative bound on ``|sum_i w_i - B| / B`` for the batch weights.

    ``w_i = B e_i / S`` with ``S`` the rounded sum of the same ``e_i``, so the logits' errors
    cancel; what is left is the sum (``(B - 1) u`` in any order), the division and product
    (``2 u`` per weight) and rounding the ``w_i`` (``u``): ``(B + 2) u``, doubled for margin.
    """
    return 2 * (b + 2) * _u(dtype)


def _ess_slack(b: int, dtype: torch.dtype) -> float:
    """Relative error of :func:`effective_sample_size`: the float64 sums carry ``(B - 1) 2^-53``
    each (``S1`` squared: twice), the two products/division ``3 * 2^-53``, then the result is
    rounded to ``dtype`` (``u``, doubled for margin): ``2 u + (2 B + 2) 2^-53``."""
    return 2 * _u(dtype) + (2 * b + 2) * 2.0**-53


def _tensor(values, dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- weighting


@settings(SETTINGS, max_examples=200)
@given(values=rewards_lists(max_abs=1e4), beta=temperatures, dtype=reward_dtypes)
def test_batch_weights_finite_nonnegative_mean_one(values, beta, dtype):
    """``"batch"`` weights are finite and >= 0, sum to ``B``, the largest is >= 1, and every
    weight whose logit is within 80 of the max (so ``exp`` cannot underflow) is > 0."""
    r = _tensor(values, dtype)
    b = r.shape[0]
    w = reward_weights(r, beta, "batch")
    assert w.shape == (b,)
    assert torch.isfinite(w).all(), w
    assert (w >= 0).all(), w
    total = float(w.double().sum())
    assert abs(total - b) <= _sum_rtol(b, dtype) * b, (total, b)
    assert float(w.max()) >= 1 - _sum_rtol(b, dtype), w
    spread = beta * (r.double().max() - r.double())  # float64 logit gap to the max
    assert (w[spread < 80] > 0).all(), w


@settings(SETTINGS, max_examples=150)
@given(
    values=st.lists(st.integers(-80, 80), min_size=1, max_size=64),
    shift=st.integers(-1000, 1000),
    beta=st.one_of(st.just(1.0), st.floats(0.0, 10.0)),
    dtype=reward_dtypes,
)
def test_batch_weights_shift_invariant(values, shift, beta, dtype):
    """``reward_weights(r + c, beta, "batch") == reward_weights(r, beta, "batch")`` up to the
    logits' rounding. Rewards are multiples of 1/8 and ``c`` an integer, so ``r + c`` is exact
    in float32 and only the logits' rounding differs. One weight's relative error is at most
    the logit terms of ``_log_weight_tol`` (its own logit and the max's) plus the sum's
    ``_sum_rtol``; two runs: twice that, with ``L`` the larger logit scale; plus an absolute
    floor for weights in the subnormal range."""
    r = _tensor([x / 8 for x in values], dtype)
    r_shifted = r + shift
    assert torch.equal(r_shifted - shift, r)  # the shift itself is exact
    w = reward_weights(r, beta, "batch").double()
    w_shifted = reward_weights(r_shifted, beta, "batch").double()
    L = max(_logit_scale(r, beta), _logit_scale(r_shifted, beta))
    rtol = 2 * (_log_weight_tol(L, dtype) + _sum_rtol(r.shape[0], dtype))
    tiny = torch.finfo(dtype).tiny
    torch.testing.assert_close(w_shifted, w, rtol=rtol, atol=tiny)


@settings(SETTINGS, max_examples=200)
@given(values=rewards_lists(max_abs=200.0), beta=temperatures, norm=normalizations, dtype=reward_dtypes)
def test_weight_ratios_follow_reward_differences(values, beta, norm, dtype):
    """``w_i / w_j = exp(beta (r_i - r_j))`` for both normalizations, checked as
    ``log w_i - log w_j`` against ``beta (r_i - r_j)`` for every pair of weights that is finite
    and normal (raw weights may overflow, tiny ones lose precision as subnormals)."""
    r = _tensor(values, dtype)
    w = reward_weights(r, beta, norm).double()
    ok = torch.isfinite(w) & (w >= torch.finfo(dtype).tiny)
    if ok.sum() < 2:
        return
    log_w = w[ok].log()
    logit = beta * r.double()[ok]
    got = log_w[:, None] - log_w[None, :]
    want = logit[:, None] - logit[None, :]
    tol = _log_weight_tol(_logit_scale(r, beta), dtype)
    err = float((got - want).abs().max())
    assert err <= tol, (err, tol)


@settings(SETTINGS, max_examples=100)
@given(values=rewards_lists(max_abs=1e30), norm=normalizations, dtype=reward_dtypes)
def test_zero_temperature_gives_ones(values, norm, dtype):
    """``beta = 0`` gives uniform weights 1: exactly for ``"none"`` (``exp(0) = 1``), within
    the rounding of ``B * (1 / B)`` for ``"batch"``."""
    r = _tensor(values, dtype)
    w = reward_weights(r, 0.0, norm)
    if norm == "none":
        assert torch.equal(w, torch.ones_like(w))
    else:
        torch.testing.assert_close(w, torch.ones_like(w), rtol=4 * _u(dtype), atol=0)


@settings(SETTINGS, max_examples=200)
@given(values=rewards_lists(max_abs=200.0), beta=temperatures, norm=normalizations, dtype=reward_dtypes)
def test_weights_monotone_in_reward(values, beta, norm, dtype):
    """Higher reward, no smaller weight (``beta >= 0``): sorted by reward, the weights are
    non-decreasing up to ``exp``'s last-ulp wobble (rounding, the max subtraction and the
    division are all monotone; only a faithful ``exp`` is not exactly so); and strictly
    increasing where the logit gap exceeds the weights' error and both weights are normal."""
    r = _tensor(values, dtype).sort().values
    w = reward_weights(r, beta, norm).double()
    lo, hi = w[:-1], w[1:]
    slack = 4 * _u(dtype)
    assert (lo <= hi * (1 + slack)).all(), w
    gap = beta * (r.double()[1:] - r.double()[:-1])
    tiny = torch.finfo(dtype).tiny
    strict = (gap > _log_weight_tol(_logit_scale(r, beta), dtype)) & (lo >= tiny) & torch.isfinite(hi)
    assert (lo[strict] < hi[strict]).all(), w


_LOG_FLT_MAX = math.log(torch.finfo(torch.float32).max)  # 88.7228...


@settings(SETTINGS, max_examples=200)
@given(values=rewards_lists(max_abs=150.0, width=32), beta=st.one_of(st.just(1.0), st.floats(0.0, 3.0)))
@example(values=[88.7, 88.75, -200.0, 0.0], beta=1.0)
@example(values=[44.36, 44.37], beta=2.0)
@example(values=[1e4, 1e4, -1e4], beta=1.0)
def test_raw_weights_overflow_exactly_past_log_float32_max(values, beta):
    """Float32 raw (``"none"``) weights are ``inf`` exactly when ``beta r > log(FLT_MAX) = 88.72``
    (logits within 1e-3 of the threshold, where the logit's rounding decides, are skipped),
    never NaN; the ``"batch"`` weights of the same rewards are always finite."""
    r = torch.tensor(values, dtype=torch.float32)
    raw = reward_weights(r, beta, "none")
    batch = reward_weights(r, beta, "batch")
    logit = beta * r.double()
    clear = (logit - _LOG_FLT_MAX).abs() > 1e-3
    assert not raw.isnan().any()
    assert torch.equal(raw.isinf()[clear], (logit > _LOG_FLT_MAX)[clear]), (raw, logit)
    assert torch.isfinite(batch).all(), batch


@settings(SETTINGS, max_examples=200)
@given(
    values=st.lists(st.floats(0.0, 2.0**20, width=32), min_size=1, max_size=64).filter(lambda xs: max(xs) > 0),
    dtype=reward_dtypes,
)
def test_ess_between_one_over_b_and_one(values, dtype):
    """``1/B <= ESS <= 1`` for non-negative weights with one positive (Cauchy-Schwarz), up to
    ``_ess_slack`` (float64 sums, then rounding to the weights' dtype)."""
    w = _tensor(values, dtype)
    b = w.shape[0]
    ess = effective_sample_size(w)
    assert ess.dtype == dtype and ess.shape == ()
    slack = _ess_slack(b, dtype)
    assert 1 / b * (1 - slack) <= float(ess) <= 1 + slack, (float(ess), b)


@settings(SETTINGS, max_examples=100)
@given(b=st.integers(1, 512), value=st.floats(1e-20, 1e20), hot=st.integers(0, 511), dtype=reward_dtypes)
def test_ess_equal_weights_is_one_and_one_hot_is_one_over_b(b, value, hot, dtype):
    """ESS is 1 for ``B`` equal positive weights and ``1/B`` when one weight carries all mass."""
    equal = torch.full((b,), value, dtype=torch.float64).to(dtype)
    slack = _ess_slack(b, dtype)
    assert abs(float(effective_sample_size(equal)) - 1) <= slack
    one_hot = torch.zeros(b, dtype=dtype)
    one_hot[hot % b] = value
    assert abs(float(effective_sample_size(one_hot)) * b - 1) <= slack


@settings(SETTINGS, max_examples=150)
@given(
    values=st.lists(st.floats(2.0**-20, 2.0**20, width=32), min_size=1, max_size=64),
    scale=st.one_of(st.sampled_from([2.0**-10, 0.5, 4.0, 2.0**20]), st.floats(1e-3, 1e3)),
    dtype=reward_dtypes,
)
def test_ess_scale_invariant(values, scale, dtype):
    """``ESS(c w) = ESS(w)`` for ``c > 0``. Rounding ``c w`` perturbs each weight by ``u``
    relative; ESS is ``S1^2 / (B S2)``, so that moves it by at most ``2u + 2u``; plus each
    run's own error ``_ess_slack``: ``rtol = 4 u + 2 _ess_slack``. A power of two scales every
    weight exactly, and so every float64 partial sum: the results are equal."""
    w = _tensor(values, dtype)
    scaled = w * scale
    a, b = effective_sample_size(w), effective_sample_size(scaled)
    if math.frexp(scale)[0] == 0.5:  # power of two: the scaled weights are exact
        assert torch.equal(a, b)
    else:
        rtol = 4 * _u(dtype) + 2 * _ess_slack(w.shape[0], dtype)
        torch.testing.assert_close(b, a, rtol=rtol, atol=0)


@settings(SETTINGS, max_examples=60)
@given(
    values=rewards_lists(max_abs=50.0, max_size=16),
    beta=st.floats(0.0, 5.0),
    norm=normalizations,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]),
)
def test_weight_dtype_follows_rewards(values, beta, norm, dtype):
    """Weights are float64 for float64 rewards and float32 otherwise (half, bf16, ints); float64
    weights match ``math.exp`` to float64 precision (``_log_weight_tol`` with float64's ``u``)."""
    r = torch.tensor(values, dtype=torch.float64).to(dtype)
    w = reward_weights(r, beta, norm)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:
        logits = [beta * float(x) for x in r]
        if norm == "none":
            want = torch.tensor([math.exp(x) for x in logits], dtype=torch.float64)
        else:
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            want = torch.tensor([len(e) * x / math.fsum(e) for x in e], dtype=torch.float64)
        tol = _log_weight_tol(_logit_scale(r, beta), torch.float64) + _sum_rtol(len(values), torch.float64)
        torch.testing.assert_close(w, want, rtol=tol, atol=1e-300)


# ----------------------------------------------------------------------------- loss op


def _loss(backend, v, u, v_ref, w, alpha):
    return orw_cfm_w2_loss(v, u, v_ref, w, alpha, backend=backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_is_mean_of_weighted_terms(backend):
    """``loss = mean_i(w_i fm_i + alpha w2_i)`` of the returned per-sample terms; ``fm``, ``w2``
    are finite, >= 0, ``[B]``, in the accumulation dtype. Both the loss and the terms are within
    ``_rtol`` of exact, so they agree within twice that."""

    @backend_settings(backend, fast=100, triton=20)
    @given(case=loss_cases())
    def prop(case):
        v, u, v_ref, w, alpha = case
        loss, fm, w2 = _loss(backend, v, u, v_ref, w, alpha)
        acc = accumulation_dtype(v.dtype)
        assert loss.shape == () and fm.shape == w2.shape == (v.shape[0],)
        assert loss.dtype == fm.dtype == w2.dtype == acc
        assert torch.isfinite(fm).all() and torch.isfinite(w2).all()
        assert (fm >= 0).all() and (w2 >= 0).all()
        from_terms = (w.double() * fm.double() + alpha * w2.double()).mean()
        assert_rel_close(loss, from_terms, 2 * _rtol(v.dtype), "loss vs its terms")

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_matches_float64_oracle(backend):
    """``(loss, fm, w2)`` match ``op_cases.expected_loss`` (float64 per-sample sums) within
    ``FP32_RTOL`` (float32) or 1e-12 (float64)."""

    @backend_settings(backend, fast=100, triton=20)
    @given(case=loss_cases())
    def prop(case):
        v, u, v_ref, w, alpha = case
        loss, fm, w2 = _loss(backend, v, u, v_ref, w, alpha)
        exp_loss, exp_fm, exp_w2 = expected_loss(v, u, v_ref, w, alpha)
        rtol = _rtol(v.dtype)
        assert_rel_close(loss, exp_loss, rtol, "loss")
        assert_rel_close(fm, exp_fm, rtol, "fm")
        assert_rel_close(w2, exp_w2, rtol, "w2")

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_zero_terms_when_velocities_coincide(backend):
    """``w2 == 0`` exactly when ``v_ref == v`` (then ``loss = mean(w fm)``), and ``fm == 0``
    exactly when ``u == v`` (then ``loss = alpha mean(w2)``): ``(x - x)^2`` is exactly 0."""

    @backend_settings(backend, fast=100, triton=20)
    @given(case=loss_cases())
    def prop(case):
        v, u, v_ref, w, alpha = case
        rtol = 2 * _rtol(v.dtype)
        loss, fm, w2 = _loss(backend, v, u, v.clone(), w, alpha)
        assert torch.equal(w2, torch.zeros_like(w2)), w2
        assert_rel_close(loss, (w.double() * fm.double()).mean(), rtol, "loss with v_ref == v")
        loss, fm, w2 = _loss(backend, v, v.clone(), v_ref, w, alpha)
        assert torch.equal(fm, torch.zeros_like(fm)), fm
        assert_rel_close(loss, alpha * w2.double().mean(), rtol, "loss with u == v")

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_linear_in_weights_and_alpha(backend):
    """With ``alpha = 0``, ``loss(c w) = c loss(w)`` (and ``fm``, ``w2`` do not depend on the
    weights at all); and ``loss(w, alpha) = loss(w, 0) + alpha mean(w2)``. Each side is within
    ``_rtol`` of its exact value (plus ``2 u`` for rounding ``c`` and ``c w`` to float32), so the laws hold within the
    sum of those bounds. "huge" weights are left out: ``c`` times them could overflow."""

    @backend_settings(backend, fast=100, triton=20)
    @given(
        case=loss_cases(weight_kinds=("uniform", "zero", "mixed")),
        c=st.one_of(st.sampled_from([0.0, 0.5, 2.0]), st.floats(1e-3, 1e3)),
    )
    def prop(case, c):
        v, u, v_ref, w, alpha = case
        rtol = _rtol(v.dtype)
        base, fm, w2 = _loss(backend, v, u, v_ref, w, 0.0)
        scaled, fm_c, w2_c = _loss(backend, v, u, v_ref, w * c, 0.0)
        assert torch.equal(fm_c, fm) and torch.equal(w2_c, w2)
        # w * c is float32 (the weights' dtype): c and each product are rounded, 2 * 2^-24.
        assert_rel_close(scaled, c * base.double(), 2 * rtol + 2 * 2.0**-24, f"loss(c w) vs c loss(w), c={c}")

        with_alpha = _loss(backend, v, u, v_ref, w, alpha)[0].double()
        w2_part = alpha * w2.double().mean()
        err = abs(float(with_alpha - base.double() - w2_part))
        bound = rtol * float(with_alpha + base.double() + w2_part)
        assert err <= bound, f"loss(alpha) - loss(0) - alpha mean(w2) = {err:.3g} > {bound:.3g}"

    prop()


@st.composite
def permuted_loss_cases(draw):
    case = draw(loss_cases())
    perm = draw(st.permutations(range(case[0].shape[0])))
    return case, torch.tensor(perm, dtype=torch.long)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_batch_permutation_equivariant(backend):
    """Permuting the batch (``v``, ``u``, ``v_ref``, ``weights`` together) permutes ``fm`` and
    ``w2`` and leaves the loss unchanged, up to the summation order: each result is within
    ``_rtol`` of exact, so the two runs agree within twice that."""

    @backend_settings(backend, fast=100, triton=20)
    @given(case_perm=permuted_loss_cases())
    def prop(case_perm):
        (v, u, v_ref, w, alpha), perm = case_perm
        rtol = 2 * _rtol(v.dtype)
        loss, fm, w2 = _loss(backend, v, u, v_ref, w, alpha)
        loss_p, fm_p, w2_p = _loss(backend, v[perm], u[perm], v_ref[perm], w[perm], alpha)
        assert_rel_close(fm_p, fm[perm].double(), rtol, "fm permuted")
        assert_rel_close(w2_p, w2[perm].double(), rtol, "w2 permuted")
        assert_rel_close(loss_p, loss.double(), rtol, "loss permuted")

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_gradients_match_analytic_form(backend):
    """``d loss / d v = 2 / (B D) (w_i (v - u) + alpha (v - v_ref))`` (``op_cases.expected_loss_grad``;
    ``fm``/``w2`` are means over the ``D`` elements of a sample, the loss a mean over ``B``),
    also with upstream gradients on ``fm`` and ``w2``; and ``d loss / d w_i = fm_i / B``.
    ``grad_v`` within ``ELEMENTWISE_ULPS`` ulps of the terms; ``grad_w`` within ``_rtol``."""

    @backend_settings(backend, fast=100, triton=20)
    @given(case=loss_cases(), upstream=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def prop(case, upstream, seed):
        v, u, v_ref, w, alpha = case
        v = v.clone().requires_grad_()
        w = w.clone().requires_grad_()
        loss, fm, w2 = _loss(backend, v, u, v_ref, w, alpha)
        b = v.shape[0]
        g_fm = g_w2 = None
        objective = loss
        if upstream:
            g_fm = _randn((b,), seed, fm.dtype)
            g_w2 = _randn((b,), seed + 1, w2.dtype)
            objective = loss + (g_fm * fm).sum() + (g_w2 * w2).sum()
        objective.backward()
        exp_grad, scale = expected_loss_grad(v, u, v_ref, w, alpha, 1.0, g_fm, g_w2)
        assert v.grad.dtype == v.dtype
        assert_elementwise_close(v.grad, exp_grad, scale, "grad_v", ulps=ELEMENTWISE_ULPS, eps=_eps(v.dtype))
        exp_fm = expected_loss(v, u, v_ref, w, alpha)[1]
        # grad_w is in the weights' dtype (float32 here): one more rounding, 2^-24.
        assert_rel_close(w.grad, exp_fm / b, _rtol(v.dtype) + 2.0**-24, "grad_weights")

    prop()


# ----------------------------------------------------------------------------- conditional path


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_path_endpoints_and_velocity_are_exact(backend):
    """With ``sigma = 0``: ``x_t == x_0`` where ``t = 0``, ``x_t == x_1`` where ``t = 1`` (bit
    for bit: ``0 * a + 1 * b`` is exact), and ``u_t == x_1 - x_0`` (one correctly rounded
    subtraction), whatever the other rows' times."""

    @backend_settings(backend, fast=100, triton=20)
    @given(xs=path_cases(), data=st.data())
    def prop(xs, data):
        x_0, x_1 = xs
        b = x_0.shape[0]
        t_vals = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.25, 0.7]), min_size=b, max_size=b))
        t_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        t = torch.tensor(t_vals, dtype=t_dtype)
        x_t, u_t = conditional_path(x_0, x_1, t, backend=backend)
        assert x_t.dtype == u_t.dtype == x_1.dtype and x_t.shape == u_t.shape == x_1.shape
        assert torch.equal(u_t, x_1 - x_0)
        at0, at1 = t == 0, t == 1
        assert torch.equal(x_t[at0], x_0[at0])
        assert torch.equal(x_t[at1], x_1[at1])

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_path_is_affine_in_t(backend):
    """``x_t`` is affine in ``t``: for times ``t1 != t2`` and ``t3`` between them,
    ``x_t(t3) = lam x_t(t1) + (1 - lam) x_t(t2)`` with ``lam = (t2 - t3) / (t2 - t1)``
    computed in float64 from the times as passed (so rounding ``t`` is no error). Each ``x_t``
    is within ``ELEMENTWISE_ULPS`` ulps of its terms (``op_cases.expected_path``'s scale), so
    the combination is within the same weighted sum of scales."""

    @backend_settings(backend, fast=100, triton=20)
    @given(
        xs=path_cases(),
        t1=st.floats(0.0, 1.0),
        t2=st.floats(0.0, 1.0),
        frac=st.floats(0.0, 1.0),
    )
    def prop(xs, t1, t2, frac):
        x_0, x_1 = xs
        b = x_0.shape[0]
        t_dtype = torch.float64 if x_1.dtype == torch.float64 else torch.float32
        ts = [torch.full((b,), t, dtype=torch.float64).to(t_dtype) for t in (t1, t2, t1 + frac * (t2 - t1))]
        a, c, m = (float(t[0]) for t in ts)
        if a == c:
            return
        lam = (c - m) / (c - a)
        outs = [conditional_path(x_0, x_1, t, backend=backend)[0].double() for t in ts]
        scales = [expected_path(x_0, x_1, t)[2] for t in ts]
        combo = lam * outs[0] + (1 - lam) * outs[1]
        scale = scales[2] + abs(lam) * scales[0] + abs(1 - lam) * scales[1]
        assert_elementwise_close(outs[2], combo, scale, f"x_t({m}) vs affine combination", eps=_eps(x_1.dtype))

    prop()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_path_noise_is_additive(backend):
    """``x_t(sigma, noise) = x_t(0) + sigma * noise`` and ``u_t`` ignores the noise; with
    ``sigma = 0`` a given noise is ignored bit for bit. Elementwise bound over the terms."""

    @backend_settings(backend, fast=100, triton=20)
    @given(xs=path_cases(), t=st.floats(0.0, 1.0), sigma=st.floats(1e-3, 2.0), seed=st.integers(0, 2**31 - 1))
    def prop(xs, t, sigma, seed):
        x_0, x_1 = xs
        b = x_0.shape[0]
        noise = _randn(x_1.shape, seed, x_1.dtype)
        tt = torch.full((b,), t, dtype=torch.float64).to(x_1.dtype)
        x_plain, u_plain = conditional_path(x_0, x_1, tt, backend=backend)
        x_zero, u_zero = conditional_path(x_0, x_1, tt, 0.0, noise, backend=backend)
        assert torch.equal(x_zero, x_plain) and torch.equal(u_zero, u_plain)
        x_noisy, u_noisy = conditional_path(x_0, x_1, tt, sigma, noise, backend=backend)
        assert torch.equal(u_noisy, u_plain)
        _, _, scale = expected_path(x_0, x_1, tt, sigma, noise)
        want = x_plain.double() + sigma * noise.double()
        assert_elementwise_close(x_noisy, want, 2 * scale, "x_t with noise", eps=_eps(x_1.dtype))

    prop()


# ----------------------------------------------------------------------------- bad inputs


def _other_shape(shape):
    """A strategy of ``[B, ...]`` shapes different from ``shape`` (the batch size may match)."""
    return sample_shapes().filter(lambda s: s != shape)


@settings(SETTINGS, max_examples=80)
@given(shape=sample_shapes(), data=st.data(), backend=st.sampled_from(CPU_BACKENDS))
def test_loss_rejects_mismatched_shapes(shape, data, backend):
    """A ``u`` or ``v_ref`` shaped unlike ``v`` raises ``ValueError`` naming the argument and both
    shapes; ``weights`` not shaped ``[B]`` raises ``ValueError`` naming ``weights`` and ``[B]``."""
    bad_shape = data.draw(_other_shape(shape))
    name = data.draw(st.sampled_from(["u", "v_ref"]))
    args = {"v": torch.zeros(shape), "u": torch.zeros(shape), "v_ref": torch.zeros(shape)}
    args[name] = torch.zeros(bad_shape)
    with pytest.raises(ValueError) as err:
        orw_cfm_w2_loss(args["v"], args["u"], args["v_ref"], torch.ones(shape[0]), 0.5, backend=backend)
    msg = str(err.value)
    assert msg.startswith(f"{name} has shape"), msg
    assert str(tuple(bad_shape)) in msg and str(tuple(shape)) in msg, msg

    w_shape = data.draw(
        st.lists(st.integers(0, 20), min_size=0, max_size=2).map(tuple).filter(lambda s: s != (shape[0],))
    )
    v = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[%d\]" % shape[0]):
        orw_cfm_w2_loss(v, v.clone(), v.clone(), torch.ones(w_shape), 0.5, backend=backend)


@settings(SETTINGS, max_examples=60)
@given(
    shape=sample_shapes(),
    dtypes=st.tuples(st.sampled_from(FLOAT_DTYPES + (torch.float16, torch.bfloat16)), st.sampled_from(FLOAT_DTYPES))
    .filter(lambda d: d[0] != d[1]),
    int_dtype=st.sampled_from([torch.int32, torch.int64, torch.bool]),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_loss_rejects_bad_dtypes(shape, dtypes, int_dtype, backend):
    """``u`` in another float dtype than ``v`` raises ``TypeError`` saying to cast; a non-float
    ``v`` or ``weights`` raises ``TypeError`` naming it; a non-tensor raises ``TypeError``."""
    v = torch.zeros(shape, dtype=dtypes[0])
    u = torch.zeros(shape, dtype=dtypes[1])
    w = torch.ones(shape[0])
    with pytest.raises(TypeError, match=r"^u is .* but v is .*cast one of them"):
        orw_cfm_w2_loss(v, u, v.clone(), w, 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"^v must be float16, bfloat16, float32 or float64"):
        orw_cfm_w2_loss(v.to(int_dtype), v.to(int_dtype), v.to(int_dtype), w, 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"^weights must be float16"):
        orw_cfm_w2_loss(v, v.clone(), v.clone(), w.to(int_dtype), 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"^v_ref must be a torch.Tensor, got list"):
        orw_cfm_w2_loss(v, v.clone(), v.tolist(), w, 0.5, backend=backend)


@settings(SETTINGS, max_examples=60)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=1).map(tuple),
    alpha=st.one_of(st.floats(max_value=-1e-30), st.just(float("nan")), st.just(-float("inf"))),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_loss_rejects_unbatched_samples_and_bad_alpha(shape, alpha, backend):
    """``v`` with fewer than 2 dims raises ``ValueError`` asking for ``[B, ...]``; a negative or
    NaN ``alpha`` raises ``ValueError`` naming ``alpha``."""
    v = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"^v must be \[B, \.\.\.\] with at least one non-batch dim"):
        orw_cfm_w2_loss(v, v.clone(), v.clone(), torch.ones(1), 0.5, backend=backend)
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^alpha must be >= 0"):
        orw_cfm_w2_loss(v, v.clone(), v.clone(), torch.ones(2), alpha, backend=backend)


@settings(SETTINGS, max_examples=20)
@given(shape=sample_shapes(), zero_at=st.integers(1, 3), backend=st.sampled_from(CPU_BACKENDS))
def test_loss_rejects_samples_without_elements(shape, zero_at, backend):
    """A ``v`` with no elements per sample (a trailing dim of size 0) is rejected by the input
    checks with ``ValueError``, like an empty batch, on every backend."""
    shape = list(shape)
    shape[min(zero_at, len(shape) - 1)] = 0
    v = torch.zeros(shape)
    with pytest.raises(ValueError, match="samples without elements"):
        orw_cfm_w2_loss(v, v.clone(), v.clone(), torch.ones(shape[0]), 0.5, backend=backend)


@settings(SETTINGS, max_examples=30)
@given(b=st.integers(1, 17), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ess_of_all_zero_weights_is_one_over_b(b, dtype):
    """Raw weights that all underflowed to 0 (every ``beta * r < -104``) give ``1/B``, not NaN."""
    ess = effective_sample_size(torch.zeros(b, dtype=dtype))
    assert float(ess) == pytest.approx(1 / b, rel=1e-6)


@settings(SETTINGS, max_examples=80)
@given(shape=sample_shapes(), data=st.data(), backend=st.sampled_from(CPU_BACKENDS))
def test_path_rejects_mismatched_shapes(shape, data, backend):
    """``conditional_path``: ``x_0`` shaped unlike ``x_1`` raises ``ValueError`` naming ``x_0``
    and both shapes; ``t`` not ``[B]`` raises ``ValueError`` naming ``t``; ``sigma > 0`` without
    noise, or with noise of another shape, raises ``ValueError``; a negative sigma too."""
    bad_shape = data.draw(_other_shape(shape))
    x_1 = torch.zeros(shape)
    t = torch.rand(shape[0])
    with pytest.raises(ValueError) as err:
        conditional_path(torch.zeros(bad_shape), x_1, t, backend=backend)
    msg = str(err.value)
    assert msg.startswith("x_0 has shape") and str(tuple(bad_shape)) in msg and str(tuple(shape)) in msg, msg

    t_shape = data.draw(
        st.lists(st.integers(0, 20), min_size=0, max_size=2).map(tuple).filter(lambda s: s != (shape[0],))
    )
    with pytest.raises(ValueError, match=r"^t must have shape \[B\] = \[%d\]" % shape[0]):
        conditional_path(x_1.clone(), x_1, torch.zeros(t_shape), backend=backend)

    sigma = data.draw(st.floats(1e-6, 10.0))
    with pytest.raises(ValueError, match=r"sigma > 0 needs `noise`"):
        conditional_path(x_1.clone(), x_1, t, sigma, backend=backend)
    with pytest.raises(ValueError, match=r"^noise has shape"):
        conditional_path(x_1.clone(), x_1, t, sigma, torch.zeros(bad_shape), backend=backend)
    with pytest.raises(ValueError, match=r"^sigma must be >= 0"):
        conditional_path(x_1.clone(), x_1, t, -sigma, backend=backend)


@settings(SETTINGS, max_examples=40)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple).filter(lambda s: len(s) != 1),
    norm=st.text(min_size=0, max_size=8).filter(lambda s: s not in ("none", "batch", "group")),
)
def test_reward_weights_rejects_bad_input(shape, norm):
    """Rewards not shaped ``[B]`` raise ``ValueError`` with the shape; an unknown normalization
    raises ``ValueError`` listing the valid ones."""
    with pytest.raises(ValueError, match=r"^rewards must have shape \[B\], got"):
        reward_weights(torch.zeros(shape), 1.0, "batch")
    with pytest.raises(ValueError, match=r"^weight_normalization must be one of \['none', 'batch', 'group'\]"):
        reward_weights(torch.zeros(3), 1.0, norm)
