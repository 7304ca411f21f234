"""Tests for orwcfm_fast.sampling.graph: GraphSampler (integrate replayed from one CUDA graph).

Every numerical expectation comes from ``_rk_reference``: a hand-written per-step loop of each
textbook scheme (euler, midpoint, heun, rk4; Ralston's for the custom tableau) in float64, on a
float64 copy of the model, over the same time grid. It shares no code with
``orwcfm_fast.sampling.solvers``, so a wrong weight, stage time or time grid in ``integrate`` fails
these tests instead of being compared with itself. Only ``test_eager_path_is_integrate_bit_for_bit``
(and its CUDA twin) compares with ``integrate``: that is the documented contract of the eager path.

Three groups:

- eager path (CPU): the oracle's result for every solver, on a small MLP (every CPU backend, fp32
  and float64) and a tiny torchcfm UNet; argument validation; eval/no-grad handling;
- simulated capture (CPU): the graph bookkeeping (keys, LRU, weight-replacement detection,
  fallback after a failed capture, the ``sample`` fast path) with ``_record`` replaced by a fake
  graph that recomputes on replay. It checks the Python logic only, not CUDA;
- ``cuda`` tests: real capture and replay. They need a GPU (skipped at run time without one);
  on a GPU machine run them with compiled Triton kernels::

      TRITON_INTERPRET=0 .venv/bin/python -m pytest -q -m cuda tests/test_graph_sampler.py
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from _fake_cuda import fake_stream_class, patch_checked
from _rk_reference import (
    TEXTBOOK_SCHEMES,
    evaluated_in,
    explicit_rk_step,
    float64_copy,
    ralston_step,
    rk_reference,
    uniform_grid,
)
from orwcfm_fast.ops import available_backends
from orwcfm_fast.sampling import SOLVERS, ButcherTableau, GraphCaptureWarning, GraphSampler, integrate
from orwcfm_fast.sampling import graph as graph_mod

SOLVER_NAMES = sorted(SOLVERS)

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_test(fn):
    return cuda(needs_cuda(fn))


# Tolerances of a sampler's x_1 against the float64 oracle (rk_reference).
# fp32: the sampler rounds every model output and state update to fp32 (unit roundoff 6e-8); over
# the at most 40 model calls of these tests the measured distance to the oracle is <= 4e-7 (|x_1| <= 3).
# 1e-5 leaves 25x headroom and stays far below what a solver bug moves x_1 by (measured, issue 17
# item 2): one RK4 weight 2/6 -> 2.1/6 by 2e-3, Heun's second stage at t + dt/2 instead of t + dt by
# 3.5e-3, a uniform grid built with steps + 1 in place of steps by 6e-4 (Euler, 7 steps).
FP32 = dict(rtol=1e-5, atol=1e-5)
# float64 sampler against the float64 oracle: only the order of the additions differs (measured
# <= 1e-15); the grid bug above still moves the 5-step RK4 result by 6e-9.
FP64 = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # Small CPU tensors: one thread is fastest, and on a busy 2-core machine several threads
    # contend (a tiny UNet forward goes from ~20 ms to seconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Small time-conditioned velocity field on ``[B, dim]``."""

    def __init__(self, dim: int = 2, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


class SyncMLP(MLP):
    """Reads a value back to the host every call: runs eagerly, cannot be captured."""

    def forward(self, t, x):
        scale = 1.0 + 0.0 * float(t[0])  # .item(): a host-device sync
        return scale * super().forward(t, x)


class BadShape(nn.Module):
    def forward(self, t, x):
        return x[:, :1]


def make_mlp(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kw).eval()


def make_unet(seed: int = 0):
    """A tiny torchcfm UNet whose velocity is not zero.

    torchcfm zero-initialises its output convolution and every residual/attention output layer
    (a trained model's starting point), so the fresh UNet's velocity is exactly 0 and every solver
    returns x_0: a comparison of samplers on it could not fail. Those layers get PyTorch's default
    initialisation instead (v ~ 0.2, depending on t).
    """
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(seed)
    model = UNetModelWrapper(
        dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
        num_head_channels=16, attention_resolutions="4", dropout=0.0,
    ).eval()
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def eager(model, x_0, solver, steps, backend=None):
    with torch.no_grad():
        return integrate(model, x_0, solver=solver, steps=steps, backend=backend)


def reference(model, x_0, solver, steps, *cond, time_grid=None):
    """The oracle's x_1 (float64) for ``sampler(x_0, *cond)``: the textbook scheme on a float64 copy of
    ``model`` in eval mode (``solver``: a scheme name or an ``_rk_reference`` step function)."""
    model_64 = float64_copy(model)
    cond_64 = tuple(c.double() for c in cond)
    return rk_reference(lambda t, x: model_64(t, x, *cond_64), x_0, solver, steps, time_grid=time_grid)


def assert_reference(got, want, tol=FP32):
    """``got`` (the sampler's dtype) within ``tol`` of the float64 oracle's ``want``; says where and how far."""
    torch.testing.assert_close(got.double(), want.to(got.device), **tol)


def cpu_backends() -> list[str]:
    return [name for name, status in available_backends().items() if "cpu" in status.devices]


# ----------------------------------------------------------------------------- the oracle itself


def test_reference_covers_every_solver():
    """A solver added to the library needs its textbook step in _rk_reference before these tests can check it."""
    assert set(TEXTBOOK_SCHEMES) == set(SOLVERS)


@pytest.mark.parametrize(("scheme", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4),
                                               (ralston_step, 2)])
def test_reference_converges_at_its_order(scheme, order):
    """The oracle on dx/dt = x cos(t) + t (exact solution known) converges at the scheme's order.

    Checks the hand-written steps against mathematics, not against the library: halving the step
    divides the error at t = 1 by 2^order (measured within 3% for every scheme at these step
    counts; a wrong weight or stage time drops the order or leaves an O(1) error, far outside 15%).
    """
    x_0 = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)

    def exact(t):  # x(t) = e^{sin t} (x_0 + int_0^t s e^{-sin s} ds), the integral by Simpson's rule on 2001 points
        s = torch.linspace(0.0, t, 2001, dtype=torch.float64)
        g = s * torch.exp(-torch.sin(s))
        w = torch.ones(2001, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return math.exp(math.sin(t)) * (x_0 + (t / 2000 / 3) * (w * g).sum())

    def velocity(t, x):
        return x * torch.cos(t)[:, None] + t[:, None]

    steps = 8 if order == 4 else 32  # big enough for the asymptotic ratio, small enough for float64 to see it
    err = [(rk_reference(velocity, x_0, scheme, n) - exact(1.0)).abs().max().item() for n in (steps, 2 * steps)]
    assert err[0] / err[1] == pytest.approx(2.0**order, rel=0.15)


def test_reference_grid():
    assert uniform_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    calls = []

    def velocity(t, x):
        calls.append(t[0].item())
        return torch.ones_like(x)

    x_1 = rk_reference(velocity, torch.zeros(2, 1), "heun", 2, time_grid=[0.0, 0.3, 1.0])
    assert calls == pytest.approx([0.0, 0.3, 0.3, 1.0]) and torch.equal(x_1, torch.ones(2, 1, dtype=torch.float64))


# ----------------------------------------------------------------------------- eager path (CPU)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("backend", [None, *cpu_backends()])
def test_eager_mlp_matches_reference(solver, backend):
    model = make_mlp()
    steps = 2 if backend == "triton" else 7  # triton runs in its (slow) interpreter on CPU
    x_0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    sampler = GraphSampler(model, solver=solver, steps=steps, backend=backend)
    got = sampler(x_0)
    assert got.dtype == torch.float32
    assert_reference(got, reference(model, x_0, solver, steps))
    assert sampler.captures == 0 and sampler.num_graphs == 0
    assert not got.requires_grad


def test_eager_path_is_integrate_bit_for_bit():
    """The documented contract of the eager path: exactly what integrate returns (its numbers: the tests above)."""
    model = make_mlp()
    x_0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(GraphSampler(model, solver="rk4", steps=3)(x_0), eager(model, x_0, "rk4", 3))


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_eager_mlp_float64_matches_reference(solver):
    model = make_mlp().double()
    x_0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = GraphSampler(model, solver=solver, steps=5)(x_0)
    assert got.dtype == torch.float64
    assert_reference(got, reference(model, x_0, solver, 5), FP64)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_eager_unet_matches_reference(unet, solver):
    x_0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = GraphSampler(unet, solver=solver, steps=2)(x_0)
    # torchcfm's UNet casts its input to float32 itself: the oracle evaluates it in fp32 (on the
    # oracle's float64 states rounded to fp32) and does the step arithmetic in float64.
    want = rk_reference(evaluated_in(unet, torch.float32), x_0, solver, 2)
    assert_reference(got, want)
    assert (want - x_0).abs().max() > 0.1  # the field moves the samples: the comparison can fail


def test_custom_tableau_and_plain_callable():
    ralston = ButcherTableau(name="ralston", a=((0.0, 0.0), (2 / 3, 0.0)), b=(0.25, 0.75), c=(0.0, 2 / 3), order=2)
    model = make_mlp()

    def velocity(t, x):  # not an nn.Module: no weight tracking, otherwise the same
        return model(t, x)

    x_0 = torch.randn(4, 2)
    got = GraphSampler(velocity, solver=ralston, steps=4)(x_0)
    assert_reference(got, reference(model, x_0, ralston_step, 4))


def test_sample_matches_reference_on_randn_noise():
    model = make_mlp()
    sampler = GraphSampler(model, solver="midpoint", steps=6, sample_shape=(2,))
    g_sampler, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for n in (8, 8, 3):
        got = sampler.sample(n, generator=g_sampler)
        assert_reference(got, reference(model, torch.randn((n, 2), generator=g_ref), "midpoint", 6))
    # the generators advanced alike
    assert torch.equal(torch.randn(3, generator=g_sampler), torch.randn(3, generator=g_ref))
    double = GraphSampler(make_mlp().double(), steps=2, sample_shape=(2,))
    assert double.sample(2, dtype=torch.float64).dtype == torch.float64


def test_out_argument():
    model = make_mlp()
    sampler = GraphSampler(model, solver="heun", steps=3, sample_shape=(2,))
    x_0 = torch.randn(5, 2)
    want = reference(model, x_0, "heun", 3)
    buf = torch.empty(5, 2)
    assert sampler(x_0, out=buf) is buf
    assert_reference(buf, want)
    x_in_place = x_0.clone()
    assert sampler(x_in_place, out=x_in_place) is x_in_place
    assert_reference(x_in_place, want)
    with pytest.raises(ValueError, match="out is"):
        sampler(x_0, out=torch.empty(4, 2))
    with pytest.raises(ValueError, match="out is"):
        sampler(x_0, out=torch.empty(5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        sampler(x_0, out=[0.0])
    out = torch.empty(5, 2)
    assert sampler.sample(5, generator=torch.Generator().manual_seed(0), out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        sampler.sample(5, out=torch.empty(4, 2))


def test_eval_mode_for_the_call_and_flags_restored():
    model = make_mlp(dropout=0.5)
    model.train()
    model.net[0].eval()  # a submodule with its own flag, which must survive
    flags = [m.training for m in model.modules()]
    x_0 = torch.randn(64, 2)
    sampler = GraphSampler(model, solver="rk4", steps=3)
    got = sampler(x_0)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(got, sampler(x_0))  # dropout was off: deterministic
    assert_reference(got, reference(model, x_0, "rk4", 3))  # the oracle's copy is in eval mode


def test_no_autograd_graph():
    model = MLP()  # parameters require grad, train mode
    x_0 = torch.randn(4, 2, requires_grad=True)
    got = GraphSampler(model, steps=2)(x_0)
    assert not got.requires_grad and got.grad_fn is None


def test_shapes_change_freely_on_cpu():
    model = make_mlp(dim=3)
    sampler = GraphSampler(model, solver="euler", steps=3)
    for shape in [(4, 3), (7, 3), (1, 3), (4, 3)]:
        x_0 = torch.randn(shape)
        assert_reference(sampler(x_0), reference(model, x_0, "euler", 3))
    assert sampler.captures == 0 and sampler.num_graphs == 0
    with pytest.raises(RuntimeError):  # the model itself rejects a wrong sample shape
        sampler(torch.randn(4, 2))


def test_exported():
    import orwcfm_fast.sampling as sampling

    assert "GraphSampler" in sampling.__all__ and sampling.GraphSampler is graph_mod.GraphSampler
    assert "GraphCaptureWarning" in sampling.__all__


# ----------------------------------------------------------------------------- validation


def test_constructor_validation():
    model = make_mlp()
    with pytest.raises(ValueError, match="did you mean 'euler'"):
        GraphSampler(model, solver="eulr")
    with pytest.raises(ValueError, match="unknown solver"):
        GraphSampler(model, solver=3)
    for steps in (0, -1, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            GraphSampler(model, steps=steps)
    with pytest.raises(ValueError, match="unknown ops backend"):
        GraphSampler(model, backend="cuda")
    with pytest.raises(TypeError, match="use_graphs"):
        GraphSampler(model, use_graphs="auto")
    for max_graphs in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="max_graphs"):
            GraphSampler(model, max_graphs=max_graphs)
    with pytest.raises(TypeError, match="model must be callable"):
        GraphSampler(object())
    with pytest.raises(TypeError, match="sample_shape"):
        GraphSampler(model, sample_shape=(2.5,))
    with pytest.raises(ValueError, match="sample_shape"):
        GraphSampler(model, sample_shape=(0, 3))
    assert GraphSampler(model, solver=SOLVERS["rk4"], steps=4).tableau is SOLVERS["rk4"]
    assert "rk4" in repr(GraphSampler(model, solver="rk4", steps=4))


def test_call_validation():
    sampler = GraphSampler(make_mlp(), steps=2)
    with pytest.raises(TypeError, match="x_0 must be a torch.Tensor"):
        sampler([[0.0, 0.0]])
    with pytest.raises(ValueError, match="batch dimension"):
        sampler(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        sampler(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="velocity must have the same shape"):
        GraphSampler(BadShape(), steps=2)(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        GraphSampler(make_mlp(), steps=2, use_graphs=True)(torch.zeros(3, 2))


def test_sample_validation():
    with pytest.raises(ValueError, match="sample_shape"):
        GraphSampler(make_mlp(), steps=2).sample(4)
    sampler = GraphSampler(make_mlp(), steps=2, sample_shape=(2,))
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            sampler.sample(n)


# ----------------------------------------------------------------------------- weight tracking


def test_model_watch_in_place_updates_keep_it():
    model = make_mlp()
    watch = graph_mod._ModelWatch(model)
    model.load_state_dict(make_mlp(seed=1).state_dict())  # copy_ into the same tensors
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.eval()
    model(torch.zeros(2), torch.zeros(2, 2))
    assert watch.unchanged()


@pytest.mark.parametrize(
    "change",
    ["new_parameter", "data_assignment", "assign_load", "new_submodule", "appended_module", "new_buffer",
     "removed_bias", "added_bias"],
)
def test_model_watch_sees_replacements(change):
    model = make_mlp()
    model.register_buffer("scale", torch.ones(1))
    watch = graph_mod._ModelWatch(model)
    lin = model.net[0]
    if change == "new_parameter":
        lin.weight = nn.Parameter(lin.weight.detach().clone())
    elif change == "data_assignment":
        lin.weight.data = lin.weight.data.clone()
    elif change == "assign_load":
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    elif change == "new_submodule":
        model.net[2] = nn.Identity()
    elif change == "appended_module":
        model.net.append(nn.Identity())
    elif change == "new_buffer":
        model.scale = torch.ones(1)
    elif change == "removed_bias":
        lin.bias = None
    elif change == "added_bias":
        model.net[3].bias = None
        watch = graph_mod._ModelWatch(model)
        model.net[3].bias = nn.Parameter(torch.zeros(model.net[3].out_features))
    assert not watch.unchanged()


# ----------------------------------------------------------------------------- simulated capture (CPU)


class FakeGraph:
    """Stands in for a CUDA graph: replay recomputes integrate on the static input."""

    def __init__(self, sampler, static_in, static_out, static_cond=()):
        self.sampler, self.static_in, self.static_out = sampler, static_in, static_out
        self.static_cond = static_cond
        self.replays = 0

    def replay(self):
        self.replays += 1
        with graph_mod._eval_mode(self.sampler.model):
            self.static_out.copy_(self.sampler._integrate(self.static_in, self.static_cond))


@pytest.fixture
def simulate(monkeypatch):
    """Make a CPU sampler take its graph path, with FakeGraph for the CUDA graph."""

    def install(sampler, fail_with: BaseException | None = None):
        sampler.record_calls = 0

        def fake_record(static_in, static_cond=()):
            sampler.record_calls += 1
            with graph_mod._eval_mode(sampler.model):
                static_out = sampler._integrate(static_in, static_cond)  # warm-up errors propagate, as for real
            if fail_with is not None:
                raise graph_mod._CaptureFailed(fail_with)
            return FakeGraph(sampler, static_in, static_out, static_cond), static_out

        monkeypatch.setattr(sampler, "_record", fake_record)
        monkeypatch.setattr(sampler, "_device_supports_graphs", lambda device: True)
        return sampler

    return install


def test_sim_capture_once_then_replay(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, solver="rk4", steps=4))
    x_a, x_b = torch.randn(6, 2), torch.randn(6, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_a = sampler(x_a)
        y_b = sampler(x_b)
    assert sampler.captures == 1 and sampler.num_graphs == 1 and sampler.record_calls == 1
    assert_reference(y_a, reference(model, x_a, "rk4", 4))
    assert_reference(y_b, reference(model, x_b, "rk4", 4))
    entry = next(iter(sampler._graphs.values()))
    assert entry.graph.replays == 2
    # results are fresh tensors: the next replay does not overwrite them
    assert y_a.data_ptr() != entry.static_out.data_ptr() and not torch.equal(y_a, y_b)


def test_sim_new_key_per_shape_and_dtype(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, steps=3))
    for shape in [(4, 2), (8, 2), (4, 2), (8, 2)]:
        x_0 = torch.randn(shape)
        assert_reference(sampler(x_0), reference(model, x_0, "euler", 3))
    assert sampler.captures == 2 and sampler.num_graphs == 2
    model.double()  # params replaced by .data swaps: detected, recaptured
    x_0 = torch.randn(4, 2, dtype=torch.float64)
    with pytest.warns(GraphCaptureWarning, match="replaced"):
        got = sampler(x_0)
    assert sampler.num_graphs == 1 and sampler.captures == 3
    assert got.dtype == torch.float64
    assert_reference(got, reference(model, x_0, "euler", 3), FP64)


def test_sim_full_sampler_drops_all_graphs_and_takes_a_fresh_pool(simulate):
    """One graph is never freed alone (it may share pool memory with the others): a new key past
    max_graphs drops them all, and the next capture gets a new pool."""
    model = make_mlp()
    sampler = simulate(GraphSampler(model, steps=2, max_graphs=2))
    pool = object()
    sampler._pools[torch.device("cpu")] = pool
    for b in (1, 2, 1):
        sampler(torch.randn(b, 2))
    assert sampler.captures == 2 and [k[0] for k in sampler._graphs] == [(2, 2), (1, 2)]
    x_0 = torch.randn(3, 2)
    assert_reference(sampler(x_0), reference(model, x_0, "euler", 2))
    assert sampler.captures == 3 and [k[0] for k in sampler._graphs] == [(3, 2)]
    assert torch.device("cpu") not in sampler._pools  # dropped with the graphs: the next _record makes a new one
    sampler(torch.randn(2, 2))
    assert sampler.captures == 4 and sampler.num_graphs == 2


def test_sim_in_place_update_keeps_graph(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, solver="heun", steps=3))
    x_0 = torch.randn(5, 2)
    y_old = sampler(x_0)
    model.load_state_dict(make_mlp(seed=7).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_new = sampler(x_0)
    assert sampler.captures == 1
    assert_reference(y_new, reference(model, x_0, "heun", 3))
    assert not torch.allclose(y_new, y_old, **FP32)  # the replay used the new weights


def test_sim_replaced_parameters_recapture_and_warn_once(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, steps=3))
    x_0 = torch.randn(5, 2)
    sampler(x_0)
    model.net[0].weight = nn.Parameter(torch.randn_like(model.net[0].weight))
    with pytest.warns(GraphCaptureWarning, match="replaced"):
        got = sampler(x_0)
    assert sampler.captures == 2
    assert_reference(got, reference(model, x_0, "euler", 3))
    model.load_state_dict(make_mlp(seed=3).state_dict(), assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per sampler
        got = sampler(x_0)
    assert sampler.captures == 3
    assert_reference(got, reference(model, x_0, "euler", 3))


def test_sim_capture_failure_falls_back_once(simulate):
    model = make_mlp()
    reason = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore details")
    sampler = simulate(GraphSampler(model, solver="midpoint", steps=3), fail_with=reason)
    x_0 = torch.randn(5, 2)
    with pytest.warns(GraphCaptureWarning, match="operation not permitted when stream is capturing") as rec:
        got = sampler(x_0)
    assert len(rec) == 1 and "more details" not in str(rec[0].message)
    assert_reference(got, reference(model, x_0, "midpoint", 3))
    assert sampler.fallback_reason == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sampler(x_0), got)
        sampler(torch.randn(3, 2))
    assert sampler.record_calls == 1 and sampler.captures == 0
    sampler.clear()  # retries
    assert sampler.fallback_reason is None
    with pytest.warns(GraphCaptureWarning):
        sampler(x_0)
    assert sampler.record_calls == 2


def test_sim_warmup_errors_propagate(simulate):
    sampler = simulate(GraphSampler(BadShape(), steps=2))
    with pytest.raises(ValueError, match="velocity must have the same shape"):
        sampler(torch.zeros(3, 2))
    assert sampler.fallback_reason is None and sampler.num_graphs == 0


def test_sim_sample_draws_into_static_buffer(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, solver="rk4", steps=3, sample_shape=(2,)))
    g_sampler, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        got = sampler.sample(16, generator=g_sampler)
        assert_reference(got, reference(model, torch.randn((16, 2), generator=g_ref), "rk4", 3))
    assert sampler.captures == 1
    assert next(iter(sampler._graphs.values())).graph.replays == 3


def test_sim_clear_and_out(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, steps=2))
    x_0 = torch.randn(3, 2)
    out = torch.empty(3, 2)
    assert sampler(x_0, out=out) is out
    assert_reference(out, reference(model, x_0, "euler", 2))
    sampler.clear()
    assert sampler.num_graphs == 0
    sampler(x_0)
    assert sampler.captures == 2


def test_sim_inference_mode_then_normal_calls(simulate):
    model = make_mlp()
    sampler = simulate(GraphSampler(model, solver="heun", steps=3, sample_shape=(2,)))
    x_0 = torch.randn(6, 2)
    with torch.inference_mode():
        first = sampler(x_0)  # captures under inference mode
    assert not sampler._graphs[next(iter(sampler._graphs))].static_in.is_inference()
    second = sampler(x_0)  # refills the buffers outside it
    with torch.inference_mode():
        third = sampler.sample(6, generator=torch.Generator().manual_seed(0))
    want = reference(model, x_0, "heun", 3)
    assert_reference(first, want)
    assert_reference(second, want)
    assert sampler.captures == 1
    assert_reference(third, reference(model, torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), "heun", 3))


class CondMLP(MLP):
    """``model(t, x, c)``: a conditional velocity (c: ``[B, 3]``)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(dim=2)
        self.proj = nn.Linear(3, 2)

    def forward(self, t, x, c):
        return super().forward(t, x) + self.proj(c)


@pytest.mark.parametrize("grid", [None, [0.0, 0.2, 0.7, 1.0]])
def test_sim_conditioning_and_time_grid(simulate, grid):
    model = CondMLP().eval()
    sampler = simulate(GraphSampler(model, solver="heun", steps=3, time_grid=grid, sample_shape=(2,)))
    x_0 = torch.randn(6, 2)
    c_a, c_b = torch.randn(6, 3), torch.randn(6, 3)
    y_a, y_b = sampler(x_0, c_a), sampler(x_0, c_b)
    assert sampler.captures == 1  # same shapes: one graph, the conditioning refilled
    assert_reference(y_a, reference(model, x_0, "heun", 3, c_a, time_grid=grid))
    assert_reference(y_b, reference(model, x_0, "heun", 3, c_b, time_grid=grid))
    assert not torch.allclose(y_a, y_b, **FP32)
    gen, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = sampler.sample(6, c_b, generator=gen)
    assert_reference(got, reference(model, torch.randn(6, 2, generator=ref), "heun", 3, c_b, time_grid=grid))
    sampler(x_0, torch.randn(6, 5)[:, :3].contiguous().double().float())  # same key again
    assert sampler.captures == 1
    with pytest.raises(ValueError, match=r"cond\[0\] must be a \[B = 6"):
        sampler(x_0, torch.randn(5, 3))


def test_time_grid_must_match_steps():
    with pytest.raises(ValueError, match="3 steps need 4"):
        GraphSampler(make_mlp(), steps=3, time_grid=[0.0, 1.0])


def test_sim_use_graphs_false(simulate):
    sampler = simulate(GraphSampler(make_mlp(), steps=2, use_graphs=False))
    sampler(torch.randn(3, 2))
    assert sampler.record_calls == 0


# ----------------------------------------------------------------------------- _record on a fake torch.cuda (CPU)


class FakeCudaRuntime:
    """Stands in for the torch.cuda calls GraphSampler._record makes, on CPU tensors.

    Every call is first bound to the signature of the real torch.cuda function, so a wrong
    argument name or count fails here. The fake mimics the documented behaviour that matters for
    the control flow: ``torch.cuda.stream`` sets and restores the current stream;
    ``torch.cuda.graph`` makes its stream current and "captures" (ops simply run), and when the
    body raised, its ``__exit__`` ends the capture with a second error and does not restore the
    stream (as torch.cuda.graph.__exit__ does when capture_end raises). Replay does nothing, so
    only the first call's result (computed during the "capture") is meaningful.
    """

    def __init__(self, monkeypatch):
        self.capturing = False
        self.log: list[tuple] = []
        rt = self
        Stream = fake_stream_class(on_wait=lambda stream, other: rt.log.append(("wait", stream, other)))

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.prev, rt.current = rt.current, self.stream

            def __exit__(self, *exc):
                rt.current = self.prev

        class CUDAGraph:
            def __init__(self, keep_graph=False):
                self.replays = 0

            def replay(self):
                self.replays += 1

            def capture_end(self):
                rt.capturing = False

        class GraphContext:
            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
                self.graph, self.stream, self.mode = cuda_graph, stream, capture_error_mode

            def __enter__(self):
                self.prev, rt.current = rt.current, self.stream
                rt.capturing = True
                rt.log.append(("capture", self.stream, self.mode))

            def __exit__(self, exc_type, exc, tb):
                rt.capturing = False
                if exc_type is not None:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                rt.current = self.prev

        self.default = self.current = Stream()
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        patch_checked(monkeypatch, "stream", StreamContext)
        patch_checked(monkeypatch, "graph", GraphContext)
        patch_checked(monkeypatch, "device", lambda device: __import__("contextlib").nullcontext())
        patch_checked(monkeypatch, "current_stream", lambda device=None: rt.current)
        patch_checked(monkeypatch, "graph_pool_handle", lambda: object())
        patch_checked(monkeypatch, "synchronize", lambda device=None: None)
        patch_checked(monkeypatch, "is_current_stream_capturing", lambda: rt.capturing)
        self.rng_state = torch.tensor([7], dtype=torch.uint8)

        def get_rng_state(device="cuda"):
            rt.log.append(("get_rng_state",))
            return rt.rng_state.clone()

        def set_rng_state(new_state, device="cuda"):
            rt.log.append(("set_rng_state", new_state.clone()))

        patch_checked(monkeypatch, "get_rng_state", get_rng_state)
        patch_checked(monkeypatch, "set_rng_state", set_rng_state)


class RecordingMLP(MLP):
    """Logs the stream and capture state of each call; can refuse to be captured, like .item()."""

    def __init__(self, rt, refuse_capture=False):
        torch.manual_seed(0)
        super().__init__()
        self.rt, self.refuse_capture, self.calls = rt, refuse_capture, []

    def forward(self, t, x):
        self.calls.append((self.rt.current, self.rt.capturing, self.training, torch.is_grad_enabled()))
        if self.refuse_capture and self.rt.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")
        return super().forward(t, x)


def plain_mlp(model: RecordingMLP) -> MLP:
    """An MLP with ``model``'s weights, for the oracle (a RecordingMLP holds the fake runtime: no deepcopy)."""
    plain = MLP()
    plain.load_state_dict(model.state_dict())
    return plain


def fake_cuda_sampler(monkeypatch, model, **kw):
    sampler = GraphSampler(model, **kw)
    monkeypatch.setattr(sampler, "_device_supports_graphs", lambda device: True)
    return sampler


def test_record_flow_on_fake_cuda(monkeypatch):
    rt = FakeCudaRuntime(monkeypatch)
    model = RecordingMLP(rt)
    model.train()
    sampler = fake_cuda_sampler(monkeypatch, model, solver="heun", steps=1)  # 2 calls per run: 2 warm-up runs
    x_0 = torch.randn(5, 2)
    got = sampler(x_0)
    assert rt.current is rt.default and not rt.capturing
    assert sampler.captures == 1 and sampler.fallback_reason is None
    side = sampler._streams[x_0.device]
    warm, capture = model.calls[:4], model.calls[4:]
    assert [c[0] for c in warm] == [side] * 4 and not any(c[1] for c in warm)  # warm-up: side stream
    assert [c[:2] for c in capture] == [(side, True)] * 2  # capture: the same side stream
    assert not any(c[2] or c[3] for c in model.calls)  # eval mode, no grad
    assert model.training  # restored
    assert ("capture", side, "thread_local") in rt.log
    assert ("wait", side, rt.default) in rt.log and ("wait", rt.default, side) in rt.log
    assert_reference(got, reference(plain_mlp(model), x_0, "heun", 1))
    entry = next(iter(sampler._graphs.values()))
    assert entry.graph.replays == 1 and entry.static_out.data_ptr() != got.data_ptr()
    assert sampler._pools[x_0.device] is not None


def test_record_failure_on_fake_cuda_restores_stream_and_falls_back(monkeypatch):
    rt = FakeCudaRuntime(monkeypatch)
    model = RecordingMLP(rt, refuse_capture=True).eval()
    sampler = fake_cuda_sampler(monkeypatch, model, solver="euler", steps=4)
    x_0 = torch.randn(5, 2)
    with pytest.warns(GraphCaptureWarning, match="operation not permitted when stream is capturing") as rec:
        got = sampler(x_0)
    assert len(rec) == 1
    assert rt.current is rt.default and not rt.capturing  # the caller's stream is current again
    assert sampler.captures == 0 and sampler.num_graphs == 0 and not sampler._pools
    assert "previous error" not in sampler.fallback_reason  # the first error is reported, not the follow-up
    assert "Recovering" not in str(rec[0].message)  # the generator recovery succeeded
    # The default generator was recovered: one more (tiny) capture on the same side stream, with the
    # generator's state read before it and written back after it.
    side = sampler._streams[x_0.device]
    captures = [i for i, e in enumerate(rt.log) if e[0] == "capture"]
    assert [rt.log[i] for i in captures] == [("capture", side, "thread_local")] * 2
    get = rt.log.index(("get_rng_state",))
    put = next(i for i, e in enumerate(rt.log) if e[0] == "set_rng_state")
    assert get < captures[1] < put and torch.equal(rt.log[put][1], rt.rng_state)
    assert_reference(got, reference(plain_mlp(model), x_0, "euler", 4))
    calls = len(model.calls)
    sampler(x_0)
    assert len(model.calls) == calls + 4  # eager from now on: no warm-up, no capture attempt


# ----------------------------------------------------------------------------- CUDA


def cuda_backends() -> list[str]:
    """Backends whose CUDA ops can be captured: not Triton in its interpreter (it syncs with the host)."""
    found = ["torch"]
    status = available_backends()
    if "cuda" in status["cpp"].devices:
        found.append("cpp")
    if "cuda" in status["triton"].devices:
        from orwcfm_fast.ops import triton as triton_backend

        if "compiled" in triton_backend.is_available("cuda")[1]:
            found.append("triton")
    return found


def cuda_mlp(seed: int = 0, **kw) -> MLP:
    return make_mlp(seed, **kw).cuda()


def cuda_noise(*shape, seed: int = 0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda", dtype=dtype)


@cuda_test
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_cuda_graph_matches_reference(solver):
    model = cuda_mlp()
    sampler = GraphSampler(model, solver=solver, steps=10, backend="torch")
    x_0 = cuda_noise(256, 2)
    got = sampler(x_0)
    assert sampler.captures == 1 and sampler.fallback_reason is None
    assert_reference(got, reference(model, x_0, solver, 10))  # fp32 matmuls: TF32 is off for them by default
    got2 = sampler(x_0)
    assert torch.equal(got, got2)  # replays are deterministic
    assert sampler.captures == 1 and sampler.num_graphs == 1


@cuda_test
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_graph_each_backend(backend):
    model = cuda_mlp(dim=3)
    sampler = GraphSampler(model, solver="rk4", steps=8, backend=backend)
    x_0 = cuda_noise(128, 3)
    got = sampler(x_0)
    assert sampler.captures == 1 and sampler.fallback_reason is None
    assert_reference(got, reference(model, x_0, "rk4", 8))


@cuda_test
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cuda_unet_graph_matches_reference(solver):
    model = make_unet().cuda()
    sampler = GraphSampler(model, solver=solver, steps=4, backend="torch")
    x_0 = cuda_noise(8, 1, 8, 8)
    got = sampler(x_0)
    assert sampler.captures == 1 and sampler.fallback_reason is None
    # The oracle calls the same fp32 CUDA UNet (it cannot run in float64) with float64 step arithmetic;
    # cuDNN convolutions may use TF32 and other algorithms in the graph than in the oracle's eager
    # calls: 1e-4, the tolerance graph-vs-eager had; Heun's second stage at the wrong time moves
    # x_1 of this UNet by 4e-3 (measured on the CPU).
    want = rk_reference(evaluated_in(model, torch.float32), x_0, solver, 4)
    assert_reference(got, want, dict(rtol=1e-4, atol=1e-4))
    torch.testing.assert_close(sampler(x_0), got, rtol=1e-6, atol=1e-6)  # replays repeat themselves


@cuda_test
def test_cuda_replays_use_new_inputs_and_return_fresh_tensors():
    model = cuda_mlp()
    sampler = GraphSampler(model, solver="midpoint", steps=5, backend="torch")
    x_a, x_b = cuda_noise(64, 2, seed=1), cuda_noise(64, 2, seed=2)
    y_a = sampler(x_a)
    y_a_copy = y_a.clone()
    y_b = sampler(x_b)
    assert torch.equal(y_a, y_a_copy)  # not overwritten by the second replay
    assert not torch.allclose(y_a, y_b)
    assert_reference(y_a, reference(model, x_a, "midpoint", 5))
    assert_reference(y_b, reference(model, x_b, "midpoint", 5))
    assert sampler.captures == 1


@cuda_test
def test_cuda_in_place_weight_update_without_recapture():
    model = cuda_mlp(seed=0)
    sampler = GraphSampler(model, solver="heun", steps=6, backend="torch")
    x_0 = cuda_noise(128, 2)
    y_old = sampler(x_0)
    model.load_state_dict(cuda_mlp(seed=1).state_dict())  # what ORWCFMTrainer.update_last_policy does
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphCaptureWarning)
        y_new = sampler(x_0)
    assert sampler.captures == 1
    assert_reference(y_new, reference(model, x_0, "heun", 6))
    assert not torch.allclose(y_new, y_old)
    with torch.no_grad():  # an optimizer-style in-place step
        for p in model.parameters():
            p.mul_(0.9)
    assert_reference(sampler(x_0), reference(model, x_0, "heun", 6))
    assert sampler.captures == 1


@cuda_test
@pytest.mark.parametrize("how", ["new_parameter", "assign_load"])
def test_cuda_replaced_parameters_recapture(how):
    model = cuda_mlp()
    sampler = GraphSampler(model, solver="euler", steps=6, backend="torch")
    x_0 = cuda_noise(64, 2)
    sampler(x_0)
    if how == "new_parameter":
        model.net[0].weight = nn.Parameter(torch.randn_like(model.net[0].weight))
    else:
        model.load_state_dict(cuda_mlp(seed=5).state_dict(), assign=True)
    with pytest.warns(GraphCaptureWarning, match="replaced"):
        got = sampler(x_0)
    assert sampler.captures == 2
    assert_reference(got, reference(model, x_0, "euler", 6))


@cuda_test
def test_cuda_host_sync_falls_back_with_one_warning():
    model = SyncMLP().cuda().eval()
    sampler = GraphSampler(model, solver="rk4", steps=3, backend="torch")
    x_0 = cuda_noise(32, 2)
    stream_before = torch.cuda.current_stream()
    with pytest.warns(GraphCaptureWarning, match="capture") as rec:
        got = sampler(x_0)
    assert len([w for w in rec if issubclass(w.category, GraphCaptureWarning)]) == 1
    assert torch.cuda.current_stream() == stream_before  # the failed capture left the caller's stream current
    assert sampler.captures == 0 and sampler.fallback_reason
    assert_reference(got, reference(model, x_0, "rk4", 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphCaptureWarning)
        torch.testing.assert_close(sampler(x_0), got)
    # The default generator left capture mode (before torch 2.14 a failed capture kept it there and
    # every eager random op raised "Offset increment outside graph capture"); its state round-trips.
    state = torch.cuda.get_rng_state()
    drawn = torch.randn(4, device="cuda")
    torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5, training=True)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(4, device="cuda"), drawn)
    # CUDA still works, and a healthy model still captures after the failure
    healthy = GraphSampler(cuda_mlp(), steps=3, backend="torch")
    healthy(x_0)
    assert healthy.captures == 1 and healthy.fallback_reason is None


@cuda_test
def test_cuda_new_shape_new_graph_and_lru():
    model = cuda_mlp()
    sampler = GraphSampler(model, steps=4, backend="torch", max_graphs=2)
    for b in (32, 16, 32):
        x_0 = cuda_noise(b, 2, seed=b)
        assert_reference(sampler(x_0), reference(model, x_0, "euler", 4))
    assert sampler.captures == 2 and sampler.num_graphs == 2
    sampler(cuda_noise(8, 2))  # a third key: both graphs dropped together, one new one
    assert sampler.captures == 3 and sampler.num_graphs == 1
    for b in (32, 16):  # recaptured in the fresh pool; eager matmuls after the drop still right
        x_0 = cuda_noise(b, 2, seed=b)
        assert_reference(sampler(x_0), reference(model, x_0, "euler", 4))
    assert sampler.captures == 5 and sampler.num_graphs == 2
    model.double()  # new parameter storage: detected, all graphs dropped
    x_0 = cuda_noise(32, 2, dtype=torch.float64)
    with pytest.warns(GraphCaptureWarning, match="replaced"):
        got = sampler(x_0)
    assert sampler.captures == 6 and sampler.num_graphs == 1
    assert got.dtype == torch.float64
    assert_reference(got, reference(model, x_0, "euler", 4), FP64)
    sampler.clear()
    assert sampler.num_graphs == 0


@cuda_test
def test_cuda_sample_matches_reference_on_the_same_noise():
    model = cuda_mlp()
    sampler = GraphSampler(model, solver="rk4", steps=5, backend="torch", sample_shape=(2,))
    g_sampler = torch.Generator(device="cuda").manual_seed(3)
    g_ref = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        got = sampler.sample(100, generator=g_sampler)
        assert_reference(got, reference(model, torch.randn((100, 2), generator=g_ref, device="cuda"), "rk4", 5))
    assert sampler.captures == 1


@cuda_test
def test_cuda_side_stream_and_out():
    model = cuda_mlp()
    sampler = GraphSampler(model, solver="heun", steps=5, backend="torch")
    x_0 = cuda_noise(64, 2)
    want = reference(model, x_0, "heun", 5)
    sampler(x_0)  # capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.empty_like(x_0)
        got = sampler(x_0, out=out)
    torch.cuda.current_stream().wait_stream(side)
    assert got is out
    assert_reference(out, want)


@cuda_test
def test_cuda_use_graphs_false_is_integrate():
    """The eager path's contract on CUDA: integrate's result bit for bit, which is the oracle's."""
    model = cuda_mlp()
    x_0 = cuda_noise(64, 2)
    sampler = GraphSampler(model, solver="midpoint", steps=5, backend="torch", use_graphs=False)
    got = sampler(x_0)
    assert torch.equal(got, eager(model, x_0, "midpoint", 5, "torch"))
    assert_reference(got, reference(model, x_0, "midpoint", 5))
    assert sampler.captures == 0


@cuda_test
def test_cuda_eval_mode_during_capture():
    model = cuda_mlp(dropout=0.5)
    model.train()
    sampler = GraphSampler(model, solver="euler", steps=5, backend="torch")
    x_0 = cuda_noise(256, 2)
    got = sampler(x_0)
    assert model.training and sampler.captures == 1
    assert torch.equal(got, sampler(x_0))  # no dropout in the graph
    assert_reference(got, reference(model, x_0, "euler", 5))  # the oracle's copy is in eval mode: no dropout


class CastBackMLP(MLP):
    """Returns x's dtype under autocast (integrate's step op needs k and x of one dtype)."""

    def forward(self, t, x):
        return super().forward(t, x).to(x.dtype)


# bf16 autocast against the float64 oracle: inputs, weights and outputs of every Linear are rounded
# to bf16 (unit roundoff 2^-9 = 2e-3), so each velocity is ~1% off; over the 5 Euler steps the
# measured distance is <= 9e-3 (CPU, weights doubled). 3e-2 leaves 3x headroom and is 40x below the
# ~1.2 of a replay that kept the old weights.
BF16 = dict(rtol=3e-2, atol=3e-2)


def _check_autocast_tracks_in_place_updates(device: str) -> GraphSampler:
    """bf16 samples before and after an in-place weight update, each against the float64 oracle.

    Each sampler call runs in its own autocast block: autocast caches the bf16 copy of every fp32
    leaf weight for as long as the (outermost) block is open, and an in-place update (``p.mul_``)
    does not invalidate that cache, so an eager call after the update *inside the same block*
    would still use the old weights (about 1.2 off here). The graph itself is captured with the
    cache off, so it re-casts the weights on every replay.
    """
    torch.manual_seed(0)
    model = CastBackMLP().to(device).eval()
    sampler = GraphSampler(model, solver="euler", steps=5, backend="torch")
    x_0 = torch.randn(64, 2, generator=torch.Generator(device=device).manual_seed(0), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y_1 = sampler(x_0)
    want_1 = reference(model, x_0, "euler", 5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    with torch.autocast(device, dtype=torch.bfloat16):  # a fresh block: no cached casts of the old weights
        y_2 = sampler(x_0)
    want_2 = reference(model, x_0, "euler", 5)
    assert y_1.dtype == y_2.dtype == torch.float32  # the state keeps x_0's precision
    assert_reference(y_1, want_1, BF16)
    assert_reference(y_2, want_2, BF16)
    assert not torch.allclose(y_1, y_2, **BF16)
    return sampler


def test_autocast_tracks_in_place_updates_cpu():
    sampler = _check_autocast_tracks_in_place_updates("cpu")
    assert sampler.captures == 0  # eager on the CPU


def test_autocast_cache_is_stale_within_one_block():
    """Why the expectations above need fresh blocks: inside one block, autocast reuses its stale bf16 casts."""
    torch.manual_seed(0)
    model = CastBackMLP().eval()
    x_0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = eager(model, x_0, "euler", 5, "torch")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
        stale = eager(model, x_0, "euler", 5, "torch")
        torch.clear_autocast_cache()
        fresh = eager(model, x_0, "euler", 5, "torch")
    assert torch.equal(stale, before)
    assert not torch.allclose(fresh, before, rtol=2e-2, atol=2e-2)


@cuda_test
def test_cuda_autocast_graph_tracks_in_place_updates():
    sampler = _check_autocast_tracks_in_place_updates("cuda")
    assert sampler.captures == 1  # the in-place update kept the graph
    model = sampler.model
    x_0 = cuda_noise(64, 2)
    y_fp32 = sampler(x_0)  # outside autocast: another key, another graph
    assert sampler.captures == 2
    assert_reference(y_fp32, reference(model, x_0, "euler", 5))


@cuda_test
def test_cuda_default_backend():
    from orwcfm_fast.ops import resolve_backend
    from orwcfm_fast.ops import triton as triton_backend

    model = cuda_mlp()
    sampler = GraphSampler(model, solver="heun", steps=4)
    x_0 = cuda_noise(64, 2)
    interpreted = resolve_backend(None, "cuda") == "triton" and "interpreted" in triton_backend.is_available("cuda")[1]
    if interpreted:  # the interpreter copies CUDA tensors to the host: not capturable
        with pytest.warns(GraphCaptureWarning, match="capture"):
            got = sampler(x_0)
        assert sampler.captures == 0
    else:
        got = sampler(x_0)
        assert sampler.captures == 1 and sampler.fallback_reason is None
    assert_reference(got, reference(model, x_0, "heun", 4))


@cuda_test
def test_cuda_seven_stage_tableau_default_backend():
    """backend=None picks Triton on CUDA, whose ode_step once refused rows of more than 4 stage values."""
    from op_cases import dopri5_fixed_tableau

    model = cuda_mlp()
    tableau = dopri5_fixed_tableau()
    sampler = GraphSampler(model, solver=tableau, steps=4)
    x_0 = cuda_noise(64, 2)
    got = sampler(x_0)
    # The oracle's own loop over the coefficients op_cases spells out (test data, not the library's tableaus).
    assert_reference(got, reference(model, x_0, explicit_rk_step(tableau.a, tableau.b, tableau.c), 4))


@cuda_test
def test_cuda_conditioning_refilled_per_call():
    model = CondMLP().cuda().eval()
    grid = [0.0, 0.1, 0.5, 0.9, 1.0]
    sampler = GraphSampler(model, solver="midpoint", steps=4, backend="torch", time_grid=grid)
    x_0 = cuda_noise(32, 2)
    for seed in (1, 2):
        c = cuda_noise(32, 3, seed=seed)
        assert_reference(sampler(x_0, c), reference(model, x_0, "midpoint", 4, c, time_grid=grid))
    assert sampler.captures == 1


@cuda_test
def test_cuda_inference_mode_capture_then_normal_calls():
    model = cuda_mlp()
    sampler = GraphSampler(model, solver="rk4", steps=3, backend="torch")
    x_0 = cuda_noise(64, 2)
    with torch.inference_mode():
        first = sampler(x_0)
    second = sampler(x_0)
    want = reference(model, x_0, "rk4", 3)
    assert_reference(first, want)
    assert_reference(second, want)
    assert sampler.captures == 1
