"""Run the next batch's work in the background while this batch trains: :class:`BackgroundWorker`.

Within an epoch ``last_policy`` does not change, so batch ``k + 1`` (sampling, reward, weights,
coupling) does not depend on the update of batch ``k``; :meth:`ORWCFMTrainer.train` overlaps them.
This module is the mechanism, independent of the trainer:

- one background thread runs the submitted callables in order, so CPU-bound work (a JPEG or
  other CPU reward, the exact-OT assignment on the CPU, host syncs of the reward checks) stalls
  only that thread, never the one launching the update's kernels;
- on CUDA the thread works on its own side stream: it first waits (on the GPU) for an event
  recorded on the submitter's stream at submit time, so the inputs the submitter made (noise drawn
  from its generator) are ready; when the callable returns, an event is recorded on the side
  stream, and :meth:`Pending.result` makes the consumer's stream wait for it. Tensors cross
  streams with ``record_stream``, so the caching allocator does not hand their memory to the other
  stream too early.

Grad mode and autocast are thread-local in PyTorch: the callable sets what it needs itself.
Exceptions raised in the background come back from :meth:`Pending.result` unchanged.

CUDA graphs: the background thread never captures one. Its work runs inside
:func:`orwcfm_fast.sampling.graph.defer_capture`, so a :class:`~orwcfm_fast.sampling.GraphSampler`
called there replays the graphs it has and samples a key it has no graph for (a new batch shape
mid-epoch) eagerly; the submitter's thread captures it at its next call with that key (in
``train``: the first batch of an epoch). A capture registers the default CUDA generator with
the graph, and the submitter keeps drawing from that generator meanwhile (dropout masks,
``torch.randn``, activation checkpointing's replayed dropout in the backward). Holding the
submitter during a background capture instead would need every random op of user code to wait
on a lock; deferring costs one eager sampling per new key and epoch.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from orwcfm_fast.sampling.graph import defer_capture

__all__ = ["BackgroundWorker", "Pending"]


def _tensors(obj) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class Pending:
    """The result of one :meth:`BackgroundWorker.submit` call, not yet handed over."""

    def __init__(self, future: concurrent.futures.Future, device: torch.device):
        self._future = future
        self._device = device

    def done(self) -> bool:
        """True once the background thread has returned (its GPU work may still be running)."""
        return self._future.done()

    def result(self) -> Any:
        """Wait for the callable and hand its result to the caller's current stream.

        Returns:
            What the callable returned. On CUDA the caller's current stream first waits for the
            side stream's work, and every output tensor is marked as used by that stream.

        Raises:
            Whatever the callable raised.
        """
        out, done_event = self._future.result()
        if done_event is not None:
            consumer = torch.cuda.current_stream(self._device)
            consumer.wait_event(done_event)
            for tensor in _tensors(out):
                if tensor.is_cuda:
                    tensor.record_stream(consumer)
        return out

    def wait(self) -> None:
        """Wait for the callable and discard its result and any exception it raised."""
        try:
            self.result()
        except BaseException:  # noqa: BLE001 - discarding is the point
            pass


class BackgroundWorker:
    """One background thread (and, on CUDA, one side stream) for work that overlaps the caller's.

    Args:
        device: the device the submitted work runs on; a CUDA device gets a side stream.

    Example::

        worker = BackgroundWorker(device)
        pending = worker.submit(make_batch, noise)   # noise drawn on this thread, used there
        ...                                          # launch this step's update meanwhile
        batch = pending.result()                     # the next step's batch, safe on this stream
        worker.close()
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Run ``fn(*args)`` in the background thread, after the work queued so far.

        ``args`` may hold tensors made on the caller's current stream: on CUDA the side stream
        waits for everything queued on that stream up to this call before ``fn`` runs.
        """
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orwcfm-prefetch")
        ready = None
        if self.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            for tensor in _tensors(args):
                if tensor.is_cuda:
                    tensor.record_stream(self._stream)
        return Pending(self._executor.submit(self._run, fn, args, ready), self.device)

    def _run(self, fn, args, ready):
        # No CUDA graph capture on this thread: it runs beside the submitter's random ops (module docs).
        with defer_capture():
            if ready is None:
                return fn(*args), None
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                out = fn(*args)
                done = torch.cuda.Event()
                done.record(self._stream)
            return out, done

    def close(self) -> None:
        """Finish the submitted work and stop the thread (a later submit starts a new one)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
