"""The public ops layer: input checks, backend choice, available_backends, and its users.

Per-backend numerics are tested in test_ops_reference.py (torch), test_ops_cpp.py and
test_ops_triton.py; here every usable CPU backend is run once through the public calls.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from op_cases import (assert_elementwise_close, assert_rel_close, expected_loss, expected_loss_grad,
                      expected_loss_input_grads, expected_model_loss, expected_ode_step, expected_path,
                      w2_weight_inputs)

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_w2_weights_through_the_public_call(backend):
    """``w2_weights=c``: ``loss = mean_i(w_i fm_i + alpha c_i w2_i)`` and its gradients in v, weights and c on every CPU
    backend vs float64; ``w2_weights=None`` is bitwise the call without it (today's kernels)."""
    g = torch.Generator().manual_seed(8)
    shape = (3, 2, 5, 3)  # B = 3, 4-D samples, D = 30
    v = torch.randn(shape, generator=g, requires_grad=True)
    u, v_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = (torch.rand(3, generator=g) * 2).requires_grad_(True)
    c = w2_weight_inputs(3, seed=8, kind="spread", dtype=torch.float64).requires_grad_(True)
    loss, fm, w2 = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend=backend, w2_weights=c)
    for name, got, exp in zip(("loss", "fm", "w2"), (loss, fm, w2), expected_loss(v, u, v_ref, w, 0.7, c)):
        assert_rel_close(got, exp, 1e-5, f"{backend} {name}")  # float32 sums of 30 squares
    grad_v, grad_w, grad_c = torch.autograd.grad(loss, [v, w, c])
    exp_grad, scale = expected_loss_grad(v, u, v_ref, w, 0.7, w2_weights=c)
    assert_elementwise_close(grad_v, exp_grad, scale, f"{backend} grad_v")
    exp_grad_w, exp_grad_c = expected_loss_input_grads(v, u, v_ref, w, 0.7, w2_weights=c)
    assert grad_c.dtype == torch.float64
    assert_rel_close(grad_w, exp_grad_w, 1e-5, f"{backend} grad_weights")
    assert_rel_close(grad_c, exp_grad_c, 1e-5, f"{backend} grad_w2_weights")  # from the float32 w2
    plain = ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend=backend)
    for a, b in zip(plain, ops.orw_cfm_w2_loss(v, u, v_ref, w, 0.7, backend=backend, w2_weights=None)):
        assert torch.equal(a, b)


def test_w2_weights_input_errors_name_the_argument():
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"w2_weights must have shape \[B\] = \[4\]"):
        ops.orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(2))
    with pytest.raises(TypeError, match="w2_weights must be float16, bfloat16, float32 or float64"):
        ops.orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="w2_weights is on meta but the samples are on cpu"):
        ops.orw_cfm_w2_loss(v, v, v, torch.ones(4), 1.0, w2_weights=torch.ones(4, device="meta"))


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


class _LinearVelocity(torch.nn.Module):
    """``v(t, x) = W x + b`` on 2-D points."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, t, x):
        return self.lin(x)


_TRAINER_BASE = {"sample_shape": (2,), "reward": lambda x: -x.norm(dim=1), "seed": 0, "batch_size": 8,
                 "ode_steps": 4, "warmup_steps": 0}


def test_trainer_ops_backend_key_suggests_a_spelling():
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.config import ConfigError

    with pytest.raises(ConfigError, match="'ops_backend'.*did you mean 'cpp'"):
        ORWCFMTrainer(_LinearVelocity(), {**_TRAINER_BASE, "ops_backend": "cp"}, "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trainer_compute_loss_with_each_backend_matches_float64(backend, monkeypatch):
    """``compute_loss`` under config ``ops_backend`` once the policy has left the reference (W2 > 0): its loss and the
    policy's gradients match a float64 recomputation from the models on the same ``x_0``, ``x_1``, ``t``.

    ``alpha`` is 0.7 (not the default 1) so a dropped ``alpha`` changes the loss, and the weights are non-uniform.
    """
    import orwcfm_fast.objectives.base as objectives_base
    from orwcfm_fast import ORWCFMTrainer

    alpha = 0.7
    torch.manual_seed(0)
    trainer = ORWCFMTrainer(_LinearVelocity(), {**_TRAINER_BASE, "ops_backend": backend, "w2_coefficient": alpha},
                            "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy (only): a fixed perturbation of the size of the weights themselves
        for p in trainer.net_model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    x1 = torch.randn(8, 2, generator=g)
    weights = 0.5 + torch.rand(8, generator=g)

    paths = []  # the trainer's draws, recorded on their way into the path op
    real_path = objectives_base.conditional_path

    def recording_path(x_0, x_1, t, sigma=0.0, noise=None, backend=None):
        paths.append((x_0.clone(), x_1.clone(), t.clone(), sigma, noise))
        return real_path(x_0, x_1, t, sigma, noise, backend=backend)

    monkeypatch.setattr(objectives_base, "conditional_path", recording_path)  # where the loss draws its path
    loss, metrics = trainer.compute_loss(x1, weights, cond=())
    loss.backward()

    (x_0, x_1, t, sigma, noise), = paths
    torch.testing.assert_close(x_1, x1, rtol=0, atol=0)  # independent coupling: the samples as given
    e_loss, e_fm, e_w2, e_grads = expected_model_loss(trainer.net_model, trainer.ref_model, x_0, x_1, t, weights,
                                                      alpha, sigma, noise)
    # W2 clearly nonzero: with the perturbation above, alpha * mean w2 = 0.43 against mean w fm = 2.70 (measured);
    # a W2 term that takes the policy, or the reference, for both sides gives exactly 0.
    assert alpha * e_w2.mean() > 0.1 * (weights.double() * e_fm).mean(), (e_w2, e_fm)
    # Measured on every backend: loss, fm_loss and w2_loss within 7e-8 relative of float64 (float32 forwards and sums
    # over 8 x 2 elements). A dropped alpha (1 in its place) moves the loss by 6%, a zero W2 term by 14%; 1e-5 sits
    # 150x above the rounding and 6000x below the smaller bug.
    assert_rel_close(loss, e_loss, 1e-5, f"{backend} loss")
    assert_rel_close(metrics["w2_loss"], e_w2.mean(), 1e-5, f"{backend} w2_loss")
    assert_rel_close(metrics["fm_loss"], (weights.double() * e_fm).mean(), 1e-5, f"{backend} fm_loss")
    # Gradients: sums of 8 per-sample terms that can partly cancel, so the bound is relative to the gradient's norm.
    # Measured: max error 6e-8 of the norm; the W2 part is 45% of the norm here, so a dropped alpha moves the gradient
    # by 11% of the norm and a zero W2 term by 26%.
    grad_scale = torch.cat([grad.flatten() for grad in e_grads.values()]).norm()
    for name, p in trainer.net_model.named_parameters():
        err = (p.grad.double() - e_grads[name]).abs().max()
        assert err <= 1e-5 * grad_scale, f"{backend}: gradient of {name} off by {float(err):.3g} " \
                                         f"(norm {float(grad_scale):.3g}): {p.grad} vs {e_grads[name]}"


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
        # ADRPO's per-sample W2 coefficients, from tensors of the step (no host sync in the checks or the op).
        per_sample = ops.orw_cfm_w2_loss(v, u_t, v_ref, w, 0.3, backend=backend, w2_weights=t * 2)
        return (*ops.orw_cfm_w2_loss(v, u_t, v_ref, w, 0.3, backend=backend), *per_sample)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x_0, x_1, t, v_ref, w, k), step(x_0, x_1, t, v_ref, w, k)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_config_knows_the_same_backends():
    """config.OPS_BACKENDS is spelled out (config imports no torch); it must not drift from the ops'."""
    from orwcfm_fast.config import OPS_BACKENDS

    assert tuple(OPS_BACKENDS) == tuple(ops.BACKENDS)
