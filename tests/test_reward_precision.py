"""Reward precision: ``reward_dtype: auto`` follows each reward's measured ``bf16_safe``; the measurement's metrics.

``benchmarks/reward_precision.py`` scores groups of similar images with each preference reward in fp32 and in
bf16 and compares the within-prompt rankings; each reward class declares the outcome as ``bf16_safe``, which
``auto`` follows on CUDA. These tests check the resolution, the warning for an explicit bf16, the metrics
(Spearman against scipy and by hand, the error ratio and the ``group`` weights on constructed cases) and a
small end-to-end run of the measurement on tiny models.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from orwcfm_fast.rewards import AestheticReward, CLIPScoreReward, HPSv2Reward, PickScoreReward
from orwcfm_fast.rewards import preference
from orwcfm_fast.rewards.preference import PreferenceReward, config_settings, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reward_precision as rp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CLASSES = {"clip_score": CLIPScoreReward, "pickscore": PickScoreReward, "hpsv2": HPSv2Reward,
           "aesthetic": AestheticReward}
RESULTS = ROOT / "benchmarks" / "results" / "reward_precision_cpu.json"


# ---------------------------------------------------------------------------------------------------------------
# reward_dtype: auto per reward


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_auto_follows_each_rewards_measured_bf16_safety(name, monkeypatch):
    """On CUDA ``auto`` is bf16 exactly for the rewards whose committed measurement keeps the rankings
    (mean within-prompt Spearman >= 0.99); on the CPU it is fp32 for all; explicit values are obeyed, an
    explicit bf16 with a warning for a reward that is not bf16-safe."""
    import warnings

    cls = CLASSES[name]
    measured = json.loads(RESULTS.read_text())["rewards"][name]
    assert cls.bf16_safe is measured["bf16_safe"] is (measured["spearman_mean"] >= rp.SAFE_SPEARMAN)
    want = torch.bfloat16 if measured["bf16_safe"] else torch.float32
    assert config_settings({"reward_dtype": "auto"}, "cuda:0", cls)["dtype"] == want
    assert config_settings({}, "cuda", cls)["dtype"] == want  # auto is the default
    for device in ("cpu", None):
        assert config_settings({"reward_dtype": "auto"}, device, cls)["dtype"] == torch.float32
    assert config_settings({"reward_dtype": "fp32"}, "cuda:0", cls)["dtype"] == torch.float32
    monkeypatch.setattr(preference, "_WARNED_BF16", set())
    if cls.bf16_safe:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert config_settings({"reward_dtype": "bf16"}, "cuda:0", cls)["dtype"] == torch.bfloat16
    else:
        with pytest.warns(UserWarning, match=rf"reward '{name}' runs in bf16"):
            assert config_settings({"reward_dtype": "bf16"}, "cuda:0", cls)["dtype"] == torch.bfloat16


def test_unmeasured_rewards_default_to_fp32():
    assert PreferenceReward.bf16_safe is False
    assert resolve_dtype("auto", "cuda:0") == torch.float32  # no declaration: not bf16-safe
    assert resolve_dtype("auto", "cuda:0", bf16_safe=True) == torch.bfloat16
    assert resolve_dtype(None, "cuda:0", bf16_safe=True) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", bf16_safe=True) == torch.float32  # bf16 is not native on CPUs
    assert resolve_dtype("auto", None, bf16_safe=True) == torch.float32
    assert config_settings({"reward_dtype": "auto"}, "cuda:0")["dtype"] == torch.float32
    with pytest.raises(ValueError, match="reward_dtype"):
        resolve_dtype("fp16", "cuda:0", bf16_safe=True)


def test_explicit_bf16_warns_once_per_unsafe_reward(monkeypatch):
    monkeypatch.setattr(preference, "_WARNED_BF16", set())
    with pytest.warns(UserWarning, match=r"reward 'hpsv2' runs in bf16.*reward_precision.py.*auto"):
        assert resolve_dtype("bf16", "cuda:0", bf16_safe=False, name="hpsv2") == torch.bfloat16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", "cuda:0", bf16_safe=False, name="hpsv2") == torch.bfloat16  # once only
        assert resolve_dtype(torch.bfloat16, "cpu", bf16_safe=True, name="safe") == torch.bfloat16  # safe: silent
        assert resolve_dtype("bf16", "cpu", bf16_safe=False) == torch.bfloat16  # no name: silent
    with pytest.warns(UserWarning, match="reward 'pickscore'"):  # another reward warns on its own
        resolve_dtype(torch.bfloat16, "cpu", bf16_safe=False, name="pickscore")


# ---------------------------------------------------------------------------------------------------------------
# the metrics


def test_spearman_by_hand():
    # one swap of neighbours among 4: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0], [-4.0, -3.0, -2.0, -1.0]])  # row 2: monotone, other scale
    assert rp.spearman(a, b).tolist() == pytest.approx([0.8, 1.0], abs=1e-12)
    assert rp.spearman(a[0], -a[0]).item() == pytest.approx(-1.0, abs=1e-12)
    # ties take their average rank: [1, 2, 2, 3] -> [1, 2.5, 2.5, 4]
    assert rp.average_ranks(torch.tensor([1.0, 2.0, 2.0, 3.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    # Pearson of [1, 2.5, 2.5, 4] and [1, 2, 3, 4]: centred [-1.5, 0, 0, 1.5] . [-1.5, -.5, .5, 1.5] = 4.5,
    # norms sqrt(4.5) and sqrt(5): 4.5 / sqrt(22.5)
    assert rp.spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), a[0]).item() == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(rp.spearman(torch.ones(4), a[0]).item())  # a constant row has no ranking (scipy: nan)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_spearman_matches_scipy_with_ties_and_batches():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 8, 16, 33):
        a = torch.randint(0, 5, (6, k), generator=g).double()  # many ties
        b = a + torch.randn(6, k, generator=g)
        a[0] = torch.randn(k, generator=g)  # and a row without ties
        if k > 2:
            a[1, : k // 2] = a[1, 0]  # a long run of equal values
        got = rp.spearman(a, b)
        for i in range(6):
            want = stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic
            if math.isnan(want):
                assert math.isnan(got[i].item())
            else:
                assert got[i].item() == pytest.approx(want, abs=1e-12), (k, i)


def test_compare_on_constructed_errors():
    """Errors of a known size relative to the within-prompt (population) std, and a reversed ranking."""
    from orwcfm_fast.weighting import reward_weights

    g = torch.Generator().manual_seed(1)
    k = 16
    ref = 21.0 + 0.3 * torch.randn(4 * k, generator=g, dtype=torch.float64)  # PickScore-like groups
    same = rp.compare(ref, ref.clone(), k)
    assert same["spearman_mean"] == same["spearman_min"] == 1.0 and same["err_over_std_max"] == 0.0
    assert same["bf16_safe"] and same["group_weights"]["1.0"] == {"abs_diff_mean": 0.0, "abs_diff_max": 0.0,
                                                                  "rel_diff_max": 0.0, "top1_agreement": 1.0}
    # noise with RMS exactly 0.5 x each group's population std
    r = ref.reshape(-1, k)
    noise = torch.randn(r.shape, generator=g, dtype=torch.float64)
    noise = noise / noise.square().mean(1, keepdim=True).sqrt() * 0.5 * r.std(1, unbiased=False, keepdim=True)
    noisy = rp.compare(ref, (r + noise).reshape(-1), k)
    assert noisy["err_over_std_mean"] == pytest.approx(0.5, rel=1e-9)
    assert noisy["err_over_std_max"] == pytest.approx(0.5, rel=1e-9)
    assert noisy["spearman_mean"] < rp.SAFE_SPEARMAN and not noisy["bf16_safe"]
    w_ref = reward_weights(ref, 1.0, "group", k)
    w_noisy = reward_weights((r + noise).reshape(-1), 1.0, "group", k)
    assert noisy["group_weights"]["1.0"]["abs_diff_mean"] == pytest.approx(float((w_noisy - w_ref).abs().mean()))
    # a constant shift and scale change nothing that group weights see (but the 1e-6 added to the group std, a
    # relative 3e-6 of std 0.3: ~2e-5 at beta 2)
    shifted = rp.compare(ref, 2.0 * ref + 5.0, k)
    assert shifted["spearman_min"] == 1.0 and shifted["group_weights"]["2.0"]["abs_diff_max"] < 1e-4
    reversed_ = rp.compare(ref, -ref, k)
    assert reversed_["spearman_mean"] == pytest.approx(-1.0)
    assert reversed_["group_weights"]["1.0"]["top1_agreement"] == 0


# ---------------------------------------------------------------------------------------------------------------
# a small run of the measurement


def test_small_measurement_end_to_end(tmp_path):
    """Tiny models (one layer per tower, 32 x 32 inputs, patch 8) of all four rewards, 3 prompts x 8 images.

    Checks that the bf16 path is the reward's own (bf16 weights, float32 scores), that fp32 scores equal the
    rewards' ``forward``, that the Spearman of the run agrees with scipy's, and that the bf16 error is bf16-sized:
    the bf16 image embeddings' relative error ``sqrt(2 (1 - cos))`` lies between ``u / 4`` and ``8 u`` for bf16's
    unit roundoff ``u = 2^-8`` (one layer rounds weights and activations a few times, each by up to u / 2;
    measured 1.1-1.6 u here. fp16's roundoff is u / 8 and fp32's 2^-16 u, so a path that ran in either, or
    did not cast at all (error 0), falls below the bound).
    """
    from orwcfm_fast.rewards import make_reward

    stats = pytest.importorskip("scipy.stats")
    k, prompts = 8, 3
    paths = rp.build_reward_paths(tmp_path, width=32, image_size=32, patch=8, depth_scale=0.0, embed_dim=16)
    images = rp.group_images(prompts, k, size=48, perturbation=0.1, seed=3)
    texts = rp.group_prompts(prompts, k)
    assert texts[:k] == [texts[0]] * k and len(set(texts)) == prompts
    rows = rp.measure(paths, images, texts, k, temperatures=(1.0,))
    u = 2.0 ** -8
    for name, row in rows.items():
        assert row["bf16_param_dtypes"] == ["torch.bfloat16"] or (
            name == "aesthetic" and row["bf16_param_dtypes"] == ["torch.bfloat16", "torch.float32"])  # fp32 head
        rel = math.sqrt(2 * max(1 - row["embedding_cosine"]["bf16_vs_fp32"], 0.0))
        assert u / 4 <= rel <= 8 * u, (name, rel)
        assert -1.0 <= row["spearman_min"] <= row["spearman_mean"] <= 1.0
        assert row["err_over_std_mean"] > 0 and row["bf16_safe"] == (row["spearman_mean"] >= rp.SAFE_SPEARMAN)
        assert set(row["group_weights"]) == {"1.0"}
    # the scores compared are the rewards' own: fp32 forward, grouped Spearman as scipy computes it
    reward = make_reward("pickscore", {"reward_paths": paths, "reward_dtype": "fp32"})
    ref = reward(images, texts)
    bf16 = make_reward("pickscore", {"reward_paths": paths, "reward_dtype": "bf16"})(images, texts)
    assert ref.abs().max() > 1.0  # logit_scale.exp() = 100 times a cosine
    row = rp.compare(ref, bf16, k, temperatures=(1.0,))
    want = [stats.spearmanr(bf16[i * k:(i + 1) * k].numpy(), ref[i * k:(i + 1) * k].numpy()).statistic
            for i in range(prompts)]
    assert row["spearman_mean"] == pytest.approx(sum(want) / prompts, abs=1e-12)
    assert row["spearman_min"] == pytest.approx(min(want), abs=1e-12)
    assert rows["pickscore"]["spearman_mean"] == pytest.approx(row["spearman_mean"], abs=1e-12)
