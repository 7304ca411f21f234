"""HPS v2.1 (``hpsv2``): Human Preference Score v2 (Wu et al., 2023) on open_clip's ViT-H-14.

open_clip is imported when the reward is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, List, Optional, Union

import torch

from orwcfm_fast.rewards.preference import (
    DeviceLike,
    PreferenceReward,
    config_settings,
    existing_path,
    load_error,
    reward_paths_entry,
)
from orwcfm_fast.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

__all__ = ["HPSv2Reward"]

_WHAT = ("the HPS v2.1 checkpoint file HPS_v2.1_compressed.pt (a dict whose 'state_dict' holds the whole "
         "fine-tuned open_clip ViT-H-14), or {'checkpoint': FILE, 'model_config': an open_clip model-config JSON "
         "for another architecture}")
_MAX_LISTED = 5


def _architecture(model_config: Optional[str], key: str) -> str:
    """The open_clip architecture name: ViT-H-14, or the config JSON's file stem (registered with open_clip)."""
    import open_clip

    if model_config is None:
        return "ViT-H-14"
    path = existing_path(model_config, key, "file", "an open_clip model-config JSON (embed_dim, vision_cfg, text_cfg)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"config key `{key}`: {path!r} is not a readable JSON file: {e}") from e
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"config key `{key}`: {path!r} is not an open_clip model config "
                         "(a JSON object with embed_dim, vision_cfg and text_cfg, like open_clip's ViT-H-14.json)")
    name = Path(path).stem
    known = open_clip.get_model_config(name)
    if known is None:
        open_clip.add_model_config(path)  # open_clip names an added config by its file stem
    elif known != cfg:
        raise ValueError(f"config key `{key}`: the file name {name!r} is already an open_clip architecture with "
                         "another config; rename the file (its stem becomes the architecture's name)")
    return name


def _state_dict(checkpoint: str, key: str, name: str) -> Mapping:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise load_error(name, key, checkpoint, e) from e
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"config key `{key}`: {checkpoint!r} holds no state dict (expected a dict of tensors or "
                         "{'state_dict': dict of tensors}, as HPS_v2.1_compressed.pt)")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class HPSv2Reward(PreferenceReward):
    """HPS v2.1: ``cos(image embedding, prompt embedding)`` of the HPS-fine-tuned open_clip ViT-H-14.

    As hpsv2's ``img_score.score``: the model is open_clip ``ViT-H-14`` with the checkpoint's ``state_dict`` (the
    whole fine-tuned CLIP); images are preprocessed as its ``preprocess_val`` (``light_augmentation=True``:
    ``ResizeMaxSize``, the longest side resized to 224 bicubic, both sides rounded, padded to 224 x 224 with black
    (0) centred; OpenAI mean / std), here on the device; prompts are tokenized by open_clip's ViT-H-14 tokenizer
    (77 tokens); the score is the diagonal of ``image_features @ text_features.T`` with both L2-normalised, i.e.
    the cosine. No logit scale is applied (HPS v2.1 scores are ~ 0.2-0.35). hpsv2 runs it under fp16 autocast; here
    the weights are float32 or bf16 and the normalisation and cosine are float32. A non-square image whose
    longest side is already 224 is padded to a square too (hpsv2 would pass it unpadded, which the ViT rejects).

    Args:
        checkpoint: the ``.pt`` file (``{'state_dict': ...}`` or a plain state dict; a ``module.`` prefix is removed).
        model_config: optional open_clip model-config JSON (``open_clip/model_configs/<name>.json`` layout) for an
            architecture other than ViT-H-14; its file stem becomes the open_clip name.
        device, dtype, batch_size: where it runs, the weights' dtype, images per forward (None: all).
        key: the config key named in error messages.

    Config: ``reward_paths['hpsv2']`` = the checkpoint file, or ``{'checkpoint': FILE, 'model_config': JSON}``.

    Shapes:
        ``forward(images [B, 3, H, W] in [0, 1], prompts: B strings) -> [B]`` float32 on ``images.device``.
    """

    name = "hpsv2"
    #: not bf16-safe: mean within-prompt Spearman bf16 vs fp32 0.98 < 0.99 on a random-init open_clip ViT-H-14-depth
    #: model (benchmarks/reward_precision.py; 0.992 with 3x more diverse groups: borderline); ``auto`` runs it in fp32
    bf16_safe = False

    def __init__(self, checkpoint: Union[str, os.PathLike], model_config: Optional[Union[str, os.PathLike]] = None,
                 device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32, batch_size: Optional[int] = None,
                 key: Optional[str] = None):
        super().__init__(batch_size)
        key = key or f"reward_paths[{self.name!r}]"
        ckpt_key = f"{key}['checkpoint']" if model_config is not None else key
        checkpoint = existing_path(os.fspath(checkpoint), ckpt_key, "file", _WHAT)
        arch = _architecture(None if model_config is None else os.fspath(model_config), f"{key}['model_config']")
        import open_clip

        state = _state_dict(checkpoint, ckpt_key, self.name)
        try:
            model = open_clip.create_model(arch, pretrained=None, device="cpu")
            result = model.load_state_dict(state, strict=False)
        except Exception as e:
            raise load_error(self.name, ckpt_key, checkpoint, e) from e
        if result.missing_keys or result.unexpected_keys:
            def listed(keys):
                more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
                return ", ".join(keys[:_MAX_LISTED]) + more
            raise RuntimeError(
                f"reward {self.name!r}: config key `{ckpt_key}` = {checkpoint!r} does not fit open_clip {arch}: "
                f"{len(result.missing_keys)} missing keys ({listed(result.missing_keys)}), "
                f"{len(result.unexpected_keys)} unexpected keys ({listed(result.unexpected_keys)}); expected {_WHAT}")
        size = model.visual.image_size
        size = size if isinstance(size, int) else tuple(size)
        if not isinstance(size, int):
            if size[0] != size[1]:
                raise ValueError(f"reward {self.name!r}: open_clip {arch} has a non-square image size {size}")
            size = int(size[0])
        self.architecture = arch
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_preprocess = ImagePreprocess(size, resize="longest", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                                fill=0.0).to(device)
        self.checkpoint = checkpoint

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[b, 3, s, s]`` -> ``[b, D]`` float32 ``encode_image``."""
        return self.model.encode_image(pixels.to(self.model.logit_scale.dtype)).float()

    def encode_text(self, prompts: List[str]) -> torch.Tensor:
        """``n`` prompts -> ``[n, D]`` float32 ``encode_text``."""
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()

    def score(self, image_features: torch.Tensor, prompts: Optional[List[str]]) -> torch.Tensor:
        return (image_features * self.text_features(prompts)).sum(-1)

    @classmethod
    def from_config(cls, config: Any, device: DeviceLike) -> "HPSv2Reward":
        """Builds it from config keys ``reward_paths['hpsv2']``, ``reward_dtype``, ``reward_batch_size``."""
        paths = reward_paths_entry(config, cls.name, parts=("checkpoint", "model_config"), default_part="checkpoint",
                                   required=("checkpoint",), what=_WHAT)
        return cls(paths["checkpoint"], paths.get("model_config"), **config_settings(config, device, cls))

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture!r}, checkpoint={self.checkpoint!r}, "
                f"dtype={self.model.logit_scale.dtype}, {super().extra_repr()}")
