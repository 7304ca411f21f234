"""Sharded checkpoints: a ``torch.distributed.checkpoint`` (DCP) folder plus a small file of everything else.

With config ``parallelism: "fsdp"`` no rank holds the whole model, so a checkpoint is written by every rank
at once, each its own shards, into one folder (on a filesystem all nodes share)::

    checkpoint-e000012.dcp/
        .metadata, __0_0.distcp, __1_0.distcp, ...   tensors: the trained weights, EMA, optimiser state (DCP)
        trainer_state.pt                            the rest, written by rank 0: config, counters, history,
                                                    scheduler, every rank's random state, world size, ...

The folder is written under a temporary name next to it and renamed into place once complete (rank 0, after
every rank finished), so a reader sees the old checkpoint or the new one, never half of one. DCP records each
tensor's global shape, so the tensors load onto any number of ranks: :func:`load_sharded` fills tensors of the
caller's layout (``DTensor`` shards or whole tensors) in place. Tools that want one file:
``python -m torch.distributed.checkpoint.format_utils dcp_to_torch CHECKPOINT.dcp out.pt``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orwcfm_fast import distributed as dist_utils
from orwcfm_fast.checkpoints import CheckpointError, _fsync_directory, atomic_save, load_file

__all__ = ["STATE_FILE", "check_layout", "is_sharded_checkpoint", "load_sharded", "read_state", "restore_optimizer",
           "save_sharded", "trainer_tensors"]

#: the rank-0 file inside a sharded checkpoint's folder
STATE_FILE = "trainer_state.pt"


def is_sharded_checkpoint(path) -> bool:
    """Whether ``path`` is a sharded checkpoint's folder (DCP's ``.metadata`` and :data:`STATE_FILE` inside)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def save_sharded(path, tensors: Mapping[str, Any], state: Mapping[str, Any]) -> Path:
    """Write a sharded checkpoint to the folder ``path`` (replacing one there). A collective: every rank calls it.

    Args:
        path: the checkpoint's folder; its parent is created.
        tensors: nested dicts of tensors (``DTensor`` shards or whole tensors, the same keys on every rank):
            written by DCP, each rank its own shards.
        state: plain objects and small tensors (what ``torch.load(weights_only=True)`` reads back): rank 0's is
            written as :data:`STATE_FILE`.

    Returns:
        ``path``.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    # one temporary name for every rank (rank 0's choice)
    tmp = dist_utils.broadcast_object(str(path.parent / f".{path.name}.{os.getpid()}.tmp"))
    tmp = Path(tmp)
    if dist_utils.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist_utils.barrier()
    try:
        dcp.save(dict(tensors), checkpoint_id=str(tmp))
        if dist_utils.is_main_process():
            atomic_save(dict(state), tmp / STATE_FILE)
            _fsync_directory(tmp)
            if path.exists():  # an earlier checkpoint of the same step: move it aside, then drop it
                old = path.parent / f".{path.name}.{os.getpid()}.old.tmp"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync_directory(path.parent)
    except BaseException:
        if dist_utils.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist_utils.barrier()
    return path


def read_state(path) -> dict[str, Any]:
    """A sharded checkpoint's :data:`STATE_FILE` (on every rank that calls it).

    Raises:
        CheckpointError: ``path`` is not a sharded checkpoint's folder, or its file cannot be read.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is not a sharded checkpoint (a folder with DCP's .metadata and "
                              f"{STATE_FILE}): missing or incomplete")
    state = load_file(path / STATE_FILE, map_location="cpu")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{str(path / STATE_FILE)!r} holds a {type(state).__name__}, not a dict")
    return dict(state)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"a.b.c": tensor}`` for the tensors of nested dicts (DCP's own flattening of string keys)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def check_layout(path, tensors: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless every tensor of ``tensors`` is in the checkpoint with the same global shape.

    Nothing is loaded: run it before changing anything, so a mismatch leaves the trainer as it was.
    """
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing, shapes = [], []
    for name, tensor in _flatten(tensors).items():
        entry = saved.get(name)
        size = getattr(entry, "size", None)
        if entry is None or size is None:
            missing.append(name)
        elif tuple(size) != tuple(tensor.shape):
            shapes.append(f"{name}: checkpoint {tuple(size)} vs trainer {tuple(tensor.shape)}")
    if missing or shapes:
        parts = []
        for label, items in (("missing tensors", missing), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} ({len(items)}): {items[:5]}{more}")
        raise CheckpointError(f"the sharded checkpoint {str(path)!r} does not fit this trainer (another model, "
                              "lora_rank or target modules?): " + "; ".join(parts))


def load_sharded(path, tensors: Mapping[str, Any]) -> None:
    """Fill ``tensors`` (nested dicts of ``DTensor`` shards or whole tensors) in place from the checkpoint folder.

    A collective under torch.distributed. Check with :func:`check_layout` first.
    """
    import torch.distributed.checkpoint as dcp

    dcp.load(dict(tensors), checkpoint_id=str(path))


def trainer_tensors(models, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None, *,
                    optimizer_state: bool) -> dict[str, Any]:
    """A trainer's tensors as a sharded checkpoint holds them: ``model`` (:meth:`TrainingModels.sharded_state`),
    ``ema`` (keyed by the trained parameters' names) and ``optim`` (``torch.distributed.checkpoint.state_dict``'s
    optimiser state, keyed by name), live tensors to save from or load into.

    Args:
        models: the trainer's :class:`~orwcfm_fast.flows.models.TrainingModels`.
        optimizer: its optimiser over ``models.trainable_parameters()``.
        ema: the EMA in that order, or ``None`` (left out).
        optimizer_state: include ``optim``. Leave it out for an optimiser that has not stepped: asking for its
            state would initialise it (a zero step), and a later Adam step would then differ from an
            uninterrupted run's.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tree: dict[str, Any] = {"model": models.sharded_state()}
    module = models.policy_module()
    if ema is not None:
        names = {id(p): name for name, p in module.named_parameters()}
        tree["ema"] = {names[id(p)]: e for p, e in zip(models.trainable_parameters(), ema)}
    if optimizer_state:
        tree["optim"] = get_optimizer_state_dict(module, optimizer)
    return tree


def restore_optimizer(models, optimizer: torch.optim.Optimizer, tree: Mapping[str, Any]) -> None:
    """Put :func:`trainer_tensors`' loaded ``optim`` into the optimiser (a fresh state when there is none)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if "optim" in tree:
        set_optimizer_state_dict(models.policy_module(), optimizer, tree["optim"])
    else:
        optimizer.state.clear()
