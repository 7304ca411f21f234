"""Run Python as if some installed packages were absent, without uninstalling them.

``python tests/_hidden_modules.py MOD[,MOD...] -m MODULE [ARGS...]`` runs ``python -m MODULE ARGS``
(``... MOD[,MOD...] SCRIPT [ARGS...]``: ``python SCRIPT ARGS``) in this process after :func:`hide`
has made the top-level packages ``MOD`` unfindable: ``import MOD`` raises ``ModuleNotFoundError:
No module named 'MOD'``, ``importlib.util.find_spec("MOD")`` returns None, and the distributions
that provide them drop out of ``importlib.metadata`` (so a pytest plugin they register, e.g.
hypothesis's, is not loaded either). That is what a machine without them sees, e.g. the GPU image,
which lacks the wheels that ``../shared/device/fetch-wheels.sh`` carries.

Only the path-based finder is filtered: built-in and frozen modules and modules already imported
are untouched, so hide packages before anything imports them (this script does it first thing).
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys
from pathlib import Path

__all__ = ["HidingPathFinder", "hide"]


def _top_level_names(dist) -> set[str]:
    """Top-level import names a distribution installs (``top_level.txt``, else its file list)."""
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for path in dist.files or ():
        first = path.parts[0] if path.parts else ""
        if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__"):
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    return names


class HidingPathFinder:
    """``sys.meta_path``'s PathFinder, less the top-level packages in ``hidden`` (and their distributions)."""

    def __init__(self, hidden: set[str], finder=importlib.machinery.PathFinder):
        self.hidden = frozenset(hidden)
        self.finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.hidden:
            return None
        return self.finder.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in self.finder.find_distributions(*args, **kwargs):
            if not (_top_level_names(dist) & self.hidden):
                yield dist

    def invalidate_caches(self):
        self.finder.invalidate_caches()


def hide(modules) -> HidingPathFinder:
    """Replace the PathFinder in ``sys.meta_path`` by a :class:`HidingPathFinder` of ``modules``."""
    hidden = {m for m in modules if m}
    already = sorted(m for m in hidden if m in sys.modules)
    if already:
        raise RuntimeError(f"already imported, cannot be hidden: {', '.join(already)}")
    i = sys.meta_path.index(importlib.machinery.PathFinder)
    finder = sys.meta_path[i] = HidingPathFinder(hidden)
    return finder


def main(argv: list[str]) -> None:
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        raise SystemExit(f"usage: python {__file__} MOD[,MOD...] (-m MODULE | SCRIPT) [ARGS...]")
    hide(argv[0].split(","))
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        sys.path[0] = ""  # as `python -m`: the working directory, not this file's folder
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        sys.path[0] = str(Path(argv[1]).resolve().parent)  # as `python SCRIPT`: the script's folder
        runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
