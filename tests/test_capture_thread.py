"""CUDA graphs are captured on the training thread only, never by the overlapped-batch worker.

A capture registers the default CUDA generator with the graph; the training thread keeps drawing
from it (dropout masks, ``torch.randn``, activation checkpointing's replayed dropout in the
backward) while :class:`~orwcfm_fast.prefetch.BackgroundWorker` makes the next batch. The worker
therefore runs under :func:`~orwcfm_fast.sampling.graph.defer_capture`: it replays existing
graphs, samples a key without one eagerly, and the training thread captures that key at its next
call (``train``: the first batch of the next epoch).

- CPU: the sampler's capture is replaced by a fake that records the thread it runs on (and
  "replays" by integrating eagerly), and the batch shape changes mid-epoch, first met by the
  worker. Every capture must run on the training thread, the worker must sample the new shape
  eagerly and replay the old one, and the run must be bit-identical to the sequential one.
- CUDA (``-m cuda``): the same schedule with real graphs and a model whose backward replays
  checkpointed dropout on the training thread while the worker samples.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch import nn

from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.prefetch import BackgroundWorker
from orwcfm_fast.sampling import GraphSampler, integrate

FULL, HALF = 16, 8  # batch sizes before and after the change of shape

# Tiny CPU tensors, two threads (training + worker) on a 2-core machine: one torch thread each.
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class MLPVelocity(nn.Module):
    def __init__(self, dropout: float = 0.0, checkpointed: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Dropout(dropout), nn.Linear(32, 2))
        self.checkpointed = checkpointed

    def forward(self, t, x):
        h = torch.cat([x, t[:, None]], dim=1)
        if self.checkpointed and self.training and torch.is_grad_enabled():
            # Recomputed in the backward, dropout included: the backward draws from the default generator.
            return torch.utils.checkpoint.checkpoint(self.net, h, use_reentrant=False)
        return self.net(h)


def neg_sq_norm(x):
    return -(x**2).sum(1)


def make_trainer(tmp_path, device="cpu", model=None, **overrides):
    torch.manual_seed(0)
    cfg = {"batch_size": FULL, "ode_steps": 3, "ode_solver": "midpoint", "warmup_steps": 0, "learning_rate": 1e-2,
           "reward": neg_sq_norm, "sample_shape": (2,), "seed": 5, "savedir": str(tmp_path / "results")}
    cfg.update(overrides)
    return ORWCFMTrainer((model or MLPVelocity()).to(device), cfg, device=device)


def halve_batches_from(monkeypatch, trainer, first: int) -> None:
    """From the ``first``-th batch on (0-based, counted over epochs), the batch has HALF samples.

    The full batch's draws are made and cut, so the random streams advance as before.
    """
    draw, count = trainer._draw_batch_inputs, itertools.count()

    def halved():
        noise, x_0, prompts = draw()
        return (noise[:HALF], x_0[:HALF], prompts) if next(count) >= first else (noise, x_0, prompts)

    monkeypatch.setattr(trainer, "_draw_batch_inputs", halved)


class FakeGraph:
    """Stands in for a CUDA graph: a replay integrates the static input eagerly."""

    def __init__(self, sampler, static_in, static_out, static_cond):
        self.sampler, self.static_in, self.static_out, self.static_cond = sampler, static_in, static_out, static_cond

    def replay(self):
        self.sampler.replays.append((threading.current_thread(), self.static_in.shape[0]))
        self.static_out.copy_(self.sampler._integrate(self.static_in, self.static_cond))


def fake_capture(monkeypatch, sampler: GraphSampler) -> GraphSampler:
    """Make a CPU sampler take its graph path; log (thread, batch size) of captures, replays and eager calls."""
    sampler.captured, sampler.replays, sampler.eager = [], [], []
    eager = sampler._eager

    def record(static_in, static_cond=()):
        sampler.captured.append((threading.current_thread(), static_in.shape[0]))
        static_out = sampler._integrate(static_in, static_cond)
        return FakeGraph(sampler, static_in, static_out, static_cond), static_out

    def logged_eager(x_0, cond, out):
        sampler.eager.append((threading.current_thread(), x_0.shape[0]))
        return eager(x_0, cond, out)

    monkeypatch.setattr(sampler, "_record", record)
    monkeypatch.setattr(sampler, "_eager", logged_eager)
    monkeypatch.setattr(sampler, "_device_supports_graphs", lambda device: True)
    return sampler


def test_overlapped_worker_never_captures_and_matches_sequential(tmp_path, monkeypatch):
    main = threading.main_thread()
    assert threading.current_thread() is main
    runs = {}
    for overlap in (False, True):
        trainer = make_trainer(tmp_path / str(overlap), overlap_sampling=overlap, coupling="exact_ot")
        sampler = fake_capture(monkeypatch, trainer._sampler)
        halve_batches_from(monkeypatch, trainer, 2)  # epoch 0: FULL, FULL, HALF, HALF; epoch 1: HALF only
        history = trainer.train(2, 4)
        runs[overlap] = (torch.cat([p.detach().flatten() for p in trainer.net_model.parameters()]), history,
                         trainer.generator.get_state(), trainer.cpu_generator.get_state())
        if overlap:
            # Batches 1-3 and 5-7 are made by the worker. Batch 2 brings the HALF shape to the worker
            # first: it samples it eagerly (twice in epoch 0) instead of capturing; the training thread
            # captures it with epoch 1's first batch, and the worker replays it from then on.
            worker = {thread for thread, _ in sampler.replays + sampler.eager} - {main}
            assert len(worker) == 1
            (worker,) = worker
            assert sampler.captured == [(main, FULL), (main, HALF)], (
                f"captures (thread, batch): {[(t.name, b) for t, b in sampler.captured]}; only the training "
                f"thread {main.name!r} may capture"
            )
            assert sampler.eager == [(worker, HALF), (worker, HALF)]
            assert sampler.replays == [(main, FULL), (worker, FULL), (main, HALF)] + [(worker, HALF)] * 3
        else:
            assert sampler.captured == [(main, FULL), (main, HALF)] and sampler.eager == []
    # Deferring changes where, not what: the same draws in the same order, the same kernels.
    (p_seq, h_seq, g_seq, c_seq), (p_ovl, h_ovl, g_ovl, c_ovl) = runs[False], runs[True]
    assert torch.equal(p_seq, p_ovl) and h_seq == h_ovl
    assert torch.equal(g_seq, g_ovl) and torch.equal(c_seq, c_ovl)


def test_background_worker_defers_captures_and_replays_existing_graphs(monkeypatch):
    torch.manual_seed(0)
    model = MLPVelocity().eval()
    sampler = fake_capture(monkeypatch, GraphSampler(model, solver="euler", steps=2))
    main = threading.current_thread()
    worker = BackgroundWorker("cpu")
    try:
        x_0 = torch.randn(5, 2)
        with torch.no_grad():
            expected = integrate(model, x_0, solver="euler", steps=2)
        assert torch.equal(worker.submit(sampler, x_0).result(), expected)  # a new key on the worker: eager
        assert sampler.captured == [] and sampler.num_graphs == 0
        assert torch.equal(sampler(x_0), expected)  # the same key on this thread: captured
        assert sampler.captured == [(main, 5)]
        assert torch.equal(worker.submit(sampler, x_0).result(), expected)  # the worker replays it
        (background,) = {thread for thread, _ in sampler.eager}
        assert background is not main and sampler.replays == [(main, 5), (background, 5)]
        assert sampler.eager == [(background, 5)]
    finally:
        worker.close()
    # The mark is the worker thread's only: this thread still captures new keys.
    sampler(torch.randn(3, 2))
    assert sampler.captured == [(main, 5), (main, 3)]


@pytest.mark.cuda
def test_cuda_overlapped_train_with_a_new_batch_shape_mid_epoch(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    trainer = make_trainer(tmp_path, device="cuda", model=MLPVelocity(dropout=0.2, checkpointed=True),
                           overlap_sampling=True, policy_dropout=True)
    sampler = trainer._sampler
    record, captured = sampler._record, []

    def logged_record(static_in, static_cond=()):
        captured.append((threading.current_thread(), static_in.shape[0]))
        return record(static_in, static_cond)

    monkeypatch.setattr(sampler, "_record", logged_record)
    halve_batches_from(monkeypatch, trainer, 2)
    trainer.train(2, 4)
    main = threading.main_thread()
    assert captured == [(main, FULL), (main, HALF)], [(t.name, b) for t, b in captured]
    assert sampler.fallback_reason is None and sampler.captures == 2
    assert all(torch.isfinite(p).all() for p in trainer.net_model.parameters())
    # The default generator was never left in a capture's hands: eager draws on this thread work.
    torch.randn(4, device="cuda").sum().item()
