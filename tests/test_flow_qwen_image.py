"""Qwen-Image (orwcfm_fast.flows.qwen_image) on its tiny random-init pipeline, saved once per session
(conftest's ``tiny_dir``) and loaded back with ``from_pretrained`` (``HF_HUB_OFFLINE=1``).

The independent references are diffusers' own: ``QwenImagePipeline.__call__`` (sampling, guidance, time grid,
decoding), its ``encode_prompt`` and transformer called by hand (padding, true CFG), ``QwenImageEditPipeline``'s
VAE encoding, and ``load_lora_weights`` of a fresh pipeline (the exported LoRA).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image flows need the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image flows need the 'diffusers' extra")

from _lora_velocities import policy_loaded_and_base  # noqa: E402
from orwcfm_fast.flows import flow_for_pipeline  # noqa: E402
from orwcfm_fast.flows.qwen_image import QwenImageFlow, tiny_qwen_image_pipeline  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SEQ = 16  # max_sequence_length: prompt tokens after the template's dropped system turn
SHORT, LONG = "a dog", "a red cat on a mat"  # 9 and 16 (cut from 18) tokens: the batch pads the short one
NEGATIVE = "blurry"  # 11 tokens: neither prompt's length
STEPS = 3


def load(tiny_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir("qwen_image"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lengths(mask):
    return mask.sum(1).tolist()


# ----------------------------------------------------------------------------- the tiny pipeline


def test_tiny_pipeline_loads_as_qwen_image_and_picks_its_flow(tiny_dir):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    index = json.loads((tiny_dir("qwen_image") / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    pipe = load(tiny_dir)
    assert type(pipe) is QwenImagePipeline
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel) and isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    flow = flow_for_pipeline(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    assert type(flow) is QwenImageFlow and flow.sample_shape == (16, 64)
    # save_pretrained + from_pretrained round-trips the builder's weights bit-exactly
    built = tiny_qwen_image_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # the in-memory vocabulary makes the template's system turn exactly the tokens the pipeline drops
    # (as Qwen's real one does): what stays is the prompt and the assistant turn's opening
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(SHORT)).input_ids
    kept = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx:])
    assert kept == f"{SHORT}<|im_end|>\n<|im_start|>assistant\n"


def test_flow_refuses_what_qwen_image_cannot_do(tiny_dir):
    pipe = load(tiny_dir)
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageFlow(pipe, resolution=TINY_SIZE, max_sequence_length=1025)
    with pytest.raises(ValueError, match="multiples of 16"):
        QwenImageFlow(pipe, resolution=[64, 40])
    pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(NotImplementedError, match="guidance_embeds"):
        QwenImageFlow(pipe, resolution=TINY_SIZE)


# ----------------------------------------------------------------------------- the sampler vs the pipeline


@pytest.mark.parametrize("guidance, negative", [(1.0, None), (3.0, NEGATIVE), (3.0, "")])
def test_sampler_reproduces_the_pipeline(tiny_dir, guidance, negative):
    """Same noise, steps and true CFG: the library's Euler sampler gives the pipeline's latents, for prompts of
    different lengths in one batch (padded) and a negative prompt of yet another length (or empty)."""
    pipe = load(tiny_dir)
    flow = QwenImageFlow(pipe, resolution=TINY_SIZE, guidance_scale=guidance, negative_prompt=negative,
                         max_sequence_length=SEQ)
    prompts = [SHORT, LONG, SHORT]
    cond = flow.encode(prompts)
    assert lengths(cond[1]) == [9, 16, 9]  # the short prompt is padded in this batch
    # rows 0 and 1 share one noise draw (another prompt), row 2 draws its own
    x_0 = flow.noise(2, torch.Generator().manual_seed(1))[[0, 0, 1]]
    ours = flow.sample(x_0, cond, steps=STEPS)
    # same noise, another prompt: measured 0.046 (no guidance) and 0.13 (guided) on latents of |x| <= ~4.2; a flow
    # that dropped the conditioning gives 0. 1e-2 is under both and 1000x the tolerance below, so that
    # comparison resolves what the prompt does
    assert (ours[1] - ours[0]).abs().max().item() > 1e-2
    kwargs = {} if negative is None else {"negative_prompt": negative, "true_cfg_scale": guidance}
    theirs = pipe(prompts, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=STEPS, latents=x_0.clone(),
                  output_type="latent", max_sequence_length=SEQ, **kwargs).images
    assert ours.shape == theirs.shape == (3, *flow.sample_shape)
    # measured 4.8e-7 (no guidance) and 8.3e-7 / 9.5e-7 (guided): float32 rounding. Measured effects of the
    # mistakes this catches: the mask dropped 0.10 / 0.31, a uniform time grid 0.11-0.12, CFG without the norm
    # rescaling 0.012 / 0.017
    assert (ours - theirs).abs().max().item() <= 1e-5
    # the time grid is the scheduler's after the pipeline's set_timesteps (dynamic mu, shift_terminal 0.02)
    assert [1 - t for t in flow.time_grid(STEPS)] == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=1e-7)
    assert pipe.scheduler.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)


def test_decode_is_the_pipelines_image_output(tiny_dir):
    """flow.decode of the flow's samples equals the pipeline's own ``output_type="pt"`` images."""
    pipe = load(tiny_dir)
    flow = QwenImageFlow(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    x_0 = flow.noise(2, torch.Generator().manual_seed(2))
    images = flow.decode(flow.sample(x_0, flow.encode([SHORT, LONG]), steps=2), batch_size=1)
    want = pipe([SHORT, LONG], height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=2, latents=x_0.clone(),
                max_sequence_length=SEQ, output_type="pt").images
    assert images.shape == want.shape == (2, 3, TINY_SIZE, TINY_SIZE) and images.dtype == torch.float32
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0
    # measured 1.2e-7: the latents' float32 difference through the VAE (and chunking, batch_size=1). Decoding
    # without the latents_mean / latents_std de-normalisation moves the images by 0.038
    torch.testing.assert_close(images, want, rtol=0, atol=1e-5)


def test_encode_images_is_the_vae_normalisation_decode_inverts(tiny_dir):
    from diffusers import QwenImageEditPipeline

    pipe = load(tiny_dir)
    flow = QwenImageFlow(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, TINY_SIZE), torch.linspace(0, 1, TINY_SIZE), indexing="ij")
    images = torch.stack([torch.stack([xx, yy, (xx + yy) / 2]), torch.stack([yy, 1 - xx, xx * yy])])  # smooth, [0, 1]
    x = flow.encode_images(images)
    assert x.shape == (2, *flow.sample_shape)
    # the reference: the edit pipeline's own VAE encoding (posterior mode, (z - mean) / std) of the same images
    edit = QwenImageEditPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                 tokenizer=pipe.tokenizer, processor=None, transformer=pipe.transformer)
    z = edit._encode_vae_image((images * 2 - 1)[:, :, None], generator=None)  # [2, 16, 1, 8, 8]
    # it divides by std where the flow multiplies by 1 / std (as QwenImagePipeline's decode and img2img do):
    # one rounding apart, measured 1.2e-7 relative; the unnormalised posterior mode is 0.85 away
    torch.testing.assert_close(flow.to_vae_latents(x), z, rtol=1e-6, atol=1e-6)
    assert torch.equal(flow.from_vae_latents(flow.to_vae_latents(x)), x)  # packing round-trips exactly
    # decode undoes the normalisation: decoding the flow's latents is decoding the raw posterior mode
    # (the random VAE does not reconstruct the images; the arithmetic is what is checked). Measured 1.2e-7
    raw = pipe.vae.encode((images * 2 - 1)[:, :, None]).latent_dist.mode()
    want = (pipe.vae.decode(raw, return_dict=False)[0][:, :, 0] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(flow.decode(x), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- padding and true CFG


def test_padding_is_masked_a_prompt_in_a_batch_is_the_prompt_alone(tiny_dir):
    pipe = load(tiny_dir)
    kwargs = {"resolution": TINY_SIZE, "max_sequence_length": SEQ}
    together = QwenImageFlow(pipe, **kwargs).encode([SHORT, LONG])
    alone = [QwenImageFlow(pipe, **kwargs).encode([p]) for p in (SHORT, LONG)]  # fresh flows: no shared cache
    (embeds, mask), ((short, short_mask), (long, long_mask)) = together, alone
    assert short.shape[1] == 9 and long.shape[1] == SEQ and bool(short_mask.all()) and bool(long_mask.all())
    assert embeds.shape[1] == SEQ and lengths(mask) == [9, SEQ] and not embeds[0, 9:].any()
    # the text encoder sees the short prompt right-padded; causal attention keeps its tokens as alone (measured
    # 2.4e-7 of |e| <= 3.4: a batched GEMM's rounding)
    torch.testing.assert_close(embeds[0, :9], short[0], rtol=1e-5, atol=1e-5)
    t = torch.tensor([0.2, 0.7])  # one time per sample
    x = torch.randn((2, 16, 64), generator=torch.Generator().manual_seed(3))
    flow = QwenImageFlow(pipe, **kwargs)
    with torch.no_grad():
        batched = flow.transformer_velocity(t, x, together)
        single = [flow.transformer_velocity(t[i:i + 1], x[i:i + 1], alone[i]) for i in range(2)]
        unmasked = flow.transformer_velocity(t, x, (embeds, torch.ones_like(mask)))
    # measured 2.4e-7 and 3.6e-7 (rounding, |v| <= 2); attending to the seven zero padding rows (the unmasked
    # velocity) moves the short prompt's velocity by 0.078 (asserted > 1e-3 below), so the tolerance resolves a
    # mask lost on the way
    torch.testing.assert_close(batched[0:1], single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1:2], single[1], rtol=1e-5, atol=1e-5)
    assert (unmasked[0] - batched[0]).abs().max().item() > 1e-3
    assert torch.equal(unmasked[1], batched[1])  # the long prompt has no padding: same inputs


def test_true_cfg_with_a_negative_prompt_of_another_length(tiny_dir):
    """The guided velocity is the pipeline's step by step: two forwards, each prompt at its own length and mask,
    combined and rescaled per token to the conditional prediction's norm; per-sample times."""
    pipe = load(tiny_dir)
    scale = 4.0
    flow = QwenImageFlow(pipe, resolution=TINY_SIZE, guidance_scale=scale, negative_prompt=NEGATIVE,
                         max_sequence_length=SEQ)
    t = torch.tensor([0.1, 0.6])
    x = torch.randn((2, 16, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = flow.velocity(t, x, flow.encode([SHORT, LONG]))
        # by hand, in diffusers' convention (sigma = 1 - t, prediction = noise - data), as QwenImagePipeline.__call__
        embeds, mask = pipe.encode_prompt([SHORT, LONG], max_sequence_length=SEQ)
        neg, neg_mask = pipe.encode_prompt(NEGATIVE, max_sequence_length=SEQ)
        assert neg_mask is None and neg.shape[1] == 11 and lengths(mask) == [9, 16]  # a third length, unpadded
        img_shapes = [[(1, 4, 4)]] * 2
        common = {"hidden_states": x, "timestep": 1 - t, "img_shapes": img_shapes, "return_dict": False}
        cond = pipe.transformer(encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, **common)[0]
        uncond = pipe.transformer(encoder_hidden_states=neg.expand(2, -1, -1), encoder_hidden_states_mask=None,
                                  **common)[0]
        combined = uncond + scale * (cond - uncond)
        rescaled = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    # measured 0 here (the same operations on the same inputs; |v| <= 2.2); 1e-5 leaves room for another BLAS.
    # Without the rescaling the velocity differs by 0.038 (asserted > 1e-2 below); with the negative zero-padded
    # to the prompts' length and unmasked, by 0.24
    torch.testing.assert_close(ours, -rescaled, rtol=1e-5, atol=1e-5)
    assert (combined - rescaled).abs().max().item() > 1e-2
    # negative_prompt None is the empty prompt (the pipeline would not guide at all), and it is a real prompt
    empty = QwenImageFlow(pipe, resolution=TINY_SIZE, guidance_scale=scale, negative_prompt="", max_sequence_length=SEQ)
    none = QwenImageFlow(pipe, resolution=TINY_SIZE, guidance_scale=scale, negative_prompt=None,
                         max_sequence_length=SEQ)
    cond_rows = flow.encode([SHORT, LONG])
    with torch.no_grad():
        v_empty, v_none = empty.velocity(t, x, cond_rows), none.velocity(t, x, cond_rows)
    assert none.negative_prompt == "" and torch.equal(v_none, v_empty)
    assert (v_empty - ours).abs().max().item() > 1e-3  # another negative prompt, another guided velocity (0.14)


# ----------------------------------------------------------------------------- LoRA export


def test_save_lora_loads_into_a_fresh_pipeline(tiny_dir, tmp_path):
    from orwcfm_fast import ORWCFMTrainer

    def redness(images):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))

    config = {"prompts": [SHORT, LONG], "reward": redness, "resolution": TINY_SIZE, "guidance_scale": 2.0,
              "negative_prompt": NEGATIVE, "ode_steps": 2, "lora_rank": 4, "lora_alpha": 8, "batch_size": 2,
              "images_per_prompt": 1, "max_sequence_length": SEQ, "seed": 0, "warmup_steps": 0,
              "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path), "handle_signals": False}
    # lora_alpha 8 at rank 4 (scale 2): an export that lost the alpha would load at half scale
    trainer = ORWCFMTrainer(load(tiny_dir), config, "cpu")
    trainer.train(1, 2)
    trainer.save_lora(tmp_path / "lora")
    fresh = load(tiny_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    cond = trainer.models.flow.encode([SHORT, LONG])
    t, x = torch.tensor([0.3, 0.8]), torch.randn((2, *trainer.sample_shape), generator=torch.Generator().manual_seed(5))
    ours, theirs, base = policy_loaded_and_base(trainer, fresh.transformer, t, x, cond)
    # measured bit-equal (the same weights and operations); rtol 1e-5 as the other families' export tests. Loaded
    # at half scale (alpha lost) it is 9.3e-3 off
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    # two guided steps at lr 1e-2 move the policy away from the base: measured 1.8e-2
    assert (ours - base).abs().max().item() > 1e-3
