"""The text-to-image path's shared guarantees, for every newer family behind the velocity contract.

Each family's own file (tests/test_flow_<family>.py) checks its flow against its pipeline's ``__call__``
and its LoRA export; this file checks, on each family's tiny pipeline (saved once per session), what the
trainer promises whatever the family:

- ``orwcfm-fast train --task text-to-image --pretrained DIR`` reads the family from ``model_index.json``,
  trains, and writes a LoRA;
- exact resume: two epochs in one run equal one epoch, a checkpoint, a new trainer and one more epoch,
  bit for bit;
- the three ``cfg_mode`` values wire the guided or unguided velocity into the loss, the reference and the
  sampler, as documented (:func:`orwcfm_fast.flows.pipeline_models.cfg_roles`);
- prompt caching: chunked, bounded and unchunked encodings agree row for row, rows of different lengths
  are padded per batch, and the cache lives in host memory;
- video families: the reward scores the decoded frames, reduced per video by ``video_frame_reduction``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows import PIPELINE_FLOWS, flow_for_pipeline  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: tiny pipeline name -> config the family needs beyond the shared one
FAMILIES = {
    "qwen_image": {},
    "flux2": {"max_sequence_length": 48},  # its chat template puts 31 tiny-tokenizer tokens before the prompt
    "flux2_klein": {},
    "z_image": {},
    "wan": {"num_frames": 5},
}
VIDEO = {"wan"}
PROMPTS = ["a dog", "a red cat on a mat", "a tree", "two blue cars"]  # different token lengths


def load(tiny_dir, name):
    import diffusers

    index = json.loads((tiny_dir(name) / "model_index.json").read_text())
    return getattr(diffusers, index["_class_name"]).from_pretrained(tiny_dir(name), dtype=torch.float32)


def _redness(images):
    """Mean red minus mean blue of images [N, 3, H, W] in [0, 1]."""
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def config(tmp_path, name, **overrides):
    cfg = {"prompts": PROMPTS, "reward": _redness, "resolution": TINY_SIZE, "guidance_scale": 3.0,
           "ode_steps": 2, "lora_rank": 4, "lora_alpha": 8, "batch_size": 4, "images_per_prompt": 2,
           "max_sequence_length": 16, "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "temperature": 1.0,
           "savedir": str(tmp_path), "handle_signals": False, "negative_prompt": "blurry"}
    cfg.update(FAMILIES[name])
    cfg.update(overrides)
    return cfg


def adapters(trainer):
    return [p.detach().clone() for p in trainer.models.trainable_parameters()]


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_resume(tmp_path, tiny_dir, name):
    """Two epochs straight vs one epoch, checkpoint, a fresh trainer on a fresh pipeline, one more epoch."""
    straight = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path / "a", name), "cpu")
    straight.train(2, 1)
    first = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path / "b", name), "cpu")
    first.train(1, 1)
    moved = [a - b for a, b in zip(adapters(first), adapters(straight))]
    assert max(float(m.abs().max()) for m in moved) > 0, "the second epoch did not move the adapters"
    first.save_checkpoint(tmp_path / "epoch1.pt")
    resumed = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path / "c", name), "cpu")
    resumed.load_checkpoint(tmp_path / "epoch1.pt")
    resumed.train(1, 1)
    for a, b in zip(adapters(resumed), adapters(straight)):
        assert torch.equal(a, b)
    assert resumed.history == straight.history
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["guided", "cfg_free", "sampling_only"])
def test_cfg_modes_wire_the_documented_velocities(tmp_path, tiny_dir, name, mode):
    """Loss policy, reference and sampler velocities against the flow's guided / unguided velocity of each role."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cfg_free warns that guidance_scale is unused: that is the point
        trainer = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path, name, cfg_mode=mode), "cpu")
    models, flow = trainer.models, trainer.models.flow
    with torch.no_grad():  # move the policy adapter away from the last policy's, so roles differ
        for p in models.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *flow.sample_shape), generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = flow.encode(PROMPTS[:2])
    roles = models.roles

    def by_hand(role, guided):
        with roles.role(role), torch.no_grad():
            return flow.velocity(t, x, cond) if guided else flow.transformer_velocity(t, x, cond)

    guided_loss, guided_sampling = {"guided": (True, True), "cfg_free": (False, False),
                                    "sampling_only": (False, True)}[mode]
    policy, reference, sampler = models.forwards(None)
    with torch.no_grad():
        got = {"policy": policy(t, x, *cond), "reference": reference(t, x, *cond), "sampler": sampler(t, x, *cond)}
    expected = {"policy": by_hand("policy", guided_loss), "reference": by_hand("reference", guided_loss),
                "sampler": by_hand("last_policy", guided_sampling)}
    for key in got:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), (name, mode, key)
    if flow._guided():  # the guided and unguided velocities really differ, so the check can fail
        assert not torch.allclose(by_hand("policy", True), by_hand("policy", False), atol=1e-4)
    assert not torch.allclose(expected["policy"], by_hand("reference", guided_loss), atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_cache_chunks_bounds_and_padding(tiny_dir, name):
    pipe = load(tiny_dir, name)
    extra = {"resolution": TINY_SIZE, "max_sequence_length": 16, **FAMILIES[name]}
    whole = flow_for_pipeline(pipe, text_encoder_batch_size=None, **extra)
    chunked = flow_for_pipeline(pipe, text_encoder_batch_size=1, prompt_cache_size=2, **extra)
    batch = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2]]
    a, b = whole.encode(batch), chunked.encode(batch)
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):  # one forward of 4 prompts vs 4 of one: only the GEMMs' summation order differs
        assert x.shape == y.shape and x.shape[0] == len(batch)
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
        assert torch.equal(x[0], x[2]) and torch.equal(y[0], y[2])  # a repeated prompt: one cached row
    assert len(chunked._cache) == 2 and len(whole._cache) == 4
    assert all(r.device.type == "cpu" for row in whole._cache.values() for r in row)
    # each prompt alone equals its row of the batch, up to the batch's padding (zeros at the end)
    for i, prompt in enumerate(batch):
        for alone, row in zip(whole.encode([prompt]), a):
            n = alone.shape[1] if alone.dim() > 1 else None
            if n is None:
                assert torch.equal(alone[0], row[i])
            else:
                assert torch.equal(alone[0], row[i][:n]) and not row[i][n:].any()


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_picks_the_family_from_model_index(tmp_path, tiny_dir, name, exported_trainers):
    from orwcfm_fast.cli import main

    index = json.loads((tiny_dir(name) / "model_index.json").read_text())
    module, flow_class = PIPELINE_FLOWS[index["_class_name"]]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {
        "resolution": TINY_SIZE, "ode_steps": 2, "lora_rank": 4, "batch_size": 2, "images_per_prompt": 2,
        "max_sequence_length": 16, **FAMILIES[name]}.items()]
    assert main(["train", "--task", "text-to-image", "--pretrained", str(tiny_dir(name)), "--prompts",
                 str(tmp_path / "prompts.txt"), "--epochs", "1", "--steps-per-epoch", "1", "--outdir",
                 str(tmp_path / "run"), *sets]) == 0
    (trainer,) = exported_trainers
    assert type(trainer.models.flow).__name__ == flow_class and type(trainer.models.flow).__module__ == module
    assert (tmp_path / "run" / "lora").is_dir() and any((tmp_path / "run" / "lora").iterdir())


@pytest.mark.parametrize("reduction", ["mean", "min"])
def test_video_rewards_score_the_decoded_frames(tmp_path, tiny_dir, reduction):
    """The trainer's reward of a video batch is the image reward of each decoded frame, reduced per video."""
    frames_seen = []

    def reward(images):
        frames_seen.append(images.shape)
        return _redness(images)

    name = "wan"
    trainer = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path, name, reward=reward,
                                                         video_frame_reduction=reduction), "cpu")
    samples = trainer.models.flow.noise(2, torch.Generator().manual_seed(0))
    total, _ = trainer._score(samples, PROMPTS[:2])
    videos = trainer.models.flow.decode(samples)
    frames = trainer.models.flow.frames
    assert videos.shape[:3] == (2, 3, frames) and frames_seen[-1][0] == 2 * frames
    per_frame = torch.tensor([[float(_redness(videos[i, :, j][None])) for j in range(frames)] for i in range(2)])
    expected = per_frame.mean(1) if reduction == "mean" else per_frame.min(1).values
    assert torch.allclose(total, expected, atol=1e-6)


def test_per_prompt_evaluation_of_videos(tmp_path, tiny_dir):
    """evaluate() on a video family: per-prompt reward of the frames, diversity of whole videos, a frame grid."""
    from PIL import Image

    from orwcfm_fast.evaluation import isolated_rng
    from orwcfm_fast.metrics import mean_pairwise_distance

    name = "wan"
    trainer = ORWCFMTrainer(load(tiny_dir, name), config(tmp_path, name, video_frame_reduction="min"), "cpu")
    out = trainer.evaluate(PROMPTS[:2], samples_per_prompt=3, outdir=tmp_path / "eval")
    assert set(out["per_prompt"]) == set(PROMPTS[:2]) and out["embedding"] == "pixels"
    # the first prompt again, by hand: the same noise (seeded by prompt index), frames scored one by one
    with isolated_rng(trainer, 0):
        samples = trainer.sample(3, batch_size=3, prompts=[PROMPTS[0]] * 3)
    videos = trainer.models.flow.decode(samples)
    frames = trainer.models.flow.frames
    worst = [min(float(_redness(videos[i, :, j][None])) for j in range(frames)) for i in range(3)]
    row = out["per_prompt"][PROMPTS[0]]
    assert row["reward"] == pytest.approx(sum(worst) / 3, abs=1e-6)
    flat = videos.reshape(3, -1).double()
    distances = [float((flat[i] - flat[j]).norm()) for i in range(3) for j in range(i + 1, 3)]
    assert row["diversity"] == pytest.approx(sum(distances) / 3, rel=1e-6)
    assert mean_pairwise_distance(flat) == pytest.approx(row["diversity"], rel=1e-9)
    grid = Image.open(out["files"][PROMPTS[0]])
    assert grid.size[0] > grid.size[1]  # one video a row (3 rows), its frames across


def test_shifted_training_times_use_the_samplers_step_count(tmp_path, tiny_dir):
    """FLUX.2's shift depends on the step count: time_sampling 'shifted' takes it at config ode_steps, not 50."""
    import math

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    trainer = ORWCFMTrainer(load(tiny_dir, "flux2"), config(tmp_path, "flux2", time_sampling="shifted"), "cpu")
    tokens = (TINY_SIZE // 16) ** 2
    assert trainer.models.training_shift() == pytest.approx(math.exp(compute_empirical_mu(tokens, 2)), rel=1e-12)
    assert trainer.models.training_shift() != pytest.approx(math.exp(compute_empirical_mu(tokens, 50)), rel=1e-3)
