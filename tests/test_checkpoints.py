"""Crash safety of ``atomic_save``, ``CheckpointRotation`` and readable errors of ``load_file``."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from orwcfm_fast import checkpoints
from orwcfm_fast.checkpoints import (
    CheckpointError,
    CheckpointRotation,
    atomic_save,
    latest_checkpoint,
    load_file,
)


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- atomic_save


def test_atomic_save_writes_a_loadable_file_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    assert atomic_save(state, path) == path
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert _temporaries(path.parent) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_exception_mid_write_keeps_previous_file_and_removes_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    atomic_save({"version": torch.tensor(1)}, path)
    before = path.read_bytes()
    seen = {}

    def failing_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip file")
        fh.flush()
        (name,) = _temporaries(tmp_path)  # the temporary file being written, next to the target
        assert name.startswith(".ckpt.pt.")
        seen["tmp"] = tmp_path / name
        raise error

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(type(error)):
        atomic_save({"version": torch.tensor(2)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert int(torch.load(path, weights_only=True)["version"]) == 1
    assert not seen["tmp"].exists()
    assert _temporaries(tmp_path) == []


def test_exception_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, fh, *args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(OSError, match="no space"):
        atomic_save({"x": torch.zeros(1)}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    atomic_save({"x": torch.ones(3)}, path)
    monkeypatch.undo()
    if os.name == "posix":
        assert events == ["fsync-file", "replace", "fsync-dir"]
    else:  # where a folder cannot be opened the folder fsync is skipped
        assert events[:2] == ["fsync-file", "replace"]


def test_atomic_save_works_where_folders_cannot_be_opened(tmp_path, monkeypatch):
    """Windows refuses os.open on a folder; the save must still succeed."""
    real_open = os.open

    def open_(file, flags, *args, **kwargs):
        if Path(file).is_dir():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "open", open_)
    path = atomic_save({"x": torch.ones(2)}, tmp_path / "ckpt.pt")
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_atomic_save_works_where_folders_cannot_be_fsynced(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    path = atomic_save({"x": torch.ones(2)}, tmp_path / "ckpt.pt")
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from orwcfm_fast.checkpoints import atomic_save
    path = sys.argv[1]
    n = 8_000_000  # 32 MB of float32 per version
    for counter in range(1_000_000):
        atomic_save({"counter": torch.tensor(counter), "data": torch.full((n,), float(counter))}, path)
        print(counter, flush=True)
    """
)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_during_repeated_saves_leaves_a_whole_version(tmp_path):
    path = tmp_path / "ckpt.pt"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("writer wrote nothing in 60 s")
            time.sleep(0.01)
        time.sleep(random.uniform(0.2, 1.5))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()

    completed = [int(line) for line in out.decode().split()]
    loaded = torch.load(path, weights_only=True)
    counter = int(loaded["counter"])
    # the rename of the save in flight may have happened before its print
    assert completed and completed[-1] <= counter <= completed[-1] + 1
    assert loaded["data"].shape == (8_000_000,)
    assert bool((loaded["data"] == float(counter)).all())
    # at most the in-flight temporary file remains, named after the target
    leftovers = _temporaries(tmp_path)
    assert len(leftovers) <= 1 and all(n.startswith(".ckpt.pt.") for n in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["ckpt.pt"]


# --------------------------------------------------------------------------- rotation


def _state(tag) -> dict:
    return {"tag": torch.tensor(tag)}


def test_rotation_keeps_the_last_n(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=2)
    written = [rot.save(_state(epoch), epoch) for epoch in range(1, 6)]
    assert written[0].name == "checkpoint-e000001.pt"
    assert rot.checkpoints() == [tmp_path / "checkpoint-e000004.pt", tmp_path / "checkpoint-e000005.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-e000004.pt", "checkpoint-e000005.pt"]
    assert rot.latest() == written[-1]
    assert int(load_file(rot.latest(), "cpu")["tag"]) == 5


def test_rotation_keep_last_none_keeps_all(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=None)
    for epoch in range(7):
        rot.save(_state(epoch), epoch)
    assert [p.name for p in rot.checkpoints()] == [f"checkpoint-e{e:06d}.pt" for e in range(7)]


def test_rotation_keep_last_one(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=1)
    for epoch in range(3):
        path = rot.save(_state(epoch), epoch)
        assert rot.checkpoints() == [path]


def test_mid_epoch_checkpoints_sort_chronologically(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=None, prefix="ck")
    order = [(0, 5), (0, 40), (1, 0), (1, 3), (1, 12), (2, 0), (10, 0), (10, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out of order: "newer checkpoints already there"
        for epoch, step in random.Random(0).sample(order, len(order)):
            rot.save(_state(epoch * 1000 + step), epoch, step)
    assert rot.path_for(12).name == "ck-e000012.pt"
    assert rot.path_for(12, 34).name == "ck-e000012_s000034.pt"
    assert rot.path_for(12, 0) == rot.path_for(12)
    names = [p.name for p in rot.checkpoints()]
    assert names == [rot.path_for(e, s).name for e, s in order]
    assert names == sorted(names)  # plain string order is chronological too
    assert rot.latest() == rot.path_for(10, 1)
    assert int(load_file(rot.latest(), "cpu")["tag"]) == 10_001


def test_mid_epoch_pruning(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=3)
    for epoch in range(3):
        for step in (0, 10, 20):
            rot.save(_state(epoch), epoch, step)
    assert [p.name for p in rot.checkpoints()] == [
        "checkpoint-e000002.pt",
        "checkpoint-e000002_s000010.pt",
        "checkpoint-e000002_s000020.pt",
    ]


def test_saving_an_older_checkpoint_warns_and_is_not_pruned(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=2)
    rot.save(_state(4), 4)
    rot.save(_state(5), 5)
    with pytest.warns(UserWarning, match="newer checkpoint.*checkpoint-e000005.pt"):
        path = rot.save(_state(3), 3)
    assert path.exists()  # never the one just written
    assert rot.latest() == rot.path_for(5)


def test_resave_same_epoch_overwrites(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=2)
    rot.save(_state(1), 3)
    rot.save(_state(2), 3)
    assert rot.checkpoints() == [rot.path_for(3)]
    assert int(load_file(rot.latest(), "cpu")["tag"]) == 2


def test_foreign_files_are_ignored_and_kept(tmp_path):
    foreign = [
        "best.pt",
        "checkpoint-best-e000009.pt",  # another rotation's prefix
        "checkpoint-e12.pt",  # not zero-padded as path_for writes
        "checkpoint-e0000012.pt",
        "checkpoint-e000012_s000000.pt",  # step 0 is written without _s
        "checkpoint-e000012.pt.bak",
        "checkpoint-e000012-s000034.pt",
        "notes.txt",
        ".checkpoint-best-e000001.pt.abc.tmp",  # another rotation's temporary file
        "checkpoint-e000099.pt.tmp",
    ]
    for name in foreign:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "checkpoint-e000777.pt").mkdir()  # a folder is not a checkpoint
    rot = CheckpointRotation(tmp_path, keep_last=1)
    assert rot.checkpoints() == [] and rot.latest() is None
    rot.save(_state(1), 1)
    rot.save(_state(2), 2)
    assert rot.checkpoints() == [rot.path_for(2)]
    assert all((tmp_path / name).exists() for name in foreign)
    assert (tmp_path / "checkpoint-e000777.pt").is_dir()
    assert latest_checkpoint(tmp_path) == rot.path_for(2)
    assert latest_checkpoint(tmp_path, prefix="checkpoint-best") is not None  # its own files


def test_save_removes_stale_temporaries_of_its_own_names_only(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=3)
    stale = [".checkpoint-e000004.pt.k2j3h4.tmp", ".checkpoint-e000003_s000010.pt.zz.tmp"]
    kept = [".checkpoint-best-e000004.pt.k2j3h4.tmp", ".other.pt.abc.tmp", ".checkpoint-e000004.pt.tmpx"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert rot.checkpoints() == []  # temporaries are not checkpoints
    rot.save(_state(5), 5)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(stale)
    assert set(kept) <= names
    assert rot.checkpoints() == [rot.path_for(5)]


def test_stale_temporary_from_a_killed_save_is_cleaned(tmp_path, monkeypatch):
    """A save interrupted after the temporary file was written: the next save removes it."""
    rot = CheckpointRotation(tmp_path, keep_last=2)
    rot.save(_state(1), 1)
    real_replace = os.replace

    def killed(src, dst):
        raise SystemExit  # stands in for the process dying before the rename ...

    monkeypatch.setattr(checkpoints.os, "replace", killed)
    monkeypatch.setattr(checkpoints.os, "unlink", lambda p: None)  # ... so no cleanup happens
    with pytest.raises(SystemExit):
        rot.save(_state(2), 2)
    monkeypatch.undo()
    assert os.replace is real_replace
    assert len(_temporaries(tmp_path)) == 1
    assert rot.latest() == rot.path_for(1)
    rot.save(_state(2), 2)
    assert _temporaries(tmp_path) == []
    assert rot.checkpoints() == [rot.path_for(1), rot.path_for(2)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_bad_keep_last_raises(tmp_path, bad):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointRotation(tmp_path, keep_last=bad)


@pytest.mark.parametrize("prefix", ["", "a/b", ".", 3])
def test_bad_prefix_raises(tmp_path, prefix):
    with pytest.raises(ValueError, match="prefix"):
        CheckpointRotation(tmp_path, prefix=prefix)


def test_bad_epoch_and_step_raise(tmp_path):
    rot = CheckpointRotation(tmp_path)
    with pytest.raises(ValueError, match="epoch"):
        rot.path_for(-1)
    with pytest.raises(ValueError, match="step_in_epoch"):
        rot.save(_state(0), 1, -2)
    with pytest.raises(ValueError, match="epoch"):
        rot.save(_state(0), 1.0)
    assert list(tmp_path.iterdir()) == []


def test_empty_or_missing_folder(tmp_path):
    assert CheckpointRotation(tmp_path).latest() is None
    assert CheckpointRotation(tmp_path).checkpoints() == []
    missing = tmp_path / "nope"
    assert CheckpointRotation(missing).latest() is None
    assert latest_checkpoint(missing) is None
    assert not missing.exists()  # reading does not create it
    rot = CheckpointRotation(missing / "deeper", keep_last=2)
    assert rot.save(_state(0), 0) == missing / "deeper" / "checkpoint-e000000.pt"
    assert latest_checkpoint(missing / "deeper") == rot.path_for(0)


def test_large_epoch_numbers_still_order(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=None)
    rot.save(_state(0), 999_999)
    rot.save(_state(1), 1_000_000)
    assert rot.latest() == tmp_path / "checkpoint-e1000000.pt"


# --------------------------------------------------------------------------- load_file errors


def test_load_file_missing_names_the_path(tmp_path):
    missing = tmp_path / "where" / "missing.pt"
    with pytest.raises(CheckpointError, match="not found.*missing.pt"):
        load_file(missing, "cpu")


def test_truncated_file_raises_checkpoint_error_naming_the_file(tmp_path):
    good = atomic_save({"net_model": {"w": torch.randn(64, 64)}}, tmp_path / "good.pt")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_file(truncated, "cpu")
    with pytest.raises(CheckpointError, match="truncated.pt"):
        checkpoints.read_model_state(truncated)


# ----------------------------------------------------------------------------- sharded checkpoints (folders)


def _sharded(tmp_path, path, value=1.0):
    """A sharded checkpoint folder written by save_sharded in this process (DCP without a process group)."""
    from orwcfm_fast.sharded_checkpoints import save_sharded

    return save_sharded(path, {"model": {"w": torch.full((3, 2), value)}}, {"epoch": int(value), "sched": {}})


def test_rotation_lists_prunes_and_cleans_sharded_folders(tmp_path):
    rot = CheckpointRotation(tmp_path, keep_last=2)
    assert rot.path_for(3, sharded=True).name == "checkpoint-e000003.dcp"
    assert rot.path_for(3, 4, sharded=True).name == "checkpoint-e000003_s000004.dcp"
    rot.save({"a": 1}, 1)  # a file checkpoint of an earlier (unsharded) run in the same folder
    for epoch in (2, 3):
        path = _sharded(tmp_path, rot.path_for(epoch, sharded=True), float(epoch))
        rot.prune(path)
    assert [p.name for p in rot.checkpoints()] == ["checkpoint-e000002.dcp", "checkpoint-e000003.dcp"]
    assert rot.latest().name == "checkpoint-e000003.dcp"
    # a folder of that name that is a file, or a file named .dcp, is not a checkpoint of the rotation
    (tmp_path / "checkpoint-e000009.dcp.txt").write_text("x")
    (tmp_path / "checkpoint-e000008.pt").mkdir()
    assert rot.latest().name == "checkpoint-e000003.dcp"
    # a killed save leaves a temporary folder: removed by the next save's cleanup
    stale = tmp_path / ".checkpoint-e000004.dcp.123.tmp"
    (stale / "sub").mkdir(parents=True)
    assert rot.remove_stale_temporaries() == [stale] and not stale.exists()
    with pytest.raises(ValueError, match="not a checkpoint name"):
        rot.prune(tmp_path / "best.pt")


def test_save_sharded_replaces_atomically_and_reads_back(tmp_path):
    from orwcfm_fast.sharded_checkpoints import (
        check_layout,
        is_sharded_checkpoint,
        load_sharded,
        read_state,
    )

    path = _sharded(tmp_path, tmp_path / "ck.dcp", 1.0)
    assert is_sharded_checkpoint(path) and read_state(path)["epoch"] == 1
    _sharded(tmp_path, path, 2.0)  # the same name again: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.dcp"]  # no temporaries, no old copy
    target = {"model": {"w": torch.zeros(3, 2)}}
    check_layout(path, target)
    load_sharded(path, target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 2.0)) and read_state(path)["epoch"] == 2
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\).*model\.w: checkpoint \(3, 2\) vs trainer \(2, 3\)"):
        check_layout(path, {"model": {"w": torch.zeros(2, 3)}})
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*model\.v"):
        check_layout(path, {"model": {"w": torch.zeros(3, 2), "v": torch.zeros(1)}})
    (path / "trainer_state.pt").unlink()  # incomplete: refused by name
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        read_state(path)
