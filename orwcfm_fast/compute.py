"""Compute, counted: the model forwards and backwards a run makes, by what they were for.

The unit is one sample's pass through the velocity model (a transformer or UNet forward on a batch
of ``B`` rows counts ``B``): it is what a step's GPU time is made of, and unlike GPU-hours it
transfers between machines and batch sizes. Classifier-free guidance costs two passes per sample
(conditional and unconditional, batched or not), a ``k``-stage ODE solver ``k`` per step.

Kinds (:data:`FORWARD_KINDS`):

- ``sampling``: the ODE solves that make training samples (the last policy; for ``offline-rwr`` the
  one-off draw from the pretrained model) and ``evaluate()``'s samples (counted separately there);
- ``policy``: the trained model's loss forwards (each has a backward: ``backwards`` counts them);
- ``reference``: the frozen reference's loss forwards (the W2 / KL term);
- ``old_policy``: the old policy's loss forwards (DiffusionNFT).

Counting happens on the host, in Python integers: no device sync.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["FORWARD_KINDS", "ComputeCounter"]

FORWARD_KINDS = ("sampling", "policy", "reference", "old_policy")


class ComputeCounter:
    """Forward and backward counts: the current epoch's (for per-step means) and the run's totals."""

    def __init__(self):
        self.epoch = {kind: 0 for kind in FORWARD_KINDS}
        self.total = {kind: 0 for kind in FORWARD_KINDS}
        self.epoch_backwards = 0
        self.total_backwards = 0
        self.evaluation = 0  # sample() / evaluate()'s solves: not training compute

    def add_evaluation(self, passes: int) -> None:
        """Count ``passes`` sample passes of :meth:`ORWCFMTrainer.sample` (evaluation, sample grids)."""
        self.evaluation += int(passes)

    def add(self, kind: str, passes: int) -> None:
        """Count ``passes`` sample passes of ``kind`` (policy passes also count as backwards)."""
        if kind not in self.epoch:
            raise ValueError(f"unknown forward kind {kind!r}; one of {FORWARD_KINDS}")
        passes = int(passes)
        self.epoch[kind] += passes
        self.total[kind] += passes
        if kind == "policy":
            self.epoch_backwards += passes
            self.total_backwards += passes

    def epoch_metrics(self, steps: int) -> dict[str, float]:
        """Per-step means over the epoch's ``steps`` steps and the run's totals so far.

        Returns:
            ``forwards/<kind>`` and ``backwards`` per step, ``forwards`` (their forward sum) per step,
            and ``forwards_total`` / ``backwards_total`` for the run.
        """
        steps = max(int(steps), 1)
        out = {f"forwards/{kind}": self.epoch[kind] / steps for kind in FORWARD_KINDS}
        out["backwards"] = self.epoch_backwards / steps
        out["forwards"] = sum(self.epoch.values()) / steps
        out["forwards_total"] = float(sum(self.total.values()))
        out["backwards_total"] = float(self.total_backwards)
        out["evaluation_forwards_total"] = float(self.evaluation)
        return out

    def step_counts(self, before: Mapping[str, Any]) -> dict[str, float]:
        """The passes counted since ``before`` (a :meth:`state`): ``forwards/<kind>``, ``backwards``, ``forwards``."""
        out = {f"forwards/{kind}": float(self.total[kind] - before["total"][kind]) for kind in FORWARD_KINDS}
        out["backwards"] = float(self.total_backwards - before["total_backwards"])
        out["forwards"] = sum(out[f"forwards/{kind}"] for kind in FORWARD_KINDS)
        return out

    def start_epoch(self) -> None:
        self.epoch = {kind: 0 for kind in FORWARD_KINDS}
        self.epoch_backwards = 0

    @property
    def forwards_total(self) -> int:
        return sum(self.total.values())

    def state(self) -> dict[str, Any]:
        return {"epoch": dict(self.epoch), "total": dict(self.total),
                "epoch_backwards": self.epoch_backwards, "total_backwards": self.total_backwards,
                "evaluation": self.evaluation}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state` (``None``, from checkpoints of earlier versions: counts restart at zero)."""
        self.__init__()
        if not state:
            return
        for kind in FORWARD_KINDS:
            self.epoch[kind] = int(state["epoch"].get(kind, 0))
            self.total[kind] = int(state["total"].get(kind, 0))
        self.epoch_backwards = int(state["epoch_backwards"])
        self.total_backwards = int(state["total_backwards"])
        self.evaluation = int(state.get("evaluation", 0))
