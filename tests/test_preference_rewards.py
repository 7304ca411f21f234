"""Tests of the preference rewards (clip_score, pickscore, hpsv2, aesthetic) and their on-device preprocessing.

Tiny random-init models of the real architectures (a transformers ``CLIPModel``, an open_clip ``CLIP``, the aesthetic
MLP head) are saved in the layouts of the real weights (``save_pretrained`` folders, the laion legacy
``preprocessor_config.json``, HPS's ``{'state_dict': ...}`` checkpoint, a plain ``.pth`` head) and built through
``make_reward(name, {"reward_paths": ...})``. The references are computed here, independently: the real
``CLIPImageProcessor`` / torchvision / open_clip transforms on PIL images, the models' own feature methods in
float64, and the formulas as the rewards' authors wrote them.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from orwcfm_fast.config import validate_config
from orwcfm_fast.rewards import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    PickScoreReward,
    available_rewards,
    make_reward,
    score_terms,
)
from orwcfm_fast.rewards.preprocess import ImagePreprocess

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# OpenAI CLIP normalisation, written out (independent of the module under test).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
STD_T = torch.tensor(STD).view(1, 3, 1, 1)
SIZE = 32  # the tiny models' image size
PROMPTS = ["a cat on a mat", "an astronaut riding a horse", "a red cube", "a cat on a mat", "sunset over the sea"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def images_u8(n, h, w, seed=0, smooth=True):
    """``n`` uint8-valued images as ``([n, 3, h, w]`` float in [0, 1], list of PIL)``: both paths see the same pixels.

    ``smooth``: a bilinear-upsampled coarse pattern plus noise (photo-like); else uniform noise (the worst case
    for resampling: large bicubic overshoots, many saturated pixels).
    """
    g = torch.Generator().manual_seed(seed)
    if smooth:
        base = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
        x = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + 0.08 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    else:
        x = torch.rand(n, 3, h, w, generator=g)
    u8 = (x * 255).round().to(torch.uint8)
    return u8.float() / 255, [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in u8]


def pixel_error(ours, ref):
    """|ours - ref| in 1/255 pixel units (normalisation undone)."""
    return ((ours.double() - ref.double()) * STD_T.double()).abs() * 255


def hpsv2_resize_max_size(img, size):
    """HPSv2's ``ResizeMaxSize`` + ToTensor + Normalize (hpsv2/src/open_clip/transform.py), from torchvision ops."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    w, h = img.size
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = tuple(round(d * scale) for d in (h, w))
        img = TF.resize(img, [nh, nw], InterpolationMode.BICUBIC)
        ph, pw = size - nh, size - nw
        img = TF.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


def openai_clip_transform(size):
    """OpenAI CLIP's ``_transform(n_px)`` (clip/clip.py; also ImageReward's and the aesthetic predictor's)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# preprocessing against the reference pipelines (224, the real models' size)

ODD_SIZES = [(301, 257), (97, 143), (227, 224), (1023, 767), (77, 401), (150, 150)]
# Tolerance, in 1/255 pixel units before normalisation: the references resample uint8 images in PIL's two passes
# (width, then height), each rounded to uint8. Our float passes skip the rounding: <= 0.5 from the final rounding
# plus <= 0.5 x (the vertical kernel's L1 norm, <= ~1.3) from the intermediate one, so <= ~1.15; measured <= 1.10
# max and ~0.3 mean on noise and photo-like images. 1.5 max / 0.5 mean leaves margin; a wrong filter, a missing
# clamp between the passes (up to ~20) or a one-pixel crop shift (> 10 on noise) fail it.
MAX_ERR, MEAN_ERR = 1.5, 0.5


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("hw", ODD_SIZES)
def test_preprocess_matches_transformers_clip_image_processor(hw, smooth):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    x, pil = images_u8(2, *hw, seed=hw[0], smooth=smooth)
    kwargs = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ours = ImagePreprocess.from_hf_image_processor(CLIPImageProcessorPil(**kwargs))(x)
    # the PIL backend (transformers 4's CLIPImageProcessor, what PickScore's authors ran) and transformers 5's
    # default torchvision backend
    for ref in (CLIPImageProcessorPil(**kwargs)(images=pil, return_tensors="pt")["pixel_values"],
                CLIPImageProcessor(**kwargs)(images=pil, return_tensors="pt")["pixel_values"]):
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        err = pixel_error(ours, ref)
        assert err.max() <= MAX_ERR and err.mean() <= MEAN_ERR, (hw, float(err.max()), float(err.mean()))


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("hw", ODD_SIZES)
def test_preprocess_matches_openai_clip_transform(hw, smooth):
    x, pil = images_u8(2, *hw, seed=hw[1], smooth=smooth)
    ref = torch.stack([openai_clip_transform(224)(p) for p in pil])
    ours = ImagePreprocess(224, crop_size=224, crop_offset="round", mean=MEAN, std=STD)(x)
    err = pixel_error(ours, ref)
    assert err.max() <= MAX_ERR and err.mean() <= MEAN_ERR, (hw, float(err.max()), float(err.mean()))


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("hw", ODD_SIZES)
def test_preprocess_matches_hpsv2_resize_max_size(hw, smooth):
    import open_clip

    x, pil = images_u8(2, *hw, seed=hw[0] + hw[1], smooth=smooth)
    ours = ImagePreprocess(224, resize="longest", mean=MEAN, std=STD)(x)
    # hpsv2's ResizeMaxSize, and open_clip 3's equivalent resize_mode='longest' (ResizeKeepRatio + CenterCropOrPad)
    for ref in (torch.stack([hpsv2_resize_max_size(p, 224) for p in pil]),
                torch.stack([open_clip.image_transform(224, is_train=False, resize_mode="longest")(p) for p in pil])):
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        err = pixel_error(ours, ref)
        assert err.max() <= MAX_ERR and err.mean() <= MEAN_ERR, (hw, float(err.max()), float(err.mean()))


def test_crop_offsets_follow_each_library():
    """An odd excess of 3 rows: transformers crops from row 1 (floor), torchvision from row 2 (round(1.5))."""
    from transformers import CLIPImageProcessorPil

    x, pil = images_u8(1, 227, 224, smooth=False)
    hf_ref = CLIPImageProcessorPil()(images=pil, return_tensors="pt")["pixel_values"]
    tv_ref = openai_clip_transform(224)(pil[0])[None]
    floor = ImagePreprocess(224, crop_size=224, crop_offset="floor", mean=MEAN, std=STD)(x)
    rnd = ImagePreprocess(224, crop_size=224, crop_offset="round", mean=MEAN, std=STD)(x)
    assert pixel_error(floor, hf_ref).max() < 1e-3 and pixel_error(rnd, tv_ref).max() < 1e-3  # no resample: exact
    assert pixel_error(rnd, hf_ref).max() > 10 and pixel_error(floor, tv_ref).max() > 10


def test_preprocess_keeps_device_and_shape_for_bf16_inputs():
    x, _ = images_u8(3, 40, 50)
    pp = ImagePreprocess(SIZE, crop_size=SIZE)
    out = pp(x.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (3, 3, SIZE, SIZE)
    assert pp.output_size(40, 50) == (SIZE, SIZE)
    assert ImagePreprocess(SIZE, resize="longest").output_size(20, 64) == (SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# tiny models in the real layouts


def _tokenizer(path):
    """A byte-level CLIP BPE tokenizer (the CLIP byte alphabet, no merges) saved at ``path``."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(str(path))
    return tok


def _clip_model(tok, projection_dim, seed, logit_scale=None):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    return model


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """``{'clip': one folder (model + tokenizer + processor), 'pick_model': model only, 'pick_processor': the laion
    legacy-format processor folder, 'aes_clip': a 768-d CLIP, 'aes_head': the head .pth}``."""
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("clip")
    out = {k: root / k for k in ("clip", "pick_model", "pick_processor", "aes_clip")}
    for p in out.values():
        p.mkdir()
    tok = _tokenizer(out["clip"])
    _clip_model(tok, 16, seed=1).save_pretrained(str(out["clip"]))
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(out["clip"]))
    # PickScore_v1 layout: the model alone; its processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, whose
    # preprocessor_config.json is in the legacy CLIPFeatureExtractor format (int size / crop_size)
    _clip_model(tok, 16, seed=2, logit_scale=math.log(100.0)).save_pretrained(str(out["pick_model"]))
    tok.save_pretrained(str(out["pick_processor"]))
    (out["pick_processor"] / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(MEAN), "image_std": list(STD),
        "resample": 3, "size": SIZE}))
    # aesthetic: ViT-L/14's 768-d projection, and the improved-aesthetic-predictor head as its .pth
    _clip_model(tok, 768, seed=3).save_pretrained(str(out["aes_clip"]))
    torch.manual_seed(4)
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    with torch.no_grad():  # a random head barely varies on unit-norm inputs: make its scores spread like real ones
        head[0].weight.mul_(200.0)
    out["aes_head"] = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, out["aes_head"])
    return out


@pytest.fixture(scope="module")
def hps_paths(tmp_path_factory):
    """A tiny open_clip ViT config (the ViT-H-14.json layout) and ``{'state_dict': ...}`` of a model built from it."""
    import open_clip

    root = tmp_path_factory.mktemp("hps")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    config = root / "orwcfm-test-hps-tiny.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config))
    torch.manual_seed(5)
    model = open_clip.create_model("orwcfm-test-hps-tiny", pretrained=None).eval()
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return {"checkpoint": str(checkpoint), "model_config": str(config)}


def _paths(clip_dirs, hps_paths):
    return {"clip_score": str(clip_dirs["clip"]),
            "pickscore": {"model": str(clip_dirs["pick_model"]), "processor": str(clip_dirs["pick_processor"])},
            "hpsv2": dict(hps_paths),
            "aesthetic": {"clip": str(clip_dirs["aes_clip"]), "head": str(clip_dirs["aes_head"])}}


@pytest.fixture(scope="module")
def rewards(clip_dirs, hps_paths):
    paths = _paths(clip_dirs, hps_paths)
    return {name: make_reward(name, {"reward_paths": paths}) for name in paths}


# ---------------------------------------------------------------------------------------------------------------
# independent references (float64 models, the real processors on PIL images, the authors' formulas)


def _reference_pixels(name, clip_dirs, pil):
    """``[B, 3, SIZE, SIZE]`` float64: reward ``name``'s reference preprocessing of the PIL images (the folder's
    ``CLIPImageProcessorPil`` for clip_score / pickscore, open_clip's ``resize_mode='longest'`` transform for
    hpsv2, OpenAI CLIP's transform for aesthetic)."""
    if name in ("clip_score", "pickscore"):
        from transformers import CLIPImageProcessorPil

        folder = clip_dirs["clip"] if name == "clip_score" else clip_dirs["pick_processor"]
        pixels = CLIPImageProcessorPil.from_pretrained(str(folder))(images=pil, return_tensors="pt")["pixel_values"]
    elif name == "hpsv2":
        import open_clip

        transform = open_clip.image_transform(SIZE, is_train=False, resize_mode="longest")
        pixels = torch.stack([transform(p) for p in pil])
    else:
        pixels = torch.stack([openai_clip_transform(SIZE)(p) for p in pil])
    return pixels.double()


def _hf_reference(model_dir, processor_dir, pixels, prompts, scale):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir)).double().eval()
    tok = AutoTokenizer.from_pretrained(str(processor_dir))
    text = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
        logit_scale = model.logit_scale.exp() if scale else 1.0
    return logit_scale * (unit(img) * unit(txt)).sum(-1)


def _hps_reference(hps_paths, pixels, prompts):
    import open_clip

    model = open_clip.create_model("orwcfm-test-hps-tiny", pretrained=None)
    model.load_state_dict(torch.load(hps_paths["checkpoint"])["state_dict"])
    model = model.double().eval()
    tokens = open_clip.get_tokenizer("orwcfm-test-hps-tiny")(prompts)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    return torch.diagonal(img @ txt.T)


def _aesthetic_reference(clip_dirs, pixels):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dirs["aes_clip"])).double().eval()
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).double().eval()
    head.load_state_dict({k[len("layers."):]: v for k, v in torch.load(clip_dirs["aes_head"]).items()})
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels).pooler_output
        l2 = np.linalg.norm(emb.numpy(), 2, axis=-1, keepdims=True)  # the predictor's normalized()
        emb = emb / torch.from_numpy(np.where(l2 == 0, 1.0, l2))
        return head(emb).squeeze(-1)


def _reference(name, clip_dirs, hps_paths, pil, prompts, pixels=None):
    """Reward ``name``'s reference scores of the PIL images (``pixels``: their :func:`_reference_pixels`, if
    already computed)."""
    if pixels is None:
        pixels = _reference_pixels(name, clip_dirs, pil)
    if name == "clip_score":
        return _hf_reference(clip_dirs["clip"], clip_dirs["clip"], pixels, prompts, scale=False)
    if name == "pickscore":
        return _hf_reference(clip_dirs["pick_model"], clip_dirs["pick_processor"], pixels, prompts, scale=True)
    if name == "hpsv2":
        return _hps_reference(hps_paths, pixels, prompts)
    return _aesthetic_reference(clip_dirs, pixels)


NAMES = ["clip_score", "pickscore", "hpsv2", "aesthetic"]
# Relative tolerance of the scores. Native-size inputs (no resampling; a crop / a pad only) see the references'
# pixels exactly, so only float32 vs float64 arithmetic differs (~1e-6).
EXACT = 2e-5
# Resampled inputs differ by PIL's uint8 rounding (<= 1.1 / 255 per pixel, see MAX_ERR above), which moves the tiny
# random models' scores, relative to the largest |score|, by at most 1.5e-3 for the three CLIP cosines on the inputs
# below (1.7e-3 at two other seeds): 4e-3 leaves a margin of more than 2x. Aesthetic is more sensitive (its first
# layer is scaled x200 so that its scores spread, and they sit near 0): 7.3e-3 on the inputs below (up to 1.8e-2 at
# other seeds), under 2e-2.
# Scores cannot tell resize filters apart (bilinear instead of bicubic measured 2.4e-4 .. 2.5e-2 on the same
# inputs, often inside any tolerance the correct code passes): the filter is checked on the pixels, which it
# moves by >= 9.8 / 255 at most (and >= 1.3 / 255 on average) against the correct code's <= 1.06 (0.32).
RESAMPLED = {"clip_score": 4e-3, "pickscore": 4e-3, "hpsv2": 4e-3, "aesthetic": 2e-2}


# sizes with no resampling: the shortest side / longest side already 32; crops with an odd excess of 11 / 13
# (floor and round disagree: 5 vs 6) and pads of 12 / 13 rows
NATIVE = {"clip_score": (SIZE, 43), "pickscore": (43, SIZE), "hpsv2": (19, SIZE), "aesthetic": (SIZE, 43)}


@pytest.mark.parametrize("name", NAMES)
def test_reward_matches_reference_at_native_size(name, rewards, clip_dirs, hps_paths):
    x, pil = images_u8(5, *NATIVE[name], seed=7)
    got = rewards[name](x, PROMPTS)
    ref = _reference(name, clip_dirs, hps_paths, pil, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (5,)
    scale = ref.abs().max().item()
    assert torch.allclose(got.double(), ref, rtol=0, atol=EXACT * scale), (got, ref)


@pytest.mark.parametrize("name", NAMES)
def test_reward_matches_reference_at_odd_sizes(name, rewards, clip_dirs, hps_paths):
    """Downsampled (61 x 47, 128 x 96) and upsampled (17 x 23) inputs: the reward's own preprocessed pixels are
    its reference transform's (the resize filter, resize mode, crop / pad and normalisation each reward is built
    with), and its scores are the reference's."""
    for b, (h, w) in [(3, (61, 47)), (1, (17, 23)), (2, (128, 96))]:
        x, pil = images_u8(b, h, w, seed=h)
        ref_pixels = _reference_pixels(name, clip_dirs, pil)
        ours = rewards[name].preprocess(x)
        assert ours.shape == ref_pixels.shape == (b, 3, SIZE, SIZE), (name, (h, w), ours.shape)
        err = pixel_error(ours, ref_pixels)
        assert err.max() <= MAX_ERR and err.mean() <= MEAN_ERR, (name, (h, w), float(err.max()), float(err.mean()))
        got = rewards[name](x, PROMPTS[:b])
        ref = _reference(name, clip_dirs, hps_paths, pil, PROMPTS[:b], pixels=ref_pixels)
        spread = max(ref.abs().max().item(), 1e-3)
        assert torch.allclose(got.double(), ref, rtol=0, atol=RESAMPLED[name] * spread), (name, (h, w), got, ref)


@pytest.mark.parametrize("name", NAMES)
def test_batching_does_not_change_rewards(name, clip_dirs, hps_paths):
    paths = _paths(clip_dirs, hps_paths)
    whole = make_reward(name, {"reward_paths": paths})
    one = make_reward(name, {"reward_paths": paths, "reward_batch_size": 1})
    two = make_reward(name, {"reward_paths": paths, "reward_batch_size": 2})
    assert one.batch_size == 1 and whole.batch_size is None
    x, _ = images_u8(5, 40, 36, seed=11)
    ref = whole(x, PROMPTS)
    for r in (one, two):
        assert torch.allclose(r(x, PROMPTS), ref, rtol=1e-5, atol=1e-6)


def test_text_embeddings_are_cached_per_prompt(rewards):
    reward = rewards["clip_score"]
    reward._text_cache.clear()
    calls = []
    encode = reward.encode_text
    reward.encode_text = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    try:
        x, _ = images_u8(5, SIZE, SIZE, seed=3)
        first = reward(x, PROMPTS)
        assert calls == [["a cat on a mat", "an astronaut riding a horse", "a red cube", "sunset over the sea"]]
        second = reward(x, PROMPTS)
        assert len(calls) == 1 and torch.equal(first, second)
        assert set(reward._text_cache) == set(PROMPTS)
        reward(x[:1], ["a new prompt"])
        assert calls[-1] == ["a new prompt"]
    finally:
        del reward.encode_text


def test_aesthetic_ignores_prompts(rewards):
    reward = rewards["aesthetic"]
    assert reward.takes_prompts is False and reward.input_range == (0.0, 1.0)
    x, _ = images_u8(3, 48, 40, seed=5)
    ref = reward(x)
    assert torch.equal(reward(x, ["a", "b", "c"]), ref) and torch.equal(reward(x, ["x"] * 3), ref)
    # score_terms passes no prompts to it and maps [-1, 1] samples to its [0, 1]
    total, _ = score_terms(reward, x * 2 - 1, ["a", "b", "c"])
    assert torch.allclose(total, ref, atol=1e-6)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2"])
def test_prompt_rewards_declare_their_interface(name, rewards):
    reward = rewards[name]
    assert reward.takes_prompts is True and reward.input_range == (0.0, 1.0)
    x, _ = images_u8(2, SIZE, SIZE)
    with pytest.raises(ValueError, match="one prompt string per image"):
        reward(x, ["only one"])
    with pytest.raises(ValueError, match=r"needs the 2 prompts"):
        reward(x)
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        reward(x[:, :1], ["a", "b"])


def test_rewards_work_in_a_weighted_sum_and_as_eval_modules(rewards, clip_dirs, hps_paths):
    config = validate_config({"reward": {"pickscore": 1 / 26, "aesthetic": 0.5},
                              "reward_paths": _paths(clip_dirs, hps_paths)})
    total = make_reward(config["reward"], config)
    x, _ = images_u8(3, 50, 50, seed=9)
    value, terms = score_terms(total, x * 2 - 1, PROMPTS[:3])
    expected = rewards["pickscore"](x, PROMPTS[:3]) / 26 + 0.5 * rewards["aesthetic"](x)
    assert torch.allclose(value, expected, rtol=1e-5, atol=1e-5) and set(terms) == {"pickscore", "aesthetic"}
    total.train()
    assert not any(m.training for r in total.rewards for m in r.children())  # dropout stays off


@pytest.mark.filterwarnings("ignore:reward '.*' runs in bf16:UserWarning")  # explicit bf16: warned, on purpose
@pytest.mark.parametrize("name", ["clip_score", "hpsv2"])
def test_bf16_weights_stay_close_and_return_float32(name, rewards, clip_dirs, hps_paths):
    paths = _paths(clip_dirs, hps_paths)
    reward = make_reward(name, {"reward_paths": paths, "reward_dtype": "bf16"})
    params = {p.dtype for p in reward.parameters()}
    assert params == {torch.bfloat16}
    x, _ = images_u8(4, SIZE, SIZE, seed=2)
    got, ref = reward(x, PROMPTS[:4]), rewards[name](x, PROMPTS[:4])
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05  # cosines in [-1, 1]; bf16 has 8 bits of mantissa


def test_auto_dtype_is_fp32_on_cpu_and_pickscore_scale_is_fp32(rewards):
    from orwcfm_fast.rewards.preference import resolve_dtype

    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", "cpu", bf16_safe=True) == torch.float32
    # on CUDA, bf16 only for a reward declared bf16-safe (tests/test_reward_precision.py checks each reward)
    assert resolve_dtype("auto", "cuda:0") == torch.float32 and resolve_dtype("auto", "cuda:0", True) == torch.bfloat16
    assert {p.dtype for p in rewards["pickscore"].parameters()} == {torch.float32}
    assert rewards["pickscore"].logit_scale_exp == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError, match="reward_dtype"):
        resolve_dtype("fp16", "cpu")


def test_hpsv2_loads_fp16_and_plain_state_dicts(hps_paths, tmp_path, rewards):
    state = torch.load(hps_paths["checkpoint"])["state_dict"]
    half = tmp_path / "half.pt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, half)
    plain = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)  # DistributedDataParallel's prefix
    x, _ = images_u8(2, SIZE, SIZE, seed=4)
    ref = rewards["hpsv2"](x, PROMPTS[:2])
    for path in (half, plain):
        r = make_reward("hpsv2", {"reward_paths": {"hpsv2": {"checkpoint": str(path),
                                                             "model_config": hps_paths["model_config"]}}})
        assert torch.allclose(r(x, PROMPTS[:2]), ref, atol=5e-3 if path == half else 1e-6)


def test_classes_are_exported_and_registered(rewards):
    assert {"clip_score", "pickscore", "hpsv2", "aesthetic", "imagereward"} <= set(available_rewards())
    for name, cls in [("clip_score", CLIPScoreReward), ("pickscore", PickScoreReward), ("hpsv2", HPSv2Reward),
                      ("aesthetic", AestheticReward)]:
        assert type(rewards[name]) is cls and cls.name == name


# ---------------------------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize("name", NAMES)
def test_missing_reward_paths_entry_names_the_key(name):
    with pytest.raises(ValueError, match=rf"reward '{name}' needs config key `reward_paths\['{name}'\]`"):
        make_reward(name, {})
    with pytest.raises(ValueError, match=rf"reward_paths\['{name}'\]"):
        make_reward(name, {"reward_paths": {"other": "/x"}})


@pytest.mark.parametrize("name, entry, key", [
    ("clip_score", "{missing}", r"reward_paths\['clip_score'\]"),
    ("pickscore", {"model": "{missing}", "processor": "{missing}"}, r"reward_paths\['pickscore'\]\['model'\]"),
    ("hpsv2", "{missing}/HPS_v2.1_compressed.pt", r"reward_paths\['hpsv2'\]"),
    ("aesthetic", {"clip": "{missing}", "head": "{missing}/head.pth"}, r"reward_paths\['aesthetic'\]\['clip'\]"),
])
def test_missing_path_names_the_key_and_the_path(name, entry, key, tmp_path):
    missing = str(tmp_path / "nowhere")
    entry = entry.format(missing=missing) if isinstance(entry, str) else {k: v.format(missing=missing)
                                                                         for k, v in entry.items()}
    with pytest.raises(FileNotFoundError, match=key) as info:
        make_reward(name, {"reward_paths": {name: entry}})
    assert missing in str(info.value) and "does not exist" in str(info.value)


def test_bad_entries_have_clear_errors(clip_dirs, hps_paths, tmp_path):
    with pytest.raises(ValueError, match=r"`reward_paths\['aesthetic'\]` must be a dict"):
        make_reward("aesthetic", {"reward_paths": {"aesthetic": str(clip_dirs["aes_clip"])}})
    with pytest.raises(ValueError, match=r"needs config key `reward_paths\['aesthetic'\]\['head'\]`"):
        make_reward("aesthetic", {"reward_paths": {"aesthetic": {"clip": str(clip_dirs["aes_clip"])}}})
    with pytest.raises(ValueError, match=r"unknown part 'heads'. Did you mean 'head'"):
        make_reward("aesthetic", {"reward_paths": {"aesthetic": {"clip": "a", "heads": "b"}}})
    # PickScore_v1's folder has no processor: the error says which folder to add
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config.json.*CLIP-ViT-H-14-laion2B"):
        make_reward("pickscore", {"reward_paths": {"pickscore": str(clip_dirs["pick_model"])}})
    # a file where a folder is expected, and the other way round
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        make_reward("clip_score", {"reward_paths": {"clip_score": str(clip_dirs["aes_head"])}})
    with pytest.raises(FileNotFoundError, match="is a folder, not a file"):
        make_reward("hpsv2", {"reward_paths": {"hpsv2": str(tmp_path)}})
    # a checkpoint of another architecture
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.head.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(RuntimeError, match=r"does not fit open_clip orwcfm-test-hps-tiny: \d+ missing keys .*"
                                           r"1 unexpected keys \(visual.head.weight\)"):
        make_reward("hpsv2", {"reward_paths": {"hpsv2": {"checkpoint": str(wrong),
                                                         "model_config": hps_paths["model_config"]}}})
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(RuntimeError, match=r"(?s)could not load config key `reward_paths\['hpsv2'\]\['checkpoint'\]`.*"
                                           r"size mismatch for visual.proj"):
        make_reward("hpsv2", {"reward_paths": {"hpsv2": {"checkpoint": str(wrong),
                                                         "model_config": hps_paths["model_config"]}}})
    # a folder that is not a CLIPModel
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "preprocessor_config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"reward 'clip_score': could not load config key "
                                           r"`reward_paths\['clip_score'\]`"):
        make_reward("clip_score", {"reward_paths": {"clip_score": str(empty)}})
    with pytest.raises(ValueError, match="reward_batch_size"):
        make_reward("clip_score", {"reward_paths": {"clip_score": str(clip_dirs["clip"])}, "reward_batch_size": 0})


def test_imagereward_explains_why_it_is_unavailable():
    with pytest.raises(ValueError) as info:
        make_reward("imagereward", {"reward_paths": {"imagereward": "/x"}})
    text = str(info.value)
    for needle in ("transformers 5", "apply_chunking_to_forward", "fairscale", "bert-base-uncased", "'hpsv2'",
                   "'pickscore'", "http://127.0.0.1:PORT"):
        assert needle in text


def test_importing_the_rewards_imports_no_transformers_or_open_clip():
    import subprocess
    import sys

    code = ("import sys, orwcfm_fast.rewards as r; r.available_rewards(); "
            "assert 'transformers' not in sys.modules and 'open_clip' not in sys.modules, "
            "[m for m in ('transformers', 'open_clip') if m in sys.modules]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clip_diversity_embedding_matches_the_reference_processor(clip_dirs):
    """evaluate()'s 'clip' diversity embedding: the folder's CLIP image features (L2-normalised) of the images as
    the reference CLIPImageProcessor prepares them (uint8 images, so PIL sees the same pixels)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from orwcfm_fast.config import validate_config
    from orwcfm_fast.evaluation import make_embedding

    config = validate_config({"diversity_embedding": "auto", "reward_paths": {"clip_score": str(clip_dirs["clip"])}})
    embed = make_embedding(config, "cpu", images_like=True)
    assert embed.name == "clip"
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(3, 3, 37, 45, generator=gen) * 255).round() / 255
    got = embed(images)
    processor = CLIPImageProcessor.from_pretrained(str(clip_dirs["clip"]))
    model = CLIPModel.from_pretrained(str(clip_dirs["clip"])).eval().double()
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"].double()
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels)
    want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1)
    assert got.shape == want.shape and got.dtype == torch.float64
    # resampled images: the on-device resize differs from PIL's by its uint8 rounding (~1/255)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert make_embedding(validate_config({}), "cpu", images_like=True).name == "pixels"
    with pytest.raises(ValueError, match=r"reward_paths\['dino'\]"):
        make_embedding(validate_config({"diversity_embedding": "dino"}), "cpu", images_like=True)
