"""CLIP score (``clip_score``): cosine of transformers CLIP image and text embeddings.

:class:`TransformersCLIPReward` is the shared base of the rewards built on a transformers ``CLIPModel`` with its
tokenizer and image processor (:class:`CLIPScoreReward` here, :class:`~orwcfm_fast.rewards.pickscore.PickScoreReward`).
transformers is imported when a reward is built.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Union

import torch

from orwcfm_fast.rewards.preference import (
    DeviceLike,
    PreferenceReward,
    config_settings,
    existing_path,
    features_of,
    load_error,
    reward_paths_entry,
)
from orwcfm_fast.rewards.preprocess import ImagePreprocess

__all__ = ["TransformersCLIPReward", "CLIPScoreReward"]


class TransformersCLIPReward(PreferenceReward):
    """A transformers ``CLIPModel`` with its tokenizer and image processor, on the device.

    Images are preprocessed on the device as the folder's ``CLIPImageProcessor`` would
    (:meth:`ImagePreprocess.from_hf_image_processor`: shortest side to ``size`` bicubic antialiased,
    centre crop with floored offsets, ``(x - image_mean) / image_std``); prompts are tokenized with the folder's
    tokenizer (``padding=True, truncation=True, max_length`` = the text model's ``max_position_embeddings``,
    77 for CLIP). Embeddings are ``get_image_features`` / ``get_text_features`` (the projections), computed in
    the weights' dtype and L2-normalised in float32; text embeddings are cached per prompt.

    Args:
        model_dir: folder of a ``CLIPModel`` (``config.json`` + weights; ``save_pretrained`` layout).
        processor_dir: folder with ``preprocessor_config.json`` and the tokenizer files; None: ``model_dir``.
        device: where the model runs.
        dtype: the weights' dtype (float32 or bfloat16); logits / cosines are float32 either way.
        batch_size: images (prompts) per forward; None: all.
        key: the config key named in error messages (default ``reward_paths['<name>']``).
    """

    #: what the processor folder should be (error messages)
    processor_hint = "a folder with preprocessor_config.json and the tokenizer files of the CLIP model"

    def __init__(self, model_dir: Union[str, os.PathLike], processor_dir: Optional[Union[str, os.PathLike]] = None,
                 device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32, batch_size: Optional[int] = None,
                 key: Optional[str] = None):
        super().__init__(batch_size)
        key = key or f"reward_paths[{self.name!r}]"
        model_key = f"{key}['model']" if processor_dir is not None else key
        model_dir = existing_path(os.fspath(model_dir), model_key, "dir",
                                  "a folder with a transformers CLIPModel (config.json + weights)")
        if processor_dir is None:
            processor_dir, processor_key = model_dir, key
        else:
            processor_key = f"{key}['processor']"
            processor_dir = existing_path(os.fspath(processor_dir), processor_key, "dir", self.processor_hint)
        if not os.path.isfile(os.path.join(processor_dir, "preprocessor_config.json")):
            raise FileNotFoundError(f"config key `{processor_key}`: {processor_dir!r} has no preprocessor_config.json; "
                                    f"expected {self.processor_hint}")
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:  # float32 first: the logit scale is read at full precision before a bf16 cast
            model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise load_error(self.name, model_key, model_dir, e) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor_dir, local_files_only=True)
            image_processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
            self.image_preprocess = ImagePreprocess.from_hf_image_processor(image_processor)
        except Exception as e:
            raise load_error(self.name, processor_key, processor_dir, e) from e
        #: ``logit_scale.exp()`` in float32, as the model computes it (a Python float: no dtype cast reaches it)
        self.logit_scale_exp = float(model.logit_scale.detach().float().exp())
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_preprocess.to(device)
        self.model_dir, self.processor_dir = model_dir, processor_dir

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[b, 3, h, w]`` -> ``[b, D]`` float32 ``get_image_features``."""
        return features_of(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))).float()

    def encode_text(self, prompts: List[str]) -> torch.Tensor:
        """``n`` prompts -> ``[n, D]`` float32 ``get_text_features``."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return features_of(out).float()

    def cosine(self, image_features: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """``[B]`` float32 cosine of each image's (normalised) embedding with its prompt's."""
        return (image_features * self.text_features(prompts)).sum(-1)

    @classmethod
    def _from_paths(cls, config: Any, device: DeviceLike, what: str) -> "TransformersCLIPReward":
        paths = reward_paths_entry(config, cls.name, parts=("model", "processor"), default_part="model",
                                   required=("model",), what=what)
        return cls(paths["model"], paths.get("processor"), **config_settings(config, device, cls))

    def extra_repr(self) -> str:
        return f"model_dir={self.model_dir!r}, dtype={self.model.dtype}, {super().extra_repr()}"


class CLIPScoreReward(TransformersCLIPReward):
    """CLIP score: ``cos(image embedding, prompt embedding)`` of a transformers CLIP, in [-1, 1].

    The raw cosine. CLIPScore as Hessel et al. (2021) define it is ``2.5 * max(cos, 0)``; torchmetrics'
    ``CLIPScore`` reports ``100 * max(cos, 0)``; Flow-GRPO's ``clipscore`` reward is
    ``logits_per_image / 30 = logit_scale.exp() * cos / 30`` (``100 / 30 * cos`` for OpenAI CLIP). All are
    monotone in the cosine; scale it with the reward weight (``reward: {clip_score: 2.5}``) or the temperature.
    Typically ``openai/clip-vit-large-patch14`` (the CLIP of those references), but any transformers CLIP works.

    Config: ``reward_paths['clip_score']`` = a folder with the ``CLIPModel`` and its tokenizer /
    ``preprocessor_config.json`` (a Hugging Face snapshot of the model), or ``{'model': DIR, 'processor': DIR}``.

    Shapes:
        ``forward(images [B, 3, H, W] in [0, 1], prompts: B strings) -> [B]`` float32 on ``images.device``.
    """

    name = "clip_score"
    #: not bf16-safe: bf16 reorders samples within a prompt (mean within-prompt Spearman bf16 vs fp32 0.84 < 0.99 on
    #: a random-init ViT-L/14-depth CLIP, benchmarks/reward_precision.py); ``reward_dtype: auto`` runs it in fp32
    bf16_safe = False

    def score(self, image_features: torch.Tensor, prompts: Optional[List[str]]) -> torch.Tensor:
        return self.cosine(image_features, prompts)

    @classmethod
    def from_config(cls, config: Any, device: DeviceLike) -> "CLIPScoreReward":
        """Builds it from config keys ``reward_paths['clip_score']``, ``reward_dtype``, ``reward_batch_size``."""
        return cls._from_paths(config, device, "a local folder with a transformers CLIPModel and its tokenizer / "
                               "preprocessor_config.json (e.g. a snapshot of openai/clip-vit-large-patch14), or "
                               "{'model': DIR, 'processor': DIR}")
