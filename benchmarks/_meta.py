"""Provenance stamped into every results file: date, commit (``-dirty`` if tracked files changed), torch."""

from __future__ import annotations

import datetime
import json
import math
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short HEAD hash, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True)
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"
    return head + ("-dirty" if dirty.strip() else "")


def provenance(device: str) -> dict:
    """``{'device', 'date', 'commit', 'torch'}`` for a results file."""
    return {"device": device, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__}


def write_results(result: dict, path: Path, rows: dict) -> None:
    """Write ``result`` as JSON to ``path`` (folders made) and raise if a mode of ``rows`` timed non-finite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if not all(math.isfinite(r["s_per_step"]) for r in rows.values()):
        raise RuntimeError("a mode produced a non-finite time")
