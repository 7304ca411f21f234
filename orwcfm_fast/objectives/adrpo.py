"""ADRPO (Fan et al., NeurIPS 2025, arXiv 2510.18053) with the W2 regulariser of flow matching.

ORW-CFM-W2's loss with the fixed coefficient ``alpha`` replaced by a per-sample one taken from the
advantage: high-advantage samples are regularised less, low-advantage ones more,

    ``loss = mean_i (w_i fm_i + alpha_i w2_i)``,  ``alpha_i = max(alpha - A_i, 0)``,

``A_i`` the advantage of sample ``i`` (:func:`orwcfm_fast.objectives.base.advantages`: reward minus its
prompt group's mean, over the batch's standard deviation, clipped to ``+- advantage_clip``).

From the paper (its abstract and method summary): the adaptive coefficient ``beta_0 - A`` of a divergence
regulariser (here W2, ``beta_0 = alpha``), advantages from the batch's rewards, the W2 flow-matching form.
Chosen here where this library could not consult the paper's full text offline: the advantage estimate and
normalisation (DiffusionNFT's, shared with that objective), the clip (``advantage_clip``, default 5) and the
floor at 0 (a negative W2 coefficient would make the loss unbounded below). The flow-matching term keeps
ORW-CFM-W2's weights. Runs on the fused op with its per-sample W2 weight tensor.
"""

from __future__ import annotations

import torch

from orwcfm_fast.objectives.base import advantages
from orwcfm_fast.objectives.orw_cfm_w2 import OrwCfmW2

__all__ = ["Adrpo", "adrpo_coefficients"]


def adrpo_coefficients(alpha: float, advantage: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sample W2 coefficients ``max(alpha - A, 0)``."""
    return (alpha - advantage).clamp(min=0.0)


class Adrpo(OrwCfmW2):
    name = "adrpo"
    couplings = ("independent", "exact_ot")
    per_sample_names = ("advantage",)

    def per_sample(self, rewards, weights, group):
        return {"weights": weights, "advantage": advantages(rewards, group, self.config["advantage_clip"])}

    def w2_coefficients(self, ctx, path):
        # alpha is folded into the per-sample coefficients: the op's scalar alpha is 1
        return 1.0, adrpo_coefficients(ctx.alpha, path.per_sample["advantage"]).to(path.u_t.dtype)
