"""trainer.evaluate(): per-prompt reward (every term of a reward dict), the held-out reward (config eval_reward),
within-prompt diversity and Vendi score, files, untouched random states; per-epoch sample grids to TensorBoard and
wandb; the Vendi score against independent cases."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.evaluation import UNCONDITIONAL, evaluate_policy
from orwcfm_fast.metrics import mean_pairwise_distance, vendi_score

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class MLPVelocity(torch.nn.Module):
    def __init__(self, dim=2, hidden=16):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


class ConvVelocity(torch.nn.Module):
    """A tiny image velocity for 1x4x4 samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, t, x):
        return self.conv(torch.cat([x, t[:, None, None, None].expand_as(x)], dim=1))


def first_coordinate(x):
    return x[:, 0]


def norm(x):
    return x.flatten(1).norm(dim=1)


def point_config(tmp_path, **overrides):
    cfg = {"batch_size": 8, "ode_steps": 3, "warmup_steps": 0, "learning_rate": 1e-2, "sample_shape": (2,),
           "seed": 0, "savedir": str(tmp_path), "handle_signals": False,
           "reward": {"first": 1.0, "norm": 0.5}}
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def _register_test_rewards():
    from orwcfm_fast.rewards import register_reward

    register_reward("first", lambda config, device: first_coordinate, overwrite=True)
    register_reward("norm", lambda config, device: norm, overwrite=True)


def test_unconditional_evaluation_matches_an_independent_computation(tmp_path):
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path), "cpu")
    out = trainer.evaluate(samples_per_prompt=10, seed=3)
    assert out["prompts"] == [UNCONDITIONAL] and out["samples_per_prompt"] == 10 and out["embedding"] == "pixels"
    # its model passes: 10 samples x 3 Euler steps x 1 pass (no guidance); no training passes yet
    assert out["forwards"] == 30 and out["training_forwards_total"] == 0
    # Recompute: the same noise (the generator seeded as evaluate documents), the policy, the reward terms.
    trainer.generator.manual_seed(3)
    samples = trainer.sample(10, batch_size=8)
    row = out["per_prompt"][UNCONDITIONAL]
    first, size = samples[:, 0].double(), samples.double().norm(dim=1)
    assert row["reward/first"] == pytest.approx(float(first.mean()), rel=1e-6, abs=1e-7)
    assert row["reward/norm"] == pytest.approx(float(size.mean()), rel=1e-6)
    assert row["reward"] == pytest.approx(float((first + 0.5 * size).mean()), rel=1e-5, abs=1e-6)
    d = torch.cdist(samples.double(), samples.double())
    assert row["diversity"] == pytest.approx(float(d.sum() / (10 * 9)), rel=1e-9)
    assert out["reward"] == row["reward"] and out["diversity"] == row["diversity"]
    assert out["reward/first"] == row["reward/first"]
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["per_prompt"][UNCONDITIONAL]["diversity"] == row["diversity"]
    assert (tmp_path / "eval" / "grids").is_dir() and len(list((tmp_path / "eval" / "grids").glob("*.png"))) == 1


def test_evaluate_leaves_training_bit_identical(tmp_path):
    plain = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path / "a"), "cpu")
    probed = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path / "b"), "cpu")
    plain.training_step()
    probed.training_step()
    probed.evaluate(samples_per_prompt=4, outdir=False)
    a, b = plain.training_step(), probed.training_step()
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(plain.net_model.parameters(), probed.net_model.parameters()))
    assert not (tmp_path / "b" / "eval").exists()  # outdir=False writes nothing


def test_evaluate_same_seed_same_result_other_seed_differs(tmp_path):
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path), "cpu")
    a = trainer.evaluate(samples_per_prompt=6, outdir=False)
    b = trainer.evaluate(samples_per_prompt=6, outdir=False)
    c = trainer.evaluate(samples_per_prompt=6, outdir=False, seed=1)
    assert a["per_prompt"] == b["per_prompt"]
    assert a["per_prompt"] != c["per_prompt"]


def test_evaluate_bad_input(tmp_path):
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path), "cpu")
    with pytest.raises(ValueError, match="samples_per_prompt.*>= 2"):
        trainer.evaluate(samples_per_prompt=1)
    with pytest.raises(ValueError, match="takes no prompts"):
        trainer.evaluate(prompts=["a cat"])
    with pytest.raises(ValueError, match="'clip' embeds RGB images"):
        evaluate_policy(ORWCFMTrainer(MLPVelocity(), point_config(tmp_path, diversity_embedding="clip"), "cpu"))


def test_custom_embedding(tmp_path):
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path), "cpu")
    first_only = lambda x: x[:, :1].double()  # noqa: E731
    out = evaluate_policy(trainer, samples_per_prompt=5, embedding=first_only)
    trainer.generator.manual_seed(0)
    x = trainer.sample(5)[:, :1].double()
    assert out["diversity"] == pytest.approx(mean_pairwise_distance(x), rel=1e-9)
    assert out["embedding"] == "custom"


# ---------------------------------------------------------------- text-to-image: per prompt


@pytest.fixture(scope="module")
def saved_sd3(tmp_path_factory):
    pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
    from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("pipes")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    yield root / "sd3"
    mp.undo()


def redness(images, prompts):
    return images[:, 0].mean((1, 2)) + torch.tensor([0.1 if "dog" in p else 0.0 for p in prompts])


def pipe_config(tmp_path, **overrides):
    from orwcfm_fast.flows.tiny import TINY_SIZE

    cfg = {"prompts": ["a dog", "a cat", "a tree"], "eval_prompts": ["a red dog", "a green cat"],
           "reward": redness, "resolution": TINY_SIZE, "guidance_scale": 2.0, "ode_steps": 2, "lora_rank": 4,
           "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16, "seed": 0, "warmup_steps": 0,
           "savedir": str(tmp_path), "handle_signals": False}
    cfg.update(overrides)
    return cfg


def test_per_prompt_evaluation_of_a_pipeline(saved_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    trainer = ORWCFMTrainer(StableDiffusion3Pipeline.from_pretrained(saved_sd3, dtype=torch.float32),
                            pipe_config(tmp_path), "cpu")
    out = trainer.evaluate(samples_per_prompt=3)
    assert out["prompts"] == ["a red dog", "a green cat"]  # eval_prompts by default
    # 2 prompts x 3 samples x 2 Euler steps x 2 passes (guidance_scale 2: conditional and unconditional)
    assert out["forwards"] == 2 * 3 * 2 * 2
    for i, prompt in enumerate(out["prompts"]):
        trainer.generator.manual_seed(0 + 1_000_003 * i)  # evaluate's noise for prompt i
        images = trainer.models.reward_inputs(trainer.sample(3, batch_size=3, prompts=[prompt] * 3))
        row = out["per_prompt"][prompt]
        assert row["reward"] == pytest.approx(float(redness(images, [prompt] * 3).mean()), abs=1e-6)
        assert row["diversity"] == pytest.approx(mean_pairwise_distance(images), rel=1e-6)
    grids = sorted(p.name for p in (tmp_path / "eval" / "grids").glob("*.png"))
    assert grids == ["000_a_red_dog.png", "001_a_green_cat.png"]
    other = trainer.evaluate(prompts=["a tree", "a tree"], samples_per_prompt=2, outdir=False)
    assert other["prompts"] == ["a tree"]  # each prompt once


# ---------------------------------------------------------------- per-epoch grids


def test_tensorboard_scalars_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = point_config(tmp_path, sample_shape=(1, 4, 4), use_tensorboard=True, log_samples=4, reward=norm)
    trainer = ORWCFMTrainer(ConvVelocity(), cfg, "cpu")
    trainer.train(2, 2)
    trainer._log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / cfg.get("run_name", "orw-cfm-w2")),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward")] == [1, 2]
    assert [e.value for e in acc.Scalars("reward")] == pytest.approx([h["reward"] for h in trainer.history])
    images = acc.Images("samples")
    assert [e.step for e in images] == [1, 2]
    assert (images[0].width, images[0].height) == (2 * 5 + 1, 2 * 5 + 1)  # 2x2 grid of 4x4 with 1-px padding
    assert (tmp_path / "orw-cfm-w2_metrics.csv").exists()  # the CSV stays


def test_grids_do_not_change_training(tmp_path):
    pytest.importorskip("tensorboard")
    a = ORWCFMTrainer(ConvVelocity(), point_config(tmp_path / "a", sample_shape=(1, 4, 4), reward=norm), "cpu")
    b = ORWCFMTrainer(ConvVelocity(), point_config(tmp_path / "b", sample_shape=(1, 4, 4), reward=norm,
                                                   use_tensorboard=True), "cpu")
    a.train(2, 2)
    b.train(2, 2)
    assert [h["reward"] for h in a.history] == [h["reward"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(a.net_model.parameters(), b.net_model.parameters()))


def test_wandb_gets_sample_grids(tmp_path, monkeypatch):
    logged = []

    class Run:
        def log(self, data, step=None):
            logged.append((step, dict(data)))

        def finish(self):
            pass

    class Image:
        def __init__(self, array):
            self.array = array

    fake = types.SimpleNamespace(init=lambda **kw: Run(), Image=Image)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = point_config(tmp_path, sample_shape=(1, 4, 4), use_wandb=True, log_samples=3, reward=norm)
    ORWCFMTrainer(ConvVelocity(), cfg, "cpu").train(1, 2)
    grids = [(step, data["samples"]) for step, data in logged if "samples" in data]
    assert len(grids) == 1 and grids[0][0] == 1
    array = grids[0][1].array
    assert array.dtype.name == "uint8" and array.shape == (2 * 5 + 1, 2 * 5 + 1)  # 3 samples: a 2x2 grid, grey


def test_no_grids_for_points_or_when_off(tmp_path, monkeypatch):
    logged = []

    class Run:
        def log(self, data, step=None):
            logged.append(dict(data))

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(), Image=None))
    ORWCFMTrainer(MLPVelocity(), point_config(tmp_path, use_wandb=True), "cpu").train(1, 1)
    ORWCFMTrainer(ConvVelocity(), point_config(tmp_path, sample_shape=(1, 4, 4), use_wandb=True, log_samples=0,
                                               reward=norm), "cpu").train(1, 1)
    assert logged and not any("samples" in d for d in logged)
    assert any("reward/first" in d for d in logged)  # the reward dict's terms are logged each epoch


def test_dino_diversity_embedding(tmp_path):
    """'dino': the CLS token of a DINOv2 folder (tiny random-init, saved with save_pretrained), L2-normalised,
    on images prepared as its own image processor does; diversity = the mean pairwise distance of those."""
    pytest.importorskip("transformers")
    from PIL import Image
    from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

    from orwcfm_fast.config import validate_config
    from orwcfm_fast.evaluation import make_embedding

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                             patch_size=14)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        tmp_path / "dino")
    embed = make_embedding(validate_config({"diversity_embedding": "dino",
                                            "reward_paths": {"dino": str(tmp_path / "dino")}}), "cpu", True)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).mul(255).round().div(255)
    got = embed(images)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "dino")
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    with torch.no_grad():
        cls = model(pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    want = torch.nn.functional.normalize(cls.double(), dim=-1)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # PIL's uint8 rounding after resampling
    assert mean_pairwise_distance(got) == pytest.approx(mean_pairwise_distance(want), abs=2e-2)


@pytest.mark.parametrize("weighted", [False, True])
def test_frechet_distance_against_scipy(weighted):
    """frechet_distance (eigh square roots, weighted moments) against scipy's sqrtm of S_x S_y and numpy's cov."""
    import numpy as np
    import scipy.linalg

    from orwcfm_fast.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64)
    y = torch.randn(151, 7, generator=g, dtype=torch.float64) * 1.5 + 0.3
    w = torch.rand(151, generator=g, dtype=torch.float64) if weighted else None
    a, b = x.numpy(), y.numpy()
    m1, c1 = a.mean(0), np.cov(a, rowvar=False)
    if w is None:
        m2, c2 = b.mean(0), np.cov(b, rowvar=False)
    else:
        wn = w.numpy() / w.numpy().sum()
        m2 = np.average(b, axis=0, weights=wn)
        c2 = np.cov(b, rowvar=False, aweights=wn, ddof=0) / (1 - (wn ** 2).sum())
    want = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(x, y, w) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- the held-out reward (config eval_reward)


def test_held_out_reward_matches_an_independent_computation(tmp_path):
    """A held-out reward dict is scored on evaluate's own samples, each term reported unweighted, and changes
    nothing else: the training reward and the diversity are those of the same evaluation without it."""
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path, eval_reward={"first": 2.0, "norm": -1.0}), "cpu")
    out = trainer.evaluate(samples_per_prompt=7, seed=5, outdir=False)
    trainer.generator.manual_seed(5)  # evaluate's noise for prompt 0, as documented
    samples = trainer.sample(7, batch_size=7).double()
    first, size = samples[:, 0], samples.norm(dim=1)
    held_out = 2.0 * first - size
    row = out["per_prompt"][UNCONDITIONAL]
    # float32 rewards of O(1) values: their means agree with float64 to ~1e-7
    assert row["held_out_reward"] == pytest.approx(float(held_out.mean()), rel=1e-5, abs=1e-6)
    assert row["held_out_reward_std"] == pytest.approx(float(held_out.std()), rel=1e-5, abs=1e-6)
    assert row["held_out_reward/first"] == pytest.approx(float(first.mean()), rel=1e-6, abs=1e-7)
    assert row["held_out_reward/norm"] == pytest.approx(float(size.mean()), rel=1e-6)
    assert out["held_out_reward"] == row["held_out_reward"]
    assert out["held_out_reward/norm"] == row["held_out_reward/norm"]
    plain = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path / "plain"), "cpu").evaluate(
        samples_per_prompt=7, seed=5, outdir=False)
    assert plain["held_out_reward"] is None and "held_out_reward" not in plain["per_prompt"][UNCONDITIONAL]
    assert {k: v for k, v in row.items() if not k.startswith("held_out")} == plain["per_prompt"][UNCONDITIONAL]


def test_held_out_reward_gets_its_own_input_range(tmp_path):
    from orwcfm_fast.rewards import Reward

    class Brightness(Reward):
        input_range = (0.0, 1.0)

        def forward(self, images):
            return images.flatten(1).mean(dim=1)

    trainer = ORWCFMTrainer(ConvVelocity(), point_config(tmp_path, sample_shape=(1, 4, 4), reward=norm,
                                                         eval_reward=Brightness()), "cpu")
    out = trainer.evaluate(samples_per_prompt=3, outdir=False)
    trainer.generator.manual_seed(0)
    images = trainer.sample(3, batch_size=3).double()
    want = ((images + 1) / 2).flatten(1).mean(dim=1).mean()  # [-1, 1] -> [0, 1], as score_terms does for training
    assert out["held_out_reward"] == pytest.approx(float(want), rel=1e-6)
    assert out["reward"] == pytest.approx(float(images.flatten(1).norm(dim=1).mean()), rel=1e-6)  # unconverted


def test_training_never_calls_the_held_out_reward_and_it_is_built_once(tmp_path):
    from orwcfm_fast.rewards import register_reward

    built, calls = [], []

    def counting(x):
        calls.append(x.shape[0])
        return -x[:, 0]

    register_reward("counting_held_out", lambda config, device: built.append(1) or counting, overwrite=True)
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path, eval_reward="counting_held_out"), "cpu")
    trainer.train(2, 2)
    assert built == [] and calls == [] and not hasattr(trainer, "_eval_reward_fn")
    trainer.evaluate(samples_per_prompt=5, outdir=False)
    trainer.train(1, 2)
    trainer.evaluate(samples_per_prompt=5, outdir=False)
    assert built == [1] and calls == [5, 5]  # one build; one call per evaluation (one group of 5 samples)


def test_bad_held_out_reward_names_its_key(tmp_path):
    from orwcfm_fast.config import ConfigError

    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path, eval_reward="no_such_reward"), "cpu")
    with pytest.raises(ConfigError, match="config key 'eval_reward'.*unknown reward 'no_such_reward'"):
        trainer.evaluate(samples_per_prompt=2, outdir=False)


def test_held_out_reward_of_a_pipeline_gets_the_prompts(saved_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    def greenness(images, prompts):
        return images[:, 1].mean((1, 2)) - torch.tensor([0.2 if "green" in p else 0.0 for p in prompts])

    trainer = ORWCFMTrainer(StableDiffusion3Pipeline.from_pretrained(saved_sd3, dtype=torch.float32),
                            pipe_config(tmp_path, eval_reward=greenness), "cpu")
    out = trainer.evaluate(samples_per_prompt=2, outdir=False)
    for i, prompt in enumerate(out["prompts"]):
        trainer.generator.manual_seed(1_000_003 * i)
        images = trainer.models.reward_inputs(trainer.sample(2, batch_size=2, prompts=[prompt] * 2))
        row = out["per_prompt"][prompt]
        assert row["held_out_reward"] == pytest.approx(float(greenness(images, [prompt] * 2).mean()), abs=1e-6)
        assert row["reward"] == pytest.approx(float(redness(images, [prompt] * 2).mean()), abs=1e-6)
        assert row["vendi"] == pytest.approx(vendi_score(images), rel=1e-9)


def test_eval_command_prints_held_out_reward_and_vendi(tmp_path, capsys):
    from orwcfm_fast.cli import main

    assert main(["eval", "--task", "gaussians", "--cache-dir", str(tmp_path / "cache"), "--pretrain-steps", "30",
                 "--samples-per-prompt", "6", "--outdir", str(tmp_path / "ev"), "--set", "ode_steps=3",
                 "--set", "eval_reward=first", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert printed[0].split() == ["prompt", "reward", "held-out", "diversity", "vendi"]
    mean_row = next(line for line in printed if line.startswith("mean")).split()
    assert [float(v) for v in mean_row[1:5]] == pytest.approx(
        [saved["reward"], saved["held_out_reward"], saved["diversity"], saved["vendi"]], abs=6e-5)  # 4 decimals


# ---------------------------------------------------------------- the Vendi score


def test_vendi_of_identical_and_of_orthonormal_embeddings():
    one = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64)
    assert vendi_score(one.repeat(6, 1)) == pytest.approx(1.0, abs=1e-12)
    assert vendi_score(one * torch.tensor([[1.0], [2.0], [7.5]], dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert vendi_score(q[:5]) == pytest.approx(5.0, abs=1e-10)  # 5 orthonormal rows in 9-D
    assert vendi_score(torch.eye(3) * 4.0) == pytest.approx(3.0, abs=1e-12)  # orthogonal, any length
    assert vendi_score(q[:1]) == pytest.approx(1.0, abs=1e-12)


def test_vendi_of_blocks_with_known_eigenvalues():
    """Groups of 1, 2 and 3 copies of three orthonormal vectors: K / n is block-diagonal with all-ones blocks,
    eigenvalues 1/6, 2/6, 3/6 (and zeros); two vectors at cosine c, each twice: eigenvalues (1 +- c) / 2."""
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], e[1], e[1], e[2], e[2], e[2]])
    p = torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)
    assert vendi_score(x) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)
    c = 0.6
    u, v = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([c, (1 - c * c) ** 0.5], dtype=torch.float64)
    lam = torch.tensor([(1 + c) / 2, (1 - c) / 2], dtype=torch.float64)
    assert vendi_score(torch.stack([u, v, u, v])) == pytest.approx(float(torch.exp(-(lam * lam.log()).sum())),
                                                                  rel=1e-12)


def _vendi_by_hand(rows):
    """Float64 Vendi score from lists: explicit cosine similarities, numpy's eigvalsh, an explicit entropy loop."""
    import math

    import numpy as np

    units = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]
    n = len(units)
    k = np.array([[sum(a * b for a, b in zip(units[i], units[j])) / n for j in range(n)] for i in range(n)])
    entropy = 0.0
    for lam in np.linalg.eigvalsh(k):
        if lam > 0:
            entropy -= lam * math.log(lam)
    return math.exp(entropy)


@pytest.mark.parametrize("n, d", [(7, 5), (20, 3), (1, 4), (13, 13)])
def test_vendi_against_an_explicit_float64_computation(n, d):
    """Both of vendi_score's paths (K = X X^T for N <= D, X^T X for D < N): float32 input is computed in float64,
    agreeing with the hand computation to round-off (1e-10 relative: eigvalsh of a 20 x 20 in float64)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 100 + d))
    want = _vendi_by_hand(x.double().tolist())
    assert vendi_score(x) == pytest.approx(want, rel=1e-10)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    assert vendi_score(x[perm]) == pytest.approx(want, rel=1e-10)  # the order of the samples does not matter
    assert 1.0 - 1e-12 <= vendi_score(x) <= min(n, d) + 1e-9


def test_vendi_rejects_zero_embeddings_and_no_samples():
    with pytest.raises(ValueError, match="no direction"):
        vendi_score(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 1"):
        vendi_score(torch.zeros(0, 3))


def test_evaluation_reports_vendi_of_its_embeddings(tmp_path):
    trainer = ORWCFMTrainer(MLPVelocity(), point_config(tmp_path), "cpu")
    out = trainer.evaluate(samples_per_prompt=9, seed=2, outdir=False)
    trainer.generator.manual_seed(2)
    samples = trainer.sample(9, batch_size=8).double()
    assert out["vendi"] == out["per_prompt"][UNCONDITIONAL]["vendi"]
    assert out["vendi"] == pytest.approx(_vendi_by_hand(samples.tolist()), rel=1e-10)
    custom = evaluate_policy(trainer, samples_per_prompt=9, seed=2, embedding=lambda x: x[:, :1].abs() + 1.0)
    assert custom["vendi"] == pytest.approx(1.0, abs=1e-12)  # 1-D positive embeddings all point the same way
