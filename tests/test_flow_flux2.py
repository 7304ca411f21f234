"""FLUX.2 and FLUX.2-klein (orwcfm_fast.flows.flux2) against their diffusers pipelines.

The tiny pipelines are built in memory (``tiny_flux2_pipeline``), saved once per session (conftest's
``tiny_dir``) and loaded with ``from_pretrained`` (``HF_HUB_OFFLINE=1``). The independent reference of
everything the flow computes is the pipeline itself: its ``__call__`` (what reaches the transformer,
recorded with a forward pre-hook; the latents after its last step, read by its step-end callback; its
``output_type="latent"`` and decoded output) and its own helpers (``_encode_vae_image``,
``_unpack_latents_with_ids``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image flows need the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image flows need the 'diffusers' extra")

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows import flow_for_pipeline  # noqa: E402
from orwcfm_fast.flows.flux2 import Flux2Flow, tiny_flux2_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPTS = ["a dog", "a red cat in a small boat"]  # different token lengths, both inside SEQ
SEQ = 48  # max_sequence_length: the tiny Mistral template takes 31 tokens before the prompt, Qwen's 3
HW = (32, 64)  # height, width: non-square, so a swapped row / column layout cannot pass
STEPS = 3


def load(tiny_dir, name):
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    cls = Flux2KleinPipeline if name == "flux2_klein" else Flux2Pipeline
    return cls.from_pretrained(tiny_dir(name), dtype=torch.float32)


@pytest.fixture(scope="module")
def shared(tiny_dir):
    """``shared(name)``: one loaded pipeline per name for the tests that only read it (the flows keep their own
    prompt caches; hooks are removed after each run). ``"flux2_klein_distilled"``: a step-distilled klein
    (``is_distilled``) built in memory."""
    pipes = {}

    def get(name):
        if name not in pipes:
            pipes[name] = (tiny_flux2_pipeline(klein=True, distilled=True) if name == "flux2_klein_distilled"
                           else load(tiny_dir, name))
        return pipes[name]

    return get


def record_transformer(pipe):
    """A list that collects, per transformer forward, the inputs that decide its output."""
    calls = []

    def hook(module, args, kwargs):
        guidance = kwargs.get("guidance")
        calls.append({"timestep": kwargs["timestep"].detach().clone(),
                      "guidance": None if guidance is None else guidance.detach().clone(),
                      "text": kwargs["encoder_hidden_states"].detach().clone(),
                      "batch": kwargs["hidden_states"].shape[0]})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


def pipeline_run(pipe, x_0, guidance_scale, **kwargs):
    """The pipeline's ``__call__`` from the flow's noise ``x_0`` (put in its own [B, 4C, h, w] layout by its own
    ``_unpack_latents_with_ids``): ``(final packed latents, its output_type="latent", transformer calls)``."""
    h, w = (s // (pipe.vae_scale_factor * 2) for s in HW)
    ids = pipe._prepare_latent_ids(torch.empty(x_0.shape[0], 0, h, w))
    latents = pipe._unpack_latents_with_ids(x_0, ids)
    last = {}

    def keep(pipeline, i, t, callback_kwargs):
        last["latents"] = callback_kwargs["latents"].clone()
        return {}

    calls, handle = record_transformer(pipe)
    try:
        extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        out = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=STEPS, height=HW[0], width=HW[1],
                   max_sequence_length=SEQ, output_type="latent", callback_on_step_end=keep, **extra, **kwargs).images
    finally:
        handle.remove()
    return last["latents"], out, calls


def flow_run(flow, x_0):
    calls, handle = record_transformer(flow.pipe)
    try:
        x_1 = flow.sample(x_0, flow.encode(PROMPTS), steps=STEPS)
    finally:
        handle.remove()
    return x_1, calls


def assert_same_calls(ours, theirs):
    """The flow's transformer forwards are the pipeline's: as many, same batch, timesteps, guidance and text.

    Within a step the order may differ (klein's pipeline runs the prompt's forward before the negative one,
    the library the negative first): each forward of a step is matched to the pipeline's with the same text.
    """
    assert len(ours) == len(theirs) and len(ours) % STEPS == 0
    per_step = len(ours) // STEPS
    for step in range(STEPS):
        chunk = theirs[step * per_step:(step + 1) * per_step]
        for a in ours[step * per_step:(step + 1) * per_step]:
            # the same prompt embeddings (encoded alone here, in a batch there: float32 GEMM rounding)
            same_text = [b for b in chunk if b["text"].shape == a["text"].shape
                         and torch.allclose(a["text"], b["text"], rtol=1e-5, atol=1e-6)]
            assert len(same_text) == 1, f"step {step}: no single pipeline forward with this forward's text"
            b = same_text[0]
            chunk = [c for c in chunk if c is not b]
            assert a["batch"] == b["batch"]
            # timesteps: the pipeline's float32 sigma * 1000 / 1000, ours 1 - t of a float64 grid: rounding only
            torch.testing.assert_close(a["timestep"], b["timestep"], rtol=0, atol=1e-6)
            if b["guidance"] is None:
                assert a["guidance"] is None
            else:  # the guidance value itself, in the dtype and shape the pipeline passes: exactly
                assert a["guidance"] is not None and torch.equal(a["guidance"], b["guidance"])


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["flux2", "flux2_klein"])
def test_tiny_pipeline_round_trips_and_picks_the_flow(shared, name):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration, PixtralProcessor, Qwen2TokenizerFast, Qwen3ForCausalLM

    pipe = shared(name)  # loaded from its saved folder (conftest's tiny_dir)
    klein = name == "flux2_klein"
    assert type(pipe) is (Flux2KleinPipeline if klein else Flux2Pipeline)
    assert isinstance(pipe.transformer, Flux2Transformer2DModel) and isinstance(pipe.vae, AutoencoderKLFlux2)
    assert isinstance(pipe.text_encoder, Qwen3ForCausalLM if klein else Mistral3ForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2TokenizerFast if klein else PixtralProcessor)
    assert pipe.transformer.config.guidance_embeds is (not klein)
    # the saved folder holds exactly what the builder makes (same seed, same weights and statistics)
    built = tiny_flux2_pipeline(klein=klein)
    for key in ("transformer", "vae", "text_encoder"):
        want, got = built.components[key].state_dict(), pipe.components[key].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), key
    assert not torch.allclose(pipe.vae.bn.running_mean, torch.zeros(1))  # the normalisation is not the identity
    flow = flow_for_pipeline(pipe, resolution=list(HW), max_sequence_length=SEQ)
    assert type(flow) is Flux2Flow and flow.klein is klein and not flow.distilled
    assert flow.sample_shape == ((HW[0] // 16) * (HW[1] // 16), 4 * pipe.vae.config.latent_channels)


# ----------------------------------------------------------------------------- sampler vs __call__


@pytest.mark.parametrize("name,guidance", [("flux2", 1.0), ("flux2", 2.5), ("flux2_klein", 1.0), ("flux2_klein", 3.0)])
def test_sampler_is_the_pipeline(shared, name, guidance):
    """flow.sample == the pipeline's __call__ (fp32, 3 steps, two prompts of different lengths), with and without
    guidance: FLUX.2-dev's guidance input (1 and 2.5), klein's true CFG (off at 1, two forwards per step at 3)."""
    pipe = shared(name)
    flow = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ, guidance_scale=guidance)
    lengths = [len(pipe.tokenizer.tokenizer(p)["input_ids"]) if name == "flux2" else len(pipe.tokenizer(p)["input_ids"])
               for p in PROMPTS]
    assert lengths[0] < lengths[1]
    x_0 = flow.noise(2, torch.Generator().manual_seed(0))
    ours, our_calls = flow_run(flow, x_0)
    theirs, out, their_calls = pipeline_run(pipe, x_0, guidance)
    # measured 4.8e-7 (8.3e-7 with klein's CFG at 3) on latents of magnitude ~4-5: float32 rounding of batched
    # GEMMs (the timesteps agree exactly); a wrong time grid, sign, guidance or layout is off by 1e-2 or more
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert_same_calls(our_calls, their_calls)
    assert len(their_calls) == STEPS * (2 if flow._guided() else 1)
    if name == "flux2":
        assert torch.equal(out, theirs)  # FLUX.2-dev returns its packed latents: the flow's own layout
        assert {float(c["guidance"][0]) for c in our_calls} == {guidance}
    else:
        assert flow._guided() is (guidance > 1)
        # klein returns the VAE's latents (unpacked, de-normalised, unpatchified): the flow's to_vae_latents
        torch.testing.assert_close(flow.to_vae_latents(ours), out, rtol=1e-5, atol=1e-5)
        assert all(c["guidance"] is None for c in our_calls)


def test_default_guidance_is_each_pipelines(shared):
    """guidance_scale None: the pipeline's own default reaches the transformer (FLUX.2-dev: guidance 4.0 as an
    input; klein base: CFG at 4.0, two forwards per step; step-distilled klein: no guidance at all, like the
    pipeline, which ignores guidance_scale, and an explicit guidance_scale warns)."""
    for name in ("flux2", "flux2_klein", "flux2_klein_distilled"):
        pipe = shared(name)
        flow = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ, guidance_scale=None)
        x_0 = flow.noise(2, torch.Generator().manual_seed(1))
        ours, our_calls = flow_run(flow, x_0)
        theirs, _, their_calls = pipeline_run(pipe, x_0, None)  # no guidance_scale: the pipeline's default
        assert_same_calls(our_calls, their_calls)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # as in test_sampler_is_the_pipeline
        if name == "flux2":
            assert flow.guidance_scale == 4.0 and not flow._guided()
            assert all(torch.equal(c["guidance"], torch.full((2,), 4.0)) for c in their_calls)
        elif name == "flux2_klein":
            assert flow.guidance_scale == 4.0 and flow._guided() and len(their_calls) == 2 * STEPS
        else:
            assert pipe.config.is_distilled and flow.distilled and not flow._guided()
            assert len(their_calls) == STEPS and all(c["guidance"] is None for c in their_calls)
            with pytest.warns(UserWarning, match="ignored for step-distilled"):
                guided = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ, guidance_scale=4.0)
            assert not guided._guided()


# ----------------------------------------------------------------------------- LoRA export


def test_lora_round_trip(tiny_dir, tmp_path):
    """Trainer LoRA -> save_lora -> a fresh pipeline's own load_lora_weights gives the policy's velocity.

    On FLUX.2-dev only: klein's transformer is the same class (Flux2Transformer2DModel), adapted on the same
    default targets and exported by the same Flux2LoraLoaderMixin. The default targets reach the single-stream
    blocks' fused projections, and every training forward gets the pipeline's default guidance.
    """
    pipe = load(tiny_dir, "flux2")
    guidance = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: guidance.append(k["guidance"]), with_kwargs=True)

    def redness(images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))

    config = {"prompts": ["a dog", "a red cat"], "reward": redness, "resolution": list(HW), "ode_steps": 2,
              "lora_rank": 4, "lora_alpha": 8, "batch_size": 2, "images_per_prompt": 1, "max_sequence_length": SEQ,
              "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path),
              "handle_signals": False}
    trainer = ORWCFMTrainer(pipe, config, "cpu")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A")}
    assert {"single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
            "transformer_blocks.0.attn.to_add_out"} <= adapted
    trainer.train(1, 2)
    assert guidance and all(g is not None and torch.equal(g, torch.full_like(g, 4.0)) for g in guidance)
    trainer.save_lora(tmp_path / "lora")
    flow = trainer.models.flow
    cond = flow.encode(["a dog", "a tree"])
    t, x = torch.tensor([0.3, 0.8]), torch.randn(2, *flow.sample_shape, generator=torch.Generator().manual_seed(2))
    fresh = load(tiny_dir, "flux2")
    with torch.no_grad():
        policy = flow.transformer_velocity(t, x, cond, trainer.net_model)
        with trainer.models.roles.role("reference"):
            base = flow.transformer_velocity(t, x, cond, trainer.net_model)
        # the trainer's flow runs the transformer it is handed: the fresh one, still without the LoRA, is the base
        pristine = flow.transformer_velocity(t, x, cond, fresh.transformer)
        fresh.load_lora_weights(tmp_path / "lora")
        loaded = flow.transformer_velocity(t, x, cond, fresh.transformer)
        own = Flux2Flow(fresh, resolution=list(HW), max_sequence_length=SEQ, guidance_scale=None)  # 4.0, as trained
        own = own.transformer_velocity(t, x, cond)
    # measured bit-equal; a lost lora_alpha (half scale) or a dropped adapter moves it by a share of the 1.5e-2 below
    torch.testing.assert_close(pristine, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded, policy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own, policy, rtol=1e-5, atol=1e-6)  # the fresh pipeline through its own flow
    assert (policy - base).abs().max() > 1e-3  # measured 1.5e-2 after two steps: the adapters moved


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("name", ["flux2", "flux2_klein"])
def test_decode_and_encode_are_the_pipelines(shared, name):
    """decode: the pipeline's own decoding of the same latents (its step-end callback puts ours in place of its
    last step's); encode_images: its _encode_vae_image (VAE mode, 2x2 patchify, batch-norm statistics), packed."""
    pipe = shared(name)
    flow = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ, guidance_scale=1.0)
    x = flow.noise(3, torch.Generator().manual_seed(3))
    images = flow.decode(x, batch_size=2)
    assert images.shape == (3, 3, *HW) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0

    def replace(pipeline, i, t, callback_kwargs):
        return {"latents": x.clone()}

    want = pipe(prompt=["a dog"] * 3, num_inference_steps=1, height=HW[0], width=HW[1], max_sequence_length=SEQ,
                guidance_scale=1.0, output_type="pt", callback_on_step_end=replace).images
    # the same convolutions in chunks of 2 vs one batch of 3: float32 rounding only (measured 1.7e-6 on images
    # of std 0.13-0.16; a missing batch-norm de-normalisation or unpatchify changes them by ~1e-1)
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)

    smooth = torch.linspace(0, 1, HW[1]).expand(3, 3, HW[0], HW[1]).clone()
    smooth[:, 1] = smooth[:, 1].flip(-1)
    smooth[1] = smooth[1] * 0.5
    with torch.no_grad():
        theirs = pipe._pack_latents(pipe._encode_vae_image(smooth * 2 - 1, generator=None))
    torch.testing.assert_close(flow.encode_images(smooth), theirs, rtol=1e-5, atol=1e-6)  # same ops: measured 0
    # the normalisation's two directions invert each other (measured 2.4e-7: float32 (x * s + m - m) / s)
    torch.testing.assert_close(flow.from_vae_latents(flow.to_vae_latents(x)), x, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- edge cases


def test_per_sample_times_and_step_dependent_shift(shared):
    """Per-sample t [B] in one forward equals each sample at its own t; FLUX.2's shift mu depends on the number
    of steps (compute_empirical_mu), and the grid and sampling_shift follow the step count asked for."""
    import math

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    pipe = shared("flux2")
    flow = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ)
    cond = flow.encode(PROMPTS)
    x = flow.noise(2, torch.Generator().manual_seed(4))
    t = torch.tensor([0.15, 0.7])
    with torch.no_grad():
        both = flow.transformer_velocity(t, x, cond)
        each = torch.cat([flow.transformer_velocity(t[i:i + 1], x[i:i + 1], tuple(c[i:i + 1] for c in cond))
                          for i in range(2)])
    torch.testing.assert_close(both, each, rtol=1e-5, atol=1e-6)  # batch of 2 vs 1: GEMM rounding only
    assert not torch.allclose(both[0], flow.transformer_velocity(t[1:], x[:1], tuple(c[:1] for c in cond))[0])

    tokens = flow.sample_shape[0]
    for steps in (4, 28):
        mu = compute_empirical_mu(tokens, steps)
        assert flow.sampling_shift(steps) == pytest.approx(math.exp(mu), rel=1e-12)
        sigmas = [1 - t for t in flow.time_grid(steps)]
        uniform = [1 - i / steps for i in range(steps)]  # the pipeline's linspace(1, 1/S, S), then shifted by mu
        want = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in uniform] + [0.0]
        assert sigmas == pytest.approx(want, abs=1e-6)  # the scheduler's float32 sigmas
    assert flow.sampling_shift(4) != pytest.approx(flow.sampling_shift(28))
    assert flow.sampling_shift() == pytest.approx(math.exp(compute_empirical_mu(tokens, 50)))  # pipeline default
    assert Flux2Flow(pipe, resolution=list(HW), time_shift=2.0).sampling_shift(4) == 2.0


def test_resolution_and_short_sequence_are_explained(shared):
    pipe = shared("flux2")
    with pytest.raises(ValueError, match="multiples of 16"):
        Flux2Flow(pipe, resolution=[64, 40])
    assert Flux2Flow(pipe, max_sequence_length=SEQ).height == 1024  # the pipeline's default size
    # the FLUX.2-dev template (system message) fills 16 tokens: every prompt would encode the same
    with pytest.warns(UserWarning, match="leaves no token for the prompt"):
        short = Flux2Flow(pipe, resolution=list(HW), max_sequence_length=16)
    a, b = short.encode(PROMPTS)[0]
    assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Flux2Flow(pipe, resolution=list(HW), max_sequence_length=SEQ)
        Flux2Flow(shared("flux2_klein"), resolution=list(HW), max_sequence_length=16)  # klein's fits
