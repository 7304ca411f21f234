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
import re
import shutil
import tempfile
import warnings
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
    "CheckpointRotation",
    "latest_checkpoint",
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


def _fsync_directory(directory: Path) -> None:
    """fsync a folder so a rename inside it survives a power loss (POSIX).

    Skipped silently where a folder cannot be opened or fsynced (Windows refuses to open
    one; some filesystems reject fsync on a folder): the rename itself has still happened.
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A crash mid-write leaves any previous file at ``path`` intact: readers see either the old
    file or the new one, never a partial one. The temporary file (``.{name}.*.tmp`` next to
    ``path``) is removed on any exception, ``KeyboardInterrupt`` included; only a killed
    process leaves one behind. Parent folders are created.
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
        try:
            os.unlink(tmp)
        except OSError:  # already renamed, or gone: nothing to clean, keep the original error
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _check_count(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


class CheckpointRotation:
    """Numbered checkpoints in one folder, newest last; keeps the last ``keep_last``.

    File names (``prefix`` = ``"checkpoint"``)::

        checkpoint-e000012.pt           after 12 completed epochs
        checkpoint-e000012_s000034.pt   12 completed epochs + 34 steps into the 13th
        checkpoint-e000012.dcp/         a sharded checkpoint (FSDP): a torch.distributed.checkpoint folder

    ``epoch`` counts completed epochs and ``step_in_epoch`` the steps done in the current
    one, so ``(epoch, step_in_epoch)`` increases with training time, and so does the name
    in plain string order (``"."`` < ``"_"``; numbers are zero-padded to 6 digits, ordering
    beyond that is still by number). Only names exactly of this form count as checkpoints of
    the rotation: other files in the folder (another ``prefix``, ``best.pt``, temporary files
    ``.checkpoint-*.tmp`` left by a killed save) are never listed nor pruned.

    Args:
        directory: the folder (created by the first :meth:`save`).
        keep_last: how many checkpoints :meth:`save` leaves in the folder (a positive int),
            or ``None`` to keep them all.
        prefix: start of the file names; a non-empty name without path separators.
    """

    def __init__(self, directory, *, keep_last: int | None = 3, prefix: str = "checkpoint"):
        if keep_last is not None:
            _check_count(keep_last, "keep_last", minimum=1)
        if not isinstance(prefix, str) or not prefix or prefix in (".", "..") or any(
            sep in prefix for sep in ("/", "\\", os.sep, "\0")
        ):
            raise ValueError(f"prefix must be a non-empty file-name part without path separators, got {prefix!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        stem = re.escape(prefix) + r"-e(\d{6,})(?:_s(\d{6,}))?\.(pt|dcp)"
        self._name_re = re.compile(stem)
        # atomic_save's temporary files: ".{final name}.{random}.tmp"
        self._tmp_re = re.compile(r"\." + stem + r"\..+\.tmp", re.DOTALL)

    def __repr__(self) -> str:
        return f"CheckpointRotation({str(self.directory)!r}, keep_last={self.keep_last!r}, prefix={self.prefix!r})"

    def path_for(self, epoch: int, step_in_epoch: int = 0, *, sharded: bool = False) -> Path:
        """The file (``sharded``: the folder, ``.dcp``) for a checkpoint after ``epoch`` completed epochs and
        ``step_in_epoch`` more steps."""
        _check_count(epoch, "epoch", minimum=0)
        _check_count(step_in_epoch, "step_in_epoch", minimum=0)
        name = f"{self.prefix}-e{epoch:06d}"
        if step_in_epoch:
            name += f"_s{step_in_epoch:06d}"
        return self.directory / f"{name}.{'dcp' if sharded else 'pt'}"

    def _parse(self, name: str) -> tuple[int, int] | None:
        match = self._name_re.fullmatch(name)
        if match is None:
            return None
        key = (int(match.group(1)), int(match.group(2) or 0))
        # canonical names only: "e0000012" or "_s000000" are not what path_for writes
        if self.path_for(*key, sharded=match.group(3) == "dcp").name != name:
            return None
        return key

    def _entries(self) -> list[tuple[tuple[int, int], Path]]:
        try:
            children = list(self.directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        entries = []
        for child in children:
            key = self._parse(child.name)
            if key is not None and (child.is_dir() if child.suffix == ".dcp" else child.is_file()):
                entries.append((key, child))
        entries.sort(key=lambda entry: entry[0])
        return entries

    def checkpoints(self) -> list[Path]:
        """The rotation's checkpoints (files, and sharded checkpoints' folders) now in the folder, oldest first
        (``[]`` if there is no folder)."""
        return [path for _, path in self._entries()]

    def latest(self) -> Path | None:
        """The newest checkpoint file, or ``None`` if there is none."""
        entries = self._entries()
        return entries[-1][1] if entries else None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files of this rotation's names left by a killed save; returns them.

        Called by :meth:`save`. Do not call it while another process saves into the same
        folder with the same prefix: its in-flight temporary file would go too.
        """
        removed = []
        try:
            children = list(self.directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return removed
        for child in children:
            if self._tmp_re.fullmatch(child.name):
                try:
                    _remove(child)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    warnings.warn(
                        f"could not remove stale temporary checkpoint file {str(child)!r}: {err}", stacklevel=2
                    )
                    continue
                removed.append(child)
        return removed

    def save(self, state: Any, epoch: int, step_in_epoch: int = 0) -> Path:
        """Write ``state`` atomically to :meth:`path_for` ``(epoch, step_in_epoch)``, then prune.

        Stale temporary files of earlier killed saves are removed first. After the write the
        oldest checkpoints beyond ``keep_last`` are deleted, never the file just written.
        Overwrites an existing checkpoint of the same ``(epoch, step_in_epoch)``.

        Returns:
            The path written.
        """
        path = self.path_for(epoch, step_in_epoch)
        self.remove_stale_temporaries()
        atomic_save(state, path)
        self.prune(path)
        return path

    def prune(self, written: Path) -> None:
        """After ``written`` was saved: warn if newer checkpoints are already in the folder, and delete the oldest
        beyond ``keep_last`` (never ``written``). :meth:`save` calls it; a sharded checkpoint's writer calls it
        once its folder is in place (rank 0)."""
        written = Path(written)
        key = self._parse(written.name)
        if key is None:
            raise ValueError(f"{str(written)!r} is not a checkpoint name of {self!r}")
        entries = self._entries()
        newer = [p for k, p in entries if k > key]
        if newer:
            warnings.warn(
                f"saved {written.name} but {len(newer)} newer checkpoint(s) are already in "
                f"{str(self.directory)!r} (newest {newer[-1].name}), probably from an earlier run; "
                "latest() returns the newest, not the one just saved",
                stacklevel=3,
            )
        if self.keep_last is not None:
            for _, old in entries[: max(0, len(entries) - self.keep_last)]:
                if old == written:
                    continue
                try:
                    _remove(old)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    warnings.warn(f"could not remove old checkpoint {str(old)!r}: {err}", stacklevel=3)


def _remove(path: Path) -> None:
    """Delete a file, or a folder with what it holds (a sharded checkpoint)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def latest_checkpoint(directory, prefix: str = "checkpoint") -> Path | None:
    """The newest :class:`CheckpointRotation` checkpoint in ``directory``, or ``None`` (none, or no folder)."""
    return CheckpointRotation(directory, keep_last=None, prefix=prefix).latest()
