"""Tests for orwcfm_fast.rewards against independent references computed here.

CLIP runs with a seeded random-init ViT-B-32 (no weights are downloaded).
"""

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from orwcfm_fast.rewards import (
    CallableReward,
    ClassifierReward,
    CLIPReward,
    JPEGCompressibility,
    Reward,
    WeightedSum,
    available_rewards,
    check_rewards,
    make_reward,
    register_reward,
)
from orwcfm_fast.rewards import registry as registry_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# OpenAI CLIP normalisation, written out here (independent of open_clip.constants).
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red square"]


def _images(b, c=3, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, hw, hw, generator=g) * 2 - 1


_GREY = _images(1, c=1, seed=2)  # [1, 1, 32, 32]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run this module's CLIP forwards on one intra-op thread (restored afterwards).

    On a 2-core machine shared with other processes, 2 OpenMP threads make a ViT-B-32
    forward ~8x slower (0.3 s -> 2.7 s) than 1 thread; on an idle machine the cost is small.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def clip3():
    """A CLIPReward with 3 prompts on a seeded random-init ViT-B-32."""
    torch.manual_seed(0)
    return CLIPReward(PROMPTS, model_name="ViT-B-32", pretrained=None)


def _reference_logits(model, images, prompts):
    """logit_scale.exp() * cos(img, text), preprocessing written out by hand."""
    import open_clip

    x = images.float()
    if x.shape[1] == 1:
        x = torch.cat([x, x, x], dim=1)
    x = torch.clamp((x + 1) / 2, 0, 1)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - CLIP_MEAN) / CLIP_STD
    tokens = open_clip.get_tokenizer("ViT-B-32")(prompts)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(tokens)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * img @ txt.T


class _Prompts:
    """Temporarily restricts a CLIPReward to its first n prompts (reuses one model)."""

    def __init__(self, reward, n):
        self.reward, self.n = reward, n

    def __enter__(self):
        self.full = self.reward.text_features
        self.reward.text_features = self.full[: self.n].clone()
        return self.reward

    def __exit__(self, *exc):
        self.reward.text_features = self.full


def test_clip_model_is_frozen_eval_and_metadata(clip3):
    assert clip3.image_size == (224, 224)
    assert not clip3.model.training
    assert all(not p.requires_grad for p in clip3.model.parameters())
    clip3.train()
    assert not clip3.model.training
    clip3.eval()
    assert torch.allclose(clip3.mean, CLIP_MEAN) and torch.allclose(clip3.std, CLIP_STD)
    assert clip3.text_features.shape == (3, 512)
    assert torch.allclose(clip3.text_features.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.fixture(scope="module")
def x_ref(clip3):
    """Two 32x32 images (the second a grey image repeated to RGB) and their hand-computed logits."""
    x = torch.cat([_images(1, seed=1), _GREY.repeat(1, 3, 1, 1)])
    return x, _reference_logits(clip3.model, x, PROMPTS)


def test_clip_logits_match_hand_computation(clip3, x_ref):
    x, ref = x_ref
    with torch.no_grad():
        got = clip3.logits(x)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_clip_reward_formulas_for_1_2_3_prompts(clip3, x_ref):
    x, ref = x_ref
    with torch.no_grad():
        with _Prompts(clip3, 2) as r:
            two = r(x)
        with _Prompts(clip3, 1) as r:
            one = r(x)
        clip3.batch_size = 1  # chunked image encoding gives the same result
        try:
            three = clip3(x)
        finally:
            clip3.batch_size = None
    p2 = torch.softmax(ref[:, :2], dim=-1)
    assert two.dtype == torch.float32 and two.shape == (2,)
    torch.testing.assert_close(two, p2[:, 0] - p2[:, 1], rtol=1e-4, atol=1e-5)
    assert bool(((two >= -1) & (two <= 1)).all())
    torch.testing.assert_close(one, ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(three, torch.softmax(ref, dim=-1)[:, 0], rtol=1e-4, atol=1e-5)


def test_clip_one_channel(clip3, x_ref):
    _, ref = x_ref
    with torch.no_grad():
        got = clip3(_GREY)
    assert got.shape == (1,)
    torch.testing.assert_close(got, torch.softmax(ref[1:], dim=-1)[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (2, 4, 32, 32), (2, 32, 32), (2, 2)])
def test_clip_rejects_non_images(clip3, shape):
    with pytest.raises(ValueError, match=r"CLIP needs images \[B, C, H, W\] with C in \{1, 3\}") as e:
        clip3(torch.zeros(shape))
    assert str(list(shape)) in str(e.value)


def test_clip_missing_local_file_fails_fast(tmp_path):
    missing = str(tmp_path / "nowhere" / "clip.pt")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        CLIPReward(["a", "b"], pretrained=missing)
    assert time.perf_counter() - t0 < 2.0
    assert "clip_pretrained" in str(e.value) and missing in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    # A bare file name with a checkpoint suffix is a path too.
    with pytest.raises(RuntimeError, match="clip_pretrained.*weights.safetensors"):
        CLIPReward(["a"], pretrained="weights.safetensors")


def test_clip_unknown_tag_fails_fast_with_config_key():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        CLIPReward(["a", "b"], pretrained="no_such_tag")
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert "clip_pretrained" in msg and "no_such_tag" in msg and "ViT-B-32" in msg
    assert "openai" in msg  # lists the known tags


def test_clip_unknown_model_names_clip_model():
    with pytest.raises(RuntimeError, match=r"clip_model.*ViT-B-23.*Did you mean 'ViT-B-32'"):
        CLIPReward(["a"], model_name="ViT-B-23")


def test_clip_download_failure_is_wrapped(monkeypatch):
    """A known tag whose download fails (offline) is re-raised naming clip_pretrained and the fix."""
    import open_clip

    def fail(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no internet")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    with pytest.raises(RuntimeError) as e:
        CLIPReward(["a", "b"], pretrained="openai")
    msg = str(e.value)
    assert "clip_pretrained='openai'" in msg and "ViT-B-32" in msg
    assert "no internet" in msg and "local checkpoint" in msg and "None" in msg


def test_clip_known_tag_offline_fails_quickly_with_hf_hub_offline(monkeypatch):
    """With HF_HUB_OFFLINE=1 an uncached tag fails at once (without it: ~45 s of retries)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    try:
        CLIPReward(["a", "b"], pretrained="laion400m_e31")
    except RuntimeError as e:
        assert "clip_pretrained='laion400m_e31'" in str(e) and "ViT-B-32" in str(e)
        assert time.perf_counter() - t0 < 10.0
    # else: the weights happen to be in the local Hugging Face cache, which is fine too


def test_clip_corrupt_local_file_is_wrapped(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError) as e:
        CLIPReward(["a"], pretrained=str(bad))
    msg = str(e.value)
    assert "clip_pretrained" in msg and str(bad) in msg and "ViT-B-32" in msg


def test_clip_local_state_dict_via_registry_matches_source_model(clip3, x_ref, tmp_path):
    x, ref = x_ref
    path = tmp_path / "clip_vit_b32_random.pt"
    torch.save(clip3.model.state_dict(), path)
    config = {"text_prompts": PROMPTS[:2], "clip_model": "ViT-B-32", "clip_pretrained": str(path)}
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = make_reward("clip", config, "cpu")
    path.unlink()
    assert isinstance(loaded, CLIPReward)
    torch.testing.assert_close(loaded.text_features, clip3.text_features[:2])
    with torch.no_grad():
        got = loaded(x)
    p2 = torch.softmax(ref[:, :2], dim=-1)
    torch.testing.assert_close(got, p2[:, 0] - p2[:, 1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ JPEG


def _pil_jpeg_kb(img_uint8_hwc, quality):
    arr = img_uint8_hwc[:, :, 0] if img_uint8_hwc.shape[2] == 1 else img_uint8_hwc
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("quality", [95, 50])
def test_jpeg_matches_pil_and_prefers_constant_images(channels, quality):
    const = torch.full((1, channels, 32, 32), 0.25)
    noise = _images(2, c=channels, seed=4)
    x = torch.cat([const, noise])
    got = JPEGCompressibility(quality=quality)(x)
    assert got.dtype == torch.float32 and got.shape == (3,)
    u8 = np.clip(np.round((x.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    want = torch.tensor([-_pil_jpeg_kb(u8[i], quality) for i in range(3)], dtype=torch.float32)
    torch.testing.assert_close(got, want)
    assert got[0] > got[1] and got[0] > got[2]  # constant compresses better
    inc = JPEGCompressibility(quality=quality, incompressibility=True)(x)
    torch.testing.assert_close(inc, -got)


def test_jpeg_rejects_bad_shapes_and_quality():
    r = JPEGCompressibility()
    for shape in [(2, 2, 8, 8), (2, 4, 8, 8), (2, 8, 8), (2, 2)]:
        with pytest.raises(ValueError, match=r"C in \{1, 3\}"):
            r(torch.zeros(shape))
    with pytest.raises(ValueError, match="quality"):
        JPEGCompressibility(quality=0)


# ------------------------------------------------------------------------------ classifier


class _Linear(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        torch.manual_seed(5)
        self.fc = torch.nn.Linear(2, k)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_classifier_reward_matches_hand_softmax():
    clf = _Linear(4)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(6))
    r = ClassifierReward(clf, target_class=2)
    r.train()  # must not re-enable dropout in the classifier
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    logits = x @ clf.fc.weight.T.detach() + clf.fc.bias.detach()
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    p = e / e.sum(dim=1, keepdim=True)
    torch.testing.assert_close(r(x), p[:, 2])
    torch.testing.assert_close(ClassifierReward(clf, 2, log_prob=True)(x), torch.log(p[:, 2]))
    doubled = ClassifierReward(clf, 0, transform=lambda s: 2 * s)(x)
    logits2 = (2 * x) @ clf.fc.weight.T.detach() + clf.fc.bias.detach()
    torch.testing.assert_close(doubled, torch.softmax(logits2, dim=1)[:, 0])


def test_classifier_bad_target_raises():
    clf = _Linear(3)
    with pytest.raises(ValueError, match=r"target_class=3 .*K=3"):
        ClassifierReward(clf, target_class=3)(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="target_class"):
        ClassifierReward(clf, target_class=-1)
    with pytest.raises(ValueError, match="target_class"):
        ClassifierReward(clf, target_class=1.5)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        ClassifierReward(lambda s: s.sum(dim=1), 0)(torch.zeros(2, 2))


# ------------------------------------------------------------------- callable / weighted sum


def test_callable_reward_converts_numpy_and_lists():
    x = torch.arange(6.0).view(3, 2)
    r = CallableReward(lambda s: (s.numpy() ** 2).sum(axis=1).astype(np.float64), name="sq")
    out = r(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == x.device
    torch.testing.assert_close(out, torch.tensor([1.0, 13.0, 41.0]))
    out = CallableReward(lambda s: [1, 2, 3])(x)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(r, Reward) and r.name == "sq"
    with pytest.raises(TypeError):
        CallableReward(3)


def test_weighted_sum_matches_manual_sum():
    x = _images(3, seed=7)
    jpeg = JPEGCompressibility()
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    mean_fn = lambda s: s.mean(dim=(1, 2, 3))  # noqa: E731
    ws = WeightedSum([(2.0, jpeg), (-0.5, mean_fn), (1.5, ClassifierReward(clf, 1))])
    assert len(ws.rewards) == 3 and all(isinstance(m, Reward) for m in ws.rewards)
    assert clf in list(ws.modules())  # so .to(device) moves it
    with torch.no_grad():
        want = 2.0 * jpeg(x) - 0.5 * x.mean(dim=(1, 2, 3)) + 1.5 * torch.softmax(clf(x), dim=1)[:, 1]
        got = ws(x)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="term 1"):
        WeightedSum([(1.0, mean_fn), (1.0, lambda s: torch.zeros(len(s), 2))])(x)
    with pytest.raises(ValueError):
        WeightedSum([])


# --------------------------------------------------------------------------- check_rewards


def test_check_rewards_accepts_and_converts():
    out = check_rewards(np.array([1.0, 2.0], dtype=np.float64), 2)
    assert out.dtype == torch.float32 and out.shape == (2,)
    out = check_rewards(torch.tensor([[1.0], [2.0], [3.0]]), 3)
    assert out.shape == (3,)
    out = check_rewards([0.5, 1.5], 2, device="cpu")
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))


def test_check_rewards_nonfinite_names_indices():
    r = torch.zeros(6)
    r[1] = float("nan")
    r[4] = float("nan")
    r[5] = float("inf")
    with pytest.raises(ValueError) as e:
        check_rewards(r, 6)
    msg = str(e.value)
    assert "3 non-finite" in msg
    assert "2 NaN" in msg and "[1, 4]" in msg
    assert "+inf" in msg and "[5]" in msg
    with pytest.raises(ValueError, match=r"-inf at sample indices \[0\]"):
        check_rewards(torch.tensor([-float("inf"), 0.0]), 2)
    many = torch.full((20,), float("nan"))
    with pytest.raises(ValueError, match=r"\.\.\. \(12 more\)"):
        check_rewards(many, 20)


def test_check_rewards_wrong_shape_and_dtype():
    with pytest.raises(ValueError, match=r"shape \[4, 2\].*expected \[4\]"):
        check_rewards(torch.zeros(4, 2), 4)
    with pytest.raises(ValueError, match=r"shape \[3\].*expected \[4\]"):
        check_rewards(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"shape \[\].*expected \[4\]"):
        check_rewards(torch.tensor(1.0), 4)
    with pytest.raises(ValueError, match="floating"):
        check_rewards(torch.zeros(4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="cannot be converted"):
        check_rewards(object(), 4)


# -------------------------------------------------------------------------------- registry


def test_registry_builtins_and_unknown_names():
    names = available_rewards()
    assert {"clip", "jpeg_compressibility", "jpeg_incompressibility"} <= set(names)
    r = make_reward("jpeg_compressibility", {}, "cpu")
    assert isinstance(r, JPEGCompressibility) and not r.incompressibility
    assert make_reward("jpeg-incompressibility", None, None).incompressibility
    with pytest.raises(ValueError) as e:
        make_reward("jpeg_compresibility", {}, "cpu")
    msg = str(e.value)
    assert "`reward`" in msg and "jpeg_compresibility" in msg
    assert "Did you mean 'jpeg_compressibility'" in msg and "clip" in msg
    with pytest.raises(TypeError):
        make_reward(3, {}, "cpu")


@pytest.mark.parametrize("config", [{}, {"text_prompts": None}, {"text_prompts": []},
                                    {"text_prompts": "a cat"}, {"text_prompts": ["a", 3]}])
def test_registry_clip_needs_text_prompts(config):
    with pytest.raises(ValueError, match="text_prompts"):
        make_reward("clip", config, "cpu")


def test_registry_custom_factory_spec_passthrough_and_laziness():
    calls = []

    def factory(config, device):
        calls.append((dict(config), device))
        return lambda s: s.sum(dim=1) * config["scale"]

    name = "test_rewards_custom_scaled_sum"
    register_reward(name, factory)
    try:
        assert calls == []  # registration does not build anything
        assert name in available_rewards()
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name, factory)
        r = make_reward(name, {"scale": 3.0}, "cpu")
        assert calls == [({"scale": 3.0}, "cpu")] and isinstance(r, Reward)
        torch.testing.assert_close(r(torch.ones(2, 2)), torch.tensor([6.0, 6.0]))
    finally:
        registry_module._REGISTRY.pop(name, None)

    jpeg = JPEGCompressibility()
    assert make_reward(jpeg, {}, None) is jpeg
    wrapped = make_reward(lambda s: s[:, 0], {}, "cpu")
    assert isinstance(wrapped, CallableReward)
    torch.testing.assert_close(wrapped(torch.tensor([[1.0, 2.0]])), torch.tensor([1.0]))


def test_import_does_not_import_open_clip():
    code = "import orwcfm_fast.rewards, sys; assert 'open_clip' not in sys.modules, 'open_clip imported'"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
