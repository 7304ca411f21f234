"""The text-to-image path on a GPU: tiny SD3 and Flux pipelines in bf16, with the GPU defaults.

Run by ``make gpu-check`` (``pytest -m cuda``); every test skips at run time without CUDA. The
defaults on CUDA: no whole-ODE graph for pipelines (``cuda_graphs: None``), so one test opts in to
check capture; ``compile`` with Inductor; gradient checkpointing; bf16 weights with fp32 adapters.
Each test checks what the CPU suite cannot: W2 exactly 0 at the first step in bf16 on the GPU, a
finite loss, no silent fallback (graph capture, dynamo), the capture count, a ``save_lora`` round
trip on the GPU, and the preference rewards' dtypes.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["a dog", "a red cat", "a tree", "a blue car"]


def load(saved, family, dtype=torch.bfloat16):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(saved / family, dtype=dtype)


def red(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def config(tmp_path, **overrides):
    cfg = {"prompts": PROMPTS, "reward": red, "resolution": TINY_SIZE, "guidance_scale": 4.5, "ode_steps": 4,
           "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16, "seed": 0,
           "warmup_steps": 0, "learning_rate": 1e-3, "savedir": str(tmp_path), "handle_signals": False,
           "precision": "bf16", "gradient_checkpointing": True}
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("family", ["sd35", "flux"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_lora_training_with_the_gpu_defaults(saved, tmp_path, family, compiled):
    torch._dynamo.reset()
    pipe = load(saved, family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph-capture or dynamo fallback warns: that is a failure here
        trainer = ORWCFMTrainer(pipe, config(tmp_path, compile=compiled), "cuda")
        assert trainer._sampler.use_graphs is False  # pipelines: no whole-ODE capture by default
        first = trainer.training_step()
        assert first["w2_loss"] == 0.0  # the policy starts as the reference, exactly, in bf16 on the GPU
        assert math.isfinite(first["total_loss"]) and math.isfinite(first["grad_norm"])
        history = trainer.train(1, 2)
    assert math.isfinite(history[0]["total_loss"]) and history[0]["w2_loss"] > 0.0
    assert trainer._sampler.captures == 0 and trainer._sampler.fallback_reason is None
    assert {p.dtype for p in trainer.models.trainable_parameters()} == {torch.float32}
    assert pipe.transformer.dtype == torch.bfloat16
    torch._dynamo.reset()


def test_opt_in_capture_of_the_sampling_ode(saved, tmp_path):
    """cuda_graphs True: one capture per batch shape, replayed (not re-captured) on later steps, no fallback."""
    pipe = load(saved, "sd35")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = ORWCFMTrainer(pipe, config(tmp_path, cuda_graphs=True), "cuda")
        trainer.train(1, 3)
    assert trainer._sampler.fallback_reason is None
    assert trainer._sampler.captures == 1


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_save_lora_round_trip_on_the_gpu(saved, tmp_path, family):
    trainer = ORWCFMTrainer(load(saved, family), config(tmp_path, lora_alpha=8.0), "cuda")
    trainer.train(1, 2)
    trainer.save_lora(tmp_path / "lora")
    fresh = load(saved, family).to("cuda")
    fresh.load_lora_weights(tmp_path / "lora")
    flow = trainer.models.flow
    cond = flow.encode(["a dog", "a tree"])
    t = torch.tensor([0.3, 0.8], device="cuda")
    x = torch.randn(2, *trainer.sample_shape, device="cuda")
    with torch.no_grad():
        ours = flow.transformer_velocity(t, x, cond, trainer.net_model).float()
        theirs = flow.transformer_velocity(t, x, cond, fresh.transformer).float()
        with trainer.models.roles.role("reference"):
            base = flow.transformer_velocity(t, x, cond, trainer.net_model).float()
    # bf16 base weights with fp32 adapters (ours) vs adapters loaded as bf16 (theirs): bf16's resolution
    torch.testing.assert_close(theirs, ours, rtol=2e-2, atol=2e-2)
    assert (ours - base).abs().max() > 4 * (theirs - ours).abs().max()


def test_bf16_full_fine_tuning_moves_its_master_weights(saved, tmp_path):
    pipe = load(saved, "sd35")
    trainer = ORWCFMTrainer(pipe, config(tmp_path, lora_rank=None, learning_rate=1e-5, precision="fp32"), "cuda")
    start = [p.detach().clone() for p in trainer.models.trainable_parameters()]
    out = trainer.training_step()
    assert math.isfinite(out["total_loss"])
    trained = trainer.models.trainable_parameters()
    assert {p.dtype for p in trained} == {torch.float32}
    moved = sum(int((a != b).sum()) for a, b in zip(trained, start)) / sum(p.numel() for p in trained)
    assert moved > 0.5
    assert all(torch.equal(u, t.to(u.dtype)) for u, t in zip(pipe.transformer.parameters(), trained))


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "aesthetic"])
def test_preference_rewards_run_in_their_chosen_dtype(tmp_path, name):
    """reward_dtype auto on CUDA: the dtype each reward declares safe for its ranking (benchmarks/reward_precision.py);
    explicit bf16 runs bf16 weights; scores are float32, finite and rank like the fp32 ones."""
    import sys
    from pathlib import Path

    from orwcfm_fast.rewards import make_reward

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reward_precision as rp

    paths = rp.build_reward_paths(tmp_path, width=32, image_size=32, patch=8, depth_scale=0.0, embed_dim=16)
    images = rp.group_images(2, 8, size=48, perturbation=0.3, seed=3).cuda()
    prompts = rp.group_prompts(2, 8)
    scores = {}
    for dtype in ("auto", "fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # explicit bf16 warns for a reward not measured bf16-safe
            reward = make_reward(name, {"reward_paths": paths, "reward_dtype": dtype}, torch.device("cuda"))
        weights = {p.dtype for p in reward.parameters() if p.is_floating_point()} if hasattr(reward, "parameters") \
            else set()
        want = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and type(reward).bf16_safe) else torch.float32
        assert want in weights, (dtype, weights)
        out = reward(images, prompts)
        assert out.dtype == torch.float32 and out.device.type == "cuda" and torch.isfinite(out).all()
        scores[dtype] = out
    torch.testing.assert_close(scores["auto"], scores["bf16" if type(reward).bf16_safe else "fp32"])
