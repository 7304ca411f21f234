"""The public ops layer: input checks, backend choice, available_backends, and its users.

Per-backend numerics are tested in test_ops_reference.py (torch), test_ops_cpp.py and
test_ops_triton.py; here every usable CPU backend is run once through the public calls.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from op_cases import assert_elementwise_close, assert_rel_close, expected_loss, expected_ode_step, expected_path

from orwcfm_fast import ops
from orwcfm_fast.ops import backends

CPU_BACKENDS = [name for name, s in ops.available_backends().items() if "cpu" in s.devices]


def test_available_backends_reports_every_backend():
    status = ops.available_backends()
    assert set(status) == {"torch", "cpp", "triton"}
    assert status["torch"].available and "cpu" in status["torch"].devices
    for s in status.values():
        assert isinstance(s.reason, str)
        if not s.available:
            assert s.reason, f"{s.name} is unavailable without a reason"


def test_auto_choice_on_cpu_prefers_compiled_and_never_the_interpreter():
    chosen = ops.resolve_backend(None, "cpu")
    expected = "cpp" if "cpp" in CPU_BACKENDS else "torch"
    assert chosen == expected


def test_explicit_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'.*torch, cpp, triton"):
        ops.resolve_backend("cuda", "cpu")
    monkeypatch.setattr(backends, "_status", lambda name: backends.BackendStatus(name, (), "not built (test)"))
    with pytest.raises(ops.BackendUnavailableError, match="'cpp' is unavailable.*not built \\(test\\)"):
        ops.orw_cfm_w2_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2), 1.0, backend="cpp")
    # None falls back quietly to torch
    loss, _, _ = ops.orw_cfm_w2_loss(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2), 1.0)
    assert loss.item() == 1.0


def test_import_does_no_work():
    code = (
        "import sys, orwcfm_fast.ops, orwcfm_fast.sampling; "
        "bad = [m for m in ('triton', 'orwcfm_fast._C', 'orwcfm_fast.ops.triton') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_cpu_backend_through_the_public_calls(backend):
    g = torch.Generator().manual_seed(3)
    shape = (5, 3, 7, 7)
    v = torch.randn(shape, generator=g, requires_grad=True)
    u, v_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.rand(5, generator=g) * 2
    loss, fm, w2 = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend=backend)
    e_loss, e_fm, e_w2 = expected_loss(v, u, v_ref, w, 0.7)
    assert_rel_close(loss, e_loss, 1e-5, "loss")
    assert_rel_close(fm, e_fm, 1e-5, "fm")
    assert_rel_close(w2, e_w2, 1e-5, "w2")
    loss.backward()
    ref_v = v.detach().clone().requires_grad_(True)
    ops.orw_cfm_w2_loss_reference(ref_v, u, v_ref, w, 0.7)[0].backward()
    torch.testing.assert_close(v.grad, ref_v.grad, rtol=1e-5, atol=1e-9)

    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t, noise = torch.rand(5, generator=g), torch.randn(shape, generator=g)
    x_t, u_t = ops.conditional_path(x0, x1, t, 0.1, noise, backend=backend)
    e_xt, e_ut, scale = expected_path(x0, x1, t, 0.1, noise)
    assert_elementwise_close(x_t, e_xt, scale, "x_t")
    assert_elementwise_close(u_t, e_ut, x1.double().abs() + x0.double().abs(), "u_t")

    ks = [torch.randn(shape, generator=g) for _ in range(4)]
    coeffs = [1 / 6, 1 / 3, 1 / 3, 1 / 6]
    out = ops.ode_step(x0, ks, coeffs, 0.05, backend=backend)
    e_out, scale = expected_ode_step(x0, ks, coeffs, 0.05)
    assert_elementwise_close(out, e_out, scale, "ode_step")


def test_input_errors_name_the_argument():
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match="u has shape"):
        ops.orw_cfm_w2_loss(v, torch.randn(4, 2), v, torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="v_ref is torch.float64 but v is torch.float32"):
        ops.orw_cfm_w2_loss(v, v, v.double(), torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="u must be float16, bfloat16, float32 or float64"):
        ops.orw_cfm_w2_loss(v, v.int(), v, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="u is on meta but v is on cpu"):
        ops.orw_cfm_w2_loss(v, torch.empty(4, 3, device="meta"), v, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[4\]"):
        ops.orw_cfm_w2_loss(v, v, v, torch.ones(4, 1), 1.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        ops.orw_cfm_w2_loss(v, v, v, torch.ones(4), float("nan"))
    with pytest.raises(ValueError, match="empty batch"):
        ops.orw_cfm_w2_loss(*(torch.ones(0, 3),) * 3, torch.ones(0), 1.0)
    with pytest.raises(ValueError, match="needs `noise`"):
        ops.conditional_path(v, v, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ops.conditional_path(v, v, torch.rand(4), -0.5)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        ops.conditional_path(v, v, torch.rand(3))
    with pytest.raises(ValueError, match=r"ks\[1\] has shape"):
        ops.ode_step(v, [v, v[:2]], [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="2 coefficients for 1 stage values"):
        ops.ode_step(v, [v], [0.5, 0.5], 0.1)


def test_ode_step_without_terms_returns_x():
    x, k = torch.randn(3, 2), torch.randn(3, 2)
    assert ops.ode_step(x, [], [], 0.1) is x
    assert ops.ode_step(x, [k], [0.0], 0.1) is x
    assert ops.ode_step(x, [k], [1.0], 0.0) is x


def test_non_contiguous_inputs_match_contiguous():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 6, 4, 5, generator=g)
    v = base.transpose(1, 3)  # [3, 5, 4, 6], non-contiguous
    u, v_ref = torch.randn(3, 5, 4, 6, generator=g), torch.randn(3, 6, 4, 5, generator=g).transpose(1, 3)
    w = torch.rand(6, generator=g)[::2]
    for backend in CPU_BACKENDS:
        got = ops.orw_cfm_w2_loss(v, u, v_ref, w, 1.5, backend=backend)
        want = ops.orw_cfm_w2_loss(v.contiguous(), u, v_ref.contiguous(), w.contiguous(), 1.5, backend="torch")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_trainer_ops_backend_key():
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.config import ConfigError

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, t, x):
            return self.lin(x)

    base = {"sample_shape": (2,), "reward": lambda x: -x.norm(dim=1), "seed": 0, "batch_size": 8, "ode_steps": 4,
            "warmup_steps": 0}
    with pytest.raises(ConfigError, match="'ops_backend'.*did you mean 'cpp'"):
        ORWCFMTrainer(Velocity(), {**base, "ops_backend": "cp"}, "cpu")
    losses = {}
    for backend in CPU_BACKENDS:
        torch.manual_seed(0)
        trainer = ORWCFMTrainer(Velocity(), {**base, "ops_backend": backend}, "cpu")
        x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
        losses[backend] = trainer.compute_loss(x1, torch.ones(8))[0].item()
    assert all(abs(v - losses["torch"]) <= 1e-6 * abs(losses["torch"]) for v in losses.values()), losses


@pytest.mark.parametrize("backend", [None, *CPU_BACKENDS])
def test_public_ops_trace_with_fullgraph(backend):
    """Input checks and backend choice trace without graph breaks (the compiled training step needs it)."""
    g = torch.Generator().manual_seed(4)
    shape = (3, 2, 5)
    x_0, x_1, v_ref, k = (torch.randn(shape, generator=g) for _ in range(4))
    t, w = torch.rand(3, generator=g), torch.rand(3, generator=g)

    def step(x_0, x_1, t, v_ref, w, k):
        x_t, u_t = ops.conditional_path(x_0, x_1, t, backend=backend)
        v = ops.ode_step(x_t, [k, u_t], [0.5, 0.25], 0.1, backend=backend)
        return ops.orw_cfm_w2_loss(v, u_t, v_ref, w, 0.3, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x_0, x_1, t, v_ref, w, k), step(x_0, x_1, t, v_ref, w, k)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_config_knows_the_same_backends():
    """config.OPS_BACKENDS is spelled out (config imports no torch); it must not drift from the ops'."""
    from orwcfm_fast.config import OPS_BACKENDS

    assert tuple(OPS_BACKENDS) == tuple(ops.BACKENDS)
