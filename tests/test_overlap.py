"""train()'s hot loop: the next batch made in the background, no per-step host syncs, same results.

What is checked here on the CPU (a background thread; on CUDA it also gets its own stream, which
the CUDA tests at the end cover where a GPU is present):

- overlapped and sequential ``train`` give bit-identical weights, metrics and generator states,
  for every coupling (the random draws happen in the same order), and both equal a loop of the
  public ``training_step``;
- the main thread reads metrics back once per ``log_every`` steps, not per step;
- an error in a background batch (NaN reward) reaches the caller before that batch updates
  anything, and nothing is left running;
- a subclass that overrides a step method is honoured by ``train``.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

import orwcfm_fast
from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.prefetch import BackgroundWorker


PACKAGE_DIR = os.path.dirname(orwcfm_fast.__file__)


class MLPVelocity(torch.nn.Module):
    def __init__(self, dim=2, hidden=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def neg_sq_norm(x):
    return -(x**2).sum(1)


def make_trainer(tmp_path, device="cpu", **overrides):
    torch.manual_seed(0)
    cfg = {"batch_size": 16, "ode_steps": 3, "ode_solver": "midpoint", "warmup_steps": 0, "learning_rate": 1e-2,
           "reward": neg_sq_norm, "sample_shape": (2,), "seed": 5, "savedir": str(tmp_path / "results")}
    cfg.update(overrides)
    return ORWCFMTrainer(MLPVelocity().to(device), cfg, device=device)


def flat_params(trainer):
    return torch.cat([p.detach().flatten().cpu() for p in trainer.net_model.parameters()])


@pytest.mark.parametrize("coupling,updates", [("independent", 1), ("exact_ot", 1), ("weighted_ot", 1),
                                              ("weighted_ot", 3)])
def test_overlapped_train_is_bit_identical_to_sequential(tmp_path, coupling, updates):
    """Also with updates_per_batch: the next batch is submitted in the batch's last update, after its draws
    (weighted_ot draws its partners from the CPU generator, in the worker and for each reuse)."""
    runs = {}
    for overlap in (False, True):
        trainer = make_trainer(tmp_path / str(overlap), coupling=coupling, overlap_sampling=overlap, log_every=2,
                               updates_per_batch=updates)
        history = trainer.train(2, 5)
        runs[overlap] = (flat_params(trainer), history, trainer.generator.get_state(), trainer.cpu_generator.get_state())
    (p_seq, h_seq, g_seq, c_seq), (p_ovl, h_ovl, g_ovl, c_ovl) = runs[False], runs[True]
    assert torch.equal(p_seq, p_ovl)
    assert h_seq == h_ovl
    assert torch.equal(g_seq, g_ovl) and torch.equal(c_seq, c_ovl)


@pytest.mark.parametrize("updates", [1, 2])
def test_train_equals_a_loop_of_training_step(tmp_path, updates):
    looped = make_trainer(tmp_path / "a", coupling="exact_ot", updates_per_batch=updates)
    metrics = [looped.training_step(0) for _ in range(4)]
    looped.update_last_policy()
    trained = make_trainer(tmp_path / "b", coupling="exact_ot", overlap_sampling=True, updates_per_batch=updates)
    (means,) = trained.train(1, 4)
    assert torch.equal(flat_params(looped), flat_params(trained))
    assert trained.global_step == looped.global_step == 4 * updates
    for key in ("forwards/sampling", "forwards/policy", "forwards/reference", "backwards", "forwards"):
        assert means[key] == sum(m[key] for m in metrics) / 4, key  # counted passes: exact
    assert means["forwards_total"] == 4 * means["forwards"] == looped.compute.forwards_total
    # epoch means are float32 sums on the device: equal to the float64 mean of the floats to ~1e-7
    for key in ("fm_loss", "w2_loss", "total_loss", "reward", "weight_ess", "grad_norm"):
        assert means[key] == pytest.approx(sum(m[key] for m in metrics) / 4, rel=1e-6, abs=1e-9), key
    assert means["max_reward"] == pytest.approx(max(m["max_reward"] for m in metrics))


class HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads that orwcfm_fast's code makes on the thread that enters the mode.

    Not counted: reads inside torch itself (CPU Adam reads its CPU step counters with ``.item()``;
    the fused CUDA Adam the trainer uses on GPUs keeps them on the device), and the finiteness
    check of the gradient norm in ``_optimize``, which on the CPU is a plain read (there is no
    device to wait for) and on CUDA becomes fused Adam's on-device ``found_inf`` skip.
    """

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.thread = threading.get_ident()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and threading.get_ident() == self.thread:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE_DIR) and caller.co_name != "_optimize":
                self.count += 1
        return func(*args, **(kwargs or {}))


def _main_thread_reads(tmp_path, steps, log_every):
    trainer = make_trainer(tmp_path / f"s{steps}", overlap_sampling=True, log_every=log_every, coupling="exact_ot")
    trainer.train(1, 2)  # first epoch: lazy initialisation out of the way
    with HostReads() as reads:
        trainer.train(1, steps)
    return reads.count


def test_hot_loop_reads_metrics_once_per_log_interval(tmp_path):
    # The epoch's first batch is made on the main thread (nothing to overlap with yet); every later
    # batch, with its reward checks and the exact-OT round trip, is made in the background. The
    # only main-thread reads per extra log interval: the progress bar's one read.
    base = _main_thread_reads(tmp_path, steps=8, log_every=8)
    longer = _main_thread_reads(tmp_path, steps=24, log_every=8)
    assert base > 0  # the counter sees the library's reads (first batch's checks, the bar, the means)
    assert longer - base == 2


def test_error_in_a_background_batch_leaves_later_updates_undone(tmp_path):
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        r = neg_sq_norm(x)
        return torch.full_like(r, float("nan")) if calls["n"] == 4 else r

    trainer = make_trainer(tmp_path / "flaky", reward=flaky, overlap_sampling=True)
    with pytest.raises(ValueError, match="NaN"):
        trainer.train(1, 6)
    assert calls["n"] == 4 and trainer.global_step == 3  # the fourth batch failed: three updates, no more
    reference = make_trainer(tmp_path / "ref")
    for _ in range(3):
        reference.training_step(0)
    assert torch.equal(flat_params(trainer), flat_params(reference))
    assert trainer.epoch == 0 and trainer.history == []


def test_subclass_overriding_a_step_method_is_honoured(tmp_path):
    class Counting(ORWCFMTrainer):
        calls = 0

        def compute_loss(self, x1, weights):
            Counting.calls += 1
            return super().compute_loss(x1, weights)

    torch.manual_seed(0)
    trainer = Counting(MLPVelocity(), {"batch_size": 8, "ode_steps": 2, "warmup_steps": 0, "reward": neg_sq_norm,
                                       "sample_shape": (2,), "seed": 0, "savedir": str(tmp_path),
                                       "overlap_sampling": True})
    (means,) = trainer.train(1, 3)
    assert Counting.calls == 3 and means["epoch"] == 1


def test_overlap_and_log_every_config_errors(tmp_path):
    from orwcfm_fast.config import ConfigError

    with pytest.raises(ConfigError, match="'overlap_sampling'"):
        make_trainer(tmp_path, overlap_sampling="yes")
    with pytest.raises(ConfigError, match="'log_every'"):
        make_trainer(tmp_path, log_every=0)


# ---------------------------------------------------------------- BackgroundWorker itself


def test_worker_runs_in_order_in_one_background_thread():
    worker = BackgroundWorker("cpu")
    seen = []
    main = threading.get_ident()
    pending = [worker.submit(lambda i: seen.append((i, threading.get_ident())) or i * 2, i) for i in range(5)]
    assert [p.result() for p in pending] == [0, 2, 4, 6, 8]
    assert [i for i, _ in seen] == list(range(5))
    assert len({tid for _, tid in seen}) == 1 and seen[0][1] != main
    worker.close()
    assert worker.submit(lambda: 7).result() == 7  # a closed worker starts a new thread
    worker.close()


def test_worker_exceptions_come_back_unchanged():
    worker = BackgroundWorker("cpu")

    def boom():
        raise KeyError("the background failed")

    pending = worker.submit(boom)
    with pytest.raises(KeyError, match="the background failed"):
        pending.result()
    worker.submit(boom).wait()  # wait() swallows it
    worker.close()


@pytest.mark.cuda
def test_worker_side_stream_orders_against_the_caller_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    worker = BackgroundWorker("cuda")
    main = torch.cuda.current_stream()
    for _ in range(20):
        x = torch.empty(1 << 22, device="cuda")
        torch.cuda._sleep(1_000_000)  # the fill below runs well after submit returns
        x.fill_(3.0)

        def work(t):
            assert torch.cuda.current_stream() != main
            return t * 2

        y = worker.submit(work, x).result()
        assert torch.cuda.current_stream() == main
        assert torch.equal(y, torch.full_like(y, 6.0))
    worker.close()


@pytest.mark.cuda
@pytest.mark.parametrize("coupling", ["independent", "exact_ot"])
def test_overlapped_train_on_cuda_matches_sequential(tmp_path, coupling):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = []
    for overlap in (False, True):
        trainer = make_trainer(tmp_path / str(overlap), device="cuda", coupling=coupling, overlap_sampling=overlap)
        trainer.train(2, 5)
        runs.append(flat_params(trainer))
    # same draws, same kernels; cuBLAS picks the same algorithms on both streams for these shapes
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)
