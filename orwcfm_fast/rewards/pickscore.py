"""PickScore (``pickscore``): ``logit_scale.exp() * cos(image, prompt)`` of PickScore v1 (Kirstain et al., 2023).

transformers is imported when the reward is built.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from orwcfm_fast.rewards.clip_score import TransformersCLIPReward
from orwcfm_fast.rewards.preference import DeviceLike

__all__ = ["PickScoreReward"]


class PickScoreReward(TransformersCLIPReward):
    """PickScore v1: ``model.logit_scale.exp() * cos(image embedding, prompt embedding)``, as its authors define it.

    The model is ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel``, CLIP ViT-H/14 fine-tuned on
    Pick-a-Pic); its authors preprocess with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest
    side 224 bicubic, centre crop 224, OpenAI mean / std; tokenizer truncating at 77), done here on the device.
    The logit scale is the checkpoint's (``exp`` ~ 100), taken in float32 before any bf16 cast, so scores are
    ~ 100 x a cosine: around 20-23 for typical text-to-image samples.

    Scale: Flow-GRPO and DiffusionNFT train on ``PickScore / 26`` ("norm to 0-1"). That division is a constant
    factor only; it is not applied here. To reproduce their reward magnitudes (e.g. with a temperature tuned
    for them), weight the reward by ``1 / 26`` (``reward: {pickscore: 0.03846}``) or divide the temperature by 26.

    Config: ``reward_paths['pickscore']`` = ``{'model': <PickScore_v1 folder>, 'processor': <CLIP-ViT-H-14-laion2B
    folder>}``, or one folder holding both the model and the processor files.

    Shapes:
        ``forward(images [B, 3, H, W] in [0, 1], prompts: B strings) -> [B]`` float32 on ``images.device``.
    """

    name = "pickscore"
    #: not bf16-safe: mean within-prompt Spearman bf16 vs fp32 0.92 < 0.99 on a random-init ViT-H/14-depth CLIP
    #: (benchmarks/reward_precision.py); ``reward_dtype: auto`` runs it in fp32
    bf16_safe = False
    processor_hint = ("the processor folder of PickScore, a snapshot of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                      "(preprocessor_config.json + tokenizer files); give reward_paths['pickscore'] = "
                      "{'model': <PickScore_v1 folder>, 'processor': <that folder>}")

    def score(self, image_features: torch.Tensor, prompts: Optional[List[str]]) -> torch.Tensor:
        return self.logit_scale_exp * self.cosine(image_features, prompts)

    @classmethod
    def from_config(cls, config: Any, device: DeviceLike) -> "PickScoreReward":
        """Builds it from config keys ``reward_paths['pickscore']``, ``reward_dtype``, ``reward_batch_size``."""
        return cls._from_paths(config, device, "{'model': a local snapshot of yuvalkirstain/PickScore_v1, "
                               "'processor': a local snapshot of laion/CLIP-ViT-H-14-laion2B-s32B-b79K} (or one "
                               "folder with the model and the processor files)")
