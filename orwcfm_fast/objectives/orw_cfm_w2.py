"""ORW-CFM-W2 (Fan et al., ICLR 2025): reward-weighted conditional flow matching plus a W2 bound.

``loss = mean_i (w_i fm_i + alpha w2_i)``, ``fm_i = mean_D (v - u_t)^2``, ``w2_i = mean_D (v - v_ref)^2``,
``w = exp(temperature * r)`` (config ``weight_normalization``), on samples of the last policy, which is
copied from the trained one after each epoch. Runs on the fused :func:`orwcfm_fast.ops.orw_cfm_w2_loss`.
"""

from __future__ import annotations

import torch

from orwcfm_fast.objectives.base import Objective, draw_path
from orwcfm_fast.ops import orw_cfm_w2_loss

__all__ = ["OrwCfmW2"]


class OrwCfmW2(Objective):
    name = "orw-cfm-w2"

    def loss(self, ctx, x_0, x_1, per_sample, cond=()):
        path = draw_path(ctx, x_0, x_1, per_sample, cond)
        v = ctx.forward("policy", path.t, path.x_t, path.cond)
        v_ref = ctx.forward("reference", path.t, path.x_t, path.cond)
        weights = path.per_sample["weights"]
        alpha, w2_weights = self.w2_coefficients(ctx, path)
        extra = {} if w2_weights is None else {"w2_weights": w2_weights}
        loss, fm, w2 = orw_cfm_w2_loss(v, path.u_t, v_ref, weights, alpha, backend=ctx.backend, **extra)
        metrics = {"fm_loss": (weights * fm).mean().detach(), "w2_loss": w2.mean().detach(),
                   "total_loss": loss.detach()}
        if w2_weights is not None:
            metrics["w2_coefficient"] = (alpha * w2_weights).mean().detach()
        return loss, metrics

    def w2_coefficients(self, ctx, path) -> tuple[float, torch.Tensor | None]:
        """``(alpha, c)``: sample ``i``'s W2 term is weighted ``alpha * c[i]`` (``c`` None: all ones)."""
        return ctx.alpha, None
