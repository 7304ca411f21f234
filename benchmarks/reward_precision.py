"""Does bf16 keep the preference rewards' within-prompt rankings? fp32 vs bf16 weights, per reward.

With ``images_per_prompt > 1`` the trainer's default weight normalisation is ``group``: each prompt's rewards
are standardised within the prompt's group, ``z = (r - mean) / std``, and weighted ``k * softmax(beta * z)``
(:func:`orwcfm_fast.weighting.reward_weights`). Only the differences *within* a group matter, and those are
small: a policy's samples for one prompt score close together (PickScore ~ 21-23, within-prompt spreads of a
few tenths). A reward's rounding noise that is a noticeable fraction of that spread reorders the samples and
moves the weights, and ``group`` standardisation divides the noise by the (small) group std.

For each preference reward (``clip_score``, ``pickscore``, ``hpsv2``, ``aesthetic``) this builds a random-init
model of the reward's architecture family, saved in the real layout and loaded through
``make_reward(name, {"reward_paths": ..., "reward_dtype": ...})``, so the reward's own preprocessing (224 x 224
from 256 x 256 samples: shortest side + centre crop, or HPSv2's longest side + pad), its own fp32 / bf16 paths
and its scoring formula (cosine; PickScore's ``logit_scale.exp() * cos`` with ``exp(4.6052) = 100``; the
aesthetic MLP on the normalised embedding) are the ones that run. The towers have the real depth, patch size
(14), activation (OpenAI ``quick_gelu`` for ViT-L/14, ``gelu`` for the LAION / open_clip ViT-H/14) and head
size (64) but a small width (``--width``, default 64), so bf16 on a CPU finishes in minutes:

=============  ===============================  ===========  ==========
reward         architecture (real)              vision       text
=============  ===============================  ===========  ==========
clip_score     transformers CLIP ViT-L/14       24 layers    12 layers
pickscore      transformers CLIP ViT-H/14       32 layers    24 layers
hpsv2          open_clip ViT-H-14               32 layers    24 layers
aesthetic      CLIP ViT-L/14 + LAION MLP head   24 layers    (none)
=============  ===============================  ===========  ==========

Images: ``--prompts`` groups of ``--images-per-prompt`` 256 x 256 images. Each group shares a base image
(a smooth random colour field with mid-frequency detail) and each image adds its own smooth perturbation of
amplitude ``--perturbation`` (default 0.1 in [0, 1] pixel units) plus a little fine noise: images alike within
a prompt, as a policy's samples are. The JSON records how alike the models find them (mean pairwise cosine of
the fp32 image embeddings within a group and across groups) and the within-prompt std relative to the mean
score, so the setting can be judged.

Measured per reward (fp32 scores are the reference):

- ``spearman_mean`` / ``spearman_min``: within-prompt Spearman rank correlation of bf16 vs fp32 scores, mean
  and minimum over the prompts (:func:`spearman`: Pearson correlation of average ranks, as
  ``scipy.stats.spearmanr``);
- ``err_over_std_mean`` / ``err_over_std_max``: per prompt, the RMS of (bf16 - fp32) over the population std
  of the fp32 scores (the std ``group`` divides by): the bf16 noise in units of the within-prompt spread;
- ``group_weights``: per temperature (0.5, the config default, and 1, 2), ``reward_weights(r, beta, "group",
  k)`` of bf16 vs fp32 scores: mean and max ``|w_bf16 - w_fp32|`` (weights average 1, so these are relative
  to the mean weight), the largest relative change ``|dw| / w_fp32``, and the fraction of prompts whose
  highest-weighted image is the same;
- ``bf16_safe``: ``spearman_mean >= 0.99`` (:data:`SAFE_SPEARMAN`), the rule behind each reward class's
  ``bf16_safe`` declaration (which ``reward_dtype: auto`` follows on CUDA).

Caveat: these are random-init models of the architectures, not the released checkpoints (which are not
available here); trained weights have other activation statistics (outlier features, larger norms), so the
numbers show how the architectures and code paths behave in bf16, not the real rewards' exact errors. Random-init
towers also barely tell images apart (the fp32 embeddings of unrelated images have cosines of 0.9-0.99): the
within-prompt differences are a small part of each embedding while bf16's error is relative to all of it, so
the noise-to-spread ratio is probably larger than with trained weights, and the rule errs towards fp32
(``--perturbation`` larger makes the groups more diverse: the JSON of a second setting shows how much that moves
the result).

Images per prompt default to 16: with 8, a single swap of two neighbours already gives Spearman
``1 - 6 * 2 / (8 * 63) = 0.976``, below the 0.99 rule; with 16 it gives 0.997.

``--reward-paths`` (config ``reward_paths`` as JSON, or a ``.json`` file) measures real weights instead, e.g.
on a GPU machine that has them (``--device cuda``); the images stay synthetic.

Run: ``python benchmarks/reward_precision.py [--device cpu] [--prompts 16] [--images-per-prompt 16]
[--perturbation 0.1] [--width 64] [--threads 1] [--reward-paths JSON] [--json PATH]``.
Results: ``benchmarks/results/reward_precision_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance, write_results  # noqa: E402

REWARDS = ("clip_score", "pickscore", "hpsv2", "aesthetic")
#: the decision rule: bf16 is safe for a reward whose mean within-prompt Spearman (bf16 vs fp32) reaches this
SAFE_SPEARMAN = 0.99
TEMPERATURES = (0.5, 1.0, 2.0)
#: real depths (vision layers, text layers) and activations of each reward's towers
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "clip_score": {"vision_layers": 24, "text_layers": 12, "act": "quick_gelu"},  # openai/clip-vit-large-patch14
    "pickscore": {"vision_layers": 32, "text_layers": 24, "act": "gelu"},  # PickScore_v1 (laion CLIP-ViT-H-14)
    "hpsv2": {"vision_layers": 32, "text_layers": 24, "act": "gelu"},  # open_clip ViT-H-14
    "aesthetic": {"vision_layers": 24, "text_layers": 1, "act": "quick_gelu"},  # CLIP ViT-L/14 (text unused)
}
PROMPT_WORDS = ("a cat", "an astronaut", "a red cube", "a lighthouse", "two dogs", "a bowl of fruit", "a city",
                "a forest", "a robot", "a violin", "a mountain lake", "a teapot", "a bicycle", "a dragon",
                "a chess board", "a sunflower")


# ---------------------------------------------------------------------------------------------------------------
# metrics


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, 1-based, ties given their average rank (``scipy.stats.rankdata``'s default).

    Shapes:
        ``[..., k]`` -> ``[..., k]`` float64.
    """
    x = x.double()
    order = x.argsort(dim=-1)
    sorted_x = x.gather(-1, order)
    k = x.shape[-1]
    pos = torch.arange(1, k + 1, dtype=torch.float64, device=x.device).expand_as(x).contiguous()
    # average position over each run of equal values: for each element, the mean of the positions of its equals
    eq = sorted_x.unsqueeze(-1) == sorted_x.unsqueeze(-2)  # [..., k, k]
    avg = (eq.double() * pos.unsqueeze(-2)).sum(-1) / eq.double().sum(-1)
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` along the last dim (Pearson of average ranks).

    NaN where either row is constant (as ``scipy.stats.spearmanr``).

    Shapes:
        ``[..., k]``, ``[..., k]`` -> ``[...]`` float64.
    """
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / den, torch.full_like(den, math.nan))


def compare(ref: torch.Tensor, other: torch.Tensor, group_size: int,
            temperatures: Sequence[float] = TEMPERATURES) -> Dict[str, Any]:
    """How far ``other`` scores are from the ``ref`` scores, within each group of ``group_size``.

    Args:
        ref: ``[B]`` reference (fp32) scores, groups of ``group_size`` consecutive samples.
        other: ``[B]`` the same samples' scores from the path under test (bf16).
        group_size: images per prompt.
        temperatures: the ``group`` weights' temperatures to compare at.

    Returns:
        The metrics of the module docs (``spearman_*``, ``err_over_std_*``, ``group_weights``, ``bf16_safe``,
        and context: ``score_mean``, ``within_std_mean``, ``within_std_over_abs_mean``, ``abs_err_mean``).
    """
    from orwcfm_fast.weighting import reward_weights

    r = ref.double().reshape(-1, group_size)
    o = other.double().reshape(-1, group_size)
    rho = spearman(o, r)
    std = r.std(dim=1, unbiased=False)
    rms = (o - r).square().mean(1).sqrt()
    ratio = rms / std
    weights = {}
    for beta in temperatures:
        w_ref = reward_weights(ref.double(), beta, "group", group_size).reshape(-1, group_size)
        w_oth = reward_weights(other.double(), beta, "group", group_size).reshape(-1, group_size)
        dw = (w_oth - w_ref).abs()
        weights[str(beta)] = {
            "abs_diff_mean": float(dw.mean()),
            "abs_diff_max": float(dw.max()),
            "rel_diff_max": float((dw / w_ref).max()),
            "top1_agreement": float((w_oth.argmax(1) == w_ref.argmax(1)).double().mean()),
        }
    rho_mean = float(rho.nanmean())
    return {
        "spearman_mean": rho_mean,
        "spearman_min": float(rho.min()),
        "err_over_std_mean": float(ratio.mean()),
        "err_over_std_max": float(ratio.max()),
        "abs_err_mean": float((o - r).abs().mean()),
        "score_mean": float(r.mean()),
        "within_std_mean": float(std.mean()),
        "within_std_over_abs_mean": float(std.mean() / r.mean(1).abs().mean()),
        "group_weights": weights,
        "bf16_safe": bool(rho_mean >= SAFE_SPEARMAN),
    }


# ---------------------------------------------------------------------------------------------------------------
# random-init models in the real layouts


def _tokenizer(path: Path):
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


def _hf_clip(tok, arch: Dict[str, Any], width: int, image_size: int, patch: int, projection_dim: int, seed: int,
             logit_scale: Optional[float] = None):
    from transformers import CLIPConfig, CLIPModel

    heads = max(width // 64, 1)
    common = dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, hidden_act=arch["act"])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), num_hidden_layers=arch["text_layers"], max_position_embeddings=77,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id, **common),
        vision_config=dict(num_hidden_layers=arch["vision_layers"], image_size=image_size, patch_size=patch,
                           **common),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    return model


def build_reward_paths(root: Path, width: int = 64, image_size: int = 224, patch: int = 14, depth_scale: float = 1.0,
                       embed_dim: int = 64, seed: int = 0) -> Dict[str, Any]:
    """Random-init models of the four rewards' architectures saved under ``root``; returns ``reward_paths``.

    Args:
        root: an existing folder.
        width: the towers' width (heads of 64 channels; one head below 128).
        image_size, patch: the vision towers' input size and patch size (224 / 14 as the real ones).
        depth_scale: fraction of the real depths of :data:`ARCHITECTURES` (at least one layer each).
        embed_dim: the CLIP embedding size (the aesthetic CLIP's is 768, as its head needs).
        seed: the models' seed.
    """
    import open_clip
    from transformers import CLIPImageProcessor

    def scaled(name):
        a = dict(ARCHITECTURES[name])
        for k in ("vision_layers", "text_layers"):
            a[k] = max(1, round(a[k] * depth_scale))
        return a

    root = Path(root)
    dirs = {k: root / k for k in ("clip", "pick_model", "pick_processor", "aes_clip")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(dirs["clip"])
    # clip_score: one folder with model, tokenizer and processor (an openai/clip-vit-large-patch14 snapshot)
    _hf_clip(tok, scaled("clip_score"), width, image_size, patch, embed_dim, seed + 1).save_pretrained(
        str(dirs["clip"]))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(dirs["clip"]))
    # pickscore: the model alone, with the authors' logit scale (exp(4.6052) = 100); the laion processor folder in
    # the legacy CLIPFeatureExtractor format
    _hf_clip(tok, scaled("pickscore"), width, image_size, patch, embed_dim, seed + 2,
             logit_scale=4.6052).save_pretrained(str(dirs["pick_model"]))
    tok.save_pretrained(str(dirs["pick_processor"]))
    (dirs["pick_processor"] / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": image_size}))
    # aesthetic: a CLIP with ViT-L/14's 768-d projection and the LAION MLP head (.pth)
    _hf_clip(tok, scaled("aesthetic"), width, image_size, patch, 768, seed + 3).save_pretrained(str(dirs["aes_clip"]))
    torch.manual_seed(seed + 4)
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    with torch.no_grad():  # a random head barely varies on unit-norm inputs: scale it (scores are linear in it)
        head[0].weight.mul_(200.0)
    aes_head = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, aes_head)
    # hpsv2: an open_clip ViT-H-14-style config (file stem = architecture name) and {'state_dict': ...}
    h = scaled("hpsv2")
    name = f"orwcfm-precision-vit-w{width}-l{h['vision_layers']}-s{image_size}-p{patch}"
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": image_size, "layers": h["vision_layers"], "width": width,
                          "head_width": min(64, width), "patch_size": patch},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": max(width // 64, 1),
                        "layers": h["text_layers"]}}
    config = root / f"{name}.json"
    config.write_text(json.dumps(cfg))
    if open_clip.get_model_config(name) is None:
        open_clip.add_model_config(str(config))
    torch.manual_seed(seed + 5)
    model = open_clip.create_model(name, pretrained=None).eval()
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return {"clip_score": str(dirs["clip"]),
            "pickscore": {"model": str(dirs["pick_model"]), "processor": str(dirs["pick_processor"])},
            "hpsv2": {"checkpoint": str(checkpoint), "model_config": str(config)},
            "aesthetic": {"clip": str(dirs["aes_clip"]), "head": str(aes_head)}}


# ---------------------------------------------------------------------------------------------------------------
# images


def _smooth(n: int, size: int, cells: int, g: torch.Generator) -> torch.Tensor:
    """``[n, 3, size, size]`` zero-mean smooth noise (a ``cells x cells`` grid, bicubic upsampled), std ~1."""
    coarse = torch.randn(n, 3, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def group_images(prompts: int, images_per_prompt: int, size: int = 256, perturbation: float = 0.1,
                 seed: int = 0) -> torch.Tensor:
    """``[prompts * images_per_prompt, 3, size, size]`` images in [0, 1]: per prompt a shared base, per image a
    smooth perturbation of std ``perturbation`` and fine noise of std ``perturbation / 4``."""
    g = torch.Generator().manual_seed(seed)
    base = 0.5 + 0.18 * _smooth(prompts, size, 4, g) + 0.08 * _smooth(prompts, size, 24, g)
    base = base.repeat_interleave(images_per_prompt, dim=0)
    n = prompts * images_per_prompt
    delta = perturbation * (0.8 * _smooth(n, size, 6, g) + 0.6 * _smooth(n, size, 20, g)) / 1.0
    fine = (perturbation / 4) * torch.randn(n, 3, size, size, generator=g)
    return (base + delta + fine).clamp(0, 1)


def group_prompts(prompts: int, images_per_prompt: int) -> List[str]:
    """``prompts * images_per_prompt`` strings, each prompt repeated for its group."""
    words = [PROMPT_WORDS[i % len(PROMPT_WORDS)] + ("" if i < len(PROMPT_WORDS) else f" #{i}")
             for i in range(prompts)]
    return [w for w in words for _ in range(images_per_prompt)]


def embedding_geometry(fp32: torch.Tensor, bf16: torch.Tensor, group_size: int) -> Dict[str, float]:
    """How alike the (L2-normalised) fp32 image embeddings are within and across groups (mean pairwise cosine),
    and how close the bf16 embeddings are to them (mean cosine; ``1 - cos`` ~ half the squared relative error)."""
    e, b = fp32.double(), bf16.double()
    sim = e @ e.T
    groups = torch.arange(e.shape[0]) // group_size
    same = groups[:, None] == groups[None, :]
    off = ~torch.eye(e.shape[0], dtype=torch.bool)
    return {"fp32_within_prompt": float(sim[same & off].mean()), "fp32_across_prompts": float(sim[~same].mean()),
            "bf16_vs_fp32": float((e * b).sum(-1).mean())}


# ---------------------------------------------------------------------------------------------------------------


def measure(paths: Dict[str, Any], images: torch.Tensor, prompts: List[str], group_size: int,
            names: Sequence[str] = REWARDS, device: str = "cpu",
            temperatures: Sequence[float] = TEMPERATURES) -> Dict[str, Dict[str, Any]]:
    """Scores ``images`` with each reward built in fp32 and in bf16 (``reward_dtype``) and compares them.

    Returns:
        ``{name: compare(...) + {"seconds_fp32", "seconds_bf16", "embedding_cosine" (embedding_geometry),
        "bf16_param_dtypes"}}``.
    """
    from orwcfm_fast.rewards import make_reward

    out = {}
    for name in names:
        scores, feats, seconds = {}, {}, {}
        for dtype in ("fp32", "bf16"):
            with warnings.catch_warnings():  # bf16 on purpose: no "not bf16-safe" warning
                warnings.filterwarnings("ignore", message=r"reward '.*' runs in bf16")
                reward = make_reward(name, {"reward_paths": paths, "reward_dtype": dtype, "reward_batch_size": 32},
                                     device)
            t0 = time.perf_counter()
            with torch.no_grad():  # reward(images, prompts) is score(image_features(images), prompts), after checks
                feats[dtype] = reward.image_features(images.to(device))
                scores[dtype] = reward.score(feats[dtype], prompts if reward.takes_prompts else None).float().cpu()
            seconds[dtype] = time.perf_counter() - t0
            if dtype == "bf16":
                param_dtypes = sorted({str(p.dtype) for p in reward.parameters()})
            del reward
        row = compare(scores["fp32"], scores["bf16"], group_size, temperatures)
        geometry = embedding_geometry(feats["fp32"].cpu(), feats["bf16"].cpu(), group_size)
        row.update(seconds_fp32=seconds["fp32"], seconds_bf16=seconds["bf16"], embedding_cosine=geometry,
                   bf16_param_dtypes=param_dtypes)
        out[name] = row
        print(f"{name:>10}: spearman mean {row['spearman_mean']:.4f} min {row['spearman_min']:.4f}  "
              f"err/std mean {row['err_over_std_mean']:.3f} max {row['err_over_std_max']:.3f}  "
              f"group w (beta 1) |dw| mean {row['group_weights'].get('1.0', {}).get('abs_diff_mean', math.nan):.4f}  "
              f"emb cos within {geometry['fp32_within_prompt']:.4f} across {geometry['fp32_across_prompts']:.4f} "
              f"bf16 {geometry['bf16_vs_fp32']:.6f}  bf16_safe {row['bf16_safe']}  "
              f"({seconds['fp32']:.1f} s fp32, {seconds['bf16']:.1f} s bf16)", flush=True)
    return out


def _processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--images-per-prompt", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256, help="the samples' side (resized to the models' 224)")
    p.add_argument("--perturbation", type=float, default=0.1, help="within-prompt perturbation std ([0, 1] units)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth-scale", type=float, default=1.0, help="fraction of the real depths")
    p.add_argument("--model-size", type=int, default=224, help="the vision towers' input size")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--rewards", default=",".join(REWARDS))
    p.add_argument("--reward-paths", default=None,
                   help="config reward_paths (a JSON object or a .json file) of real weights to measure instead "
                        "of the random-init models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    images = group_images(args.prompts, args.images_per_prompt, args.image_size, args.perturbation, args.seed)
    prompts = group_prompts(args.prompts, args.images_per_prompt)
    with tempfile.TemporaryDirectory() as tmp:
        if args.reward_paths:
            text = args.reward_paths
            paths = json.loads(Path(text).read_text() if text.strip().endswith(".json") else text)
        else:
            paths = build_reward_paths(Path(tmp), args.width, args.model_size, args.patch, args.depth_scale,
                                       seed=args.seed)
        rows = measure(paths, images, prompts, args.images_per_prompt, names, args.device)
    device_name = args.device
    if torch.device(args.device).type == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(args.device)).replace(" ", "_")
    result = {
        **provenance(device_name),
        "processor": _processor_name() if torch.device(args.device).type == "cpu" else None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "models": ("the weights of --reward-paths" if args.reward_paths else
                   "random-init models of the rewards' architectures (real depth, small width), not the released "
                   "checkpoints"),
        "architectures": None if args.reward_paths else {n: ARCHITECTURES[n] for n in names},
        "safe_spearman": SAFE_SPEARMAN,
        "rewards": rows,
    }
    path = args.json or ROOT / "benchmarks" / "results" / f"reward_precision_{args.device.split(':')[0]}.json"
    write_results(result, path, {})  # no timed modes: the check of s_per_step has nothing to check
    return result


if __name__ == "__main__":
    main()
