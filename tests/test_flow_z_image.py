"""Z-Image (orwcfm_fast.flows.z_image) on its tiny random-init pipeline, saved and loaded back offline.

The independent reference is diffusers' ``ZImagePipeline`` itself: its ``__call__`` (sampling, guidance,
decoding), its ``encode_prompt`` (the per-prompt rows) and its transformer called with the lists it builds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from _lora_velocities import policy_loaded_and_base  # noqa: E402
from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows import flow_for_pipeline  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402
from orwcfm_fast.flows.z_image import ZImageFlow, tiny_z_image_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SEQ = 32  # max_sequence_length: the chat template alone is 8 tokens, the prompts' characters add 5 to 18
PROMPTS = ["a dog", "a red cat on a mat"]  # 13 and 26 tokens: rows of different lengths in one batch
NEGATIVE = "blurry photo"  # 20 tokens: between the two, so the 2B CFG batch pads on both sides


def load(tiny_dir):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(tiny_dir("z_image"), dtype=torch.float32)


def make_flow(pipe, **kwargs):
    return flow_for_pipeline(pipe, **{"resolution": TINY_SIZE, "max_sequence_length": SEQ, **kwargs})


def run_pipeline(pipe, prompts, x_0, steps, guidance_scale, output_type="latent", **options):
    """The pipeline's own sampling from ``x_0``; ``guidance_scale`` in the library's convention (1 = off)."""
    return pipe(list(prompts),  # a copy: the pipeline writes the chat-templated prompts into the list it is given
                negative_prompt=[NEGATIVE] * len(prompts), height=TINY_SIZE, width=TINY_SIZE,
                num_inference_steps=steps, guidance_scale=guidance_scale - 1.0, latents=x_0.clone(),
                output_type=output_type, max_sequence_length=SEQ, **options).images


def test_tiny_pipeline_round_trips_and_picks_its_flow(tiny_dir):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

    pipe = load(tiny_dir)
    assert type(pipe) is ZImagePipeline
    classes = {name: type(c) for name, c in pipe.components.items()}
    assert classes == {"transformer": ZImageTransformer2DModel, "vae": AutoencoderKL, "text_encoder": Qwen3Model,
                       "tokenizer": Qwen2Tokenizer, "scheduler": FlowMatchEulerDiscreteScheduler}
    built = tiny_z_image_pipeline()  # same seed: the saved folder holds exactly these weights
    for name in ("transformer", "vae", "text_encoder"):
        saved, fresh = pipe.components[name].state_dict(), built.components[name].state_dict()
        assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in saved), name
    assert pipe.transformer.cap_pad_token.abs().min() > 0  # drawn, not left at zeros: the pad path is exercised
    # the tokenizer kept its chat template and vocabulary through the files
    message = [{"role": "user", "content": PROMPTS[1]}]
    for tok in (pipe.tokenizer, built.tokenizer):
        text = tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        assert text == "<|im_start|>user\na red cat on a mat<|im_end|>\n<|im_start|>assistant\n"
    assert pipe.tokenizer(text).input_ids == built.tokenizer(text).input_ids
    flow = make_flow(pipe)
    assert type(flow) is ZImageFlow and flow.sample_shape == (16, TINY_SIZE // 8, TINY_SIZE // 8)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_reproduces_the_pipeline(tiny_dir, guidance):
    """Same noise, steps, prompts of two lengths and (library 4 = pipeline 3) guidance with a negative prompt:
    the library's Euler sampler gives the pipeline's latents."""
    pipe = load(tiny_dir)
    flow = make_flow(pipe, guidance_scale=guidance, negative_prompt=NEGATIVE)
    x_0 = flow.noise(2, torch.Generator().manual_seed(1))
    ours = flow.sample(x_0, flow.encode(PROMPTS), steps=3)
    theirs = run_pipeline(pipe, PROMPTS, x_0, 3, guidance)
    assert ours.shape == theirs.shape == (2, *flow.sample_shape)
    # measured 4.8e-7 (no guidance) and 1.5e-6 (guidance 4) on latents of |x| <= 4.5; feeding the transformer
    # 1 - (1 - t) instead of the pipeline's (1000 - 1000 sigma) / 1000 alone gave 3.9e-6, a guidance off by one
    # (s for the pipeline's s - 1) 0.41
    assert (ours - theirs).abs().max().item() <= 1e-5
    # same noise, another prompt: the prompt moves the latents far more than the tolerance (measured 0.42, 1.6)
    same_noise = flow.sample(x_0[[0, 0]], flow.encode(PROMPTS), steps=3)
    assert (same_noise[1] - same_noise[0]).abs().max().item() > 1e-1


def test_cfg_normalization_and_truncation_are_the_pipelines(tiny_dir):
    """The pipeline's two guidance options, off by default, reproduced when set (and each changes the result)."""
    pipe = load(tiny_dir)
    x_0 = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(2))
    options = {"cfg_normalization": 1.0, "cfg_truncation": 0.3}  # 3 steps at t = 0, 0.14, 0.4: the last unguided
    flow = make_flow(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE, **options)
    cond = flow.encode(PROMPTS)
    ours = flow.sample(x_0, cond, steps=3)
    theirs = run_pipeline(pipe, PROMPTS, x_0, 3, 4.0, **options)
    assert (ours - theirs).abs().max().item() <= 1e-5  # measured 7.5e-7
    plain = make_flow(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE)
    assert (plain.sample(x_0, cond, steps=3) - ours).abs().max().item() > 1e-1  # measured 0.77
    for name, value in options.items():  # each option alone changes the guided velocity (measured 0.24, 1.1)
        one = make_flow(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE, **{name: value})
        t = torch.tensor([0.1, 0.5])
        with torch.no_grad():
            assert (one.velocity(t, x_0, cond) - plain.velocity(t, x_0, cond)).abs().max().item() > 1e-2, name


def test_time_grid_is_the_pipelines_static_and_dynamic_shift(tiny_dir):
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    for pipe in (load(tiny_dir), tiny_z_image_pipeline(use_dynamic_shifting=True)):
        flow = make_flow(pipe)
        run_pipeline(pipe, PROMPTS[:1], torch.zeros(1, 16, 8, 8), 4, 1.0)  # leaves its sigmas on its scheduler
        want = [1.0 - float(s) for s in pipe.scheduler.sigmas]
        assert flow.time_grid(4) == pytest.approx(want, abs=1e-7)
        if pipe.scheduler.config.use_dynamic_shifting:  # mu of the 4 x 4 tokens of 8 x 8 latents
            mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
            assert flow.sampling_shift() == pytest.approx(torch.tensor(mu).exp().item())
        else:
            assert flow.sampling_shift() == 3.0
    with pytest.raises(ValueError, match="multiples of 16"):
        make_flow(pipe, resolution=[64, 40])


def test_prompt_rows_are_the_pipelines_and_padding_is_masked(tiny_dir):
    """Rows of different lengths in one batch equal each prompt alone: the encoding, the unguided and the guided
    velocity (the 2B batch pads the negative prompt's rows too)."""
    pipe = load(tiny_dir)
    flow = make_flow(pipe, guidance_scale=3.0, negative_prompt=NEGATIVE)
    prompts = [PROMPTS[1], PROMPTS[0], "a tree"]
    embeds, mask = flow.encode(prompts)
    direct = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=SEQ)[0]
    assert [int(n) for n in mask.sum(1)] == [len(r) for r in direct] == [26, 13, 14]
    for row, m, want in zip(embeds, mask, direct):
        n = len(want)
        assert torch.equal(m[:n], torch.ones(n, dtype=m.dtype)) and not m[n:].any() and not row[n:].any()
        # one forward of three prompts vs the pipeline's own of three: the same rows (measured bit-equal)
        torch.testing.assert_close(row[:n], want, rtol=1e-5, atol=1e-6)
    x = torch.randn((3, *flow.sample_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.2, 0.5, 0.7])
    solo = make_flow(pipe, guidance_scale=3.0, negative_prompt=NEGATIVE)  # its own cache: each prompt encoded alone
    with torch.no_grad():
        batch = flow.transformer_velocity(t, x, (embeds, mask)), flow.velocity(t, x, (embeds, mask))
        for i, prompt in enumerate(prompts):
            cond = solo.encode([prompt])
            assert cond[0].shape[1] == len(direct[i])  # alone: no padding at all
            alone = solo.transformer_velocity(t[i:i + 1], x[i:i + 1], cond), solo.velocity(t[i:i + 1], x[i:i + 1], cond)
            # measured <= 2.1e-6 on velocities of |v| <= 2.1 (the batch's padded attention vs none); the padding
            # taken for caption tokens moves the shorter rows' velocities by 0.49-0.54
            for b, a in zip(batch, alone):
                torch.testing.assert_close(b[i:i + 1], a, rtol=1e-5, atol=1e-5)


def test_guidance_combines_the_negative_prompt_as_the_pipeline_does(tiny_dir):
    """velocity = v_u + s (v_c - v_u) with v_u from the negative prompt, i.e. the pipeline's v_c + (s - 1)(v_c - v_u),
    the transformer given the pipeline's own per-prompt lists."""
    pipe = load(tiny_dir)
    flow = make_flow(pipe, guidance_scale=4.0, negative_prompt=NEGATIVE)
    x = torch.randn((2, *flow.sample_shape), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.25, 0.6])
    positive = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=SEQ)[0]
    negative = pipe.encode_prompt([NEGATIVE] * 2, do_classifier_free_guidance=False, max_sequence_length=SEQ)[0]
    with torch.no_grad():
        ours = flow.velocity(t, x, flow.encode(PROMPTS))
        # the pipeline's forward: one list of 2B latents, prompts then negatives, timestep (1000 - 1000 sigma) / 1000
        out = pipe.transformer(list(x.unsqueeze(2).repeat(2, 1, 1, 1, 1).unbind(0)),
                               ((1000 - (1 - t) * 1000) / 1000).repeat(2), positive + negative, return_dict=False)[0]
        pos, neg = torch.stack(out[:2]).squeeze(2), torch.stack(out[2:]).squeeze(2)
        want = pos + 3.0 * (pos - neg)
        # measured 1.2e-7 on |v| <= 2.5; a guidance of s instead of s - 1 gives 0.46
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        # the negative prompt is used: the empty one gives another velocity (measured 1.1 apart)
        empty = make_flow(pipe, guidance_scale=4.0, negative_prompt="")
        assert (empty.velocity(t, x, flow.encode(PROMPTS)) - ours).abs().max().item() > 1e-2


def test_per_sample_times_in_one_batch(tiny_dir):
    """The loss draws one t per sample: a batch of three times equals three single-sample calls, unguided and guided."""
    pipe = load(tiny_dir)
    flow = make_flow(pipe, guidance_scale=3.0, negative_prompt=NEGATIVE)
    cond = flow.encode([PROMPTS[0]] * 3)
    x = torch.randn((1, *flow.sample_shape), generator=torch.Generator().manual_seed(5)).expand(3, -1, -1, -1)
    t = torch.tensor([0.05, 0.5, 0.95])
    with torch.no_grad():
        for velocity in (flow.transformer_velocity, flow.velocity):
            batch = velocity(t, x, cond)
            alone = torch.cat([velocity(t[i:i + 1], x[i:i + 1], tuple(c[i:i + 1] for c in cond)) for i in range(3)])
            # measured <= 1.9e-6; the first time broadcast to the whole batch is 0.8-0.93 off
            torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
            assert (batch[2] - batch[0]).abs().max().item() > 1e-1  # same input, the time alone: 0.57-0.74


def test_decode_is_the_pipelines_and_encode_images_inverts_its_normalisation(tiny_dir):
    pipe = load(tiny_dir)
    flow = make_flow(pipe)
    x_0 = flow.noise(2, torch.Generator().manual_seed(6))
    latents = flow.sample(x_0, flow.encode(PROMPTS), steps=2)
    images = flow.decode(latents, batch_size=1)
    assert images.shape == (2, 3, TINY_SIZE, TINY_SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    # the pipeline's own images ("pt": [0, 1]) of the same generation: unscale, unshift, decode, postprocess
    theirs = run_pipeline(pipe, PROMPTS, x_0, 2, 1.0, output_type="pt")
    # measured 1.7e-6 (the latents' 4.8e-7 through the VAE); a decode without shift_factor is 0.033 off
    torch.testing.assert_close(images, theirs, rtol=1e-5, atol=1e-5)
    # encode_images is the inverse normalisation: (posterior mode - shift_factor) * scaling_factor
    vae = pipe.vae.config
    assert (vae.shift_factor, vae.scaling_factor) == (0.1159, 0.3611)  # FLUX.1's VAE, as Z-Image uses
    smooth = torch.linspace(0, 1, TINY_SIZE)
    image = torch.stack([smooth[None, :].expand(TINY_SIZE, -1), smooth[:, None].expand(-1, TINY_SIZE),
                         0.5 * torch.ones(TINY_SIZE, TINY_SIZE)])[None]
    z = flow.encode_images(image)
    with torch.no_grad():
        mode = pipe.vae.encode(image * 2 - 1).latent_dist.mode()
    assert z.shape == (1, *flow.sample_shape)
    torch.testing.assert_close(z, (mode - 0.1159) * 0.3611, rtol=0, atol=1e-6)
    # and decode undoes exactly that normalisation before the VAE
    with torch.no_grad():
        want = (pipe.vae.decode(z / 0.3611 + 0.1159, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(flow.decode(z), want, rtol=1e-5, atol=1e-6)


def _redness(images):
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def test_save_lora_loads_into_a_fresh_pipeline(tiny_dir, tmp_path):
    """Train the policy adapter a few steps (rank 4, alpha 8: a lost alpha would load at half scale), export it,
    load it into a fresh pipeline with the pipeline's own loader: the trainer's policy velocity, not the base's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = {"prompts": PROMPTS + ["a tree", "two blue cars"], "reward": _redness, "resolution": TINY_SIZE,
              "guidance_scale": 3.0, "negative_prompt": NEGATIVE, "ode_steps": 2, "lora_rank": 4, "lora_alpha": 8,
              "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": SEQ, "seed": 0, "warmup_steps": 0,
              "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path / "run"), "handle_signals": False}
    trainer = ORWCFMTrainer(load(tiny_dir), config, "cpu")
    adapted = {n for n, m in trainer.net_model.named_modules() if isinstance(m, BaseTunerLayer)}
    # the default targets: every attention projection of the refiners and of the main stack, nothing else
    assert adapted == {n for n, _ in trainer.net_model.named_modules()
                       if n.endswith(("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"))}
    assert {n.split(".")[0] for n in adapted} == {"noise_refiner", "context_refiner", "layers"}
    trainer.train(1, 2)
    trainer.save_lora(tmp_path / "lora")
    fresh = load(tiny_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    cond = trainer.models.flow.encode(PROMPTS)
    t, x = torch.tensor([0.3, 0.8]), torch.randn((2, *trainer.sample_shape), generator=torch.Generator().manual_seed(7))
    ours, theirs, base = policy_loaded_and_base(trainer, fresh.transformer, t, x, cond)
    # the same weights in another peft wrapper: measured bit-equal (a file without the adapter's alpha: 0.14 off)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    moved = (ours - base).abs().max().item()
    assert moved > 1e-3, f"two training steps moved the policy by only {moved:.3g}"  # measured 0.32
