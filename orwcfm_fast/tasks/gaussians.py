"""The 2-D eight-Gaussians task: a pretrained flow, a reward for one mode, and its analysis.

Used by the coupling experiment (``benchmarks/coupling_experiment.py``) and the tests
that check ORW-CFM-W2's behaviour: alpha = 0 collapses onto the rewarded mode,
alpha = 1 raises the reward while keeping the other modes. :class:`ModePosteriorReward` is the
held-out reward of ``orwcfm-fast sweep`` on this task (the data's own classifier, not the distance
that is trained on).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EightGaussians",
    "MLPVelocity",
    "ModeReward",
    "ModePosteriorReward",
    "pretrain_flow",
    "tilted_mode_masses",
    "reference_ot_coupling",
    "finetune_eight_gaussians",
]


class EightGaussians:
    """Mixture of 8 isotropic Gaussians on a circle (torchcfm's 8-Gaussians: radius 5, variance 0.1).

    Args:
        radius: circle radius of the centres.
        std: per-coordinate standard deviation of each component.
    """

    def __init__(self, radius: float = 5.0, std: float = math.sqrt(0.1)):
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        self.centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()  # [8, 2]
        self.std = std

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, 2]`` points, components chosen uniformly."""
        idx = torch.randint(0, 8, (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=generator)


class MLPVelocity(torch.nn.Module):
    """``v(t, x)`` for 2-D points: an MLP on ``[x, t]``.

    Args:
        dim: point dimension. hidden: width. depth: hidden layers.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers, width = [], dim + 1
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, dim))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B]``, ``x`` ``[B, dim]`` -> ``[B, dim]``."""
        return self.net(torch.cat([x, t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)], dim=1))


class ModeReward(torch.nn.Module):
    """Closeness to one centre: ``r(x) = -||x - centre||``.

    Args:
        center: ``[2]`` the rewarded point.
    """

    def __init__(self, center: torch.Tensor):
        super().__init__()
        self.register_buffer("center", center.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` -> ``[B]``."""
        return -(x - self.center.to(x.device)).norm(dim=1)


class ModePosteriorReward(torch.nn.Module):
    """The mixture's own classifier: the posterior probability that ``x`` came from component ``mode``.

    ``r(x) = p(mode | x) = N(x; c_mode, s^2 I) / sum_k N(x; c_k, s^2 I)`` for the equal-weight mixture of
    :class:`EightGaussians` (centres ``c_k``, std ``s``), i.e. ``softmax_k(-||x - c_k||^2 / (2 s^2))[mode]``.
    In ``[0, 1]``: about 1 on the mode's side of the bisectors to its neighbours, about 0 elsewhere, so its
    mean is the fraction of samples in the mode. Unlike :class:`ModeReward` it gives nothing for pulling
    samples closer to the centre than the mode's own spread, and a point half-way between two modes scores
    1/2, not a distance.

    Args:
        data: the mixture (its ``centers`` and ``std``).
        mode: the component, ``0 .. 7``.
    """

    def __init__(self, data: EightGaussians, mode: int):
        super().__init__()
        if not 0 <= int(mode) < data.centers.shape[0]:
            raise ValueError(f"mode must be in 0..{data.centers.shape[0] - 1}, got {mode!r}")
        self.register_buffer("centers", data.centers.detach().clone().float())
        self.std = float(data.std)
        self.mode = int(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` -> ``[B]`` float32 (the log-likelihoods compared in float64: far from every centre they
        are large and close together)."""
        d2 = torch.cdist(x.double(), self.centers.to(x.device, torch.float64)).pow(2)  # [B, 8]
        return torch.softmax(-d2 / (2 * self.std**2), dim=1)[:, self.mode].float()


def pretrain_flow(
    model: torch.nn.Module,
    data: EightGaussians,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """Plain conditional flow matching (independent coupling, sigma 0) on the mixture.

    Returns:
        ``model``, trained in place, in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        x1 = data.sample(batch_size, g)
        x0 = torch.randn(batch_size, 2, generator=g)
        t = torch.rand(batch_size, generator=g)
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        loss = (model(t, x_t) - (x1 - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def tilted_mode_masses(data: EightGaussians, reward: ModeReward, temperature: float, n: int = 200_000,
                       seed: int = 0) -> torch.Tensor:
    """Mode masses of ``q(x) exp(temperature r(x)) / Z``, by importance weighting ``n`` draws from ``q``.

    Returns:
        ``[8]`` float64 probabilities; the ORW-CFM target after one round of weighted training.
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 8, (n,), generator=g)
    x = data.centers[idx] + data.std * torch.randn(n, 2, generator=g)
    logw = temperature * reward(x).double()
    w = torch.exp(logw - logw.max())
    masses = torch.zeros(8, dtype=torch.float64).index_add_(0, idx, w)
    return masses / masses.sum()


def reference_ot_coupling(x_0, x_1, weights, generator=None):
    """The published trainer's pairing, reproduced to measure it: torchcfm's exact-OT
    ``sample_plan`` redraws ``(x_0, x_1)`` pairs with replacement and reorders ``x_1``,
    while the weights are returned in their original order (so they no longer match).
    """
    from torchcfm.optimal_transport import OTPlanSampler

    x0_new, x1_new = OTPlanSampler(method="exact").sample_plan(x_0, x_1)
    return x0_new, x1_new, weights


def finetune_eight_gaussians(
    pretrained: torch.nn.Module,
    data: EightGaussians,
    reward: ModeReward,
    *,
    alpha: float,
    epochs: int = 15,
    steps_per_epoch: int = 20,
    eval_samples: int = 2000,
    savedir: str,
    **config,
) -> dict:
    """Fine-tune a copy of ``pretrained`` with :class:`ORWCFMTrainer` and measure the result.

    Args:
        pretrained: the flow from :func:`pretrain_flow` (not modified).
        data: the mixture (for mode masses). reward: the rewarded mode.
        alpha: ``w2_coefficient``.
        epochs, steps_per_epoch: training length.
        eval_samples: samples drawn from the final policy to measure it.
        savedir: where the trainer's CSV goes.
        **config: further trainer config keys (defaults otherwise).

    Returns:
        dict with ``reward`` (mean), ``diversity`` (mean pairwise distance), ``mode_masses`` (``[8]``
        list, nearest-centre assignment) of ``eval_samples`` final samples, and ``history``.
    """
    import copy

    from orwcfm_fast.metrics import mean_pairwise_distance, mode_histogram
    from orwcfm_fast.trainer import ORWCFMTrainer

    cfg = {"sample_shape": (2,), "reward": reward, "w2_coefficient": alpha, "savedir": savedir, **config}
    trainer = ORWCFMTrainer(copy.deepcopy(pretrained), cfg, "cpu")
    history = trainer.train(epochs, steps_per_epoch)
    samples = trainer.sample(eval_samples)
    return {
        "reward": float(reward(samples).mean()),
        "diversity": float(mean_pairwise_distance(samples)),
        "mode_masses": [float(m) for m in mode_histogram(samples, data.centers)],
        "history": history,
    }
