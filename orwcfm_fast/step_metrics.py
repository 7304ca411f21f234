"""Step metrics summed on the device through an epoch: one host read per ``log_every`` steps, not per step."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from orwcfm_fast import distributed as dist_utils

__all__ = ["MetricSums"]


class MetricSums:
    """Running sums (and the max reward) of step metrics, kept on the device: no host sync per step."""

    def __init__(self):
        self.keys: tuple[str, ...] | None = None
        self.sums: torch.Tensor | None = None
        self.max_reward: torch.Tensor | None = None
        self.lr_sum = 0.0
        self.count = 0
        self.last: dict[str, torch.Tensor] = {}

    def add(self, metrics: Mapping[str, torch.Tensor], lr: float) -> None:
        if self.keys is None:
            self.keys = tuple(metrics)
        values = torch.stack([metrics[k].detach().to(torch.float32) for k in self.keys])
        self.sums = values if self.sums is None else self.sums + values
        reward_max = metrics["max_reward"].detach()
        self.max_reward = reward_max if self.max_reward is None else torch.maximum(self.max_reward, reward_max)
        self.lr_sum += lr
        self.count += 1
        self.last = dict(metrics)

    def last_floats(self, *keys: str) -> dict[str, float]:
        """The latest step's values of ``keys`` (one host sync)."""
        values = torch.stack([self.last[k].detach().to(torch.float32) for k in keys]).tolist()
        return dict(zip(keys, values))

    def means(self) -> dict[str, float]:
        """Means over the steps so far, with ``max_reward`` the max (one host sync).

        When distributed, every rank must call it: the means are over all ranks' steps.
        """
        if self.count == 0:
            return {}
        sums, max_reward = self.sums, self.max_reward.reshape(1).to(torch.float32)
        count = self.count
        if dist_utils.is_distributed():
            import torch.distributed as dist

            sums, max_reward = sums.clone(), max_reward.clone()
            dist.all_reduce(sums)
            dist.all_reduce(max_reward, op=dist.ReduceOp.MAX)
            count *= dist_utils.world_size()
        values = torch.cat([sums / count, max_reward]).tolist()
        out = dict(zip(self.keys, values[:-1]))
        out["max_reward"] = values[-1]
        out["lr"] = self.lr_sum / self.count
        return out

    def state(self) -> dict[str, Any]:
        """The sums so far (a checkpoint taken mid-epoch keeps them, so the epoch's means are exact)."""
        return {"keys": list(self.keys or ()), "sums": self.sums, "max_reward": self.max_reward,
                "lr_sum": self.lr_sum, "count": self.count}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> "MetricSums":
        sums = cls()
        if state["count"]:
            sums.keys = tuple(state["keys"])
            sums.sums = state["sums"].to(device)
            sums.max_reward = state["max_reward"].to(device)
        sums.lr_sum, sums.count = float(state["lr_sum"]), int(state["count"])
        return sums
