"""Reward weights, and couplings that keep each weight with its sample."""

import math

import pytest
import torch

from orwcfm_fast.coupling import couple, exact_ot, weighted_ot
from orwcfm_fast.weighting import effective_sample_size, reward_weights


def test_raw_weights_are_the_reference_exp():
    r = torch.tensor([-2.0, 0.0, 0.3, 5.0])
    torch.testing.assert_close(reward_weights(r, 0.5, "none"), torch.exp(0.5 * r))
    torch.testing.assert_close(reward_weights(r, 0.0, "none"), torch.ones(4))


def test_batch_weights_mean_one_and_overflow_safe():
    r = torch.tensor([1000.0, 999.0, 0.0])
    w = reward_weights(r, 1.0, "batch")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    # Same ratios as exp: w0 / w1 = e.
    assert math.isclose((w[0] / w[1]).item(), math.e, rel_tol=1e-5)
    assert torch.isinf(reward_weights(r, 1.0, "none")).any()


def test_weight_errors():
    with pytest.raises(ValueError, match="weight_normalization"):
        reward_weights(torch.zeros(3), 1.0, "softmax")
    with pytest.raises(ValueError, match=r"\[B\]"):
        reward_weights(torch.zeros(3, 1), 1.0)


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(8)).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(0.25)


def _labelled_batch(b, d=3, seed=0):
    """x_1[j] carries its label j in coordinate 0, so a returned weight can be checked against it."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, d, generator=g)
    x1[:, 0] = torch.arange(b, dtype=torch.float32)
    weights = torch.rand(b, generator=g) + 0.1
    return torch.randn(b, d, generator=g), x1, weights


@pytest.mark.parametrize("b", [1, 2, 7, 64])
def test_exact_ot_keeps_weights_with_samples_and_is_optimal(b):
    from scipy.optimize import linear_sum_assignment

    x0, x1, w = _labelled_batch(b)
    x0_new, x1_new, w_new = exact_ot(x0, x1, w)
    assert torch.equal(x1_new, x1) and torch.equal(w_new, w)
    # x_0 is a permutation of the input noise: the source batch is unchanged as a set.
    assert torch.equal(torch.sort(x0_new[:, 0]).values, torch.sort(x0[:, 0]).values)
    # Its cost equals the optimum computed independently (brute force for tiny b).
    cost = torch.cdist(x0.double(), x1.double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    assert ((x0_new - x1).double() ** 2).sum().item() == pytest.approx(cost[rows, cols].sum().item(), rel=1e-6)
    if b <= 7:
        import itertools
        best = min(sum(cost[p[j], j].item() for j in range(b)) for p in itertools.permutations(range(b)))
        assert ((x0_new - x1).double() ** 2).sum().item() == pytest.approx(best, rel=1e-6)


def test_weighted_ot_marginals():
    b = 64
    x0, x1, _ = _labelled_batch(b, seed=1)
    w = torch.zeros(b)
    w[:4] = torch.tensor([1.0, 2.0, 3.0, 2.0])
    g = torch.Generator().manual_seed(0)
    x0_new, x1_new, w_new = weighted_ot(x0, x1, w, generator=g)
    assert torch.equal(x0_new, x0)  # every noise sample kept exactly once
    assert torch.equal(w_new, torch.ones(b))
    labels = x1_new[:, 0].long()
    counts = torch.bincount(labels, minlength=b).double()
    # Exact plan: column sums are w / sum(w) = [1, 2, 3, 2] / 8 of 64 rows, so 8, 16, 24, 16
    # rows up to the at most B-1 split rows whose partner is drawn at random.
    assert counts[4:].sum() == 0
    assert (counts[:4] - torch.tensor([8.0, 16, 24, 16])).abs().sum() <= 2 * 3


def test_weighted_ot_rejects_bad_weights():
    x0, x1, _ = _labelled_batch(4)
    with pytest.raises(ValueError, match="weight_normalization='batch'"):
        weighted_ot(x0, x1, torch.tensor([float("inf"), 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        weighted_ot(x0, x1, torch.zeros(4))


def test_couple_dispatch_and_errors():
    x0, x1, w = _labelled_batch(5)
    assert all(torch.equal(a, b) for a, b in zip(couple("independent", x0, x1, w), (x0, x1, w)))
    with pytest.raises(ValueError, match="coupling must be one of"):
        couple("ot", x0, x1, w)
    with pytest.raises(ValueError, match="shapes"):
        couple(lambda a, b, c, generator=None: (a[:2], b, c), x0, x1, w)


# ----------------------------------------------------------------------------- group normalisation


def test_group_weights_standardise_within_each_group():
    from orwcfm_fast.weighting import reward_weights

    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0], dtype=torch.float64)
    w = reward_weights(r, 2.0, "group", group_size=4)
    # each group's weights sum to its size, and the two groups (same shape, shifted) get the same weights
    torch.testing.assert_close(w.view(2, 4).sum(1), torch.full((2,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(w[:4], w[4:])
    # an independent float64 computation of k * softmax(beta * z)
    g = r[:4]
    z = (g - g.mean()) / (g.std(unbiased=False) + 1e-6)
    want = 4 * torch.exp(2.0 * z) / torch.exp(2.0 * z).sum()
    torch.testing.assert_close(w[:4], want, rtol=1e-12, atol=1e-12)
    # scale-free up to the 1e-6 in the denominator (relative effect ~ beta * |z| * 1e-6 / std = a few 1e-6 here);
    # equal rewards give ones
    torch.testing.assert_close(reward_weights(r * 1000, 2.0, "group", group_size=4), w, rtol=2e-5, atol=1e-9)
    assert torch.equal(reward_weights(torch.full((6,), 3.0), 5.0, "group", group_size=3), torch.ones(6))
    # no overflow where raw weights overflow, and one group = the whole batch without a size
    big = torch.tensor([1e30, -1e30, 0.0, 5.0])
    assert torch.isfinite(reward_weights(big, 50.0, "group")).all()
    torch.testing.assert_close(reward_weights(r, 1.0, "group"), reward_weights(r, 1.0, "group", group_size=8))
    with pytest.raises(ValueError, match="groups of 3"):
        reward_weights(torch.zeros(8), 1.0, "group", group_size=3)


def test_trainer_uses_prompt_groups(tmp_path):
    """A conditional model's batch of 2 prompts x 4 images: each prompt's weights sum to 4."""
    from orwcfm_fast import ORWCFMTrainer

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2 + 1 + 2, 2)

        def forward(self, t, x, e):
            return self.lin(torch.cat([x, t[:, None], e], 1))

    seen = {}

    def reward(x, prompts):
        seen["prompts"] = list(prompts)
        return x[:, 0] * (10.0 if prompts[0] == "a" else 1.0)

    trainer = ORWCFMTrainer(Cond(), {
        "prompts": ["a", "b"], "prompt_encoder": lambda ps: torch.stack([torch.eye(2)[["a", "b"].index(p)] for p in ps]),
        "reward": reward, "sample_shape": (2,), "batch_size": 8, "images_per_prompt": 4, "ode_steps": 2,
        "weight_normalization": "group", "temperature": 3.0, "seed": 0, "savedir": str(tmp_path),
        "handle_signals": False})
    samples, rewards = trainer.sample_batch()
    weights = trainer._weights(rewards)
    torch.testing.assert_close(weights.view(2, 4).sum(1), torch.full((2,), 4.0))
    assert seen["prompts"][:4] == [seen["prompts"][0]] * 4
