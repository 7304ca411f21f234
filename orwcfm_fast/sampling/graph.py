"""A multistep sampler replayed from one CUDA graph: :class:`GraphSampler`.

Sampling integrates ``dx/dt = model(t, x)`` with :func:`~orwcfm_fast.sampling.integrate`:
``stages * steps`` model calls plus as many fused :func:`~orwcfm_fast.ops.ode_step` launches,
each a chain of small kernels whose launch overhead the GPU often waits on. On CUDA tensors
:class:`GraphSampler` captures the whole integration (every model call and every step op of
every step) once into a ``torch.cuda.CUDAGraph`` and replays it, so a call costs one copy into
the graph's input buffer, one graph launch and one copy out. Elsewhere (CPU tensors,
``use_graphs=False``, after a failed capture) it runs ``integrate`` eagerly, with the same
results.

How a graph is built (PyTorch's documented recipe, "whole network capture"):

1. a static input buffer ``x_0`` is allocated (outside the graph pool) and filled;
2. warm-up: the integration runs eagerly on a side stream (at least three model calls), which
   does lazy initialisation, cuDNN/cuBLAS algorithm selection and Triton compilation before
   capture; its result is thrown away;
3. capture: the same integration runs under ``torch.cuda.graph`` on that side stream, with the
   model in eval mode under ``torch.no_grad()`` (not ``inference_mode``: its tensors could not be
   refilled outside it), in ``capture_error_mode="thread_local"`` so other threads (data loader
   pin-memory threads, say) neither break the capture nor are broken by it. The time grid is baked
   into the graph as Python floats, exactly as ``integrate`` passes them (the per-stage ``[B]``
   time tensors are constant fills captured with the rest);
4. replay: each call copies its ``x_0`` into the static input on the caller's current stream,
   replays there, and clones the static output (or copies it into ``out=``).

Noise: not generated inside the graph. The caller's noise is copied into the static input, or
:meth:`GraphSampler.sample` draws it with the caller's generator *directly into* the static
input, outside the graph (``Tensor.normal_``, the same draw as ``torch.randn``). Random streams,
seeds and saved generator states therefore behave exactly as in eager code, and no custom
generator has to be registered with the graph.

Memory: one graph memory pool per sampler and device (``torch.cuda.graph_pool_handle()``), shared
by the graphs of all its keys, so graphs for a few batch sizes cost about one working set rather
than one each. Sharing is safe because nothing of the pool outlives a call: a static output is
cloned (or copied into ``out``) right after its replay, on the replaying stream, before any other
graph of the sampler replays. Do not replay one sampler from several streams or threads at
once. Graphs are kept per key ``(x_0 shape, dtype, device, CUDA autocast state)`` (the solver and
step count are fixed per sampler), at most ``max_graphs`` of them. Graphs are only ever dropped
*all together*: when a new key would exceed ``max_graphs``, on :meth:`GraphSampler.clear`, and
when the model's parameters were replaced. Freeing one graph alone is not safe: all of a
sampler's graphs share one memory pool and one capture stream, and what one capture left in the
pool, the cuBLAS workspace of the capture stream among it, can be what a surviving graph reads.
Dropping waits for the device, takes a fresh pool (``graph_pool_handle()``) for the next capture
and clears the cuBLAS workspaces, so no later kernel can use memory of a freed pool
(``torch.cuda.empty_cache()`` then returns the memory).

Weights: a graph reads the model's parameters and buffers at the addresses they had at capture.
Updating them in place keeps every graph valid and makes replays use the new values:
``model.load_state_dict(sd)`` (the default, which ``copy_``s into the existing tensors; this is
what ``ORWCFMTrainer.update_last_policy`` does), ``p.copy_(...)``, optimizer steps. Replacing them
does not: assigning new ``nn.Parameter`` objects or submodules, ``load_state_dict(sd,
assign=True)``, ``p.data = ...``, ``model.to(other_device)``. Every graph call checks that every
parameter, buffer and submodule is still the same object in the same place with the same
``data_ptr()``; if not, the graphs are dropped and recaptured, with a one-time
:class:`GraphCaptureWarning`. (The check re-reads lists recorded at capture with C-level ``map``
calls: 0.1-0.2 ms per call for a 36M-parameter CIFAR UNet, 2 us for a small MLP, on a slow,
busy 2-core machine; walking ``model.parameters()`` instead costs ten times as much.)
The check sees only the module given: state the model reads from elsewhere (a plain tensor
attribute, a Python number, a CPU tensor's value, another module it closes over, a non-Module
callable's captured state) and global switches (``torch.backends`` flags) are baked in at
capture; call :meth:`GraphSampler.clear` after changing them.

Capture failures (a model that syncs with the host, e.g. calls ``.item()``; ops that cannot be
captured; running out of memory in the pool) never fail the call: the sampler warns once with a
:class:`GraphCaptureWarning` naming the error, records it in ``fallback_reason`` and samples
eagerly from then on (until :meth:`GraphSampler.clear`). Errors of the warm-up, which is plain
eager ``integrate``, propagate unchanged: they would happen without graphs too.

After a failed capture the sampler also *recovers the default CUDA generator* (every torch
version, so no version check can be wrong): before torch 2.14 a capture that fails between
``capture_begin`` and a successful ``capture_end`` leaves the default generator, which
``capture_begin`` registered with the graph, in capture mode, and every later eager random op on
that device (``torch.randn(..., device="cuda")``, dropout in the training forward) then raises
"Offset increment outside graph capture encountered unexpectedly". The recovery captures one
tiny graph that draws from the default generator on the same device: its successful
``capture_end`` ends the generator's capture mode. The generator's seed and offset are saved
before and restored after, so eager random streams continue exactly as without the failed capture.
The recovery graph gets a memory pool of its own (a fresh ``graph_pool_handle()``), never the
sampler's, which the failed capture may have left registered with the allocator.

The failed capture also *ends its pool in the caching allocator* (every torch version, for the
same reason). ``CUDAGraph::capture_end`` tells the allocator that the capture is over
(``endAllocateToPool``) only after ``cudaStreamEndCapture`` succeeded; when that raises (the
capture was invalidated: a host sync, an op that cannot be captured) the allocator believes the
capture runs for the rest of the process: a block freed after ``record_stream`` (the overlapped
batches mark every batch's tensors so) waits for the end of the capture and is never reused,
``empty_cache`` and the out-of-memory retry free nothing, and later captures can allocate into
the wrong pool. The fallback ends it by hand (``torch._C._cuda_endAllocateToPool``, called
``_cuda_endAllocateCurrentStreamToPool`` before torch 2.8; both take the capture's device index
and pool id) and, only when that found the capture still registered, drops the capture's
reference to the pool (``torch._C._cuda_releasePool``), which the graph never drops after an
unfinished ``capture_end``. See :func:`_end_allocation_to_pool`.

Threads: a capture registers the default CUDA generator of its device with the graph, which
every thread draws from; a capture on a thread that runs beside the one drawing dropout masks or
``torch.randn`` noise would take those draws into its capture. :func:`defer_capture` marks a
thread as such a background thread: calls there replay the graphs that exist and run eagerly
(same results) for a key that has none, and the next call for that key on a thread that may
capture captures it. :class:`orwcfm_fast.prefetch.BackgroundWorker` runs all its work so.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orwcfm_fast.ops import BACKENDS
from orwcfm_fast.sampling.solvers import (
    ButcherTableau,
    VelocityModel,
    _check_steps,
    _resolve_solver,
    integrate,
)

__all__ = ["GraphSampler", "GraphCaptureWarning", "defer_capture"]

#: Model calls the warm-up makes at least (PyTorch's docs warm up with a few iterations).
_MIN_WARMUP_CALLS = 3


_THREAD = threading.local()  # .defer: GraphSampler calls on this thread never capture (defer_capture)


@contextlib.contextmanager
def defer_capture():
    """In the block, :class:`GraphSampler` calls on this thread capture no new graph (nestable).

    A key that already has a graph is replayed; one that has none runs eagerly (same results) and
    is captured at its next call on a thread that may capture. Why: a capture registers the
    default CUDA generator of its device with the graph, and that generator is shared by every
    thread; a capture on a background thread while another thread draws dropout masks or
    ``torch.randn`` noise from it would take those draws into the capture (before torch 2.14 they
    raise "Offset increment outside graph capture"). Deferring costs one eager call per new key;
    the alternative, holding the other thread for the whole capture, would need every random op
    of user code to wait on a lock.
    """
    previous = getattr(_THREAD, "defer", False)
    _THREAD.defer = True
    try:
        yield
    finally:
        _THREAD.defer = previous


def _capture_deferred() -> bool:
    """Whether this thread is inside :func:`defer_capture`."""
    return getattr(_THREAD, "defer", False)


class GraphCaptureWarning(RuntimeWarning):
    """A :class:`GraphSampler` could not use (or had to rebuild) its CUDA graphs; results are unaffected."""


class _CaptureFailed(Exception):
    """Capture raised; ``reason`` is the first error (not the follow-up from ending the capture)."""

    def __init__(self, reason: BaseException, recovery: str | None = None):
        super().__init__(str(reason))
        self.reason = reason
        self.recovery = recovery  # None, or why the default generator could not be recovered


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph (or a test double with .replay())
    static_in: torch.Tensor
    static_out: torch.Tensor
    static_cond: tuple[torch.Tensor, ...] = ()  # conditioning inputs, refilled like static_in


class _ModelWatch:
    """Whether a module still has, object for object and address for address, the state it had.

    Records every ``(owner dict, name, value)`` of every submodule's ``_parameters``, ``_buffers``
    and ``_modules`` (``None`` values included), the number of entries of each of those dicts
    (``ModuleList.append`` and the like), and the ``data_ptr()`` of every parameter and buffer. :meth:`unchanged` re-reads them with C-level ``map`` calls, which is much
    cheaper than walking ``model.parameters()`` (that builds names and a memo set each time).
    """

    __slots__ = ("_dicts", "_keys", "_objs", "_all_dicts", "_lens", "_tensors", "_ptrs")

    def __init__(self, model: object):
        dicts: list[dict] = []
        keys: list[str] = []
        objs: list[object] = []
        all_dicts: list[dict] = []
        if isinstance(model, torch.nn.Module):
            for module in model.modules():
                for d in (module._parameters, module._buffers, module._modules):
                    all_dicts.append(d)
                    for name, value in d.items():  # None entries too (``bias=None`` -> a Parameter)
                        dicts.append(d)
                        keys.append(name)
                        objs.append(value)
        self._dicts, self._keys, self._objs = dicts, keys, objs
        self._all_dicts = all_dicts
        self._lens = list(map(len, all_dicts))
        self._tensors = [v for v in objs if isinstance(v, torch.Tensor)]
        self._ptrs = list(map(torch.Tensor.data_ptr, self._tensors))

    def unchanged(self) -> bool:
        return (
            all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._objs))
            and list(map(len, self._all_dicts)) == self._lens
            and list(map(torch.Tensor.data_ptr, self._tensors)) == self._ptrs
        )


@contextlib.contextmanager
def _eval_mode(model: object):
    """``model`` in eval mode for the block; every submodule's own flag restored afterwards."""
    if not (isinstance(model, torch.nn.Module) and model.training):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _cuda_autocast_state() -> tuple[bool, torch.dtype | None]:
    if torch.is_autocast_enabled("cuda"):
        return True, torch.get_autocast_dtype("cuda")
    return False, None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


class GraphSampler:
    """``integrate(model, x_0, ...)`` replayed from one CUDA graph per input shape.

    Args:
        model: velocity model ``model(t, x) -> v`` (an ``nn.Module`` for weight-replacement
            detection; any callable works). Held by reference, never copied.
        solver: name in :data:`~orwcfm_fast.sampling.SOLVERS` or a
            :class:`~orwcfm_fast.sampling.ButcherTableau`.
        steps: number of integration steps from ``t = 0`` (noise) to ``t = 1`` (data).
        backend: ops backend of the step arithmetic (``None``: the best one for the device; on
            CUDA use a compiled backend, since interpreted Triton kernels sync with the host and
            cannot be captured).
        use_graphs: ``None``: graphs for CUDA inputs, eager otherwise. ``False``: always eager.
            ``True``: like ``None`` but a non-CUDA input raises ``ValueError``.
        sample_shape: shape of one sample, needed only by :meth:`sample`.
        max_graphs: most graphs kept (one per key); a new key past it drops them all.
        time_grid: the ``steps + 1`` times of a non-uniform grid (see :func:`integrate`), baked
            into the graphs; ``None``: uniform.

    Calling it (``sampler(x_0)``) returns what ``integrate(model, x_0, solver=solver, steps=steps,
    backend=backend)`` returns under ``torch.no_grad()`` with the model in eval mode: bit for bit
    on the eager path; on the graph path the same kernels are replayed, so results agree up to
    rounding where a library picks another algorithm under capture. An ``nn.Module`` in training
    mode is switched to eval for the call (or the capture) and restored afterwards. It works
    under ``torch.inference_mode()`` too (the graph's buffers are made outside it).

    Attributes:
        captures: number of successful graph captures so far.
        fallback_reason: ``None``, or why capture failed (the sampler then runs eagerly).

    Example::

        sampler = GraphSampler(trainer.last_policy, solver="euler", steps=100, sample_shape=(2,))
        x_1 = sampler.sample(512, generator=trainer.generator)  # captures on the first CUDA call
        trainer.update_last_policy()                             # in place: graphs stay valid
    """

    def __init__(
        self,
        model: VelocityModel,
        *,
        solver: str | ButcherTableau = "euler",
        steps: int = 100,
        backend: str | None = None,
        use_graphs: bool | None = None,
        sample_shape: Sequence[int] | None = None,
        max_graphs: int = 8,
        time_grid: Sequence[float] | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable as model(t, x), got {type(model).__name__}")
        self.model = model
        self.tableau = _resolve_solver(solver)
        self.solver = solver
        self.steps = _check_steps(steps)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(
                f"unknown ops backend {backend!r}; known: {', '.join(BACKENDS)} (or None for the best available)"
            )
        self.backend = backend
        if use_graphs is not None and not isinstance(use_graphs, bool):
            raise TypeError(f"use_graphs must be None, True or False, got {use_graphs!r}")
        self.use_graphs = use_graphs
        if sample_shape is not None:
            try:
                sample_shape = tuple(operator.index(d) for d in sample_shape)
            except TypeError:
                raise TypeError(f"sample_shape must be a sequence of ints, got {sample_shape!r}") from None
            if any(d < 1 for d in sample_shape):
                raise ValueError(f"sample_shape must have positive sizes, got {sample_shape}")
        self.sample_shape: tuple[int, ...] | None = sample_shape
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.time_grid = None if time_grid is None else tuple(float(t) for t in time_grid)
        if self.time_grid is not None and len(self.time_grid) != self.steps + 1:
            raise ValueError(f"time_grid has {len(self.time_grid)} times, but {self.steps} steps need {self.steps + 1}")

        nfe = self.tableau.stages * self.steps
        self._warmup_runs = max(1, math.ceil(_MIN_WARMUP_CALLS / nfe))
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pools: dict[torch.device, object] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._watch: _ModelWatch | None = None
        self._warned_replaced = False
        self.captures = 0
        self.fallback_reason: str | None = None

    # ------------------------------------------------------------------ public API

    def __call__(self, x_0: torch.Tensor, *cond: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate ``dx/dt = model(t, x, *cond)`` from ``x_0`` (``[B, *sample_shape]``) to ``t = 1``.

        Args:
            x_0: initial noise. It is read (copied into the graph's input buffer), never modified,
                and not referenced after the call.
            cond: conditioning tensors ``[B, ...]`` (e.g. prompt embeddings) passed to every model
                call; copied into the graph's buffers like ``x_0`` (part of the graph's key: their
                shapes and dtypes).
            out: optional tensor of ``x_0``'s shape, dtype and device to write the result into
                (may be ``x_0`` itself).

        Returns:
            ``x_1``, a new tensor (never the graph's static output buffer, which the next replay
            overwrites), or ``out``.

        Raises:
            TypeError: ``x_0`` is not a floating-point tensor, or ``out`` is not a tensor.
            ValueError: ``x_0`` has no batch dimension, ``out`` does not match ``x_0``, or
                ``use_graphs=True`` with a non-CUDA ``x_0``; and whatever ``integrate`` raises for
                the model (wrong output shape, unavailable backend, ...).
        """
        _check_x0(x_0)
        _check_cond(cond, x_0.shape[0], x_0.device)
        if out is not None:
            _check_out(out, x_0)
        if x_0.numel() > 0 and self._wants_graphs(x_0.device):
            with torch.no_grad():
                entry = self._entry(self._key(x_0.shape, x_0.dtype, x_0.device, cond), x_0, cond)
                if entry is not None:
                    entry.static_in.copy_(x_0)
                    _fill(entry.static_cond, cond)
                    return self._replay(entry, out)
        return self._eager(x_0, cond, out)

    def sample(
        self,
        n: int,
        *cond: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` samples from fresh standard normal noise.

        Equal to ``self(torch.randn((n, *sample_shape), generator=generator, device=device,
        dtype=dtype))``, and it consumes ``generator`` the same way; once a graph exists for the
        key the noise is drawn straight into its input buffer (no extra allocation or copy).

        Args:
            n: number of samples (positive int).
            generator: random generator on ``device`` (``None``: the default one).
            device: where to sample (default: the generator's device, else the device of the
                model's first parameter, else CPU).
            dtype: noise dtype (default: ``torch.get_default_dtype()``).
            out: optional ``[n, *sample_shape]`` tensor to write the result into.

        Returns:
            ``[n, *sample_shape]`` tensor.

        Raises:
            ValueError: no ``sample_shape`` was given to the constructor, ``n`` is not a positive
                int, or ``out`` does not match.
        """
        if self.sample_shape is None:
            raise ValueError("GraphSampler.sample needs sample_shape=... at construction (the shape of one sample)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample(n): n must be a positive integer, got {n!r}")
        device = self._sample_device(device, generator)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        shape = torch.Size((n, *self.sample_shape))
        if out is not None and (not isinstance(out, torch.Tensor) or out.shape != shape
                                or out.dtype != dtype or out.device != device):
            got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a {tuple(shape)} {dtype} tensor on {device}, got {got}")
        _check_cond(cond, n, device)
        if self._wants_graphs(device):
            with torch.no_grad():
                entry = self._entry(self._key(shape, dtype, device, cond), None)
                if entry is not None:
                    entry.static_in.normal_(generator=generator)
                    _fill(entry.static_cond, cond)
                    return self._replay(entry, out)
        x_0 = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self(x_0, *cond, out=out)

    def clear(self) -> None:
        """Drop every graph and its memory pool, and forget a capture failure (the next CUDA call captures again).

        Waits for the device(s) first, so in-flight replays finish before their buffers are
        freed. Use it after changing state the graphs bake in (see the module docs); replaced
        parameters are detected without it.
        """
        self._drop_graphs()
        self.fallback_reason = None

    invalidate = clear

    @property
    def num_graphs(self) -> int:
        """Number of captured graphs held."""
        return len(self._graphs)

    def __repr__(self) -> str:
        name = self.tableau.name
        state = f"fallback={self.fallback_reason!r}" if self.fallback_reason else f"graphs={len(self._graphs)}"
        return (f"GraphSampler(solver={name!r}, steps={self.steps}, backend={self.backend!r}, "
                f"use_graphs={self.use_graphs}, {state}, captures={self.captures})")

    # ------------------------------------------------------------------ paths

    def _integrate(self, x_0: torch.Tensor, cond: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        model = self.model if not cond else (lambda t, x: self.model(t, x, *cond))
        return integrate(model, x_0, solver=self.solver, steps=self.steps, backend=self.backend,
                         time_grid=self.time_grid)

    def _eager(self, x_0: torch.Tensor, cond: tuple[torch.Tensor, ...], out: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), _eval_mode(self.model):
            x_1 = self._integrate(x_0, cond)
            if out is None:
                return x_1
            out.copy_(x_1)
            return out

    @staticmethod
    def _replay(entry: _Graph, out: torch.Tensor | None) -> torch.Tensor:
        entry.graph.replay()
        if out is None:
            return entry.static_out.clone()
        out.copy_(entry.static_out)
        return out

    @staticmethod
    def _device_supports_graphs(device: torch.device) -> bool:
        return device.type == "cuda"

    def _wants_graphs(self, device: torch.device) -> bool:
        if self.use_graphs is False:
            return False
        if not self._device_supports_graphs(device):
            if self.use_graphs:
                raise ValueError(
                    f"GraphSampler(use_graphs=True) needs CUDA tensors, got a tensor on {device}; "
                    "use use_graphs=None to run eagerly off CUDA"
                )
            return False
        if self.fallback_reason is not None or torch.compiler.is_compiling():
            return False
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # inside someone else's capture: run eagerly, it is captured there
        return True

    def _key(self, shape: torch.Size, dtype: torch.dtype, device: torch.device,
             cond: tuple[torch.Tensor, ...] = ()) -> tuple:
        autocast = _cuda_autocast_state() if device.type == "cuda" else (False, None)
        return (tuple(shape), dtype, device, autocast, tuple((tuple(c.shape), c.dtype) for c in cond))

    def _sample_device(self, device, generator) -> torch.device:
        if device is not None:
            device = torch.device(device)
        elif generator is not None:
            device = torch.device(generator.device)
        else:
            param = None
            if isinstance(self.model, torch.nn.Module):
                param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    # ------------------------------------------------------------------ graph bookkeeping

    def _entry(self, key: tuple, x_0: torch.Tensor | None, cond: tuple[torch.Tensor, ...] = ()) -> _Graph | None:
        """The valid graph for ``key``; captured from ``x_0`` if missing (``x_0=None``: look up only)."""
        if self._graphs and not self._watch.unchanged():
            if not self._warned_replaced:
                self._warned_replaced = True
                warnings.warn(
                    "GraphSampler: the model's parameters, buffers or submodules were replaced (not updated in "
                    "place) since its CUDA graphs were captured; dropping the graphs and recapturing. Update "
                    "weights in place (model.load_state_dict(sd), p.copy_(...)) to keep the graphs.",
                    GraphCaptureWarning,
                    stacklevel=3,
                )
            self._drop_graphs()
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        if x_0 is None or _capture_deferred():
            return None  # look-up only, or a background thread: the caller runs eagerly (defer_capture)
        return self._capture(key, x_0, cond)

    def _capture(self, key: tuple, x_0: torch.Tensor, cond: tuple[torch.Tensor, ...] = ()) -> _Graph | None:
        if len(self._graphs) >= self.max_graphs:
            self._drop_graphs()  # all together: one graph cannot be freed alone (module docs, "Memory")
        # Normal tensors even when called under inference_mode: later calls outside it refill them.
        with torch.inference_mode(False):
            static_in = torch.empty(x_0.shape, dtype=x_0.dtype, device=x_0.device)
            static_in.copy_(x_0)
            static_cond = tuple(c.clone(memory_format=torch.contiguous_format) for c in cond)
            try:
                graph, static_out = self._record(static_in, static_cond)
            except _CaptureFailed as failed:
                self._fall_back(failed.reason, x_0, failed.recovery)
                return None
        if self._watch is None:
            # The baseline all graphs share, taken after the warm-up (which may have
            # materialised lazy parameters); later captures checked it in _entry().
            self._watch = _ModelWatch(self.model)
        entry = self._graphs[key] = _Graph(graph, static_in, static_out, static_cond)
        self.captures += 1
        return entry

    def _record(self, static_in: torch.Tensor, static_cond: tuple[torch.Tensor, ...] = ()):
        """Warm up, then capture ``integrate`` on ``static_in`` (and ``static_cond``); returns ``(graph, static_out)``.

        Raises:
            _CaptureFailed: capture raised (the caller falls back to eager).
            Exception: the warm-up (plain eager ``integrate``) raised; propagated unchanged.
        """
        device = static_in.device
        with torch.cuda.device(device):
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            pool = self._pools.get(device)
            if pool is None:
                pool = self._pools[device] = torch.cuda.graph_pool_handle()
            current = torch.cuda.current_stream(device)
            # Under autocast, cached weight casts made during warm-up would be read (not redone)
            # by the graph and freed when autocast exits: capture with the cache off instead.
            autocast, autocast_dtype = _cuda_autocast_state()
            no_cache = (torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False)
                        if autocast else contextlib.nullcontext())
            with torch.no_grad(), _eval_mode(self.model), no_cache:
                # Warm-up on a side stream, as PyTorch's docs prescribe before capture.
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    for _ in range(self._warmup_runs):
                        self._integrate(static_in, static_cond)
                current.wait_stream(stream)

                graph = torch.cuda.CUDAGraph()
                body_error: BaseException | None = None
                try:
                    # The outer stream context puts the caller's stream back even when
                    # torch.cuda.graph.__exit__ raises (it then skips restoring it itself).
                    with torch.cuda.stream(current):
                        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                            try:
                                static_out = self._integrate(static_in, static_cond)
                            except Exception as err:
                                body_error = err
                                raise
                except Exception as err:
                    _end_capture_quietly(graph, stream)
                    _end_allocation_to_pool(pool)  # the allocator's side of the capture (module docs)
                    recovery = _recover_default_generator(device, stream)
                    raise _CaptureFailed(body_error if body_error is not None else err, recovery) from err
            current.wait_stream(stream)
        return graph, static_out

    def _fall_back(self, reason: BaseException, x_0: torch.Tensor, recovery: str | None) -> None:
        self.fallback_reason = f"{type(reason).__name__}: {_first_line(reason)}"
        self._drop_graphs()  # a failed capture may leave its pool half used: the next one starts afresh
        extra = "" if recovery is None else f" {recovery}"
        warnings.warn(
            f"GraphSampler: CUDA graph capture of the {self.tableau.name!r} sampler ({self.steps} steps, x_0 "
            f"{tuple(x_0.shape)} {x_0.dtype} on {x_0.device}) failed with {self.fallback_reason}. Sampling "
            "eagerly with integrate() from now on (same results, more launch overhead). Common causes: host "
            "syncs in the model (.item(), .cpu(), print(tensor), data-dependent Python control flow), ops or "
            f"backends that cannot be captured (e.g. Triton under TRITON_INTERPRET=1). clear() retries.{extra}",
            GraphCaptureWarning,
            stacklevel=5,
        )

    def _drop_graphs(self) -> None:
        """Drop every graph at once, after the device finished with them; the next capture gets a fresh pool."""
        devices = {key[2] for key in self._graphs} | set(self._pools)
        for device in devices:
            self._sync(device)
        self._graphs.clear()
        self._pools.clear()
        self._watch = None
        if any(device.type == "cuda" for device in devices):
            _clear_cublas_workspaces()

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _clear_cublas_workspaces() -> None:
    """Free cuBLAS's per-(handle, stream) workspaces (made again at the next matmul), after a sync.

    A workspace first needed during a capture is allocated from that capture's pool; once the
    pool's graphs are gone, a later matmul on the capture stream must not reuse it.
    """
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _end_allocation_to_pool(pool) -> bool:
    """Tell the caching allocator that a failed capture into ``pool`` on the current device is over.

    Call it where the capture began: inside its ``torch.cuda.device``, whose index is the device
    ``CUDAGraph::capture_begin`` registered the capture on. ``CUDAGraph::capture_end`` calls the
    allocator's ``endAllocateToPool`` only after ``cudaStreamEndCapture`` succeeded (see the module
    docs). This calls it by hand through the binding this torch has:
    ``torch._C._cuda_endAllocateToPool`` (torch >= 2.8) or ``_cuda_endAllocateCurrentStreamToPool``
    (2.4 - 2.7), both ``(device index, pool id)``. When it succeeds the capture was still
    registered, and its reference to the pool (taken by ``beginAllocateToPool``) is dropped too
    with ``torch._C._cuda_releasePool``: the graph only releases its pool after a completed
    ``capture_end``. When it raises ("not currently recording to mempool_id") ``capture_end``
    already ended the allocation and the graph owns that reference; releasing it here as well
    would free a pool that live graphs may still use.

    Returns:
        True if this call ended the allocation (the capture had left it registered).
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    if end is None:
        return False
    pool_id = getattr(pool, "id", pool)  # a torch.cuda.MemPool, or graph_pool_handle()'s (int, int)
    try:
        device_index = torch.cuda.current_device()
        end(device_index, pool_id)
    except Exception:  # noqa: BLE001 - ended already (the usual case), or nothing to end
        return False
    release = getattr(torch._C, "_cuda_releasePool", None)
    if release is not None:
        try:
            release(device_index, pool_id)
        except Exception:  # noqa: BLE001 - the pool then stays reserved until the process ends
            pass
    return True


def _recover_default_generator(device: torch.device, stream) -> str | None:
    """End a failed capture's hold on the default CUDA generator of ``device`` (see the module docs).

    Captures one tiny graph that draws from the default generator, on ``stream`` (the failed
    capture's), into a memory pool of its own, with the generator's state saved before and
    restored after. Returns ``None`` on success, else a sentence for the fallback warning.
    """
    try:
        with torch.cuda.device(device):
            state = torch.cuda.get_rng_state(device)  # a host-side read: allowed in capture mode
            graph = torch.cuda.CUDAGraph()
            # Its own pool: never the sampler's, which the failed capture may have left registered.
            pool = torch.cuda.graph_pool_handle()
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)
            try:
                with torch.cuda.stream(current):  # put the caller's stream back whatever happens
                    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                        torch.rand(1, device=device)
            except Exception:
                _end_capture_quietly(graph, stream)
                _end_allocation_to_pool(pool)
                raise
            current.wait_stream(stream)
            torch.cuda.synchronize(device)
            del graph
            torch.cuda.set_rng_state(state, device)
    except Exception as err:  # noqa: BLE001 - reported in the fallback warning
        return (f"Recovering the default CUDA generator after the failed capture also failed "
                f"({type(err).__name__}: {_first_line(err)}): eager random ops on {device} may raise; "
                "restart the process or use cuda_graphs=False.")
    return None


def _end_capture_quietly(graph, stream) -> None:
    """End a capture a failure left open (normally ``torch.cuda.graph.__exit__`` has ended it)."""
    try:
        with torch.cuda.stream(stream):
            if torch.cuda.is_current_stream_capturing():
                graph.capture_end()
    except Exception:  # noqa: BLE001 - best effort on an already failed capture
        pass


def _check_x0(x_0) -> None:
    # The checks (and messages) of integrate(), made before any graph bookkeeping.
    if not isinstance(x_0, torch.Tensor):
        raise TypeError(f"x_0 must be a torch.Tensor, got {type(x_0).__name__}")
    if x_0.ndim < 1:
        raise ValueError("x_0 must have a batch dimension: expected shape [B, *sample_shape], got a 0-d tensor")
    if not x_0.is_floating_point():
        raise TypeError(f"x_0 must be a floating-point tensor, got dtype {x_0.dtype}")


def _check_cond(cond: tuple, batch: int, device: torch.device) -> None:
    for i, c in enumerate(cond):
        if not isinstance(c, torch.Tensor) or c.ndim < 1 or c.shape[0] != batch or c.device != device:
            got = (tuple(c.shape), c.device) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"cond[{i}] must be a [B = {batch}, ...] tensor on {device}, got {got}")


def _fill(static: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> None:
    for buffer, value in zip(static, values):
        buffer.copy_(value)


def _check_out(out, x_0: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x_0.shape or out.dtype != x_0.dtype or out.device != x_0.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device} but x_0 is "
            f"{tuple(x_0.shape)} {x_0.dtype} on {x_0.device}; they must match"
        )
