"""LAION aesthetic predictor v2 (``aesthetic``): an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

transformers is imported when the reward is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from orwcfm_fast.rewards.preference import (
    DeviceLike,
    PreferenceReward,
    config_settings,
    existing_path,
    features_of,
    load_error,
    reward_paths_entry,
)
from orwcfm_fast.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

__all__ = ["AestheticMLP", "AestheticReward"]

_WHAT = ("{'clip': a local folder with the transformers CLIPModel openai/clip-vit-large-patch14, "
         "'head': the predictor's state-dict file sac+logos+ava1-l14-linearMSE.pth}")


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: five linear layers, no activations, dropout between the first four.

    State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` (the ``.pth`` files of
    christophschuhmann/improved-aesthetic-predictor).

    Shapes:
        ``[B, in_features]`` -> ``[B, 1]``.
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.in_features = int(in_features)
        self.layers = nn.Sequential(
            nn.Linear(self.in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticReward(PreferenceReward):
    """LAION aesthetic score v2 (improved-aesthetic-predictor): ``MLP(normalise(CLIP ViT-L/14 image embedding))``.

    As the predictor's ``simple_inference.py``: the image embedding of CLIP ViT-L/14 (``encode_image``, i.e.
    transformers' ``get_image_features``: the projected 768-d embedding), divided by its L2 norm, fed to
    :class:`AestheticMLP`; ~ 1-10 (the AVA rating scale), ~ 5-6 for typical samples. Preprocessing is OpenAI CLIP's
    (``Resize(224, bicubic)``, ``CenterCrop(224)`` with torchvision's rounded offsets, OpenAI mean / std), here on
    the device. The CLIP vision tower runs in the weights' dtype; the normalisation and the head are float32.
    Prompts are ignored (``takes_prompts`` is False; a second argument is accepted and unused).

    Args:
        clip_dir: folder of a transformers ``CLIPModel`` (``openai/clip-vit-large-patch14``); only its vision tower
            and visual projection are kept.
        head: the head's state-dict file (``sac+logos+ava1-l14-linearMSE.pth``; ``{'state_dict': ...}`` also read).
        device, dtype, batch_size: where it runs, the CLIP weights' dtype, images per forward (None: all).
        key: the config key named in error messages.

    Config: ``reward_paths['aesthetic'] = {'clip': DIR, 'head': FILE}``.

    Shapes:
        ``forward(images [B, 3, H, W] in [0, 1], prompts=None) -> [B]`` float32 on ``images.device``.
    """

    name = "aesthetic"
    takes_prompts = False
    #: not bf16-safe: mean within-prompt Spearman bf16 vs fp32 0.95 < 0.99 on a random-init ViT-L/14-depth CLIP
    #: with the head (benchmarks/reward_precision.py); ``reward_dtype: auto`` runs it in fp32
    bf16_safe = False

    def __init__(self, clip_dir: Union[str, os.PathLike], head: Union[str, os.PathLike], device: DeviceLike = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: Optional[int] = None, key: Optional[str] = None):
        super().__init__(batch_size)
        key = key or f"reward_paths[{self.name!r}]"
        clip_key, head_key = f"{key}['clip']", f"{key}['head']"
        clip_dir = existing_path(os.fspath(clip_dir), clip_key, "dir",
                                 "a folder with a transformers CLIPModel (openai/clip-vit-large-patch14)")
        head = existing_path(os.fspath(head), head_key, "file",
                             "the aesthetic predictor's state-dict file (sac+logos+ava1-l14-linearMSE.pth)")
        from transformers import CLIPModel

        try:
            clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise load_error(self.name, clip_key, clip_dir, e) from e
        try:
            state = torch.load(head, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
            self.head = AestheticMLP(int(state["layers.0.weight"].shape[1]))
            self.head.load_state_dict(state)
        except Exception as e:
            raise load_error(self.name, head_key, head, e) from e
        dim = int(clip.config.projection_dim)
        if self.head.in_features != dim:
            raise ValueError(f"reward {self.name!r}: the head `{head_key}` takes {self.head.in_features}-d embeddings "
                             f"but the CLIP `{clip_key}` makes {dim}-d ones (the predictor needs CLIP ViT-L/14)")
        size = int(clip.config.vision_config.image_size)
        self.vision_model = clip.vision_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.visual_projection = clip.visual_projection.to(device=device, dtype=dtype).eval().requires_grad_(False)
        del clip  # the text tower is not needed
        self.head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_preprocess = ImagePreprocess(size, resize="shortest", crop_size=size, crop_offset="round",
                                                mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD).to(device)
        self.clip_dir, self.head_path = clip_dir, head

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[b, 3, s, s]`` -> ``[b, 768]`` float32 projected CLIP image embeddings."""
        pooled = features_of(self.vision_model(pixel_values=pixels.to(self.visual_projection.weight.dtype)))
        return self.visual_projection(pooled).float()

    def score(self, image_features: torch.Tensor, prompts: Optional[List[str]]) -> torch.Tensor:
        return self.head(image_features.float()).squeeze(-1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Scores a batch (prompts ignored).

        Args:
            images: ``[B, 3, H, W]`` floating, values in [0, 1] (clamped), any device.
            prompts: ignored.

        Returns:
            ``[B]`` float32 on ``images.device``.
        """
        return super().forward(images, prompts)

    @classmethod
    def from_config(cls, config: Any, device: DeviceLike) -> "AestheticReward":
        """Builds it from config keys ``reward_paths['aesthetic']``, ``reward_dtype``, ``reward_batch_size``."""
        paths = reward_paths_entry(config, cls.name, parts=("clip", "head"), default_part=None,
                                   required=("clip", "head"), what=_WHAT)
        return cls(paths["clip"], paths["head"], **config_settings(config, device, cls))

    def extra_repr(self) -> str:
        return f"clip_dir={self.clip_dir!r}, head={self.head_path!r}, {super().extra_repr()}"
