"""Reading model weights from the checkpoint formats users have, and writing safely.

Accepted by :func:`read_model_state`:

- torchcfm's training checkpoints ``{'net_model', 'ema_model', 'optim', 'sched', 'step'}``
  (the published trainer's ``load_pretrained`` input), with ``ema=True`` picking ``ema_model``;
- this library's checkpoints (same ``net_model`` key);
- ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers and plain state dicts;
- keys prefixed by ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (torch.compile).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "CheckpointError",
    "unwrap_model",
    "load_file",
    "read_model_state",
    "load_state_strict",
    "atomic_save",
]

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model. The message says which."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def load_file(path, map_location) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r} as tensors and plain containers "
            f"(weights_only=True): {type(err).__name__}: {err}. Re-save it as a dict of state dicts."
        ) from err


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_model_state(path, *, ema: bool = False, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a model's weights from any supported checkpoint layout.

    Args:
        path: checkpoint file.
        ema: take ``ema_model`` (torchcfm's EMA weights) instead of ``net_model``.
        map_location: where tensors are loaded.

    Returns:
        ``(state_dict, checkpoint)``: the weights with wrapper prefixes removed, and the
        whole loaded object (a dict; ``{}`` for a plain state dict) for optimiser state etc.

    Raises:
        CheckpointError: missing file, unreadable file, or no model weights inside.
    """
    ckpt = load_file(path, map_location)
    if _is_state_dict(ckpt):
        if ema:
            raise CheckpointError(f"{str(path)!r} is a plain state dict: it has no 'ema_model' (ema=True)")
        return _strip_prefixes(ckpt), {}
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a dict of weights")
    keys = ("ema_model",) if ema else ("net_model", "state_dict", "model")
    for key in keys:
        if key in ckpt and _is_state_dict(ckpt[key]):
            return _strip_prefixes(ckpt[key]), dict(ckpt)
    raise CheckpointError(
        f"{str(path)!r} has no model weights under {list(keys)}; its top-level keys are {sorted(map(str, ckpt))}"
    )


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with a message that lists what differs.

    Raises:
        CheckpointError: naming missing keys, unexpected keys and shape mismatches
            (first few of each), so another architecture is recognisable at a glance.
    """
    model = unwrap_model(model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} ({len(items)}): {items[:5]}{more}")
        raise CheckpointError(
            f"the weights in {source} do not fit this model ({type(model).__name__}); "
            "is it another architecture or size? " + "; ".join(parts)
        )
    model.load_state_dict(state)


def atomic_save(obj: Any, path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves any previous file at ``path`` intact. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
