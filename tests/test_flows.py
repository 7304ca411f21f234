"""Text-to-image flows (orwcfm_fast.flows) on tiny random-init diffusers pipelines.

The pipelines are built in-process (orwcfm_fast.flows.tiny), saved once per session with ``save_pretrained``
(conftest's ``saved``) and loaded back with ``from_pretrained`` (``HF_HUB_OFFLINE=1``): the real loading path,
no download. The independent reference of the sampler is the diffusers pipeline's own ``__call__``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image flows need the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image flows need the 'diffusers' extra")

from orwcfm_fast.flows import conventions  # noqa: E402
from orwcfm_fast.flows.diffusers_base import parse_resolution  # noqa: E402
from orwcfm_fast.flows.flux import FluxFlow  # noqa: E402
from orwcfm_fast.flows.lora import LoraRoles  # noqa: E402
from orwcfm_fast.flows.sd3 import SD3Flow  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402
from orwcfm_fast.sampling import integrate  # noqa: E402

PROMPTS = ["a dog", "a red cat", "a dog"]
SEQ = 16  # max_sequence_length: T5 tokens


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def load(saved, family):
    """The tiny ``family`` pipeline from conftest's session fixture ``saved`` (written once by save_pretrained)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(saved / family, dtype=torch.float32)


FLOWS = {"sd3": SD3Flow, "sd35": SD3Flow, "flux": FluxFlow}


# ----------------------------------------------------------------------------- conventions


def test_shifted_grid_is_the_sd3_shift_formula():
    grid = conventions.shifted_time_grid(4, 3.0)
    for t, i in zip(grid, range(5)):
        sigma = 1 - i / 4
        assert math.isclose(1 - t, 3 * sigma / (1 + 2 * sigma), abs_tol=1e-15)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert conventions.shifted_time_grid(5, 1.0) == pytest.approx([i / 5 for i in range(6)], abs=1e-15)


def test_scheduler_grid_follows_the_scheduler_and_leaves_it_alone():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    before = scheduler.timesteps.clone() if scheduler.timesteps is not None else None
    grid = conventions.scheduler_time_grid(scheduler, 4)
    # the verified SD3 sigmas at s = 3 (the scheduler shifts its last sigma twice)
    assert [1 - t for t in grid] == pytest.approx([1, 0.8577, 0.6021, 0.0089, 0], abs=1e-4)
    after = scheduler.timesteps
    assert (before is None and after is not None and len(after) == 1000) or torch.equal(before, after)


def test_cfg_commutes_with_the_sign_flip():
    v_u, v_c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    lhs = conventions.cfm_velocity(conventions.cfg_combine(v_u, v_c, 4.5))
    rhs = conventions.cfg_combine(conventions.cfm_velocity(v_u), conventions.cfm_velocity(v_c), 4.5)
    torch.testing.assert_close(lhs, rhs, rtol=1e-15, atol=1e-15)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(conventions.model_timestep(t, 1000.0), torch.tensor([1000.0, 750.0, 0.0]))


def test_time_grid_validation():
    with pytest.raises(ValueError, match="decrease"):
        conventions.time_grid_from_sigmas([0.0, 1.0])
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="3 steps need 4"):
        integrate(lambda t, x: x, x, steps=3, time_grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="strictly"):
        integrate(lambda t, x: x, x, steps=2, time_grid=[0.0, 0.0, 1.0])


def test_integrate_on_a_time_grid_is_euler_on_that_grid():
    grid = [0.0, 0.1, 0.5, 1.0]
    x_0 = torch.randn(4, 3, dtype=torch.float64)
    got = integrate(lambda t, x: -x * (1 + t[:, None]), x_0, steps=3, time_grid=grid)
    want = x_0.clone()
    for a, b in zip(grid, grid[1:]):
        want = want + (b - a) * (-want * (1 + a))
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


def test_resolution_checks():
    assert parse_resolution(64, 16) == (64, 64)
    assert parse_resolution([32, 48], 16) == (32, 48)
    for bad in (60, [64, 40], [0, 16], "64", 64.0, [16]):
        with pytest.raises(ValueError, match="'resolution'"):
            parse_resolution(bad, 16)


# ----------------------------------------------------------------------------- the sampler vs the pipeline


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_sampler_reproduces_the_pipeline(saved, family, guidance):
    """Same initial noise, steps and guidance: the library's Euler sampler gives the pipeline's latents; and the
    prompt moves them far more than the comparison's tolerance, so the comparison covers the conditioning."""
    pipe = load(saved, family)
    flow = FLOWS[family](pipe, resolution=TINY_SIZE, guidance_scale=guidance, max_sequence_length=SEQ)
    # rows 0-2 share one noise draw ("a dog", "a red cat", "a dog" again); row 3 draws its own
    prompts = ["a dog", "a red cat", "a dog", "a red cat"]
    x_0 = flow.noise(2, torch.Generator().manual_seed(1))[[0, 0, 0, 1]]
    ours = flow.sample(x_0, flow.encode(prompts), steps=4)
    # same prompt, same noise: the same latents (measured bit-equal; 1e-5 allows other BLAS's per-row rounding)
    assert (ours[2] - ours[0]).abs().max().item() <= 1e-5
    # same noise, another prompt: measured 0.056 (sd3, no guidance) to 0.34 (sd35, guidance 4.5) on latents of
    # |x| <= ~6; a flow that drops the conditioning gives 0. 1e-2 is 5x under the smallest and 1000x the
    # pipeline tolerance below, so that comparison resolves what the prompt does.
    prompt_effect = (ours[1] - ours[0]).abs().max().item()
    assert prompt_effect > 1e-2, f"{family}: the prompt moves the latents by only {prompt_effect:.3g}"
    theirs = pipe(prompts, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=4, guidance_scale=guidance,
                  latents=x_0.clone(), output_type="latent", max_sequence_length=SEQ).images
    assert ours.shape == theirs.shape == (len(prompts), *flow.sample_shape)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_prompt_embeddings_are_cached_and_per_sample(saved):
    pipe = load(saved, "sd3")
    flow = SD3Flow(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    embeds, pooled = flow.encode(PROMPTS)
    assert embeds.shape == (3, 77 + SEQ, 32) and pooled.shape == (3, 16)
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    direct, _, direct_pooled, _ = pipe.encode_prompt(PROMPTS[1:2], None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=SEQ)
    # encoded in a batch of two here, alone there: equal up to float32 rounding of batched matmuls
    torch.testing.assert_close(embeds[1:2], direct.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[1:2], direct_pooled.detach(), rtol=1e-5, atol=1e-6)
    calls = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: calls.append(a) or original(*a, **k)
    flow.encode(["a dog", "a red cat"])
    assert calls == []  # both cached
    flow.release_text_encoders()
    assert pipe.text_encoder_3.device.type == "cpu"
    flow.encode(["a new prompt"])
    assert len(calls) == 1


def test_decode_gives_images_in_unit_range(saved):
    for family in ("sd3", "flux"):
        pipe = load(saved, family)
        flow = FLOWS[family](pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
        x = flow.noise(3, torch.Generator().manual_seed(0))
        images = flow.decode(x, batch_size=2)
        assert images.shape == (3, 3, TINY_SIZE, TINY_SIZE) and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
        # chunking changes a row only by float32 rounding of batched convolutions
        torch.testing.assert_close(images[2:], flow.decode(x[2:]), rtol=1e-5, atol=1e-5)
        # the flow's decode is the pipeline's: latents -> VAE -> [0, 1]
        z = flow.to_vae_latents(x) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        want = (pipe.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(flow.from_vae_latents(flow.to_vae_latents(x)), x)


def test_bad_resolution_names_the_multiple(saved):
    pipe = load(saved, "sd3")
    with pytest.raises(ValueError, match="multiples of 16"):
        SD3Flow(pipe, resolution=72)
    with pytest.raises(ValueError, match="multiples of 16"):
        FluxFlow(load(saved, "flux"), resolution=[64, 40])


# ----------------------------------------------------------------------------- LoRA roles


def _forward(flow, roles, role, t, x, cond):
    with roles.role(role):
        return flow.transformer_velocity(t, x, cond)


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_lora_roles_one_transformer(saved, family):
    pipe = load(saved, family)
    flow = FLOWS[family](pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cond = flow.encode(PROMPTS)
    t = torch.tensor([0.1, 0.5, 0.9])
    x = flow.noise(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = flow.transformer_velocity(t, x, cond)
    roles = LoraRoles(pipe.transformer, rank=4, seed=0)
    params = roles.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in roles.last_policy_parameters())
    # at the start every role is the base model, exactly: the W2 term is exactly zero
    with torch.no_grad():
        for role in ("policy", "last_policy", "reference"):
            assert torch.equal(_forward(flow, roles, role, t, x, cond), base), role
    # one optimiser step on a loss with the reference forward in between
    opt = torch.optim.Adam(params, lr=1e-2)
    v = _forward(flow, roles, "policy", t, x, cond)
    with torch.no_grad():
        v_ref = _forward(flow, roles, "reference", t, x, cond)
    ((v - v_ref - 1.0) ** 2).mean().backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    with torch.no_grad():
        v_new = _forward(flow, roles, "policy", t, x, cond)
        assert not torch.allclose(v_new, base)
        assert torch.equal(_forward(flow, roles, "reference", t, x, cond), base)  # base weights untouched
        assert torch.equal(_forward(flow, roles, "last_policy", t, x, cond), base)  # not refreshed yet
        roles.update_last_policy()
        assert torch.equal(_forward(flow, roles, "last_policy", t, x, cond), v_new)
    state = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert set(state) == set(base_state)  # peft wrapped the adapted layers: the same base weights under base_layer
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    assert all(p.requires_grad for p in params) and pipe.transformer.active_adapters() == ["orwcfm_policy"]


def test_lora_state_round_trip_and_errors(saved):
    pipe = load(saved, "sd3")
    roles = LoraRoles(pipe.transformer, rank=4)
    with torch.no_grad():
        for p in roles.trainable_parameters():
            p.add_(torch.randn_like(p))
    saved_state = roles.state_dict()
    other = LoraRoles(load(saved, "sd3").transformer, rank=4, seed=5)
    other.load_state_dict(saved_state)
    assert all(torch.equal(a, b) for a, b in zip(other.trainable_parameters(), roles.trainable_parameters()))
    wrong = LoraRoles(load(saved, "sd3").transformer, rank=2)
    before = [p.clone() for p in wrong.trainable_parameters()]
    with pytest.raises(ValueError, match="lora_rank"):
        wrong.load_state_dict(saved_state)
    assert all(torch.equal(a, b) for a, b in zip(before, wrong.trainable_parameters()))  # nothing copied
    with pytest.raises(ValueError, match="match no module"):
        LoraRoles(load(saved, "sd3").transformer, rank=2, target_modules=("no_such_layer",))


def test_lora_init_is_seeded_without_touching_global_generators(saved, monkeypatch):
    transformers = [load(saved, "sd3").transformer for _ in range(4)]
    seeded = []  # torch.manual_seed would also seed every CUDA generator, outside what fork_rng restores
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    cpu_state = torch.get_rng_state()
    weights = [[p.detach().clone() for p in LoraRoles(tr, rank=4, seed=s).trainable_parameters()]
               for tr, s in zip(transformers, (1, 1, 2))]
    assert seeded == []
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # deterministic per seed
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))
    # where CUDA is initialised, its generators are forked (and so restored) as well
    forked, fork_rng = [], torch.random.fork_rng

    def recording_fork(devices=None, **kwargs):
        forked.append(list(devices))
        return fork_rng(devices=[], **kwargs)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", recording_fork)
    LoraRoles(transformers[3], rank=4, seed=1)
    assert forked == [[0, 1]] and seeded == []


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_transformer_call_does_not_walk_the_model_for_its_dtype(saved, family, monkeypatch):
    from diffusers import ModelMixin

    pipe = load(saved, family)
    flow = FLOWS[family](pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    cond = flow.encode(PROMPTS)
    t = torch.tensor([0.1, 0.5, 0.9])
    x = flow.noise(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = flow.transformer_velocity(t, x, cond)
    calls, dtype = [], ModelMixin.dtype  # walks every module, then the parameters, on each access
    counted = property(lambda self: calls.append(type(self).__name__) or dtype.fget(self))
    monkeypatch.setattr(ModelMixin, "dtype", counted)
    with torch.no_grad():
        again = [flow.transformer_velocity(t, x, cond) for _ in range(2)]
    assert calls == []
    assert all(torch.equal(v, before) for v in again)
    # the dtype follows a later .to() (e.g. a bf16 cast): the same inputs as a transformer loaded in bf16 gets
    pipe.transformer.to(torch.bfloat16)
    bf16 = type(pipe).from_pretrained(saved / family, dtype=torch.bfloat16).transformer
    with torch.no_grad():
        cast = flow.transformer_velocity(t, x, cond)
        loaded = flow.transformer_velocity(t, x, cond, bf16)
    assert calls == []
    assert not torch.equal(cast, before) and torch.equal(cast, loaded)
