"""The training objectives (config ``objective``) through the trainer, against float64 computations written here.

Each objective's loss, metrics and parameter gradient, as the trainer makes them (``sample_batch``, ``_weights``,
``compute_loss``, ``loss.backward()``), are checked against a float64 computation of this file, written from the
formulas and not from :mod:`orwcfm_fast.objectives`:

- ORW-CFM-W2: ``mean_i (w_i fm_i + alpha w2_i)``, ``w = B softmax(temperature r)`` (config ``weight_normalization``
  ``"batch"``);
- ADRPO: ``mean_i (w_i fm_i + max(alpha - A_i, 0) w2_i)``;
- offline-rwr: ORW-CFM-W2's loss on a batch of its fixed set;
- DiffusionNFT: transcribed from its script (``scripts/train_nft_sd3.py`` of NVlabs/DiffusionNFT, the loss of its
  training loop) in the script's own convention (``x0`` data, ``xt = (1 - t) x0 + t noise``, prediction
  ``noise - x0``), fed ours (``x_1`` data, ``x_t = t x_1 + (1 - t) x_0``, ``v = x_1 - x_0``): ``x0 = x_1``,
  ``t_script = 1 - t``, ``prediction = -v``.

Advantages come from a numpy transcription of DiffusionNFT's ``PerPromptStatTracker(global_std=True)`` (its
``flow_grpo/stat_tracking.py``), then the clip. The random draws are replayed from a copy of the trainer's generator
state in the engine's order (``compute_loss``'s ``x_0``; ``draw_path``'s extra ``x_0`` for ``loss_timesteps > 1``,
the times, the path noise for ``sigma > 0``), the exact-OT pairing by brute force over all permutations.

Models: (a) a pixel MLP on samples of shape (1, 5, 3), (b) a conditional MLP (config ``prompt_encoder``) on (3,),
both in float64 (the default dtype is float64 for their tests, so the trainer draws and runs in float64), (c) the
tiny SD3 pipeline with LoRA and classifier-free guidance (4.5, cfg_mode guided) in float32, its loss velocities
``v_u + s (v_c - v_u)`` recomputed from separate transformer calls per role.

Also: exact resume per objective (pixel; pipeline: diffusion-nft and offline-rwr), DiffusionNFT's decay schedule and
old-policy EMA, offline-rwr's fixed set, ``updates_per_batch``, the forward/backward counts (per step, history, CSV,
totals across a resume), the configuration errors.
"""

from __future__ import annotations

import copy
import csv
import itertools
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.config import ConfigError
from orwcfm_fast.interrupt import TrainingInterrupted
from orwcfm_fast.objectives import advantages
from orwcfm_fast.objectives import offline_rwr as offline_module
from orwcfm_fast.objectives.adrpo import adrpo_coefficients
from orwcfm_fast.objectives.diffusion_nft import nft_decay

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

OBJECTIVES = ("orw-cfm-w2", "adrpo", "offline-rwr", "diffusion-nft")
PROMPTS = ["a dog", "a red cat", "a tree", "a blue car", "a boat"]

# Tolerances of the trainer against the float64 computations (measured worst cases in the comments).
# float64 models: everything is float64 but the rewards, which are float32 by the trainer's contract, and what it
# derives from them in float32 (the weights' softmax, the advantages): each a few float32 ulps (~1e-7 relative).
# The loss is linear in the weights and Lipschitz in the advantages (ADRPO's coefficients, NFT's r), so loss,
# metrics and gradient move by ~1e-7 relative: measured at most 7.6e-8 (of the largest gradient element). 2e-6
# leaves a margin of 25; every mutation in the report moved them by more than 1e-3.
F64_RTOL = 2e-6
# float32 pipeline: the trainer runs each guided velocity as one 2B transformer batch, this file as two B batches,
# and the float32 matmuls round differently (~1e-7 relative per velocity). Measured worst: 2.2e-6 on the W2 metric
# (a mean of squared differences of two close velocities: cancellation), 2.0e-6 on the gradient, 5.5e-8 on the loss.
PIPE_RTOL = 5e-5


# ------------------------------------------------------------------------------------------------ models


class MLPVelocity(torch.nn.Module):
    """``v(t, x, *cond)``: an MLP on the flattened sample, the time and the conditioning (odd widths)."""

    def __init__(self, shape, cond_dim=0, hidden=11):
        super().__init__()
        dim = int(np.prod(shape))
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1 + cond_dim, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, t, x, *cond):
        return self.net(torch.cat([x.flatten(1), t[:, None], *cond], dim=1)).view(x.shape)


PIXEL_SHAPE = (1, 5, 3)
COND_SHAPE = (3,)


def _table(rows, cols, seed):
    """A fixed float64 ``[rows, cols]`` table (a prompt's embedding or target point), the same in every call."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pixel_reward(x):
    """A linear reward of the pixels: well spread over a batch."""
    direction = torch.linspace(-1.0, 1.3, x[0].numel(), dtype=x.dtype)
    return (x.flatten(1) * direction).sum(1)


def encode_prompts(prompts):
    embed = _table(len(PROMPTS), 5, 5)
    return torch.stack([embed[PROMPTS.index(p)] for p in prompts]).to(torch.get_default_dtype())


def prompt_reward(x, prompts):
    """Closeness to the prompt's target point."""
    target = _table(len(PROMPTS), 3, 6)
    targets = torch.stack([target[PROMPTS.index(p)] for p in prompts]).to(x.dtype)
    return -((x - targets) ** 2).sum(1)


def module_trainer(tmp_path, kind, objective, **overrides):
    """A trainer on (a) ``kind="pixel"`` or (b) ``kind="conditional"``, built in the current default dtype."""
    torch.manual_seed(0)
    cfg = {"objective": objective, "batch_size": 6, "ode_steps": 2, "seed": 3, "warmup_steps": 0,
           "learning_rate": 1e-2, "grad_clip": None, "weight_normalization": "batch", "temperature": 0.7,
           "w2_coefficient": 0.6, "loss_timesteps": 2, "sigma": 0.05, "advantage_clip": 1.5, "nft_beta": 0.7,
           "offline_samples": 10, "savedir": str(tmp_path), "handle_signals": False}
    if kind == "pixel":
        cfg.update(sample_shape=PIXEL_SHAPE, reward=pixel_reward, coupling="exact_ot")
        model = MLPVelocity(PIXEL_SHAPE)
    else:
        cfg.update(sample_shape=COND_SHAPE, reward=prompt_reward, prompts=PROMPTS, prompt_encoder=encode_prompts,
                   images_per_prompt=2)
        model = MLPVelocity(COND_SHAPE, cond_dim=5)
    cfg.update(overrides)
    return ORWCFMTrainer(model, cfg)


@pytest.fixture(autouse=True)
def default_dtype(request):
    """float64 for the module models (the trainer then draws and runs in float64); float32 for the pipelines."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if "sd3" in request.fixturenames else torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def sd3(tiny_dir):
    """The tiny SD3 pipeline, loaded once (tests take a deep copy: LoRA adapts the transformer in place)."""
    pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
    pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_dir("sd3"), dtype=torch.float32)


class RedReward:
    """Mean red minus mean blue of the decoded images."""

    def __call__(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def pipeline_trainer(sd3, tmp_path, objective, **overrides):
    from orwcfm_fast.flows.tiny import TINY_SIZE

    cfg = {"objective": objective, "prompts": PROMPTS[:3], "reward": RedReward(), "resolution": TINY_SIZE,
           "guidance_scale": 4.5, "ode_steps": 2, "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2,
           "max_sequence_length": 16, "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "grad_clip": None,
           "weight_normalization": "batch", "temperature": 1.0, "w2_coefficient": 0.6, "advantage_clip": 1.5,
           "nft_beta": 0.7, "offline_samples": 4, "savedir": str(tmp_path), "handle_signals": False}
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cfg_free's "guidance_scale is not used"
        return ORWCFMTrainer(copy.deepcopy(sd3), cfg, "cpu")


def role_parameters(trainer):
    """``(policy, last policy, reference)`` parameter lists (the reference: None for LoRA, its base is fixed)."""
    roles = getattr(trainer.models, "roles", None)
    if roles is not None:
        return roles.trainable_parameters(), roles.last_policy_parameters(), None
    return (list(trainer.net_model.parameters()), list(trainer.last_policy.parameters()),
            list(trainer.ref_model.parameters()))


def separate_roles(trainer, scale=0.05):
    """Move the policy and the last policy apart from each other and from the reference (seeded)."""
    gen = torch.Generator().manual_seed(17)
    policy, last, _ = role_parameters(trainer)
    with torch.no_grad():
        for params in (policy, last):
            for p in params:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


# ------------------------------------------------------------------------------------------------ float64 oracles


def tracker_advantages(prompts, rewards):
    """numpy transcription of DiffusionNFT's ``PerPromptStatTracker(global_std=True).update`` on a fresh tracker:
    each reward minus its prompt's mean, over the std (ddof 0) of all rewards, plus 1e-4."""
    prompts = np.array(prompts)
    rewards = np.array(rewards, dtype=np.float64)
    out = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        out[prompts == prompt] = (prompt_rewards - mean) / std
    return out


def expected_advantages(rewards, group, clip):
    """The clipped advantages of ``rewards`` (groups of ``group`` consecutive rows; None: one group), float64."""
    b = rewards.shape[0]
    labels = [str(i // (group or b)) for i in range(b)]
    a = tracker_advantages(labels, rewards.double().cpu().numpy())
    return torch.from_numpy(a).clamp(-clip, clip)


def return_decay(step, decay_type):
    """DiffusionNFT's ``return_decay`` (scripts/train_nft_sd3.py), transcribed."""
    if decay_type == 0:
        flat_steps, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat_steps, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat_steps, uprate, uphold = 75, 0.0075, 0.999
    else:
        raise AssertionError(decay_type)
    if step < flat_steps:
        return 0.0
    return min((step - flat_steps) * uprate, uphold)


def ot_permutation(x_0, x_1):
    """``perm`` minimising ``sum_j ||x_0[perm[j]] - x_1[j]||^2``, by trying every permutation (B <= 7)."""
    cost = torch.cdist(x_0.flatten(1).double(), x_1.flatten(1).double()).pow(2).numpy()
    b = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(b))))
    totals = cost[perms, np.arange(b)].sum(1)
    return torch.from_numpy(perms[int(np.argmin(totals))])


def replay_path(state, x_1, cfg, coupling="independent"):
    """The loss's draws replayed from the generator state ``state`` taken before ``compute_loss``, in float64.

    Returns ``(x_0, t, noise)`` of the ``k B`` rows (``k = loss_timesteps``; rows ``j B + i`` are sample ``i``).
    """
    gen = torch.Generator().set_state(state)
    dtype, shape = x_1.dtype, x_1.shape
    b, k = shape[0], cfg["loss_timesteps"]
    x_0 = torch.randn(shape, generator=gen, dtype=dtype)
    if coupling == "exact_ot":
        x_0 = x_0[ot_permutation(x_0, x_1)]
    if k > 1:
        x_0 = torch.cat([x_0, torch.randn((b * (k - 1), *shape[1:]), generator=gen, dtype=dtype)])
    t = torch.rand(b * k, generator=gen, dtype=dtype)
    noise = torch.randn((b * k, *shape[1:]), generator=gen, dtype=dtype) if cfg["sigma"] > 0 else None
    return x_0.double(), t.double(), None if noise is None else noise.double()


def expected_loss(objective, cfg, x_0, x_1, t, noise, rewards, group, velocity, policy_params):
    """The float64 loss, metrics and policy gradient of ``objective`` on a coupled batch.

    Args:
        x_0, t, noise: from :func:`replay_path` (``k B`` rows). x_1: ``[B, ...]`` samples. rewards: ``[B]``.
        group: samples per prompt group (None: the batch). velocity: ``(role, t, x_t, grad) -> float64 v`` for
        ``"policy"``, ``"old_policy"``, ``"reference"``. policy_params: what the gradient is taken in.
    """
    k = cfg["loss_timesteps"]
    alpha, clip, b = cfg["w2_coefficient"], cfg["advantage_clip"], x_1.shape[0]
    x_1 = x_1.double().repeat((k,) + (1,) * (x_1.ndim - 1))
    tb = t.view((-1,) + (1,) * (x_1.ndim - 1))
    x_t = tb * x_1 + (1 - tb) * x_0 + (cfg["sigma"] * noise if noise is not None else 0.0)
    u_t = x_1 - x_0
    dims = tuple(range(1, x_1.ndim))
    r = rewards.double()
    weights = (b * torch.softmax(cfg["temperature"] * r, 0)).repeat(k)
    adv = expected_advantages(rewards, group, clip).repeat(k)
    v = velocity("policy", t, x_t, True)
    metrics = {}
    if objective == "diffusion-nft":
        with torch.no_grad():
            old = velocity("old_policy", t, x_t, False)
            ref = velocity("reference", t, x_t, False) if alpha > 0 else None
        beta = cfg["nft_beta"]
        # the script's variables: x0 data, xt, t from data (0) to noise (1), predictions of noise - x0
        x0, xt, t_s = x_1, x_t, (1 - t).view(tb.shape)
        forward_prediction, old_prediction = -v, -old
        advantages_clip = torch.clamp(adv, -clip, clip)
        normalized_advantages_clip = (advantages_clip / clip) / 2.0 + 0.5
        r_nft = torch.clamp(normalized_advantages_clip, 0, 1)
        positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
        implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
        x0_prediction = xt - t_s * positive_prediction
        with torch.no_grad():
            weight_factor = torch.abs(x0_prediction - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
        positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)
        negative_x0_prediction = xt - t_s * implicit_negative_prediction
        with torch.no_grad():
            negative_weight_factor = (
                torch.abs(negative_x0_prediction - x0).mean(dim=dims, keepdim=True).clip(min=0.00001))
        negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)
        ori_policy_loss = r_nft * positive_loss / beta + (1.0 - r_nft) * negative_loss / beta
        policy_loss = (ori_policy_loss * clip).mean()
        loss = policy_loss
        metrics["fm_loss"] = policy_loss.detach()
        metrics["nft/probability"] = r_nft.mean()
        metrics["nft/old_deviation"] = ((v.detach() - old) ** 2).mean()
        if ref is not None:
            kl_div_loss = ((forward_prediction - (-ref)) ** 2).mean(dim=dims)
            loss = loss + alpha * torch.mean(kl_div_loss)
            metrics["w2_loss"] = kl_div_loss.mean().detach()
        else:
            metrics["w2_loss"] = torch.zeros((), dtype=torch.float64)
    else:
        with torch.no_grad():
            ref = velocity("reference", t, x_t, False)
        fm = ((v - u_t) ** 2).mean(dim=dims)
        w2 = ((v - ref) ** 2).mean(dim=dims)
        coefficient = (alpha - adv).clamp(min=0.0) if objective == "adrpo" else torch.full_like(w2, alpha)
        loss = (weights * fm + coefficient * w2).mean()
        metrics["fm_loss"] = (weights * fm).mean().detach()
        metrics["w2_loss"] = w2.mean().detach()
        if objective == "adrpo":
            metrics["w2_coefficient"] = coefficient.mean()
    metrics["total_loss"] = loss.detach()
    grads = torch.autograd.grad(loss, policy_params)
    return loss.detach(), metrics, [g.detach() for g in grads]


def module_velocity(trainer, prompts):
    """``velocity`` of :func:`expected_loss` for module models: float64 copies of the three roles.

    Returns ``(velocity, policy parameters)``.
    """
    policy = copy.deepcopy(trainer.net_model).double()
    old = copy.deepcopy(trainer.last_policy).double()
    ref = copy.deepcopy(trainer.ref_model).double()
    k = trainer.config["loss_timesteps"]
    cond = () if prompts is None else (encode_prompts(list(prompts) * k).double(),)
    models = {"policy": policy, "old_policy": old, "reference": ref}

    def velocity(role, t, x_t, grad):
        with torch.set_grad_enabled(grad):
            return models[role](t, x_t, *cond)

    return velocity, list(policy.parameters())


def pipeline_velocity(trainer, prompts, guided=True):
    """``velocity`` of :func:`expected_loss` for the LoRA pipeline: per role, ``v_u + s (v_c - v_u)`` from two
    separate float32 transformer calls (the trainer batches them as one), then float64; ``v_c`` if not ``guided``."""
    flow, s = trainer.models.flow, trainer.models.flow.guidance_scale
    k = trainer.config["loss_timesteps"]
    cond = flow.encode(list(prompts) * k)
    role_of = {"policy": "policy", "old_policy": "last_policy", "reference": "reference"}

    def velocity(role, t, x_t, grad):
        x = x_t.float()
        neg = tuple(e.expand(x.shape[0], *e.shape[1:]) for e in flow.encode([""]))
        with torch.set_grad_enabled(grad), trainer.models.roles.role(role_of[role]):
            v_c = flow.transformer_velocity(t.float(), x, cond, trainer.net_model)
            if not guided:
                return v_c.double()
            v_u = flow.transformer_velocity(t.float(), x, neg, trainer.net_model)
        return (v_u + s * (v_c - v_u)).double()

    return velocity, trainer.models.trainable_parameters()


def assert_close_rel(actual, expected, rtol, name):
    """``|actual - expected| <= rtol * max|expected|`` (float64), with the worst error in the message."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    relative = err / max(scale, 1e-300)
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g} (relative {relative:.3g})"


def check_loss_through_trainer(trainer, velocity_of, rtol):
    """One batch through the trainer's ``sample_batch``, ``_weights``, ``compute_loss`` and ``backward``, against
    :func:`expected_loss`. Returns the batch's rewards (for checks of what the batch covered)."""
    cfg = trainer.config
    samples, rewards = trainer.sample_batch()
    prompts = trainer.last_prompts
    weights = trainer._weights(rewards)
    state = trainer.generator.get_state()
    velocity, params = velocity_of(trainer, prompts)
    loss, metrics = trainer.compute_loss(samples, weights)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    got_grads = [p.grad for p in trainer.models.trainable_parameters()]
    coupling = cfg["coupling"] if isinstance(cfg["coupling"], str) else "independent"
    x_0, t, noise = replay_path(state, samples, cfg, coupling)
    group = cfg["images_per_prompt"] if prompts is not None else None
    want_loss, want_metrics, want_grads = expected_loss(cfg["objective"], cfg, x_0, samples, t, noise, rewards, group,
                                                        velocity, params)
    assert float(want_loss) != 0.0
    if cfg["w2_coefficient"] > 0:  # the roles differ: every term is at work
        assert float(want_metrics["w2_loss"]) > 1e-6
    if "nft/old_deviation" in want_metrics:
        assert float(want_metrics["nft/old_deviation"]) > 1e-6
    assert_close_rel(loss, want_loss, rtol, "loss")
    for name, value in want_metrics.items():
        if float(value) == 0:  # NFT's w2_loss without a reference term: exactly 0
            assert float(metrics[name]) == 0, name
        else:
            assert_close_rel(metrics[name], value, rtol, name)
    assert all(g is not None for g in got_grads)
    assert_close_rel(flat(got_grads), torch.cat([g.flatten() for g in want_grads]), rtol, "gradient")
    return rewards


# ------------------------------------------------------------------------------------------------ loss and gradient


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind", ["pixel", "conditional"])
def test_module_loss_and_gradient_match_float64(tmp_path, kind, objective):
    """(a) pixel (exact-OT coupling) and (b) conditional (prompt groups of 2) models, loss_timesteps 2, sigma 0.05,
    three distinct roles: the trainer's loss, metrics and gradient equal the float64 computation."""
    trainer = module_trainer(tmp_path, kind, objective)
    separate_roles(trainer)
    rewards = check_loss_through_trainer(trainer, module_velocity, F64_RTOL)
    group = 2 if kind == "conditional" else None
    adv = expected_advantages(rewards, group, 1.5)
    if objective == "adrpo":  # some W2 coefficients max(0.6 - A, 0) at the floor, some above alpha
        assert (adv > 0.6).any() and (adv < 0).any()
    if objective == "diffusion-nft":  # r = A / 3 + 1/2 on both sides of 1/2
        assert (adv > 0.3).any() and (adv < -0.3).any()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pipeline_loss_and_gradient_match_float64(sd3, tmp_path, objective):
    """(c) the tiny SD3 pipeline, LoRA, guidance 4.5 in the loss (cfg_mode guided), prompt groups of 2."""
    trainer = pipeline_trainer(sd3, tmp_path, objective)
    separate_roles(trainer)
    check_loss_through_trainer(trainer, pipeline_velocity, PIPE_RTOL)


def test_nft_without_reference_term_skips_the_reference(tmp_path):
    """w2_coefficient 0: DiffusionNFT's loss is the policy loss alone and the reference never runs."""
    trainer = module_trainer(tmp_path, "pixel", "diffusion-nft", w2_coefficient=0.0)
    separate_roles(trainer)
    check_loss_through_trainer(trainer, module_velocity, F64_RTOL)
    assert trainer.compute.total["reference"] == 0 and trainer.compute.total["old_policy"] == 12


# ------------------------------------------------------------------------------------------------ advantages, decay


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group", [None, 1, 3, 4])
def test_advantages_are_diffusion_nfts_per_prompt_estimate(dtype, group):
    """advantages() = PerPromptStatTracker(global_std=True) (per-prompt mean, std of all rewards, ddof 0, + 1e-4)
    with one prompt per group, then the clip (0.9: some are clipped); float32 rewards to float32 round-off."""
    gen = torch.Generator().manual_seed(1)
    rewards = (torch.randn(12, generator=gen, dtype=torch.float64) * 3 + 20).to(dtype)
    size = group or 12
    prompts = [PROMPTS[i // size % len(PROMPTS)] + str(i // size) for i in range(12)]  # distinct per group
    want = np.clip(tracker_advantages(prompts, rewards.double().numpy()), -0.9, 0.9)
    got = advantages(rewards, group, 0.9)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # float32: reward ~20, std ~3: a few ulps of 20 / 3
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=tol)
    if group != 1:
        assert (got.abs() == 0.9).any() and (got.abs() < 0.9).any()
    else:  # singleton groups: every advantage is 0
        assert not got.any()
    alpha = 0.4
    coefficients = adrpo_coefficients(alpha, got)
    a = got.numpy()  # in the advantages' dtype, as the coefficients are: exact
    np.testing.assert_array_equal(coefficients.numpy(), np.maximum(a.dtype.type(alpha) - a, a.dtype.type(0)))
    if group != 1:
        assert (coefficients == 0).any() and (coefficients > alpha).any()


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_nft_decay_is_the_scripts_return_decay(decay_type):
    for step in (0, 1, 74, 75, 76, 500, 10**5):
        assert nft_decay(step, decay_type) == pytest.approx(return_decay(step, decay_type), rel=1e-15, abs=0)


@pytest.mark.parametrize("decay_type", [1, 2])
def test_nft_old_policy_is_an_ema_after_each_epoch(tmp_path, decay_type):
    """After an epoch the last policy is decay * old + (1 - decay) * policy, decay = return_decay(optimiser steps
    so far); global_step starts at 80 so type 2 is past its 75 flat steps (decay 0.0525; type 1: 0.082)."""
    trainer = module_trainer(tmp_path, "pixel", "diffusion-nft", nft_decay_type=decay_type)
    separate_roles(trainer, 0.2)
    trainer.global_step = 80
    old = flat(trainer.last_policy.parameters()).clone()
    trainer.train(1, 2)
    decay = return_decay(82, decay_type)
    assert decay > 0.05
    policy = flat(trainer.net_model.parameters())
    want = decay * old + (1 - decay) * policy
    assert float((old - policy).abs().max()) > 0.1  # the blend is not close to either end
    torch.testing.assert_close(flat(trainer.last_policy.parameters()), want, rtol=0, atol=1e-14)


def test_nft_old_adapter_is_an_ema_on_the_pipeline(sd3, tmp_path):
    """The LoRA pipeline: the old-policy adapter becomes decay * old + (1 - decay) * policy adapter (decay 0.301
    with type 1 after 301 steps); the reference (adapters off) is untouched. float32 lerp: 1e-6 absolute."""
    trainer = pipeline_trainer(sd3, tmp_path, "diffusion-nft", nft_decay_type=1)
    separate_roles(trainer, 0.2)
    trainer.global_step = 300
    policy_params, last_params, _ = role_parameters(trainer)
    old = flat(last_params).clone()
    trainer.train(1, 1)
    decay = return_decay(301, 1)
    want = decay * old.double() + (1 - decay) * flat(policy_params).double()
    assert float((old - flat(policy_params)).abs().max()) > 0.1
    torch.testing.assert_close(flat(last_params).double(), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ offline-rwr


def euler_float64(model, noise, cond, steps):
    """``x_1`` of ``dx/dt = model(t, x, *cond)`` from ``noise`` by Euler on the uniform grid, in float64."""
    x = noise.double()
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, dtype=torch.float64)
        with torch.no_grad():
            x = x + model(t, x, *cond) / steps
    return x


def test_offline_set_is_one_draw_of_the_pretrained_model_and_is_never_refreshed(tmp_path):
    """offline_samples 10 with batches of 6: 12 samples (2 whole batches), drawn once with the documented seeds (the
    run's seed + 7777777 for the noise, + 7777778 for the prompts) from the pretrained model; training on it moves the
    policy, never the last policy nor the set; batches are whole prompt groups; the draw's sampling passes are
    counted once (first epoch)."""
    trainer = module_trainer(tmp_path, "conditional", "offline-rwr")
    objective = trainer.objective
    pretrained = copy.deepcopy(trainer.ref_model)
    batches = []
    real_make_samples = objective.make_samples

    def make_samples(engine, noise, prompts):
        out = real_make_samples(engine, noise, prompts)
        batches.append((out[0].clone(), list(out[3])))
        return out

    objective.make_samples = make_samples
    start = flat(trainer.net_model.parameters()).clone()
    trainer.train(2, 3)
    assert offline_module._NOISE_SEED == 7_777_777 and offline_module._PROMPT_SEED == 7_777_778

    # the set: an independent draw with those seeds
    noise_gen = torch.Generator().manual_seed(3 + 7_777_777)
    prompt_gen = torch.Generator().manual_seed(3 + 7_777_778)
    want_samples, want_prompts = [], []
    for _ in range(2):
        idx = torch.randint(len(PROMPTS), (3,), generator=prompt_gen).tolist()
        prompts = [PROMPTS[i] for i in idx for _ in range(2)]
        noise = torch.randn((6, *COND_SHAPE), generator=noise_gen)
        want_samples.append(euler_float64(pretrained, noise, (encode_prompts(prompts),), 2))
        want_prompts += prompts
    want_samples = torch.cat(want_samples)
    assert objective.samples.shape == (12, *COND_SHAPE) and objective.prompts == want_prompts
    torch.testing.assert_close(objective.samples, want_samples, rtol=0, atol=1e-12)  # float64, 2 Euler steps
    torch.testing.assert_close(objective.rewards, prompt_reward(want_samples, want_prompts).float(), rtol=0, atol=0)

    # never refreshed: the set is the one drawn first, the last policy is still the pretrained model
    set_before = objective.samples
    assert torch.equal(flat(trainer.last_policy.parameters()), flat(pretrained.parameters()))
    assert not torch.equal(flat(trainer.net_model.parameters()), start)
    trainer.train(1, 3)
    assert objective.samples is set_before

    # batches: 3 whole groups of 2 rows of the set, distinct groups, the set's prompts
    assert len(batches) == 9
    for samples, prompts in batches:
        rows = [int(torch.nonzero((objective.samples == s).all(1)).flatten()[0]) for s in samples]
        groups = [rows[i] // 2 for i in range(0, 6, 2)]
        assert rows == [g * 2 + j for g in groups for j in range(2)] and len(set(groups)) == 3
        assert prompts == [objective.prompts[r] for r in rows]

    # compute: the set's draw (12 samples x 2 Euler steps) counted in the first epoch only
    per_step = [h["forwards/sampling"] for h in trainer.history]
    assert per_step == [12 * 2 / 3, 0.0, 0.0]
    assert trainer.compute.total["sampling"] == 24


def test_offline_set_size_rounds_up_to_whole_batches(tmp_path):
    for offline_samples, size in ((None, 48), (1, 6), (6, 6), (7, 12)):
        trainer = module_trainer(tmp_path, "pixel", "offline-rwr", offline_samples=offline_samples)
        assert trainer.objective.size(6) == size


# ------------------------------------------------------------------------------------------------ updates_per_batch


def test_updates_per_batch_steps_on_one_batch_with_fresh_noise_and_times(tmp_path):
    """updates_per_batch 3: three optimiser steps per sampled batch (global_step), each on the same samples with
    fresh x_0 and times; the epoch's metrics are the means over all updates; sampling is counted once per batch."""
    trainer = module_trainer(tmp_path, "pixel", "adrpo", updates_per_batch=3, coupling="independent")
    calls = []  # (x_0, x_1, t, loss) per update
    real_loss, real_times = trainer.objective.loss, trainer._loss_times

    def loss(ctx, x_0, x_1, per_sample, cond=()):
        out = real_loss(ctx, x_0, x_1, per_sample, cond)
        calls[-1].update(x_0=x_0.clone(), x_1=x_1.clone(), loss=float(out[0].detach()))
        return out

    def times(n, like):
        t = real_times(n, like)
        calls.append({"t": t.clone()})
        return t

    trainer.objective.loss, trainer._loss_times = loss, times
    history = trainer.train(1, 2)
    assert trainer.global_step == 6 and trainer.scheduler.last_epoch == 6 and len(calls) == 6
    for batch in (calls[:3], calls[3:]):
        assert all(torch.equal(c["x_1"], batch[0]["x_1"]) for c in batch)
        for a, b in itertools.combinations(batch, 2):
            assert not torch.isclose(a["x_0"], b["x_0"]).any() and not torch.isclose(a["t"], b["t"]).any()
    assert not torch.equal(calls[0]["x_1"], calls[3]["x_1"])
    # float32 metric sums: the mean of 6 O(1) values to 1e-6
    assert history[0]["total_loss"] == pytest.approx(np.mean([c["loss"] for c in calls]), rel=1e-6)
    assert history[0]["forwards/sampling"] == 6 * 2 and history[0]["forwards/policy"] == 3 * 6 * 2

    calls.clear()
    out = trainer.training_step()
    assert trainer.global_step == 9 and len(calls) == 3
    assert out["total_loss"] == pytest.approx(np.mean([c["loss"] for c in calls]), rel=1e-12)
    assert out["forwards/sampling"] == 6 * 2 and out["forwards/policy"] == out["backwards"] == 3 * 6 * 2


# ------------------------------------------------------------------------------------------------ forward counts


def count_passes(trainer, modules):
    """Rows through each of ``modules`` ``{name: module}`` (forward pre-hooks), by the trainer's forward role in
    progress (``"sampling"`` outside the loss's forwards): ``counts[(role, name)]``."""
    counts = {}
    current = ["sampling"]
    real_forward = trainer._forward

    def forward(role, *args, **kwargs):
        current[0] = role
        try:
            return real_forward(role, *args, **kwargs)
        finally:
            current[0] = "sampling"

    def hook(name):
        def pre(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
            key = (current[0], name)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return pre

    trainer._forward = forward
    for name, module in modules.items():
        module.register_forward_pre_hook(hook(name), with_kwargs=True)
    return counts


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_forward_counts_on_the_pixel_model(tmp_path, objective):
    """Per step: sampling B * nfe (midpoint, 3 steps: 6), each loss role B * loss_timesteps (x updates_per_batch 2)
    through its own module, backwards = policy; the counts are the rows the modules really ran; history per step,
    CSV, and totals."""
    trainer = module_trainer(tmp_path, "pixel", objective, ode_solver="midpoint", ode_steps=3, updates_per_batch=2,
                             offline_samples=12, run_name="counts")
    counts = count_passes(trainer, {"net_model": trainer.net_model, "ref_model": trainer.ref_model,
                                    "last_policy": trainer.last_policy})
    b, nfe, k, updates, steps = 6, 6, 2, 2, 2
    trainer.train(2, steps)
    loss_rows = 2 * steps * updates * b * k  # two epochs
    want = {"policy": loss_rows, "reference": loss_rows,
            "old_policy": loss_rows if objective == "diffusion-nft" else 0,
            "sampling": (12 if objective == "offline-rwr" else 2 * steps * b) * nfe}
    assert trainer.compute.total == want and trainer.compute.total_backwards == loss_rows
    module_of = {"policy": "net_model", "reference": "ref_model", "old_policy": "last_policy",
                 "sampling": "last_policy"}
    assert counts == {(role, module_of[role]): n for role, n in want.items() if n}  # nothing ran uncounted
    rows = read_csv(Path(tmp_path) / "counts_metrics.csv")
    total = 0.0
    for epoch, (h, row) in enumerate(zip(trainer.history, rows)):
        sampling = (12 * nfe / steps if epoch == 0 else 0.0) if objective == "offline-rwr" else b * nfe
        per_step = {"forwards/sampling": sampling, "forwards/policy": updates * b * k,
                    "forwards/reference": updates * b * k,
                    "forwards/old_policy": updates * b * k if objective == "diffusion-nft" else 0.0,
                    "backwards": updates * b * k}
        per_step["forwards"] = sum(v for key, v in per_step.items() if key.startswith("forwards/"))
        total += per_step["forwards"] * steps
        per_step["forwards_total"] = total
        for key, value in per_step.items():
            assert h[key] == value and float(row[key]) == value, key


def pipeline_modules(trainer):
    return {"transformer": trainer.net_model}


@pytest.mark.parametrize("cfg_mode, passes", [("guided", 2), ("cfg_free", 1)])
def test_forward_counts_on_the_pipeline(sd3, tmp_path, cfg_mode, passes):
    """Guidance 4.5: a guided velocity is 2 transformer passes per sample (cfg_mode guided), 1 without (cfg_free).
    DiffusionNFT, one step: sampling B * nfe * passes, policy / reference / old policy B * passes each; the counts
    are the transformer rows that really ran in each role."""
    trainer = pipeline_trainer(sd3, tmp_path, "diffusion-nft", cfg_mode=cfg_mode)
    counts = count_passes(trainer, pipeline_modules(trainer))
    out = trainer.training_step()
    b, nfe = 4, 2
    want = {"sampling": b * nfe * passes, "policy": b * passes, "reference": b * passes, "old_policy": b * passes}
    assert {role: counts[(role, "transformer")] for role in want} == want
    assert {role: out[f"forwards/{role}"] for role in want} == want
    assert out["backwards"] == b * passes and out["forwards"] == sum(want.values())


def test_nft_old_policy_is_the_loss_velocity_under_sampling_only(sd3, tmp_path):
    """cfg_mode sampling_only samples guided and trains the conditional velocity: DiffusionNFT's old policy is the
    conditional velocity too (the script runs old and new policy the same way), one pass per sample, and the loss is
    the float64 one with every role unguided. (It was the sampler's guided velocity, counted as one pass.)"""
    trainer = pipeline_trainer(sd3, tmp_path, "diffusion-nft", cfg_mode="sampling_only")
    counts = count_passes(trainer, pipeline_modules(trainer))
    out = trainer.training_step()
    assert out["forwards/old_policy"] == 4 and out["forwards/sampling"] == 4 * 2 * 2
    assert counts[("old_policy", "transformer")] == out["forwards/old_policy"]
    separate_roles(trainer)
    check_loss_through_trainer(trainer, lambda tr, p: pipeline_velocity(tr, p, guided=False), PIPE_RTOL)


# ------------------------------------------------------------------------------------------------ exact resume


def optimizer_tensors(trainer):
    state = trainer.optimizer.state_dict()["state"]
    return [v for key in sorted(state) for _, v in sorted(state[key].items())]


def snapshot(trainer):
    policy, last, ref = role_parameters(trainer)
    return {"policy": flat(policy), "last": flat(last), "ref": flat(ref) if ref is not None else None,
            "optim": optimizer_tensors(trainer), "sched": trainer.scheduler.state_dict(),
            "history": copy.deepcopy(trainer.history), "global_step": trainer.global_step, "epoch": trainer.epoch,
            "compute": trainer.compute.state(),
            "rng": (trainer.generator.get_state(), trainer.cpu_generator.get_state())}


def assert_same_run(got, want):
    for key in ("policy", "last", "ref"):
        assert (got[key] is None and want[key] is None) or torch.equal(got[key], want[key]), key
    assert len(got["optim"]) == len(want["optim"]) and all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(got["optim"], want["optim"]))
    assert got["sched"] == want["sched"] and got["global_step"] == want["global_step"]
    assert got["epoch"] == want["epoch"]
    assert all(torch.equal(a, b) for a, b in zip(got["rng"], want["rng"]))
    assert got["history"] == want["history"] and got["compute"] == want["compute"]


RESUME_OVERRIDES = {"orw-cfm-w2": {"updates_per_batch": 2}, "adrpo": {}, "offline-rwr": {"coupling": "independent"},
                    "diffusion-nft": {"nft_decay_type": 1}}


def resume_runs(make, tmp_path, epochs, steps):
    """An uninterrupted run of ``epochs`` epochs and one saved after the first epoch and resumed in a new trainer
    (the same savedir, so its CSV continues): their snapshots and CSV rows."""
    full = make(tmp_path / "full")
    full.train(epochs, steps)
    first = make(tmp_path / "run")
    first.train(1, steps)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(999)
    resumed = make(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # offline-rwr: the set drawn again must be the same (no warning)
        resumed.load_checkpoint(tmp_path / "ckpt.pt")
        resumed.train(epochs - 1, steps)
    csv_rows = (read_csv(tmp_path / "full" / "resume_metrics.csv"), read_csv(tmp_path / "run" / "resume_metrics.csv"))
    return snapshot(full), snapshot(resumed), csv_rows, (full, resumed)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_is_exact_on_the_pixel_model(tmp_path, objective):
    """Bit-identical parameters (policy, last policy, reference), optimiser and scheduler, history with its forward
    counts, CSV rows, compute totals and generator states after a resume at an epoch boundary."""
    def make(savedir):
        return module_trainer(savedir, "pixel", objective, run_name="resume", **RESUME_OVERRIDES[objective])

    want, got, (full_csv, resumed_csv), (full, resumed) = resume_runs(make, tmp_path, 3, 2)
    assert_same_run(got, want)
    assert full_csv == resumed_csv and float(resumed_csv[-1]["forwards_total"]) == sum(got["compute"]["total"].values())
    if objective == "offline-rwr":  # the set drawn again on resume is the uninterrupted run's, its passes not recounted
        assert torch.equal(resumed.objective.samples, full.objective.samples)
        assert [h["forwards/sampling"] for h in got["history"]] == [12 * 2 / 2, 0.0, 0.0]


def test_mid_epoch_resume_keeps_the_epochs_counts(tmp_path):
    """DiffusionNFT, updates_per_batch 2, stopped by SIGTERM after the first step of epoch 2 (its checkpoint holds
    the epoch's partial metric sums and forward counts) and resumed: the same run, history and CSV included."""
    def make(savedir):
        return module_trainer(savedir, "pixel", "diffusion-nft", run_name="resume", updates_per_batch=2,
                              handle_signals=True)

    full = make(tmp_path / "full")
    full.train(2, 3)
    stopped = make(tmp_path / "run")
    updates = []

    def signal_after_update_7(optimizer, args, kwargs):  # epoch 2's first batch, its first of two updates
        updates.append(1)
        if len(updates) == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped.optimizer.register_step_post_hook(signal_after_update_7)
    with pytest.raises(TrainingInterrupted) as info:
        stopped.train(2, 3)
    assert stopped.epoch == 1 and stopped.step_in_epoch == 1 and stopped.global_step == 8
    torch.manual_seed(999)
    resumed = make(tmp_path / "run")
    resumed.load_checkpoint(info.value.checkpoint)
    resumed.train(1, 3)
    assert_same_run(snapshot(resumed), snapshot(full))
    assert read_csv(tmp_path / "full" / "resume_metrics.csv") == read_csv(tmp_path / "run" / "resume_metrics.csv")


@pytest.mark.parametrize("objective", ["diffusion-nft", "offline-rwr"])
def test_resume_is_exact_on_the_pipeline(sd3, tmp_path, objective):
    """The LoRA pipeline: both adapters (DiffusionNFT's old adapter an EMA: decay type 2 from step 100, 0.195 and
    0.21), optimiser, history, generators; offline-rwr's set drawn again identically."""
    def make(savedir):
        trainer = pipeline_trainer(sd3, savedir, objective, nft_decay_type=2, run_name="resume")
        trainer.global_step = 100  # type 2's decay is 0 before step 75
        return trainer

    want, got, _, (full, resumed) = resume_runs(make, tmp_path, 2, 2)
    if objective == "diffusion-nft":  # the old adapter is a blend, neither the policy nor its start
        assert not torch.equal(want["last"], want["policy"])
    assert_same_run(got, want)
    if objective == "offline-rwr":
        assert torch.equal(resumed.objective.samples, full.objective.samples)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("objective", ["adrpo", "diffusion-nft"])
def test_advantage_objectives_refuse_weighted_ot(tmp_path, objective):
    with pytest.raises(ConfigError, match="weighted_ot.*advantages.*independent.*exact_ot"):
        module_trainer(tmp_path, "pixel", objective, coupling="weighted_ot")


@pytest.mark.parametrize("objective", ["adrpo", "diffusion-nft"])
def test_compute_loss_without_the_batchs_advantages_says_how(tmp_path, objective):
    """Weights not made by trainer._weights carry no advantages: a ValueError that names them and the fix."""
    trainer = module_trainer(tmp_path, "pixel", objective)
    samples, rewards = trainer.sample_batch()
    with pytest.raises(ValueError, match=r"needs the per-sample \['advantage'\].*_weights"):
        trainer.compute_loss(samples, torch.ones(6))
    trainer._weights(rewards)  # another batch's weights do not lend theirs either
    with pytest.raises(ValueError, match="advantage"):
        trainer.compute_loss(samples, torch.ones(6))
