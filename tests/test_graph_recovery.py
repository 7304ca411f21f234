"""After a failed capture, :class:`GraphSampler` leaves the caching allocator as it found it.

``CUDAGraph::capture_end`` ends the allocator's side of a capture (``endAllocateToPool``) only
after ``cudaStreamEndCapture`` succeeded. When the capture was invalidated (a host sync, an op
that cannot be captured) torch raises first, and the allocator believes the capture runs for the
rest of the process: blocks freed after ``record_stream`` are never reused (the overlapped
batches call it on every batch), ``empty_cache`` frees nothing, later captures can allocate into
the wrong pool. The sampler's fallback ends it by hand and drops the capture's reference to the
pool; the tiny graph that recovers the default generator gets a pool of its own.

- CPU: ``_record`` runs on a fake ``torch.cuda`` whose ``torch.cuda.graph`` keeps the allocator's
  books like torch does (a capture registers ``(device, pool)`` as under way and takes a
  reference to the pool; a completed ``capture_end`` takes it off; an invalidated one raises
  before that), and fake ``torch._C`` bindings that end / release a pool and raise "not currently
  recording" as the allocator does. The sampler's tensors stand for ``cuda:1`` while device 0 is
  current, so a pool ended on the wrong device stays under way.
- CUDA (``-m cuda``): after a forced failed capture, ``torch.cuda.memory_reserved()`` stays flat
  while blocks freed after ``record_stream`` on a side stream are allocated again and again.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch import nn

from _fake_cuda import fake_stream_class, patch_checked
from orwcfm_fast.sampling import GraphCaptureWarning, GraphSampler, integrate

SAMPLER_DEVICE = 1  # the index the fake torch.cuda.device makes current for the sampler's (CPU) tensors


class MLP(nn.Module):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


class FakeAllocatorRuntime:
    """The torch.cuda calls of ``GraphSampler._record`` on CPU tensors, with the allocator's capture books.

    Args:
        fail: what goes wrong at the end of capture number ``i`` (0: the sampler's, 1: the
            recovery's), ``{i: mode}``. ``"invalidated"``: ``capture_end`` raises a CUDA error
            and leaves the capture registered with the allocator (torch < 2.12 when
            ``cudaStreamEndCapture`` fails). ``"ended"``: ``capture_end`` completes (the allocator's
            side is ended, the graph keeps its pool reference) and the body's own error propagates.
        end_binding: the name torch gives the pool-ending binding (``_cuda_endAllocateToPool`` from
            2.8, ``_cuda_endAllocateCurrentStreamToPool`` in 2.4 - 2.7).
    """

    def __init__(self, monkeypatch, *, fail: dict[int, str], end_binding: str = "_cuda_endAllocateToPool"):
        self.fail = fail
        self.current_device = 0
        self.capturing = False
        self.underway: list[tuple[int, tuple]] = []  # (device, pool) the allocator allocates captures into
        self.refs: Counter = Counter()  # (device, pool) -> references taken by captures, not yet released
        self.captures: list[tuple] = []  # pool of each capture, in order
        self.calls: list[tuple] = []  # ("end" | "release", device, pool)
        self._pools = 0
        rt = self
        Stream = fake_stream_class()

        @contextlib.contextmanager
        def stream(s):
            previous, rt.stream = rt.stream, s
            try:
                yield
            finally:
                rt.stream = previous

        @contextlib.contextmanager
        def device(d):
            index = SAMPLER_DEVICE if torch.device(d).type == "cpu" else torch.device(d).index
            previous, rt.current_device = rt.current_device, index
            try:
                yield
            finally:
                rt.current_device = previous

        def graph_pool_handle():
            rt._pools += 1
            return (0, rt._pools)  # what torch's graph_pool_handle() gives: (0, n)

        class CUDAGraph:
            def __init__(self, keep_graph=False):
                pass

            def capture_end(self):
                rt.capturing = False

            def replay(self):
                pass

        class GraphContext:
            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
                self.pool, self.stream = pool, stream
                self.number = len(rt.captures)

            def __enter__(self):
                # CUDAGraph::capture_begin: without a pool argument the graph makes a private one.
                self.key = (rt.current_device, self.pool if self.pool is not None else ("private", self.number))
                rt.captures.append(self.pool)
                rt.refs[self.key] += 1  # beginAllocateToPool
                rt.underway.append(self.key)
                rt.capturing = True
                self.previous, rt.stream = rt.stream, self.stream

            def __exit__(self, exc_type, exc, tb):
                mode = rt.fail.get(self.number)
                rt.capturing = False
                if mode == "invalidated":  # cudaStreamEndCapture raised: endAllocateToPool never ran
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                rt.underway.remove(self.key)  # capture_end: endAllocateToPool (the graph keeps its reference)
                rt.stream = self.previous
                return False  # the body's error, if any, propagates

        def end(device_index, pool):
            rt.calls.append(("end", device_index, pool))
            key = (device_index, pool)
            if key not in rt.underway:
                raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
            rt.underway.remove(key)

        def release(device_index, pool):
            rt.calls.append(("release", device_index, pool))
            key = (device_index, pool)
            assert rt.refs[key] > 0, f"releasePool of {key}, which holds no reference"
            rt.refs[key] -= 1

        self.default = self.stream = Stream()
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        patch_checked(monkeypatch, "stream", stream)
        patch_checked(monkeypatch, "device", device)
        patch_checked(monkeypatch, "graph", GraphContext)
        patch_checked(monkeypatch, "current_device", lambda: rt.current_device)
        patch_checked(monkeypatch, "current_stream", lambda device=None: rt.stream)
        patch_checked(monkeypatch, "graph_pool_handle", graph_pool_handle)
        patch_checked(monkeypatch, "synchronize", lambda device=None: None)
        patch_checked(monkeypatch, "is_current_stream_capturing", lambda: rt.capturing)
        patch_checked(monkeypatch, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
        patch_checked(monkeypatch, "set_rng_state", lambda new_state, device="cuda": None)
        for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
            monkeypatch.delattr(torch._C, name, raising=False)
        monkeypatch.setattr(torch._C, end_binding, end, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", release, raising=False)


class RaisesWhileCapturing(MLP):
    """A model whose forward raises a plain Python error inside the capture (not a CUDA error)."""

    def __init__(self, rt):
        super().__init__()
        self.rt = rt

    def forward(self, t, x):
        if self.rt.capturing:
            raise ValueError("data-dependent branch refused during capture")
        return super().forward(t, x)


def _sample_failing(rt, model, match):
    sampler = GraphSampler(model, solver="euler", steps=2)
    sampler._device_supports_graphs = lambda device: True
    x_0 = torch.randn(4, 2)
    with pytest.warns(GraphCaptureWarning, match=match) as record:
        got = sampler(x_0)
    assert len(record) == 1 and sampler.fallback_reason is not None
    with torch.no_grad():
        assert torch.equal(got, integrate(model.eval(), x_0, solver="euler", steps=2))  # eager fallback
    return str(record[0].message)


@pytest.mark.parametrize("end_binding", ["_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"])
def test_invalidated_capture_is_ended_in_the_allocator_once(monkeypatch, end_binding):
    rt = FakeAllocatorRuntime(monkeypatch, fail={0: "invalidated"}, end_binding=end_binding)
    message = _sample_failing(rt, MLP(), "previous error during capture")
    assert "Recovering" not in message  # the generator's recovery capture succeeded
    sampler_pool, recovery_pool = rt.captures
    # The recovery graph captures into a pool of its own, never the sampler's (possibly still registered) one.
    assert recovery_pool is not None and recovery_pool != sampler_pool
    capture = (SAMPLER_DEVICE, sampler_pool)
    # The fallback ended the sampler's capture exactly once, on the device the capture began on,
    # and gave back the reference the capture took; the recovery's own capture ended normally.
    # Without the fix: no call at all, and the capture stays under way for the rest of the process.
    assert rt.calls == [("end", *capture), ("release", *capture)], rt.calls
    assert rt.underway == [], f"the allocator still believes these captures run: {rt.underway}"
    assert rt.refs[capture] == 0


def test_capture_ended_by_torch_is_not_released_twice(monkeypatch):
    # The body raised but capture_end completed: the allocator's side is already ended and the
    # graph owns the pool's reference. Ending is tried (it raises "not currently recording"), and
    # nothing is released: a second release would free a pool under live graphs.
    rt = FakeAllocatorRuntime(monkeypatch, fail={0: "ended"})
    _sample_failing(rt, RaisesWhileCapturing(rt), "data-dependent branch refused")
    sampler_pool = rt.captures[0]
    capture = (SAMPLER_DEVICE, sampler_pool)
    assert rt.calls == [("end", *capture)], rt.calls
    assert rt.underway == [] and rt.refs[capture] == 1  # the graph's own reference, released with it


def test_failed_recovery_capture_is_ended_too(monkeypatch):
    rt = FakeAllocatorRuntime(monkeypatch, fail={0: "invalidated", 1: "invalidated"})
    message = _sample_failing(rt, MLP(), "previous error during capture")
    assert "Recovering the default CUDA generator after the failed capture also failed" in message
    sampler_pool, recovery_pool = rt.captures
    ended = [(SAMPLER_DEVICE, sampler_pool), (SAMPLER_DEVICE, recovery_pool)]
    assert [c[1:] for c in rt.calls if c[0] == "end"] == ended
    assert [c[1:] for c in rt.calls if c[0] == "release"] == ended
    assert rt.underway == [] and all(rt.refs[key] == 0 for key in ended)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


class SyncMLP(MLP):
    """Reads a value back to the host every call: its capture is invalidated."""

    def forward(self, t, x):
        return (1.0 + 0.0 * float(t[0])) * super().forward(t, x)


@pytest.mark.cuda
def test_cuda_record_stream_memory_is_reused_after_a_failed_capture():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sampler = GraphSampler(SyncMLP().cuda(), solver="euler", steps=2, backend="torch")
    with pytest.warns(GraphCaptureWarning):
        sampler(torch.randn(64, 2, device="cuda"))
    assert sampler.fallback_reason is not None and sampler.captures == 0
    torch.randn(8, device="cuda")  # the default generator works again (the recovery)

    side = torch.cuda.Stream()
    block = 16 << 20  # bytes

    def churn():
        """One overlapped-batch hand-over: allocate, use on a side stream, record_stream, free."""
        x = torch.empty(block // 4, device="cuda")
        x.record_stream(side)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x.fill_(1.0)
        del x
        torch.cuda.synchronize()  # the side stream is done: the block may be handed out again

    for _ in range(2):
        churn()
    before = torch.cuda.memory_reserved()
    for _ in range(20):
        churn()
    grown = torch.cuda.memory_reserved() - before
    # Reused: 0 bytes of growth. While the allocator believes a capture runs, each freed block waits
    # for the capture's end, so every churn reserves a new block: 20 * 16 MiB. One block of slack.
    assert grown < block, f"memory_reserved grew by {grown / 2**20:.0f} MiB over 20 record_stream allocations"
