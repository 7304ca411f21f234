"""Named ranges for profilers: NVTX (Nsight Systems) and torch.profiler, from one context manager.

The trainer marks the phases of a step (``sample``, ``reward``, ``loss``, ``backward``,
``optimizer``) with :func:`phase`. On CUDA the range is an NVTX range, so
``nsys profile --trace=cuda,nvtx python train.py`` shows the phases on the timeline; on
every device it is also a ``torch.profiler.record_function`` range, so torch.profiler's
traces and tables group the ops by phase. Ranges cost a few microseconds; set
``ORWCFM_FAST_NVTX=0`` to turn them off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["phase", "ranges_enabled"]

_enabled: bool | None = None


def ranges_enabled() -> bool:
    """Whether :func:`phase` emits ranges (``ORWCFM_FAST_NVTX``, read once; default on)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("ORWCFM_FAST_NVTX", "1").strip().lower() not in ("0", "false", "off", "no")
    return _enabled


@contextlib.contextmanager
def phase(name: str, device: torch.device | None = None) -> Iterator[None]:
    """Mark a region as ``orwcfm/<name>`` for Nsight Systems (NVTX, CUDA only) and torch.profiler.

    Args:
        name: the phase, e.g. ``"sample"``.
        device: the device the work runs on; NVTX ranges are pushed only for CUDA devices
            (NVTX needs the CUDA runtime).
    """
    if not ranges_enabled():
        yield
        return
    label = f"orwcfm/{name}"
    use_nvtx = device is not None and device.type == "cuda"
    if use_nvtx:
        torch.cuda.nvtx.range_push(label)
    try:
        with torch.profiler.record_function(label):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
