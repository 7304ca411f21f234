"""Wan text-to-video (orwcfm_fast.flows.wan) on tiny random-init ``WanPipeline`` s.

The pipelines "wan" (Wan 2.1 layout) and "wan22" (two experts) are saved once per session (conftest's ``tiny_dir``)
and loaded back with ``from_pretrained`` (``HF_HUB_OFFLINE=1``); the Wan 2.2 TI2V-5B layout (per-token timesteps,
48-channel 16x VAE) is saved and loaded here. The independent references are the pipeline's own ``__call__``
(sampling, decoding), its scheduler's sigmas, and the loaded LoRA of diffusers' own loader.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-video flow needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-video flow needs the 'diffusers' extra")

from _lora_velocities import policy_loaded_and_base  # noqa: E402
from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows import flow_for_pipeline  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402
from orwcfm_fast.flows.wan import WanFlow, tiny_wan_pipeline  # noqa: E402

FRAMES = 5  # 4k + 1: two latent frames
SEQ = 16  # max_sequence_length: UMT5 tokens
PROMPTS = ["a dog", "a red cat on a mat", "a dog"]  # 5 and 14 tokens (with </s>): rows of different lengths

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def load(path):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory, tiny_dir):
    """A saved Wan 2.2 TI2V-5B style tiny pipeline (``expand_timesteps``, Wan 2.2 VAE); ``tiny_dir`` sets offline mode."""
    path = tmp_path_factory.mktemp("wan_ti2v") / "wan_ti2v"
    tiny_wan_pipeline(expand_timesteps=True).save_pretrained(path)
    return path


def flow_of(pipe, **kwargs):
    return WanFlow(pipe, **{"resolution": TINY_SIZE, "max_sequence_length": SEQ, "num_frames": FRAMES, **kwargs})


# ----------------------------------------------------------------------------- loading


def test_tiny_pipelines_load_as_wan_and_pick_the_wan_flow(tiny_dir, ti2v_dir):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    pipe = load(tiny_dir("wan"))
    assert type(pipe) is WanPipeline and pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    # save_pretrained + from_pretrained round-trips the builder's weights bit for bit (same seed, same weights)
    built = tiny_wan_pipeline()
    for name in ("transformer", "vae", "text_encoder"):
        ours, saved = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours), name
    flow = flow_for_pipeline(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ, num_frames=FRAMES)
    assert type(flow) is WanFlow and flow.video and flow.frames == FRAMES
    assert flow.sample_shape == (16, 2, TINY_SIZE // 8, TINY_SIZE // 8)
    ti2v = load(ti2v_dir)
    assert ti2v.config.expand_timesteps is True
    flow = flow_for_pipeline(ti2v, resolution=TINY_SIZE, max_sequence_length=SEQ, num_frames=FRAMES)
    assert flow.expand_timesteps and flow.sample_shape == (48, 2, TINY_SIZE // 16, TINY_SIZE // 16)


def test_defaults_are_the_pipelines(tiny_dir):
    """num_frames None: 81 frames (21 latent); resolution None: 480 x 832; guidance_scale None: 5.0."""
    flow = WanFlow(load(tiny_dir("wan")), guidance_scale=None)
    assert flow.frames == 81 and (flow.height, flow.width) == (480, 832) and flow.guidance_scale == 5.0
    assert flow.sample_shape == (16, 21, 60, 104)


# ----------------------------------------------------------------------------- the sampler vs the pipeline


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("layout", ["wan", "ti2v"])
def test_sampler_reproduces_the_pipeline(tiny_dir, ti2v_dir, layout, guidance):
    """Same noise, 3 steps, same guidance and negative prompt: the library's Euler sampler gives the pipeline's
    latents, for prompts of different lengths in one batch."""
    pipe = load(tiny_dir("wan") if layout == "wan" else ti2v_dir)
    flow = flow_of(pipe, guidance_scale=guidance, negative_prompt="blurry")
    # rows 0 and 2 ("a dog" twice) share a noise draw, row 1 ("a red cat on a mat") shares it too
    x_0 = flow.noise(1, torch.Generator().manual_seed(1))[[0, 0, 0]]
    ours = flow.sample(x_0, flow.encode(PROMPTS), steps=3)
    assert (ours[2] - ours[0]).abs().max().item() <= 1e-5  # same prompt, same noise (measured bit-equal)
    # same noise, another prompt: measured 0.12 (wan, no guidance) to 0.68 (ti2v, guidance 4) on latents of |x| <~ 5;
    # dropping the conditioning gives 0. 1e-2 is 10x under the smallest and 1000x the tolerance below.
    prompt_effect = (ours[1] - ours[0]).abs().max().item()
    assert prompt_effect > 1e-2, f"{layout}: the prompt moves the latents by only {prompt_effect:.3g}"
    theirs = pipe(PROMPTS, negative_prompt="blurry", height=TINY_SIZE, width=TINY_SIZE, num_frames=FRAMES,
                  num_inference_steps=3, guidance_scale=guidance, latents=x_0.clone(), output_type="latent",
                  max_sequence_length=SEQ).frames
    assert ours.shape == theirs.shape == (3, *flow.sample_shape)
    # measured 4.8e-7 without guidance, 1.7e-6 with guidance 4 (float32 rounding of 1000 (1 - t) vs the scheduler's
    # timesteps, amplified by g); a wrong timestep scale, sign or CFG combination moves them by > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_prompt_rows_are_the_pipelines_zero_padded_embeddings(tiny_dir):
    """Each prompt is cut to its tokens and zero-padded to max_sequence_length (the pipeline's encode_prompt)."""
    pipe = load(tiny_dir("wan"))
    flow = flow_of(pipe)
    (embeds,) = flow.encode(PROMPTS)
    assert embeds.shape == (3, SEQ, pipe.text_encoder.config.d_model)
    tokens = pipe.tokenizer(PROMPTS, padding="max_length", max_length=SEQ, truncation=True,
                            return_tensors="pt").attention_mask.sum(1).tolist()
    assert tokens == [5, 14, 5]
    for row, n in zip(embeds, tokens):
        assert row[:n].abs().min() > 0 and not row[n:].any()
    direct, _ = pipe.encode_prompt(PROMPTS[1:2], do_classifier_free_guidance=False, max_sequence_length=SEQ)
    # encoded in a batch of two distinct prompts here, alone there: equal up to float32 rounding of batched matmuls
    torch.testing.assert_close(embeds[1:2], direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["wan", "ti2v"])
def test_transformer_gets_the_pipelines_timesteps(tiny_dir, ti2v_dir, layout):
    """What the transformer is handed: ``[B]`` timesteps, or with expand_timesteps (TI2V-5B) one per latent token
    ``[B, F' h/2 w/2]``, the pipeline's own tensors. The two give the same velocity to float32 rounding (measured
    3.6e-7), so only the call itself can tell that the flow takes the pipeline's per-token path."""
    pipe = load(tiny_dir("wan") if layout == "wan" else ti2v_dir)
    flow = flow_of(pipe)
    seen = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: seen.append(k["timestep"].detach().clone()) or forward(*a, **k)
    x_0 = flow.noise(2, torch.Generator().manual_seed(0))
    pipe(PROMPTS[:2], height=TINY_SIZE, width=TINY_SIZE, num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0,
         latents=x_0.clone(), output_type="latent", max_sequence_length=SEQ)
    theirs, seen[:] = list(seen), []
    flow.sample(x_0, flow.encode(PROMPTS[:2]), steps=2)
    tokens = 2 * (flow.sample_shape[2] // 2) * (flow.sample_shape[3] // 2)
    shape = (2, tokens) if layout == "ti2v" else (2,)
    assert len(seen) == len(theirs) == 2
    for ours, want in zip(seen, theirs):
        assert ours.shape == want.shape == shape and ours.dtype == want.dtype == torch.float32
        # 1000 (1 - t) in float32 vs the scheduler's float32 1000 sigma: measured <= 6.1e-5 apart; a wrong scale or
        # time direction is off by hundreds
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- LoRA


def _redness(images):
    """Mean red minus mean blue of frames [N, 3, H, W] in [0, 1]."""
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def trainer_config(tmp_path, **overrides):
    cfg = {"prompts": PROMPTS[:2], "reward": _redness, "resolution": TINY_SIZE, "num_frames": FRAMES,
           "guidance_scale": 3.0, "negative_prompt": "blurry", "ode_steps": 2, "lora_rank": 4, "lora_alpha": 8,
           "batch_size": 2, "images_per_prompt": 1, "max_sequence_length": SEQ, "seed": 0, "warmup_steps": 0,
           "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path), "handle_signals": False}
    cfg.update(overrides)
    return cfg


def test_save_lora_loads_into_a_fresh_pipeline(tiny_dir, tmp_path):
    # lora_alpha 8 at rank 4 (scale 2): with alpha equal to the rank a lost alpha would load unnoticed
    trainer = ORWCFMTrainer(load(tiny_dir("wan")), trainer_config(tmp_path), "cpu")
    trainer.train(1, 2)
    trainer.save_lora(tmp_path / "lora")
    fresh = load(tiny_dir("wan"))
    fresh.load_lora_weights(tmp_path / "lora")
    cond = trainer.models.flow.encode(PROMPTS[:2])
    t, x = torch.tensor([0.3, 0.8]), torch.randn(2, *trainer.sample_shape, generator=torch.Generator().manual_seed(2))
    ours, theirs, base = policy_loaded_and_base(trainer, fresh.transformer, t, x, cond)
    # measured bit-equal (same weights, same ops); a half-scale adapter (lost alpha) is off by ~5e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        # the fresh pipeline through its own flow (not the trainer's flow handed another transformer)
        torch.testing.assert_close(flow_of(fresh).transformer_velocity(t, x, cond), ours, rtol=1e-5, atol=1e-6)
        # the trainer's flow handed a pristine base transformer gives the reference role (measured bit-equal): the
        # flow calls the transformer it is given, and the reference is the base weights
        pristine = load(tiny_dir("wan")).transformer
        torch.testing.assert_close(trainer.models.flow.transformer_velocity(t, x, cond, pristine), base,
                                   rtol=1e-5, atol=1e-6)
    # two steps at lr 1e-2 moved the policy by ~0.1 (measured) on velocities of |v| <~ 3
    assert (ours - base).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------- videos


def test_decode_is_the_pipelines_and_encode_images_inverts_its_normalisation(tiny_dir, ti2v_dir):
    for path in (tiny_dir("wan"), ti2v_dir):
        pipe = load(path)
        flow = flow_of(pipe)
        x_0 = flow.noise(2, torch.Generator().manual_seed(3))
        kwargs = dict(height=TINY_SIZE, width=TINY_SIZE, num_frames=FRAMES, num_inference_steps=1, guidance_scale=1.0,
                      max_sequence_length=SEQ)
        latents = pipe(PROMPTS[:2], latents=x_0.clone(), output_type="latent", **kwargs).frames
        frames = pipe(PROMPTS[:2], latents=x_0.clone(), output_type="pt", **kwargs).frames  # [B, F, 3, H, W]
        videos = flow.decode(latents)
        assert videos.shape == (2, 3, FRAMES, TINY_SIZE, TINY_SIZE) and videos.dtype == torch.float32
        assert videos.min() >= 0 and videos.max() <= 1
        # the pipeline's own post-processing of the same latents (measured bit-equal)
        torch.testing.assert_close(videos, frames.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-6)
        if not flow.expand_timesteps:  # chunking changes a row only by float32 rounding of batched convolutions
            torch.testing.assert_close(flow.decode(latents, batch_size=1), videos, rtol=1e-5, atol=1e-5)
        # encode_images: the posterior mode, normalised by the VAE's statistics (written here as a division)
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        mode = pipe.vae.encode(videos * 2 - 1).latent_dist.mode()
        z = flow.encode_images(videos)
        assert z.shape == latents.shape
        torch.testing.assert_close(z, (mode - mean) / std, rtol=1e-5, atol=1e-5)  # x (1/std) vs / std: 1 ulp
        # decode(encode_images(v)) is the VAE's own round trip: the normalisations cancel (random VAE weights, so
        # that round trip is not the identity; a mismatched mean or std moves the decoded frames by > 1e-2)
        raw = (pipe.vae.decode(mode, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(flow.decode(z), raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"videos \[B, 3, F, H, W\]"):
        flow.encode_images(videos[:, :, 0])
    with pytest.raises(ValueError, match="4k \\+ 1"):
        flow.encode_images(videos[:, :, :4])


# ----------------------------------------------------------------------------- what is refused


def test_num_frames_not_4k_plus_1_is_refused_not_rounded(tiny_dir, tmp_path):
    pipe = load(tiny_dir("wan"))
    for frames, nearest in ((6, "use 5 or 9"), (8, "use 5 or 9"), (4, "use 1 or 5")):
        with pytest.raises(ValueError, match=f"config key 'num_frames' is {frames}.*{nearest}"):
            flow_of(pipe, num_frames=frames)
    with pytest.raises(ValueError, match="config key 'num_frames' is 6"):
        ORWCFMTrainer(pipe, trainer_config(tmp_path, num_frames=6), "cpu")
    assert flow_of(pipe, num_frames=1).sample_shape[1] == 1 and flow_of(pipe, num_frames=9).sample_shape[1] == 3


def test_resolution_must_be_a_multiple_of_the_pipelines(tiny_dir, ti2v_dir):
    with pytest.raises(ValueError, match="'resolution'.*multiples of 16"):
        flow_of(load(tiny_dir("wan")), resolution=[64, 72])
    # Wan 2.2's VAE compresses 16x and the transformer patches 2x2: multiples of 32 (the pipeline would round 48 down)
    with pytest.raises(ValueError, match="'resolution'.*multiples of 32"):
        flow_of(load(ti2v_dir), resolution=48)


def test_two_experts_are_refused_with_the_same_message_everywhere(tiny_dir, tmp_path):
    pipe = load(tiny_dir("wan22"))
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    with pytest.raises(ValueError) as direct:
        flow_for_pipeline(pipe, resolution=TINY_SIZE, num_frames=FRAMES)
    message = str(direct.value)
    for part in ("WanPipeline", "two experts", "transformer_2", "boundary_ratio 0.875",
                 "not the one that samples", "Wan 2.1", "TI2V-5B"):
        assert part in message, part
    with pytest.raises(ValueError) as through_trainer:
        ORWCFMTrainer(pipe, trainer_config(tmp_path), "cpu")
    assert str(through_trainer.value) == message


def test_unipc_grid_is_the_schedulers_own_sigmas(tiny_dir):
    """The released checkpoints' UniPC scheduler (flow sigmas): the flow steps through its sigmas, terminal 0
    included, and its shift is UniPC's flow_shift. The samples then differ from UniPC's multistep update by the
    two solvers' discretisation (see the module docs), so only the grid is compared."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    pipe = load(tiny_dir("wan"))
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    flow = flow_of(pipe)
    steps = 4
    before = pipe.scheduler.sigmas.clone()
    grid = flow.time_grid(steps)
    assert torch.equal(pipe.scheduler.sigmas, before) and pipe.scheduler.num_inference_steps is None  # left alone
    reference = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(steps)
    assert grid == [1.0 - float(s) for s in reference.sigmas.double()] and grid[-1] == 1.0
    # and independently of the scheduler's code: flow_shift on linspace(1, 1/1000), first sigma 1 - 1e-6, then 0
    u = np.linspace(1, 1 / 1000, steps + 1)[:-1]
    sigmas = 5.0 * u / (1 + 4.0 * u)
    sigmas[0] -= 1e-6
    np.testing.assert_allclose(grid, 1 - np.append(sigmas, 0.0).astype(np.float32), rtol=0, atol=1e-7)
    assert flow.sampling_shift() == 5.0
    assert flow_of(pipe, time_shift=2.0).sampling_shift() == 2.0
    assert flow_of(tiny_wan_pipeline(), time_shift=None).sampling_shift() == 3.0  # the Euler scheduler's shift
    pipe.scheduler = UniPCMultistepScheduler(flow_shift=5.0)  # an epsilon UniPC: not a flow scheduler
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        flow_of(pipe)
