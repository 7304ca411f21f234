"""What holds on tiny pipelines at real magnitudes: reward offsets, guidance, time shifts, graphs.

PickScore-sized rewards (around 22) must not switch the W2 term off; what classifier-free guidance
samples must be what the loss trains (config ``cfg_mode``); Flux-dev gets its own guidance and its
resolution-dependent shift; pipelines sample without a captured whole-ODE CUDA graph by default.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows.conventions import shift_sigma  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402
from orwcfm_fast.weighting import raw_weight_scale_warning  # noqa: E402

PROMPTS = ["a dog", "a red cat", "a tree", "a blue car"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def load(saved, family="sd35"):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(saved / family, dtype=torch.float32)


class RedReward:
    """Mean red minus mean blue of the decoded images, plus a constant ``offset`` (PickScore sits near 22)."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def __call__(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)) + self.offset


def config(tmp_path, **overrides):
    cfg = {"prompts": PROMPTS, "reward": RedReward(), "resolution": TINY_SIZE, "guidance_scale": 4.5,
           "ode_steps": 2, "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16,
           "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path),
           "handle_signals": False}
    cfg.update(overrides)
    return cfg


def lora(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.models.trainable_parameters()])


# ---------------------------------------------------------------------------------------------- reward scale


@pytest.mark.parametrize("images_per_prompt, normalization", [(2, "group"), (1, "batch")])
def test_prompted_defaults_normalise_the_weights(saved, tmp_path, images_per_prompt, normalization):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, images_per_prompt=images_per_prompt), "cpu")
    assert trainer.config["weight_normalization"] == normalization


def test_plain_models_keep_the_reference_raw_weights(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    trainer = ORWCFMTrainer(lambda_model(model), {"sample_shape": (2,), "reward": lambda x: x[:, 0],
                                                  "savedir": str(tmp_path), "batch_size": 4}, "cpu")
    assert trainer.config["weight_normalization"] == "none"


class lambda_model(torch.nn.Module):  # noqa: N801 - a velocity module v(t, x) = net(x)
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, x):
        return self.net(x)


@pytest.mark.parametrize("images_per_prompt", [2, 1])
def test_a_reward_offset_changes_nothing_under_the_defaults(saved, tmp_path, images_per_prompt):
    """r and r + 20 (a PickScore-sized offset) train the same adapters: alpha means the same at any offset.

    Three steps, so the second and third see W2 > 0 with the policy moved. The tolerance covers float32
    rounding of r + 20 (ulp 2e-6) through the standardisation / softmax; raw weights would differ by e^20.
    """
    adapters = []
    for offset in (0.0, 20.0):
        trainer = ORWCFMTrainer(load(saved), config(tmp_path / str(offset), reward=RedReward(offset),
                                                    images_per_prompt=images_per_prompt, w2_coefficient=3.0), "cpu")
        for _ in range(3):
            out = trainer.training_step()
        assert out["w2_loss"] > 0
        adapters.append(lora(trainer))
    assert adapters[0].abs().max() > 0
    torch.testing.assert_close(adapters[1], adapters[0], rtol=0, atol=2e-4 * float(adapters[0].abs().max()))


def test_raw_weights_at_preference_scale_warn_once(tmp_path):
    model = lambda_model(torch.nn.Linear(2, 2))
    reward = lambda x: 22.0 + 0.1 * x[:, 0]  # noqa: E731 - PickScore-sized
    trainer = ORWCFMTrainer(model, {"sample_shape": (2,), "reward": reward, "savedir": str(tmp_path), "batch_size": 8,
                                    "ode_steps": 2, "temperature": 0.5, "w2_coefficient": 1.0, "seed": 0}, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            trainer.training_step()
    raw = [w for w in caught if "weight_normalization" in str(w.message)]
    assert len(raw) == 1
    text = str(raw[0].message)
    mean = float(re.search(r"mean weight is ([0-9.]+(?:e[+-][0-9]+)?)", text).group(1))
    # e^(0.5 * 22) = 5.99e4, times E[e^(0.05 x_0)] of the samples (|x_0| of a few units: within 10 %). The
    # samples depend on the model's random init, so the printed value ranges over 5.9e4 .. 6.1e4 by test order
    assert "'batch'" in text and 5.4e4 < mean < 6.6e4, text


def test_raw_weights_near_scale_one_do_not_warn(tmp_path):
    model = lambda_model(torch.nn.Linear(2, 2))
    trainer = ORWCFMTrainer(model, {"sample_shape": (2,), "reward": lambda x: 0.3 * torch.tanh(x[:, 0]),
                                    "savedir": str(tmp_path), "batch_size": 8, "ode_steps": 2, "seed": 0}, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.training_step()
    assert not [w for w in caught if "weight_normalization" in str(w.message)]


def test_raw_weight_warning_names_the_effective_alpha():
    rewards = torch.tensor([21.5, 22.0, 22.7, 23.1], dtype=torch.float32)
    text = raw_weight_scale_warning(rewards, 0.5, 2.0)
    mean = sum(math.exp(0.5 * float(r)) for r in rewards.double()) / 4  # float64, by hand
    assert f"{mean:.3g}" in text and f"{2.0 / mean:.3g}" in text
    assert raw_weight_scale_warning(torch.tensor([0.1, 0.5, 0.9]), 0.5, 1.0) is None
    # a wide spread alone warns too (temperature 5 over rewards in [0, 1.2]: weights span e^6)
    assert raw_weight_scale_warning(torch.tensor([0.0, 1.2]), 5.0, 1.0) is not None
    # no overflow at any scale: the mean is computed from a logsumexp
    assert "inf" in raw_weight_scale_warning(torch.tensor([3000.0, 3001.0]), 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ cfg modes


def guided_by_hand(trainer, t, x, cond, role):
    """v_u + s (v_c - v_u) of ``role`` from two separate transformer calls (not the flow's 2B batch)."""
    flow, s = trainer.models.flow, trainer.models.flow.guidance_scale
    neg = tuple(e.expand(x.shape[0], *e.shape[1:]) for e in flow.encode([""]))
    with torch.no_grad(), trainer.models.roles.role(role):
        v_c = flow.transformer_velocity(t, x, cond, trainer.net_model)
        v_u = flow.transformer_velocity(t, x, neg, trainer.net_model)
    return v_u + s * (v_c - v_u), v_c


def moved(trainer):
    """The policy adapter moved off the reference (a step), so policy and reference differ."""
    trainer.training_step()
    with torch.no_grad():
        for p in trainer.models.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("mode", ["guided", "cfg_free", "sampling_only"])
def test_cfg_mode_sets_what_is_trained_and_what_samples(saved, tmp_path, mode):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, cfg_mode=mode), "cpu")
    moved(trainer)
    cond = trainer.models.flow.encode(["a dog", "a tree", "a dog"])
    t, x = torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, *trainer.sample_shape)
    with torch.no_grad():
        policy = trainer._policy_forward(t, x, *cond)
        ref = trainer._ref_forward(t, x, *cond)
        sampler = trainer._last_policy_forward(t, x, *cond)
        sampled_policy = trainer.models.policy_sampling_velocity()(t, x, *cond)
    pol_guided, pol_cond = guided_by_hand(trainer, t, x, cond, "policy")
    ref_guided, ref_cond = guided_by_hand(trainer, t, x, cond, "reference")
    last_guided, last_cond = guided_by_hand(trainer, t, x, cond, "last_policy")
    tol = dict(rtol=1e-5, atol=1e-5)
    want_loss = (pol_guided, ref_guided) if mode == "guided" else (pol_cond, ref_cond)
    torch.testing.assert_close(policy, want_loss[0], **tol)
    torch.testing.assert_close(ref, want_loss[1], **tol)
    want_sampler = (last_cond, pol_cond) if mode == "cfg_free" else (last_guided, pol_guided)
    torch.testing.assert_close(sampler, want_sampler[0], **tol)
    torch.testing.assert_close(sampled_policy, want_sampler[1], **tol)
    assert not torch.allclose(pol_guided, pol_cond, **tol)  # guidance 4.5 does change the velocity


def test_guided_mode_w2_compares_guided_velocities(saved, tmp_path):
    """The loss's W2 term is ||guided policy - guided reference||^2 (checked in float64 from separate calls)."""
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, cfg_mode="guided", w2_coefficient=2.0), "cpu")
    moved(trainer)
    cond = trainer.models.flow.encode(["a dog", "a tree"])
    x_0, x_1 = torch.randn(2, *trainer.sample_shape), torch.randn(2, *trainer.sample_shape)
    weights = torch.tensor([0.5, 1.5])
    state = trainer.generator.get_state()
    loss, metrics = trainer._coupled_loss(x_0, x_1, weights, cond)
    trainer.generator.set_state(state)
    t = trainer._loss_times(2, x_1)
    x_t = t.view(-1, 1, 1, 1) * x_1 + (1 - t.view(-1, 1, 1, 1)) * x_0
    v, _ = guided_by_hand(trainer, t, x_t, cond, "policy")
    v_ref, _ = guided_by_hand(trainer, t, x_t, cond, "reference")
    w2 = ((v.double() - v_ref.double()) ** 2).flatten(1).mean(1)
    fm = ((v.double() - (x_1 - x_0).double()) ** 2).flatten(1).mean(1)
    assert float(w2.mean()) > 0
    torch.testing.assert_close(metrics["w2_loss"].double(), w2.mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(loss.double(), (weights.double() * fm + 2.0 * w2).mean(), rtol=1e-4, atol=0)


def test_cfg_free_with_a_guidance_scale_warns(saved, tmp_path):
    with pytest.warns(UserWarning, match="guidance_scale 4.5 is not used"):
        ORWCFMTrainer(load(saved), config(tmp_path, cfg_mode="cfg_free"), "cpu")


# ------------------------------------------------------------------------------------------------------ Flux


def recorded_guidance(transformer):
    seen = []
    transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("guidance")),
                                          with_kwargs=True)
    return seen


@pytest.mark.parametrize("given, expected", [(None, 3.5), (2.0, 2.0)])
def test_flux_dev_gets_its_pipelines_guidance(saved, tmp_path, given, expected):
    pipe = load(saved, "flux")
    seen = recorded_guidance(pipe.transformer)
    trainer = ORWCFMTrainer(pipe, config(tmp_path, guidance_scale=given), "cpu")
    seen.clear()
    out = trainer.training_step()
    assert math.isfinite(out["total_loss"]) and seen
    # every forward (sampling, the policy's and the reference's loss forwards) gets the guidance input
    assert all(g is not None and torch.equal(g, torch.full_like(g, expected)) for g in seen)


def test_flux_shifted_loss_times_follow_its_dynamic_shift(saved, tmp_path):
    """time_sampling 'shifted' uses the resolution-dependent shift e^mu, the one FluxPipeline's grid applies."""
    trainer = ORWCFMTrainer(load(saved, "flux"), config(tmp_path, time_sampling="shifted"), "cpu")
    flow = trainer.models.flow
    s = trainer._training_shift()
    assert s == pytest.approx(math.exp(flow.dynamic_shift_mu()))
    assert s != pytest.approx(flow.scheduler.config.shift)  # the static 3.0 Flux's scheduler does not use
    steps = 6
    grid = flow.time_grid(steps)  # the scheduler's own, through diffusers
    sigmas = [1 - i / steps for i in range(steps)]  # FluxPipeline's linspace(1, 1/steps, steps)
    want = [1 - shift_sigma(sig, s) for sig in sigmas]
    assert grid[:-1] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_sd3_shifted_loss_times_keep_the_static_shift(saved, tmp_path):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, time_sampling="shifted"), "cpu")
    assert trainer._training_shift() == 3.0
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, time_sampling="shifted", time_shift=1.5), "cpu")
    assert trainer._training_shift() == 1.5


# ------------------------------------------------------------------------------------------------ CUDA graphs


def test_pipelines_do_not_capture_the_sampling_ode_by_default(saved, tmp_path):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path), "cpu")
    assert trainer._sampler.use_graphs is False
    plain = ORWCFMTrainer(lambda_model(torch.nn.Linear(2, 2)), {"sample_shape": (2,), "reward": lambda x: x[:, 0],
                                                                "savedir": str(tmp_path)}, "cpu")
    assert plain._sampler.use_graphs is None  # graphs where available (CUDA)


# ------------------------------------------------------------------------------------- bf16 full fine-tuning


def full_ft_update(saved, tmp_path, dtype, start):
    """The change of every trained weight (fp32 view) after two full fine-tuning steps at lr 1e-5 from ``start``."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(saved / "sd35", dtype=dtype)
    with torch.no_grad():
        for p, s in zip(pipe.transformer.parameters(), start):
            p.copy_(s)
    trainer = ORWCFMTrainer(pipe, config(tmp_path / str(dtype), lora_rank=None, learning_rate=1e-5,
                                         guidance_scale=1.0), "cpu")
    for _ in range(2):
        trainer.training_step()
    trained = trainer.models.trainable_parameters()
    used = list(pipe.transformer.parameters())
    assert all(torch.equal(u, t.to(u.dtype)) for u, t in zip(used, trained))  # the forwards see the masters
    delta = torch.cat([(t.detach() - s).flatten() for t, s in zip(trained, start)])
    changed = sum(int((u.float() != s).sum()) for u, s in zip(used, start)) / delta.numel()
    return delta, changed


def test_bf16_full_fine_tuning_updates_like_fp32(saved, tmp_path):
    """fp32 master weights: a bf16 run's update matches the fp32 run's from the same (bf16-exact) weights.

    At lr 1e-5 Adam moves each weight by ~1e-5, below bf16's resolution for most weights: without
    master weights almost none of the bf16 weights change. With them the update differs from fp32's
    only by bf16's forward rounding of the gradients.
    """
    from diffusers import StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(saved / "sd35", dtype=torch.float32).transformer
    start = [p.detach().to(torch.bfloat16).float() for p in base.parameters()]  # representable in both
    d32, changed32 = full_ft_update(saved, tmp_path, torch.float32, start)
    d16, changed16 = full_ft_update(saved, tmp_path, torch.bfloat16, start)
    assert float(d32.abs().max()) == pytest.approx(2e-5, rel=0.05)  # two Adam steps of ~lr each
    rel = float((d16 - d32).norm() / d32.norm())
    print(f"bf16 vs fp32 update: relative error {rel:.3f}, bf16 weights changed {changed16:.3f}")
    assert rel < 0.25, rel
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.97
    assert changed32 > 0.9
    assert changed16 > 0.01  # the weights the forwards use move too, once the masters cross a bf16 step


def test_bf16_full_fine_tuning_resumes_its_master_weights(saved, tmp_path):
    """The fp32 masters are in the checkpoint: sub-bf16 progress survives a resume (nothing learned is lost)."""
    from diffusers import StableDiffusion3Pipeline

    def trainer():
        pipe = StableDiffusion3Pipeline.from_pretrained(saved / "sd35", dtype=torch.bfloat16)
        return ORWCFMTrainer(pipe, config(tmp_path, lora_rank=None, learning_rate=1e-5, guidance_scale=1.0), "cpu")

    first = trainer()
    first.training_step()
    first.save_checkpoint(tmp_path / "ckpt.pt")
    second = trainer()
    second.load_checkpoint(tmp_path / "ckpt.pt")
    for a, b in zip(first.models.trainable_parameters(), second.models.trainable_parameters()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(first.net_model.parameters(), second.net_model.parameters()))
