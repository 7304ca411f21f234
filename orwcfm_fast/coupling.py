"""How noise x_0 is paired with policy samples x_1, and where the weights go.

Every coupling takes ``(x_0, x_1, weights)`` and returns ``(x_0, x_1, weights)`` of the
same shapes, with each weight still attached to the sample it was computed for
(the published trainer lost that link: torchcfm's ``sample_plan`` redraws and reorders
``x_1`` while the weights stay in their original order).

- ``independent``: ``x_0`` and ``x_1`` as drawn. The weighted CFM loss
  ``E[w(x_1) ||v(t, x_t) - (x_1 - x_0)||^2]`` is then minimised by the marginal velocity
  of the path towards ``q(x) w(x) / Z``: the ORW-CFM target. The default.
- ``exact_ot``: exact optimal-transport pairing of the batch (uniform marginals, squared
  Euclidean cost). With equal batch sizes the plan is a permutation, so ``x_0`` is
  permuted and each ``x_1`` keeps its weight. Weighting a pair also reweights its
  ``x_0``, so the source marginal is no longer N(0, I): the target is biased.
- ``weighted_ot``: exact OT from uniform ``x_0`` to ``x_1`` with target marginal
  ``w / sum(w)``. Each ``x_0`` is used once and draws its partner from its row of the
  plan; the returned weights are ones (the weighting lives in the plan).

A user callable with the same signature (plus ``generator=``) can be passed instead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from orwcfm_fast.config import COUPLINGS
from orwcfm_fast.rng import keep_global_states

__all__ = ["couple", "independent", "exact_ot", "weighted_ot", "COUPLING_FNS"]


def _squared_distances(x_0: torch.Tensor, x_1: torch.Tensor) -> np.ndarray:
    """``[B, B]`` float64 cost ``||x_0[i] - x_1[j]||^2`` as a numpy array (for the CPU solvers)."""
    a = x_0.detach().flatten(1).double().cpu()
    b = x_1.detach().flatten(1).double().cpu()
    return torch.cdist(a, b).pow_(2).numpy()


def independent(x_0, x_1, weights, generator=None):
    """Identity pairing: ``(x_0, x_1, weights)`` as given."""
    return x_0, x_1, weights


def exact_ot(x_0, x_1, weights, generator=None):
    """Exact OT pairing between the two batches, weights staying with their ``x_1``.

    Args:
        x_0: ``[B, ...]`` noise.
        x_1: ``[B, ...]`` samples.
        weights: ``[B]`` weights of ``x_1``.
        generator: unused (the assignment is deterministic).

    Returns:
        ``(x_0[perm], x_1, weights)`` where ``perm`` minimises ``sum_j ||x_0[perm[j]] - x_1[j]||^2``.
    """
    from scipy.optimize import linear_sum_assignment

    cost = _squared_distances(x_0, x_1)
    rows, cols = linear_sum_assignment(cost)
    # rows is 0..B-1; x_0[rows[k]] pairs with x_1[cols[k]]: invert to index x_0 by x_1's order.
    perm = np.empty_like(rows)
    perm[cols] = rows
    return x_0[torch.as_tensor(perm, device=x_0.device)], x_1, weights


def weighted_ot(x_0, x_1, weights, generator=None):
    """OT plan from uniform noise to the reward-weighted samples; returns unit weights.

    Solves ``min_pi <pi, C>`` with row sums ``1/B`` and column sums ``w / sum(w)`` exactly
    (POT's network simplex). Row ``i`` of the plan says where ``x_0[i]`` goes; each
    ``x_0[i]`` is kept once and its partner drawn from ``pi[i] / sum(pi[i])`` (the exact
    solution has at most ``2B - 1`` nonzeros, so most rows have a single partner).

    Args:
        x_0: ``[B, ...]`` noise.
        x_1: ``[B, ...]`` samples.
        weights: ``[B]`` non-negative weights of ``x_1``; only their ratios matter.
        generator: CPU ``torch.Generator`` for the partner draws.

    Returns:
        ``(x_0, x_1[partner], ones)``.
    """
    with keep_global_states():  # POT draws from Python's `random` when first imported
        import ot

    w = weights.detach().double().cpu()
    total = w.sum()
    if not torch.isfinite(total) or total <= 0 or (w < 0).any():
        raise ValueError(
            "weighted_ot coupling needs finite non-negative weights with a positive sum "
            f"(got sum {total.item():.4g}); use weight_normalization='batch' to avoid overflow"
        )
    batch = x_0.shape[0]
    a = np.full(batch, 1.0 / batch)
    b = (w / total).numpy()
    cost = _squared_distances(x_0, x_1)
    scale = cost.max()
    plan = ot.emd(a, b, cost / scale if scale > 0 else cost, numItermax=1_000_000)
    rows = torch.from_numpy(plan)
    rows = rows / rows.sum(dim=1, keepdim=True)
    partner = torch.multinomial(rows, 1, generator=generator).squeeze(1)
    partner = partner.to(x_1.device)
    return x_0, x_1[partner], torch.ones_like(weights)


COUPLING_FNS: dict[str, Callable] = {"independent": independent, "exact_ot": exact_ot, "weighted_ot": weighted_ot}


def couple(coupling, x_0: torch.Tensor, x_1: torch.Tensor, weights: torch.Tensor, generator=None):
    """Pair noise with samples by name or callable.

    Args:
        coupling: one of ``"independent"``, ``"exact_ot"``, ``"weighted_ot"``, or a callable
            ``(x_0, x_1, weights, generator=None) -> (x_0, x_1, weights)``.
        x_0: ``[B, ...]`` noise. x_1: ``[B, ...]`` samples. weights: ``[B]``.
        generator: CPU ``torch.Generator`` for couplings that draw at random.

    Returns:
        ``(x_0, x_1, weights)`` with the input shapes.
    """
    fn = coupling if callable(coupling) else COUPLING_FNS.get(coupling)
    if fn is None:
        raise ValueError(f"coupling must be one of {list(COUPLINGS)} or a callable, got {coupling!r}")
    out = fn(x_0, x_1, weights, generator=generator)
    if len(out) != 3 or out[0].shape != x_0.shape or out[1].shape != x_1.shape or out[2].shape != weights.shape:
        raise ValueError("a coupling must return (x_0, x_1, weights) with the shapes it was given")
    return out
