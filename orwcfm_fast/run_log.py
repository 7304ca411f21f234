"""Epoch metrics: a CSV under ``savedir`` always; TensorBoard and Weights & Biases when asked.

wandb and tensorboard are imported only when ``use_wandb`` / ``use_tensorboard`` is true, so neither
is a dependency. Both also get a grid of the policy's samples each epoch (:meth:`EpochLog.log_images`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

__all__ = ["EpochLog"]


class EpochLog:
    """Appends one row per epoch to ``<savedir>/<run_name>_metrics.csv`` and, optionally, to wandb and TensorBoard.

    Args:
        savedir: folder for the CSV (created on first write).
        run_name: CSV prefix and wandb run name.
        use_wandb: also ``wandb.log`` each epoch's means.
        wandb_project: wandb project name.
        config: logged to wandb as the run config.
        use_tensorboard: also write each epoch's means as scalars to ``<savedir>/tensorboard/<run_name>``.
    """

    def __init__(self, savedir: str, run_name: str, *, use_wandb=False, wandb_project=None, config=None,
                 use_tensorboard=False):
        self.csv_path = Path(savedir) / f"{run_name}_metrics.csv"
        self._wandb_run = None
        self._tensorboard = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "config 'use_tensorboard' is True but the tensorboard package is not installed: "
                    "`pip install tensorboard` (or the 'tensorboard' extra), or set use_tensorboard to False"
                ) from err
            self.tensorboard_dir = Path(savedir) / "tensorboard" / run_name
            self._tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir))
        if use_wandb:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    "config 'use_wandb' is True but the wandb package is not installed: "
                    "`pip install wandb`, or set use_wandb to False"
                ) from err
            self._wandb_run = wandb.init(project=wandb_project, name=run_name, config=dict(config or {}))

    def log(self, metrics: Mapping[str, Any], step: int, *, table: str = "metrics") -> None:
        """Write one row of metrics (numbers) at ``step``: an epoch's, or with ``table`` another CSV's
        (``<savedir>/<run_name>_<table>.csv``; evaluation rows: ``"eval"``); wandb and TensorBoard get them all."""
        row = {"epoch": step, **{k: v for k, v in metrics.items() if k != "epoch"}}
        path = self.csv_path if table == "metrics" else self.csv_path.with_name(
            self.csv_path.name.removesuffix("_metrics.csv") + f"_{table}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = None
        if path.exists():
            with path.open(newline="") as fh:
                header = next(csv.reader(fh), None)
        with path.open("a", newline="") as fh:
            # A resumed run appends under the existing header; columns it lacks stay empty.
            writer = csv.DictWriter(fh, fieldnames=header or list(row), restval="", extrasaction="ignore")
            if header is None:
                writer.writeheader()
            writer.writerow(row)
        if self._wandb_run is not None:
            self._wandb_run.log(dict(metrics), step=step)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()

    @property
    def wants_images(self) -> bool:
        """Whether a sink that shows images (TensorBoard, wandb) is on."""
        return self._tensorboard is not None or self._wandb_run is not None

    def log_images(self, tag: str, grid, step: int) -> None:
        """One image ``grid`` (a ``[C, H, W]`` tensor in [0, 1], ``C`` 1 or 3) at ``step`` to TensorBoard and wandb."""
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, grid, global_step=step, dataformats="CHW")
            self._tensorboard.flush()
        if self._wandb_run is not None:
            import wandb

            array = (grid.clamp(0, 1) * 255).round().to("cpu").byte().permute(1, 2, 0).numpy()
            self._wandb_run.log({tag: wandb.Image(array[..., 0] if array.shape[2] == 1 else array)}, step=step)

    def close(self) -> None:
        """Finish the wandb run and close the TensorBoard writer, if any."""
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
