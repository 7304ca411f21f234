"""Tests for orwcfm_fast.sampling: fixed-step explicit Runge–Kutta solvers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orwcfm_fast.sampling import SOLVERS, ButcherTableau, integrate, nfe, rk_update, stage_point

SOLVER_NAMES = sorted(SOLVERS)
STEPS = [8, 16, 32, 64]

# --------------------------------------------------------------------------------------
# ODEs with closed-form solutions (float64). Each entry: (rhs(t, x), exact(x_0, t), x_0).
# --------------------------------------------------------------------------------------


def _linear_problem():
    # Rotation + decay: eigenvalues -0.3 ± 2i, so the solution spirals in.
    A = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=torch.float64)
    x_0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -2.0], [-1.5, 0.25]], dtype=torch.float64)

    def rhs(t, x):
        return x @ A.T

    def exact(x0, t):
        return x0 @ torch.linalg.matrix_exp(A * t).T

    return rhs, exact, x_0


def _cos_problem():
    # dx/dt = cos(t) x  ->  x(t) = x_0 exp(sin t)   (non-autonomous, uses the stage times)
    x_0 = torch.tensor([[1.0, -0.5, 2.0], [0.3, 1.0, -1.0]], dtype=torch.float64)

    def rhs(t, x):
        return torch.cos(t)[:, None] * x

    def exact(x0, t):
        return x0 * math.exp(math.sin(t))

    return rhs, exact, x_0


def _gauss_problem():
    # dx/dt = -2 t x  ->  x(t) = x_0 exp(-t^2)
    x_0 = torch.tensor([[1.0, 2.0], [-0.7, 0.1], [3.0, -1.0]], dtype=torch.float64)

    def rhs(t, x):
        return -2.0 * t[:, None] * x

    def exact(x0, t):
        return x0 * math.exp(-(t**2))

    return rhs, exact, x_0


def _image_problem():
    # Elementwise on [3, 2, 4, 4]: dx/dt = lam * (1 + t) * x  ->  x(t) = x_0 exp(lam (t + t^2/2)),
    # with a different rate lam per pixel in [-1.5, 0.5].
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 2.0 - 1.5
    x_0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)

    def rhs(t, x):
        return lam * (1.0 + t)[:, None, None, None] * x

    def exact(x0, t):
        return x0 * torch.exp(lam * (t + t * t / 2.0))

    return rhs, exact, x_0


PROBLEMS = {
    "linear": _linear_problem,
    "cos": _cos_problem,
    "gauss": _gauss_problem,
    "image": _image_problem,
}


def _errors(solver, problem, steps_list):
    rhs, exact, x_0 = PROBLEMS[problem]()
    ref = exact(x_0, 1.0)
    return [(integrate(rhs, x_0, solver=solver, steps=n) - ref).abs().max().item() for n in steps_list]


def _slope(steps_list, errs):
    dts = 1.0 / np.asarray(steps_list, dtype=np.float64)
    return float(np.polyfit(np.log(dts), np.log(np.asarray(errs)), 1)[0])


# --------------------------------------------------------------------------------------
# Order of convergence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_order_of_convergence(solver, problem):
    tableau = SOLVERS[solver]
    errs = _errors(solver, problem, STEPS)
    # The error must shrink with every refinement and stay well above float64 round-off
    # (smallest error in this grid is ~1e-9 for rk4), so the fit measures truncation error.
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert min(errs) > 1e-12, errs
    slope = _slope(STEPS, errs)
    # Tolerance: the global error is C h^p (1 + O(h)), so on h in [1/64, 1/8] the fitted slope
    # differs from p only by the pre-asymptotic O(h) term (measured: within 0.15 of p for all
    # solver/problem pairs; worst is midpoint on the cos problem, 1.86). ±0.25 absorbs that while staying far from the nearest wrong order
    # (orders here are 1, 2, 4: a scheme one order off would miss by >= 0.75).
    assert abs(slope - tableau.order) <= 0.25, f"{solver} on {problem}: slope {slope:.3f}, errors {errs}"


# --------------------------------------------------------------------------------------
# Tableau consistency
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_tableau_consistency(solver):
    t = SOLVERS[solver]
    s = t.stages
    assert t.name == solver
    assert len(t.b) == len(t.c) == len(t.a) == s
    assert all(len(row) == s for row in t.a)
    assert math.isclose(sum(t.b), 1.0, abs_tol=1e-15)
    for i in range(s):
        assert math.isclose(t.c[i], sum(t.a[i]), abs_tol=1e-15)
        assert all(t.a[i][j] == 0.0 for j in range(i, s)), "explicit scheme: a strictly lower-triangular"
    assert t.c[0] == 0.0
    assert all(isinstance(v, float) for v in (*t.b, *t.c, *(x for row in t.a for x in row)))


def test_solver_set_and_orders():
    assert {k: v.order for k, v in SOLVERS.items()} == {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    with pytest.raises(Exception):
        SOLVERS["euler"].order = 3  # frozen


def test_tableau_rejects_implicit_and_ragged():
    with pytest.raises(ValueError, match="explicit"):
        ButcherTableau("bad", a=((0.5,),), b=(1.0,), c=(0.5,), order=1)
    with pytest.raises(ValueError):
        ButcherTableau("bad", a=((0.0, 0.0),), b=(0.5, 0.5), c=(0.0, 1.0), order=2)


def test_nfe():
    assert nfe("euler", 10) == 10
    assert nfe("midpoint", 10) == 20
    assert nfe("heun", 7) == 14
    assert nfe("rk4", 25) == 100
    assert nfe(SOLVERS["rk4"], 1) == 4
    with pytest.raises(ValueError):
        nfe("rk4", 0)
    with pytest.raises(ValueError, match="rk4"):
        nfe("rk5", 3)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("steps", [1, 3])
def test_nfe_matches_model_calls(solver, steps):
    calls = []

    def model(t, x):
        calls.append(t)
        return -x

    integrate(model, torch.ones(2, 3), solver=solver, steps=steps)
    assert len(calls) == nfe(solver, steps)


# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------


def _nonautonomous(t, x):
    return torch.sin(3.0 * t)[:, None] * x + t[:, None] ** 2 - 0.5 * x**2


def test_euler_matches_hand_written_loop():
    x_0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    x, dt = x_0.clone(), 1.0 / 3.0
    for n in range(3):
        t = torch.full((2,), n * dt, dtype=torch.float64)
        x = x + dt * _nonautonomous(t, x)
    out = integrate(_nonautonomous, x_0, solver="euler", steps=3)
    torch.testing.assert_close(out, x, rtol=1e-14, atol=1e-14)


def _one_step_reference(solver, f, x, t, h):
    def T(s):
        return torch.full((x.shape[0],), s, dtype=x.dtype)

    if solver == "euler":
        return x + h * f(T(t), x)
    if solver == "midpoint":
        k1 = f(T(t), x)
        return x + h * f(T(t + h / 2), x + h / 2 * k1)
    if solver == "heun":
        k1 = f(T(t), x)
        k2 = f(T(t + h), x + h * k1)
        return x + h / 2 * (k1 + k2)
    if solver == "rk4":
        k1 = f(T(t), x)
        k2 = f(T(t + h / 2), x + h / 2 * k1)
        k3 = f(T(t + h / 2), x + h / 2 * k2)
        k4 = f(T(t + h), x + h * k3)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise AssertionError(solver)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_two_steps_match_textbook_formulas(solver):
    x_0 = torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=torch.float64)
    t_0, t_1 = 0.25, 0.85
    h = (t_1 - t_0) / 2
    ref = _one_step_reference(solver, _nonautonomous, x_0, t_0, h)
    ref = _one_step_reference(solver, _nonautonomous, ref, t_0 + h, h)
    out = integrate(_nonautonomous, x_0, solver=solver, steps=2, t_0=t_0, t_1=t_1)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_matches_torchdiffeq_fixed_grid(solver):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x_0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)

    def f(t, x):  # torchdiffeq passes a 0-d t
        return _nonautonomous(t.expand(x.shape[0]), x)

    ref = torchdiffeq.odeint(
        f, x_0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=solver, options={"step_size": 0.125}
    )[-1]
    out = integrate(_nonautonomous, x_0, solver=solver, steps=8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_stage_point_and_rk_update():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    k1 = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    k2 = torch.tensor([[0.5, 4.0]], dtype=torch.float64)
    x_before, k1_before = x.clone(), k1.clone()
    assert stage_point(x, 0.1, (), []) is x
    assert stage_point(x, 0.1, (0.0,), [k1]) is x
    torch.testing.assert_close(stage_point(x, 0.1, (0.5,), [k1, k2]), x + 0.05 * k1)
    torch.testing.assert_close(stage_point(x, -0.2, (0.0, 0.5), [k1, k2]), x - 0.1 * k2)
    torch.testing.assert_close(rk_update(x, 0.1, (0.5, 0.5), [k1, k2]), x + 0.05 * (k1 + k2))
    torch.testing.assert_close(rk_update(x, 0.1, (0.0, 1.0), [k1, k2]), x + 0.1 * k2)
    assert torch.equal(x, x_before) and torch.equal(k1, k1_before)  # inputs not modified
    with pytest.raises(ValueError):
        rk_update(x, 0.1, (1.0,), [k1, k2])


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_every_cpu_ops_backend_integrates_alike(solver):
    """The fused stage/update arithmetic of each usable backend follows the torch reference.

    float32 on the image problem: each combination rounds once (the backends) or once per term
    (torch); over 8 steps the two stay within a few float32 ulps of the state's scale.
    """
    from orwcfm_fast.ops import available_backends

    rhs, _, x_0 = _image_problem()
    x_0 = x_0.float()

    def f(t, x):
        return rhs(t.double(), x.double()).float()

    want = integrate(f, x_0, solver=solver, steps=8, backend="torch")
    for name, status in available_backends().items():
        if "cpu" in status.devices:
            got = integrate(f, x_0, solver=solver, steps=8, backend=name)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"backend {name}")


# --------------------------------------------------------------------------------------
# Grid, direction, trajectory
# --------------------------------------------------------------------------------------


def test_backward_integration_recovers_x0():
    rhs, _, x_0 = _linear_problem()
    x_1 = integrate(rhs, x_0, solver="rk4", steps=64)
    back = integrate(rhs, x_1, solver="rk4", steps=64, t_0=1.0, t_1=0.0)
    torch.testing.assert_close(back, x_0, rtol=1e-7, atol=1e-7)


def test_backward_integration_nonautonomous_matches_exact():
    rhs, exact, x_0 = _cos_problem()
    x_1 = exact(x_0, 1.0)
    back = integrate(rhs, x_1, solver="rk4", steps=32, t_0=1.0, t_1=0.0)
    torch.testing.assert_close(back, x_0, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_trajectory(solver):
    rhs, exact, x_0 = _image_problem()
    traj = integrate(rhs, x_0, solver=solver, steps=5, return_trajectory=True)
    x_1 = integrate(rhs, x_0, solver=solver, steps=5)
    assert traj.shape == (6, *x_0.shape)
    assert torch.equal(traj[0], x_0)
    assert torch.equal(traj[-1], x_1)
    # Intermediate states sit on the uniform grid t = n / 5.
    torch.testing.assert_close(traj[3], exact(x_0, 0.6), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_model_sees_grid_and_stage_times(solver):
    seen = []

    def model(t, x):
        seen.append(t.clone())
        return torch.zeros_like(x)

    integrate(model, torch.zeros(3, 2), solver=solver, steps=4, t_0=0.2, t_1=1.0)
    tab = SOLVERS[solver]
    expected = [0.2 + 0.2 * (n + c) for n in range(4) for c in tab.c]
    got = [float(t[0]) for t in seen]
    assert got == pytest.approx(expected, abs=1e-6)
    for t in seen:
        assert torch.equal(t, t[:1].expand(3))  # same time for every batch element


def test_model_receives_t_shape_dtype_device_and_is_not_copied():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.deepcopies = 0
            self.ts = []
            self.ids = set()

        def __deepcopy__(self, memo):
            self.deepcopies += 1
            raise AssertionError("integrate must not deep-copy the model")

        def forward(self, t, x):
            self.ts.append(t)
            self.ids.add(id(self))
            return self.lin(x)

    for dtype in (torch.float32, torch.float64):
        model = Model().to(dtype)
        for training in (True, False):
            model.train(training)
            model.ts.clear()
            x_0 = torch.randn(5, 2, dtype=dtype)
            with torch.no_grad():
                out = integrate(model, x_0, solver="heun", steps=3)
            assert out.shape == x_0.shape and out.dtype == dtype
            assert model.training is training
            assert all(m.training is training for m in model.modules())
            assert model.deepcopies == 0 and model.ids == {id(model)}
            assert len(model.ts) == 6
            for t in model.ts:
                assert t.shape == (5,) and t.dtype == dtype and t.device == x_0.device


def test_does_not_change_grad_mode():
    model = torch.nn.Linear(2, 2)

    def f(t, x):
        return model(x)

    x_0 = torch.randn(4, 2)
    with torch.no_grad():
        out = integrate(f, x_0, solver="rk4", steps=2)
        assert not torch.is_grad_enabled()
    assert not out.requires_grad
    assert torch.is_grad_enabled()
    out = integrate(f, x_0, solver="rk4", steps=2)  # grad mode left on: differentiable
    assert out.requires_grad
    out.sum().backward()
    assert model.weight.grad is not None


def test_no_host_sync_calls(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside integrate")

    rhs, _, x_0 = _linear_problem()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = integrate(rhs, x_0, solver="rk4", steps=3, return_trajectory=True)
    monkeypatch.undo()
    assert out.shape == (4, *x_0.shape)


def test_input_not_modified():
    rhs, _, x_0 = _image_problem()
    before = x_0.clone()
    for solver in SOLVER_NAMES:
        integrate(rhs, x_0, solver=solver, steps=2, return_trajectory=True)
    assert torch.equal(x_0, before)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_unknown_solver_suggests_close_match():
    with pytest.raises(ValueError) as exc:
        integrate(lambda t, x: x, torch.zeros(1, 2), solver="eular")
    msg = str(exc.value)
    assert "eular" in msg and "did you mean 'euler'" in msg
    for name in SOLVERS:
        assert name in msg
    with pytest.raises(ValueError, match="unknown solver 'dopri5'"):
        integrate(lambda t, x: x, torch.zeros(1, 2), solver="dopri5")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None, "10"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        integrate(lambda t, x: x, torch.zeros(1, 2), steps=steps)


def test_numpy_int_steps_ok():
    out = integrate(lambda t, x: -x, torch.ones(2, 2), steps=np.int64(4))
    assert out.shape == (2, 2)


def test_wrong_output_shape():
    with pytest.raises(ValueError, match=r"model returned shape \(3, 1\) for input shape \(3, 2\)"):
        integrate(lambda t, x: x[:, :1], torch.zeros(3, 2), solver="rk4", steps=4)
    with pytest.raises(ValueError, match="model returned shape"):
        integrate(lambda t, x: x.sum(), torch.zeros(3, 2), steps=1)


def test_x0_without_batch_dim():
    with pytest.raises(ValueError, match="batch dimension"):
        integrate(lambda t, x: x, torch.tensor(1.0))
    with pytest.raises(TypeError):
        integrate(lambda t, x: x, torch.zeros(2, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------
# nn.Module velocity models, float32
# --------------------------------------------------------------------------------------


class _MLP(torch.nn.Module):
    """Tiny time-conditioned MLP on flattened samples."""

    def __init__(self, sample_shape, hidden=32):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        d = math.prod(self.sample_shape)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d)
        )

    def forward(self, t, x):
        h = torch.cat([x.flatten(1), t[:, None]], dim=1)
        return self.net(h).view(x.shape)


@pytest.mark.parametrize("sample_shape", [(2,), (1, 8, 8)])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_nn_module_float32(solver, sample_shape):
    torch.manual_seed(0)
    model = _MLP(sample_shape).eval()
    x_0 = torch.randn(6, *sample_shape)
    with torch.no_grad():
        x_1 = integrate(model, x_0, solver=solver, steps=10)
        traj = integrate(model, x_0, solver=solver, steps=10, return_trajectory=True)
    assert x_1.shape == x_0.shape and x_1.dtype == torch.float32
    assert torch.isfinite(x_1).all() and not x_1.requires_grad
    assert traj.shape == (11, 6, *sample_shape)
    assert torch.equal(traj[-1], x_1)
    assert not model.training
    # A fine rk4 solve is the reference; every solver should land near it at 10 steps.
    with torch.no_grad():
        ref = integrate(model, x_0, solver="rk4", steps=100)
    torch.testing.assert_close(x_1, ref, rtol=0.05, atol=0.05)
