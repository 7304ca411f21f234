"""Training objectives on one engine, one file each, chosen by config ``objective``.

- ``"orw-cfm-w2"`` (:class:`OrwCfmW2`): the default; ORW-CFM-W2's reward-weighted flow matching + W2.
- ``"adrpo"`` (:class:`Adrpo`): ORW-CFM-W2 with a per-sample W2 coefficient from the advantage.
- ``"offline-rwr"`` (:class:`OfflineRwr`): the same loss on one fixed set drawn from the pretrained model.
- ``"diffusion-nft"`` (:class:`DiffusionNft`): DiffusionNFT's implicit positive/negative policies around an
  EMA old policy.

:mod:`orwcfm_fast.objectives.base` holds the contract (:class:`Objective`, :class:`LossContext`) and what
the objectives share (the path draw, the advantage estimate).
"""

from __future__ import annotations

from typing import Any, Mapping

from orwcfm_fast.objectives.adrpo import Adrpo
from orwcfm_fast.objectives.base import LossContext, Objective, PathBatch, advantages, draw_path
from orwcfm_fast.objectives.diffusion_nft import DiffusionNft
from orwcfm_fast.objectives.offline_rwr import OfflineRwr
from orwcfm_fast.objectives.orw_cfm_w2 import OrwCfmW2

__all__ = ["OBJECTIVES", "Adrpo", "DiffusionNft", "LossContext", "Objective", "OfflineRwr", "OrwCfmW2",
           "PathBatch", "advantages", "draw_path", "make_objective"]

#: config ``objective`` -> its class
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (OrwCfmW2, Adrpo, OfflineRwr, DiffusionNft)}


def make_objective(config: Mapping[str, Any]) -> Objective:
    """The objective of a validated config (its ``objective`` key)."""
    return OBJECTIVES[config["objective"]](config)
