"""ORWCFMTrainer on text-to-image pipelines (tiny random-init SD3 / Flux, saved and loaded) and
on conditional velocity models ``model(t, x, *cond)``.

Random models cannot show learning (the prompted-digits demo does); these tests check the
wiring: prompts, CFG sampling, rewards on decoded images, LoRA roles in one transformer (W2 exactly
zero at the start, base weights never change), diffusers-format export, exact resume, bad input.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from _lora_velocities import policy_loaded_and_base  # noqa: E402
from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.checkpoints import CheckpointError  # noqa: E402
from orwcfm_fast.config import ConfigError  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE, tiny_sd3_pipeline  # noqa: E402

PROMPTS = ["a dog", "a red cat", "a tree", "a blue car"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def load(saved, family="sd35"):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(saved / family, dtype=torch.float32)


class PromptReward:
    """Mean red minus mean blue, plus 0.1 for prompts with 'dog'; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append((images.shape, images.min().item(), images.max().item(), list(prompts)))
        bonus = torch.tensor([0.1 if "dog" in p else 0.0 for p in prompts])
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)) + bonus


def config(tmp_path, **overrides):
    cfg = {"prompts": PROMPTS, "reward": PromptReward(), "resolution": TINY_SIZE, "guidance_scale": 4.5,
           "ode_steps": 2, "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16,
           "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(tmp_path),
           "handle_signals": False}
    cfg.update(overrides)
    return cfg


def base_weights(transformer):
    return {k.replace(".base_layer", ""): v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}


def lora(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.models.trainable_parameters()])


def test_lora_training_on_sd35(saved, tmp_path):
    pipe = load(saved)
    base = base_weights(pipe.transformer)
    reward = PromptReward()
    trainer = ORWCFMTrainer(pipe, config(tmp_path, reward=reward), "cpu")
    assert trainer.net_model is pipe.transformer
    assert trainer.sample_shape == (16, 8, 8)
    first = trainer.training_step()
    assert first["w2_loss"] == 0.0  # the policy starts as the reference, exactly
    shape, lo, hi, prompts = reward.calls[-1]
    assert shape == (4, 3, TINY_SIZE, TINY_SIZE) and 0.0 <= lo and hi <= 1.0
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and set(prompts) <= set(PROMPTS)
    start = lora(trainer)
    history = trainer.train(1, 2)
    assert len(history) == 1 and history[0]["w2_loss"] >= 0.0
    assert not torch.equal(lora(trainer), start)
    after = base_weights(pipe.transformer)
    assert all(torch.equal(after[k], base[k]) for k in base)  # base weights never change
    # the epoch ended with last_policy = policy (adapter to adapter)
    last = torch.cat([p.detach().flatten() for p in trainer.models.roles.last_policy_parameters()])
    assert torch.equal(last, lora(trainer))
    # a second epoch's first step sees a non-zero W2 once the policy moved away from the reference
    assert trainer.training_step()["w2_loss"] > 0.0


def test_save_lora_loads_into_a_fresh_pipeline(saved, tmp_path):
    # lora_alpha 8 at rank 4 (scale 2): with alpha equal to the rank a lost alpha would load unnoticed
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, lora_alpha=8), "cpu")
    trainer.train(1, 2)
    trainer.save_lora(tmp_path / "lora")
    fresh = load(saved)
    fresh.load_lora_weights(tmp_path / "lora")
    cond = trainer.models.flow.encode(["a dog", "a tree"])
    t, x = torch.tensor([0.3, 0.8]), torch.randn(2, *trainer.sample_shape)
    ours, theirs, base = policy_loaded_and_base(trainer, fresh.transformer, t, x, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, base, rtol=1e-5, atol=1e-6)


def test_flux_trains_with_its_guidance_input(saved, tmp_path):
    """Flux-dev's guidance is an input of every forward of a training step (the sampler's, the policy's, the
    reference's), exactly as FluxPipeline passes it (the scale itself: the transformer multiplies it by 1000),
    and the step trains the adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from orwcfm_fast.flows.lora import LAST_POLICY, POLICY

    pipe = load(saved, "flux")
    calls = []  # (role, grad enabled, guidance) per transformer forward
    layers = []  # a LoRA layer, once the trainer has adapted the transformer: which role is switched on

    def record(module, args, kwargs):
        role = None
        if layers:
            role = "reference" if layers[0].disable_adapters else layers[0].active_adapters[0]
        calls.append((role, torch.is_grad_enabled(), kwargs.get("guidance")))

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    # The independent reference: what FluxPipeline itself gives the transformer at this guidance scale
    # (2.5, not the 3.5 default, so neither a dropped setting nor the default passes for it).
    pipe(prompt="a dog", guidance_scale=2.5, num_inference_steps=1, height=TINY_SIZE, width=TINY_SIZE,
         max_sequence_length=16, output_type="latent")
    (_, _, want), = calls
    assert want is not None and want.shape == (1,)
    calls.clear()

    trainer = ORWCFMTrainer(pipe, config(tmp_path, guidance_scale=2.5), "cpu")
    assert trainer.sample_shape == (16, 64)
    layers.append(next(m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)))
    calls.clear()  # the constructor's check of the model's output shape is not training
    start = lora(trainer)
    out = trainer.training_step()
    assert out["w2_loss"] == 0.0 and torch.isfinite(torch.tensor(out["total_loss"]))
    # every role ran: the sampler (last policy, no grad), the trained policy (with grad), the reference
    assert {(role, grad) for role, grad, _ in calls} == {(LAST_POLICY, False), (POLICY, True), ("reference", False)}
    for role, _, got in calls:  # one guidance per sample, the pipeline's value and dtype, exactly
        assert got is not None and got.dtype == want.dtype and torch.equal(got, want.expand(got.shape[0])), (role, got)
    assert not torch.equal(lora(trainer), start)  # the step moved the policy adapter


def test_exact_resume_of_adapters_optimiser_and_rng(saved, tmp_path):
    def run(cfg_dir):
        return ORWCFMTrainer(load(saved), config(cfg_dir, ema_decay=0.5, loss_timesteps=2,
                                                 time_sampling="logit_normal"), "cpu")

    full = run(tmp_path / "full")
    full.train(2, 2)
    first = run(tmp_path / "a")
    first.train(1, 2)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "lora" in ckpt and "base_fingerprint" in ckpt
    assert not any(k.startswith("transformer") for k in ckpt)  # base weights identified, not saved
    resumed = run(tmp_path / "b")
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.train(1, 2)
    assert torch.equal(lora(resumed), lora(full))
    assert all(torch.equal(a, b) for a, b in zip(resumed._ema, full._ema))
    assert resumed.history == full.history
    assert torch.equal(resumed.generator.get_state(), full.generator.get_state())
    assert torch.equal(resumed.cpu_generator.get_state(), full.cpu_generator.get_state())


def test_resume_refuses_another_base_model(saved, tmp_path):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path), "cpu")
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    other_pipe = tiny_sd3_pipeline(sd35=True, seed=7)
    other = ORWCFMTrainer(other_pipe, config(tmp_path), "cpu")
    before = lora(other)
    with pytest.raises(CheckpointError, match="other base weights"):
        other.load_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(lora(other), before)
    wrong_rank = ORWCFMTrainer(load(saved), config(tmp_path, lora_rank=2), "cpu")
    with pytest.raises(CheckpointError, match="lora_rank"):
        wrong_rank.load_checkpoint(tmp_path / "ckpt.pt")


def test_prompt_files(saved, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("# training prompts\na dog\n\na red cat\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)) + "\n")
    pipe = load(saved)
    assert ORWCFMTrainer(pipe, config(tmp_path, prompts=str(txt)), "cpu").prompts == ["a dog", "a red cat"]
    assert ORWCFMTrainer(load(saved), config(tmp_path, prompts=str(jsonl)), "cpu").prompts == PROMPTS


@pytest.mark.parametrize("overrides, match", [
    ({"prompts": "{tmp}/MISSING.txt"}, "does not exist"),
    ({"prompts": "{tmp}/EMPTY.txt"}, "holds no prompts"),
    ({"prompts": "{tmp}/BAD.jsonl"}, "line 2 has no \"prompt\""),
    ({"prompts": "{tmp}/BAD.csv"}, ".txt"),
    ({"resolution": 72}, "multiples of 16"),
    ({"batch_size": 5}, "multiple of 'images_per_prompt'"),
    ({"coupling": "exact_ot"}, "independent"),
    ({"overlap_sampling": True}, "overlap_sampling"),
    ({"prompts": None}, "'prompts' is required"),
    ({"lora_target_modules": ["no_such_layer"]}, "match no module"),
    ({"sample_shape": (4, 8, 8)}, "sample_shape"),
])
def test_bad_input_is_a_clear_config_error(saved, tmp_path, overrides, match):
    (tmp_path / "EMPTY.txt").write_text("\n# nothing\n")
    (tmp_path / "BAD.jsonl").write_text('{"prompt": "a dog"}\n{"text": "a cat"}\n')
    (tmp_path / "BAD.csv").write_text("a dog\n")
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=match):
        ORWCFMTrainer(load(saved), config(tmp_path, **overrides), "cpu")


def test_a_reward_of_the_wrong_shape_changes_nothing(saved, tmp_path):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, reward=lambda images, prompts: torch.zeros(3)), "cpu")
    before = lora(trainer)
    with pytest.raises(ValueError, match=r"reward returned shape \[3\]"):
        trainer.train(1, 1)
    assert torch.equal(lora(trainer), before) and trainer.global_step == 0


def test_one_argument_rewards_get_images_only(saved, tmp_path):
    seen = []

    def redness(images):
        seen.append(images.shape)
        return images[:, 0].mean((1, 2))

    trainer = ORWCFMTrainer(load(saved), config(tmp_path, reward=redness), "cpu")
    trainer.training_step()
    assert seen[-1] == (4, 3, TINY_SIZE, TINY_SIZE)


@pytest.mark.parametrize("input_range", [(-1.0, 1.0), (0.0, 1.0), None])
def test_rewards_get_images_in_their_input_range(saved, tmp_path, input_range):
    """Each reward declares the image range it takes (clip / jpeg: [-1, 1], preference rewards: [0, 1]);
    a reward that declares none gets the decoded [0, 1] images as they are."""
    from orwcfm_fast.rewards import Reward, register_reward

    seen = []

    class Probe(Reward):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.mean((1, 2, 3))

    Probe.input_range = input_range
    register_reward("test_range_probe", lambda config, device: Probe(), overwrite=True)
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, reward="test_range_probe"), "cpu")
    trainer.sample_batch()
    lo, hi = seen[-1].min().item(), seen[-1].max().item()
    if input_range == (-1.0, 1.0):
        assert -1.0 <= lo < 0.0 and hi <= 1.0  # decoded [0, 1] images mapped to [-1, 1]
    else:
        assert 0.0 <= lo and hi <= 1.0


def test_full_fine_tuning_keeps_three_transformers(saved, tmp_path):
    pipe = load(saved)
    trainer = ORWCFMTrainer(pipe, config(tmp_path, lora_rank=None), "cpu")
    assert trainer.ref_model.transformer is not pipe.transformer
    assert trainer.last_policy.transformer is not pipe.transformer
    ref_before = base_weights(trainer.ref_model.transformer)
    out = trainer.training_step()
    assert out["w2_loss"] == 0.0
    assert all(torch.equal(v, ref_before[k]) for k, v in base_weights(trainer.ref_model.transformer).items())
    assert not all(torch.equal(v, ref_before[k]) for k, v in base_weights(pipe.transformer).items())
    with pytest.raises(ValueError, match="save_lora needs LoRA"):
        trainer.save_lora(tmp_path / "lora")


def test_bf16_pipeline_trains_fp32_adapters(saved, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(saved / "sd35", dtype=torch.bfloat16)
    trainer = ORWCFMTrainer(pipe, config(tmp_path, precision="bf16"), "cpu")
    assert pipe.transformer.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.models.trainable_parameters()} == {torch.float32}
    start = lora(trainer)
    out = trainer.training_step()
    assert out["w2_loss"] == 0.0 and torch.isfinite(torch.tensor(out["total_loss"]))
    assert not torch.equal(lora(trainer), start)


def test_full_fine_tuning_overlaps_batches_with_the_same_results(saved, tmp_path):
    """Three transformers (lora_rank None): the next batch is made in the background, bit-identically."""
    runs = []
    for overlap in (False, True):
        trainer = ORWCFMTrainer(load(saved), config(tmp_path / str(overlap), lora_rank=None, overlap_sampling=overlap,
                                                    guidance_scale=1.0), "cpu")
        trainer.train(1, 3)
        runs.append((torch.cat([p.detach().flatten() for p in trainer.net_model.parameters()]), trainer.history))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_compiled_transformer_trains(saved, tmp_path):
    """config compile: the pipeline's transformer is compiled in place (backend 'eager' keeps the CPU test short)."""
    torch._dynamo.reset()
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, compile=True, compile_backend="eager"), "cpu")
    out = trainer.training_step()
    assert out["w2_loss"] == 0.0 and trainer.net_model._compiled_call_impl is not None
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_loss_time_sampling(saved, tmp_path, kind):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path, time_sampling=kind), "cpu")
    like = torch.zeros(1)
    state = trainer.generator.get_state()
    got = trainer._loss_times(1000, like)
    trainer.generator.set_state(state)
    if kind == "logit_normal":
        want = torch.sigmoid(torch.randn(1000, generator=trainer.generator))
    else:
        u = torch.rand(1000, generator=trainer.generator)
        s = 3.0  # the tiny pipeline's scheduler shift (SD3's)
        want = u if kind == "uniform" else 1 - s * (1 - u) / (1 + (s - 1) * (1 - u))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got.min() > 0 and got.max() < 1


def test_gradient_checkpointing_gives_the_same_step(saved, tmp_path):
    runs = []
    for flag in (False, True):
        trainer = ORWCFMTrainer(load(saved), config(tmp_path, gradient_checkpointing=flag), "cpu")
        assert pipe_checkpointing(trainer) is flag
        out = trainer.training_step()
        runs.append((out["total_loss"], lora(trainer)))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-6, atol=1e-7)


def pipe_checkpointing(trainer) -> bool:
    return bool(getattr(trainer.net_model, "gradient_checkpointing", False))


def test_missing_extra_is_named(monkeypatch):
    import builtins

    from orwcfm_fast.flows import MissingExtraError, require_diffusers

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(MissingExtraError, match=r"needs peft.*orwcfm_fast\[diffusers\]"):
        require_diffusers()


def test_sample_uses_prompts_and_the_policy(saved, tmp_path):
    trainer = ORWCFMTrainer(load(saved), config(tmp_path), "cpu")
    x = trainer.sample(3, prompts=["a dog", "a tree", "a dog"])
    assert x.shape == (3, *trainer.sample_shape)
    with pytest.raises(ValueError, match="one per sample"):
        trainer.sample(3, prompts=["a dog"])


# ----------------------------------------------------------------------------- conditional modules


class CondVelocity(torch.nn.Module):
    """``model(t, x, emb)``: a 2-D velocity conditioned on a prompt embedding."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 1 + 4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, t, x, emb):
        return self.net(torch.cat([x, t[:, None], emb], dim=1))


def encode_prompts(prompts):
    table = {p: torch.eye(4)[i] for i, p in enumerate(PROMPTS)}
    return torch.stack([table[p] for p in prompts])


def test_conditional_module_with_prompt_encoder(tmp_path):
    seen = []

    def reward(x, prompts):
        seen.append(list(prompts))
        target = torch.tensor([[1.0, 0.0] if "dog" in p else [-1.0, 0.0] for p in prompts])
        return -((x - target) ** 2).sum(1)

    torch.manual_seed(0)
    cfg = {"prompts": PROMPTS, "prompt_encoder": encode_prompts, "reward": reward, "sample_shape": (2,),
           "batch_size": 8, "images_per_prompt": 4, "ode_steps": 4, "seed": 1, "warmup_steps": 0,
           "savedir": str(tmp_path), "handle_signals": False}
    trainer = ORWCFMTrainer(CondVelocity(), cfg)
    out = trainer.training_step()
    assert out["w2_loss"] == 0.0
    assert len(seen[-1]) == 8 and len(set(seen[-1][:4])) == 1 and len(set(seen[-1][4:])) == 1
    trainer.train(1, 3)
    assert trainer.global_step == 4
    with pytest.raises(ConfigError, match="no prompts"):
        ORWCFMTrainer(CondVelocity(), {**cfg, "prompt_encoder": None})
