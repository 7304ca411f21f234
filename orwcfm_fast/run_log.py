"""Epoch metrics: a CSV under ``savedir`` always, Weights & Biases when asked.

wandb is imported only when ``use_wandb`` is true, so it is not a dependency.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

__all__ = ["EpochLog"]


class EpochLog:
    """Appends one row per epoch to ``<savedir>/<run_name>_metrics.csv`` and, optionally, to wandb.

    Args:
        savedir: folder for the CSV (created on first write).
        run_name: CSV prefix and wandb run name.
        use_wandb: also ``wandb.log`` each epoch's means.
        wandb_project: wandb project name.
        config: logged to wandb as the run config.
    """

    def __init__(self, savedir: str, run_name: str, *, use_wandb=False, wandb_project=None, config=None):
        self.csv_path = Path(savedir) / f"{run_name}_metrics.csv"
        self._wandb_run = None
        if use_wandb:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    "config 'use_wandb' is True but the wandb package is not installed: "
                    "`pip install wandb`, or set use_wandb to False"
                ) from err
            self._wandb_run = wandb.init(project=wandb_project, name=run_name, config=dict(config or {}))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write one epoch's metrics (numbers) at ``step``."""
        row = {"epoch": step, **{k: v for k, v in metrics.items() if k != "epoch"}}
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        header = None
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as fh:
                header = next(csv.reader(fh), None)
        with self.csv_path.open("a", newline="") as fh:
            # A resumed run appends under the existing header; columns it lacks stay empty.
            writer = csv.DictWriter(fh, fieldnames=header or list(row), restval="", extrasaction="ignore")
            if header is None:
                writer.writeheader()
            writer.writerow(row)
        if self._wandb_run is not None:
            self._wandb_run.log(dict(metrics), step=step)

    def close(self) -> None:
        """Finish the wandb run, if any."""
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
