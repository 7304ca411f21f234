"""Random-number-generator states as plain tensors and numbers, for exact resume.

A run's randomness lives in several generators: the trainer's own (``generator`` for noise and
times, ``cpu_generator`` for couplings) and the global ones user code reaches for — torch's CPU
and CUDA default generators (dropout, a reward that samples), numpy's and Python's. A checkpoint
that restores only some of them resumes a different run. :func:`capture` reads them all into a
dict that ``torch.load(weights_only=True)`` can read back (tensors, ints, floats, strings);
:func:`restore` writes them back.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["capture", "restore"]


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
