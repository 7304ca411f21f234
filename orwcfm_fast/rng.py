"""Random-number-generator states as plain tensors and numbers, for exact resume.

A run's randomness lives in several generators: the trainer's own (``generator`` for noise and
times, ``cpu_generator`` for couplings) and the global ones user code reaches for — torch's CPU
and CUDA default generators (dropout, a reward that samples), numpy's and Python's. A checkpoint
that restores only some of them resumes a different run. :func:`capture` reads them all into a
dict that ``torch.load(weights_only=True)`` can read back (tensors, ints, floats, strings);
:func:`restore` writes them back.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = ["capture", "keep_global_states", "restore"]


def capture(generators: Mapping[str, torch.Generator] | None = None,
            cuda_device: torch.device | None = None) -> dict[str, Any]:
    """All random states: ``generators`` by name, torch CPU, torch CUDA (``cuda_device``), numpy, Python.

    Args:
        generators: the caller's own generators, saved under their names.
        cuda_device: the CUDA device whose default generator to save (``None``: none is saved).

    Returns:
        A dict of tensors and plain values (safe for ``weights_only`` loading).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if cuda_device is not None and cuda_device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None,
            cuda_device: torch.device | None = None) -> None:
    """Write back what :func:`capture` read (the parts present in ``state``).

    Raises:
        KeyError: ``state`` has a generator ``generators`` lacks, or vice versa (a checkpoint of
            another kind of run).
    """
    saved = state.get("generators", {})
    for key, gen in (generators or {}).items():
        if key not in saved:
            raise KeyError(f"the saved random state has no generator {key!r} (it has {sorted(saved)})")
        gen.set_state(saved[key].cpu())
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].cpu())
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(int(v) for v in s["internal"].tolist()), s["gauss_next"]))
    if "torch_cuda" in state and cuda_device is not None and cuda_device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), cuda_device)


@contextlib.contextmanager
def keep_global_states() -> Iterator[None]:
    """Leave Python's, numpy's and torch's CPU global generators as they were on entry.

    For lazy imports of third-party packages that draw at import time (``rich``, which POT and
    torchcfm pull in through scikit-learn, calls ``random.getrandbits`` when its module loads):
    without it, the first trainer built in a process, or the first ``weighted_ot`` batch, moves the
    user's global streams, so a run depends on whether those modules happened to be imported
    already (a resumed process imports them at another moment than the run it continues).
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
