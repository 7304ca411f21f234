"""Every Triton launch of :mod:`orwcfm_fast.ops.triton` runs with its tensors' device current.

Triton compiles for, and launches on, the *current* CUDA device and its current stream, not on
the device of the tensors it is handed: without a guard, tensors on ``cuda:1`` while device 0 is
current launch on device 0 (reading another device's memory behind its stream's back, or failing).

- CPU (always runs): the four ops (``orw_cfm_w2_loss``, its backward op, ``conditional_path``,
  ``ode_step`` in one and in two passes) run on fake tensors on ``cuda:k`` (``FakeTensorMode``:
  metadata only, no GPU needed) with ``torch.cuda.device`` replaced by a recorder of the current
  device (the real one starts at another index) and each module's ``wrap_triton`` replaced by a
  launcher that records, per launch, which kernel and which device was current. Every launch
  must see the tensors' device, and the previous device must be current again after the op.
- CUDA with two or more GPUs (``-m cuda``, compiled kernels): tensors on ``cuda:1`` while device 0
  is current give the float64 oracle's values. The inputs are written on ``cuda:1``'s stream
  behind a ``torch.cuda._sleep``: a kernel launched on device 0's stream (no guard) would not
  wait for them, even where peer access lets it read ``cuda:1``'s memory.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package")
if not hasattr(torch.library, "triton_op"):
    pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op", allow_module_level=True)

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from op_cases import (  # noqa: E402
    FP32_RTOL,
    assert_elementwise_close,
    assert_rel_close,
    expected_loss,
    expected_loss_grad,
    expected_ode_step,
    expected_path,
)

import orwcfm_fast.ops.triton as T  # noqa: E402
from orwcfm_fast.ops.triton import loss as loss_mod  # noqa: E402  (imports define the kernels)
from orwcfm_fast.ops.triton import ode as ode_mod  # noqa: E402
from orwcfm_fast.ops.triton import path as path_mod  # noqa: E402

KERNEL_MODULES = (loss_mod, path_mod, ode_mod)


class DeviceRecorder:
    """Stands in for ``torch.cuda.device``: keeps a current device index and logs launches.

    ``recorder.device(d)`` is bound to the real ``torch.cuda.device`` signature first, so a call
    the real one would reject fails here too; entering makes ``d``'s index current, leaving puts
    the previous one back (as the real context manager does).
    """

    def __init__(self, current: int):
        self.current = current
        self.launches: list[tuple[str, int]] = []  # (kernel name, device current at the launch)
        recorder = self
        real = torch.cuda.device

        class device:  # noqa: N801 - the name it replaces
            def __init__(self, device):
                inspect.signature(real).bind(device)
                self.index = device.index if isinstance(device, torch.device) else int(device)
                assert self.index is not None, f"device guard without an index: {device!r}"

            def __enter__(self):
                self.previous, recorder.current = recorder.current, self.index

            def __exit__(self, *exc):
                recorder.current = self.previous
                return False

        self.device = device

    def wrap_triton(self, kernel):
        """A ``wrap_triton`` whose ``kernel[grid](...)`` records the launch and runs nothing."""
        recorder = self
        name = getattr(kernel, "fn", kernel).__name__

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, recorder.current))

                return launch

        return Launcher()


@pytest.fixture
def recorder(monkeypatch):
    """A :class:`DeviceRecorder` installed in place of ``torch.cuda.device`` and the kernel modules' launches."""
    rec = DeviceRecorder(current=0)
    monkeypatch.setattr(torch.cuda, "device", rec.device)
    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "wrap_triton", rec.wrap_triton)
        # Interpreted kernels skip the launch on fake tensors; the recorder runs nothing, so launch.
        monkeypatch.setattr(module, "should_launch", lambda kernel, *tensors: True)
    return rec


def _ops(device: str):
    """``{case: (call, kernels launched in order)}``: every public Triton op on fake tensors on ``device``."""
    def r(*shape):
        return torch.randn(*shape, device=device)

    v, u, v_ref, x = r(4, 3, 5), r(4, 3, 5), r(4, 3, 5), r(4, 3, 5)
    w, t = torch.rand(4, device=device), torch.rand(4, device=device)
    ks = [r(4, 3, 5) for _ in range(6)]
    fwd, bwd = "_orw_cfm_w2_loss_fwd_kernel", "_orw_cfm_w2_loss_bwd_kernel"
    return {
        "orw_cfm_w2_loss": (lambda: T.orw_cfm_w2_loss(v, u, v_ref, w, 0.5), [fwd]),
        "orw_cfm_w2_loss_backward": (lambda: loss_mod.orw_cfm_w2_loss_backward_op(v, u, v_ref, w, t), [bwd]),
        "conditional_path": (lambda: T.conditional_path(x, v, t), ["_conditional_path_kernel"]),
        "conditional_path_noise": (lambda: T.conditional_path(x, v, t, 0.3, u), ["_conditional_path_kernel"]),
        "ode_step": (lambda: T.ode_step(x, ks[:4], [0.1, 0.2, 0.3, 0.4], 0.5), ["_ode_step_kernel"]),
        "ode_step_two_passes": (lambda: T.ode_step(x, ks, [0.1] * 6, 0.5), ["_ode_step_kernel"] * 2),
    }


CASES = ["orw_cfm_w2_loss", "orw_cfm_w2_loss_backward", "conditional_path", "conditional_path_noise",
         "ode_step", "ode_step_two_passes"]


@pytest.mark.parametrize("tensor_index, current_index", [(1, 0), (0, 2)])
@pytest.mark.parametrize("case", CASES)
def test_every_launch_runs_on_the_tensors_device(recorder, case, tensor_index, current_index):
    recorder.current = current_index
    with FakeTensorMode():
        call, kernels = _ops(f"cuda:{tensor_index}")[case]
        out = call()
    outputs = out if isinstance(out, tuple) else (out,)
    assert all(o.device == torch.device("cuda", tensor_index) for o in outputs)
    # Correct: each kernel launched once per pass with cuda:tensor_index current. Without the guard
    # every launch records current_index (the launch goes to the wrong device).
    assert recorder.launches == [(name, tensor_index) for name in kernels], (
        f"{case}: launches (kernel, current device) {recorder.launches}; tensors on cuda:{tensor_index}, "
        f"device {current_index} current before the call"
    )
    assert recorder.current == current_index  # the caller's device is current again


# --------------------------------------------------------------------------------------------
# CUDA, two or more GPUs
# --------------------------------------------------------------------------------------------


def _two_gpus() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs CUDA"
    if torch.cuda.device_count() < 2:
        return False, "needs two CUDA devices"
    ok, why = T.is_available("cuda")
    if not ok or "interpreted" in why:
        return False, f"needs compiled Triton kernels on CUDA (TRITON_INTERPRET=0): {why}"
    return True, ""


def _behind_a_sleep(values: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copies of ``values`` on ``device``, written on that device's current stream after ~50 ms of sleep.

    A kernel that reads them from another device's stream runs before the copies land.
    """
    staged = [v.to(device) for v in values]
    torch.cuda.synchronize(device)
    out = [torch.empty_like(s) for s in staged]
    with torch.cuda.device(device):
        torch.cuda._sleep(100_000_000)  # ~50 ms at 2 GHz: far longer than the host needs to launch
        for dst, src in zip(out, staged):
            dst.copy_(src)  # queued behind the sleep on cuda:1's current stream
    return out


@pytest.mark.cuda
def test_cuda_ops_on_the_second_gpu_match_the_oracle():
    ok, why = _two_gpus()
    if not ok:
        pytest.skip(why)
    second = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(17)
    shape = (8, 3, 16, 16)
    v, u, v_ref, x, noise = (torch.randn(shape, generator=gen) for _ in range(5))
    w, t = torch.rand(8, generator=gen) * 3, torch.rand(8, generator=gen)
    ks = [torch.randn(shape, generator=gen) for _ in range(6)]
    coeffs = [0.5, -0.25, 1.0, 2.0, 0.125, -1.0]
    torch.cuda.set_device(0)

    v1, u1, v_ref1, w1 = _behind_a_sleep([v, u, v_ref, w], second)
    v1.requires_grad_()
    loss, fm, w2 = T.orw_cfm_w2_loss(v1, u1, v_ref1, w1, 0.5)
    (grad_v,) = torch.autograd.grad(loss, [v1])
    assert torch.cuda.current_device() == 0
    assert loss.device == fm.device == grad_v.device == second
    # float32 sums of squares vs float64: the op_cases tolerances (see op_cases' docstring). Reading
    # the inputs before the copies land gives garbage, not a rounding difference.
    exp_loss, exp_fm, exp_w2 = expected_loss(v, u, v_ref, w, 0.5)
    assert_rel_close(loss, exp_loss, FP32_RTOL, "loss on cuda:1")
    assert_rel_close(fm, exp_fm, FP32_RTOL, "fm on cuda:1")
    assert_rel_close(w2, exp_w2, FP32_RTOL, "w2 on cuda:1")
    exp_grad, scale = expected_loss_grad(v, u, v_ref, w, 0.5)
    assert_elementwise_close(grad_v, exp_grad, scale, "grad_v on cuda:1")

    x1, x11, t1, n1 = _behind_a_sleep([x, v, t, noise], second)
    x_t, u_t = T.conditional_path(x1, x11, t1, 0.3, n1)
    exp_x_t, exp_u_t, scale = expected_path(x, v, t, 0.3, noise)
    assert x_t.device == second
    assert_elementwise_close(x_t, exp_x_t, scale, "x_t on cuda:1")
    assert_elementwise_close(u_t, exp_u_t, x.abs().double() + v.abs().double(), "u_t on cuda:1")

    staged = _behind_a_sleep([x] + ks, second)
    out = T.ode_step(staged[0], staged[1:], coeffs, 0.1)  # six stage values: two passes
    exp_out, scale = expected_ode_step(x, ks, coeffs, 0.1)
    assert out.device == second and torch.cuda.current_device() == 0
    assert_elementwise_close(out, exp_out, scale, "ode_step on cuda:1")
