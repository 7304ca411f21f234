"""Which implementation of the ops runs: availability, reasons, and the choice per call.

Backends:

- ``"torch"``: :mod:`orwcfm_fast.ops.reference`, pure PyTorch; always available.
- ``"cpp"``: the compiled extension ``orwcfm_fast._C`` (:mod:`orwcfm_fast.ops._cpp`):
  C++ kernels on CPU tensors, CUDA kernels on CUDA tensors (when built with them).
- ``"triton"``: :mod:`orwcfm_fast.ops.triton`: Triton kernels on CUDA tensors, and on
  CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them; slow, never chosen automatically).

An explicit ``backend=`` that cannot run on the inputs' device raises
:class:`BackendUnavailableError` saying why; ``backend=None`` takes the first usable one of
:data:`AUTO_ORDER` for the device, quietly. Availability is probed on first use (never at
import) and cached.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from dataclasses import dataclass

__all__ = [
    "BACKENDS",
    "AUTO_ORDER",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "backend_module",
    "resolve_backend",
]

BACKENDS = ("torch", "cpp", "triton")

#: Order tried by ``backend=None``, per device type. On CPU the Triton interpreter is far
#: slower than either alternative, so it runs only when asked for by name.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cpp", "torch"),
    "cpu": ("cpp", "torch"),
}

_MODULES = {
    "torch": "orwcfm_fast.ops._torch",
    "cpp": "orwcfm_fast.ops._cpp",
    "triton": "orwcfm_fast.ops.triton",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """What one backend can do in this process.

    Attributes:
        name: ``"torch"``, ``"cpp"`` or ``"triton"``.
        devices: device types it can run on here (e.g. ``("cpu", "cuda")``); empty if none.
        reason: why it is unavailable, or on which devices not (empty when it runs everywhere
            it could).
    """

    name: str
    devices: tuple[str, ...]
    reason: str

    @property
    def available(self) -> bool:
        """True when it runs on at least one device type here."""
        return bool(self.devices)


_loaded: dict[str, ModuleType] = {}  # plain dicts, not lru_cache: torch.compile traces lookups in them
_statuses: dict[str, "BackendStatus"] = {}


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use)."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _status(name: str) -> BackendStatus:
    status = _statuses.get(name)
    if status is None:
        status = _statuses[name] = _probe(name)
    return status


def _probe(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", ("cpu", "cuda") if _cuda_present() else ("cpu",), "")
    try:
        module = backend_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure makes the backend unavailable
        return BackendStatus(name, (), f"cannot import {_MODULES[name]}: {type(err).__name__}: {err}")
    ok, reason = module.is_available()
    if not ok:
        return BackendStatus(name, (), reason)
    devices: list[str] = []
    notes: list[str] = []
    if name == "cpp":
        devices.append("cpu")
        cuda_ok, cuda_reason = module.cuda_available()
        if cuda_ok and _cuda_present():
            devices.append("cuda")
        elif cuda_ok:
            notes.append("CUDA kernels built, but no CUDA device is visible")
        else:
            notes.append(cuda_reason)
    else:  # triton: the module knows whether its kernels are (or will be) interpreted
        for device_type in ("cpu", "cuda"):
            ok_here, why = module.is_available(device_type)
            if ok_here:
                devices.append(device_type)
            else:
                notes.append(why)
    return BackendStatus(name, tuple(devices), "; ".join(notes))


def available_backends() -> dict[str, BackendStatus]:
    """Every backend's :class:`BackendStatus`: what is built and usable here, and why not otherwise.

    Example::

        >>> {name: s.devices for name, s in available_backends().items()}
        {'torch': ('cpu',), 'cpp': ('cpu',), 'triton': ()}
    """
    return {name: _status(name) for name in BACKENDS}


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo.

    Dynamo then calls ``fn`` at trace time and uses its value as a constant: the backend
    choice (availability is fixed within a process) costs nothing in a compiled graph and is
    not traced. The decorator itself imports torch._dynamo (and triton, ~2.5 s), which
    importing this package must not do. tests/test_ops_dispatch.py's fullgraph test guards it.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend to run on tensors of ``device_type``.

    Args:
        backend: a name from :data:`BACKENDS`, or ``None`` for the best usable one.
        device_type: ``"cpu"``, ``"cuda"``, ...

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: the named backend cannot run on ``device_type`` here.
    """
    if backend is None:
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if device_type in _status(name).devices:
                backend_module(name)  # imported here, outside any torch.compile trace
                return name
        backend_module("torch")
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown ops backend {backend!r}; known: {', '.join(BACKENDS)} (or None for the best available)")
    status = _status(backend)
    if device_type not in status.devices and not (backend == "torch"):
        where = f"runs on {', '.join(status.devices)} only" if status.devices else "is unavailable"
        raise BackendUnavailableError(
            f"ops backend {backend!r} {where}, not on {device_type} tensors: {status.reason or 'no reason recorded'}"
        )
    backend_module(backend)  # imported here, outside any torch.compile trace
    return backend
