"""CLIP text-image reward (the ORW-CFM-W2 reference reward), built on open_clip.

open_clip is imported inside :class:`CLIPReward` so that importing
:mod:`orwcfm_fast.rewards` stays cheap.
"""

from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from orwcfm_fast.rewards.base import Reward

__all__ = ["CLIPReward", "CLIPWeightsError", "CLIPCheckpointNotFoundError"]

# Fallback normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD), used only when
# the model carries no preprocess config and open_clip's constants cannot be read.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")

_HOW_TO_FIX = (
    "To fix: point `clip_pretrained` at a local checkpoint file (an open_clip state dict, e.g. "
    "torch.save(model.state_dict(), 'clip.pt'), or a downloaded open_clip_pytorch_model.bin / "
    "open_clip_model.safetensors for the same `clip_model`), or set `clip_pretrained` to None "
    "for random weights (smoke tests only: the reward is then meaningless)."
)


class CLIPWeightsError(RuntimeError):
    """Creating the CLIP model or loading its weights failed (message says how to fix it)."""


class CLIPCheckpointNotFoundError(CLIPWeightsError, FileNotFoundError):
    """``clip_pretrained`` looks like a file path but no such file exists."""


def _looks_like_path(value: str) -> bool:
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return (
        any(s in value for s in seps)
        or value.startswith("~")
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _clean_tag(tag: str) -> str:
    # open_clip normalises tags the same way (open_clip.pretrained._clean_tag).
    return tag.lower().replace("-", "_")


def _has_schema(model_name: str) -> bool:
    # 'hf-hub:org/repo', 'local-dir:/path': open_clip ignores `pretrained` for these.
    return model_name.startswith(("hf-hub:", "local-dir:"))


def _suggest(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _weights_error(model_name: str, pretrained, problem: str, cls=CLIPWeightsError) -> CLIPWeightsError:
    return cls(
        f"Could not create the CLIP reward model: clip_model={model_name!r}, "
        f"clip_pretrained={pretrained!r}: {problem} {_HOW_TO_FIX}"
    )


def _describe_exc(e: BaseException, limit: int = 1500) -> str:
    cls = type(e)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    text = str(e).strip()
    if len(text) > limit:
        text = text[:limit] + f" ... [{len(text) - limit} more characters]"
    return f"{name}: {text}"


def _as_pair(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class CLIPReward(Reward):
    """CLIP agreement between images and text prompts.

    Images in ``[-1, 1]`` are mapped to ``[0, 1]`` (clamped), 1-channel images are repeated to
    3 channels, resized to the model's input size (``model.visual.image_size``; bicubic,
    antialiased, then clamped to ``[0, 1]``; non-square inputs are resized, not cropped), and
    normalised with the model's mean / std (``model.visual.preprocess_cfg``, falling back to
    open_clip's OPENAI_DATASET_MEAN / STD). With L2-normalised features,
    ``logits = logit_scale.exp() * img_feats @ text_feats.T`` (``+ logit_bias`` for models that
    have one, e.g. SigLIP). The reward depends on the number of prompts ``P``:

    - ``P == 1``: the scaled cosine-similarity logit ``logits[:, 0]``;
    - ``P == 2``: ``softmax(logits)[:, 0] - softmax(logits)[:, 1]`` in ``[-1, 1]``
      (the published ORW-CFM-W2 reference reward: prompt 0 is the target, prompt 1 the contrast);
    - ``P > 2``: ``softmax(logits)[:, 0]``, the probability of prompt 0 among all prompts.

    The text features are encoded once at construction (buffer ``text_features``, ``[P, D]``).
    The CLIP model is in eval mode with ``requires_grad`` off and stays in eval mode when the
    reward's ``.train()`` is called. The forward pass does not disable autograd, so the reward
    is differentiable with respect to the images if the caller wants gradients.

    Args:
        text_prompts: ``P >= 1`` prompt strings.
        model_name: open_clip architecture name (config key ``clip_model``), e.g. ``"ViT-B-32"``.
        pretrained: (config key ``clip_pretrained``) ``None`` for random weights (offline tests,
            smoke runs); an open_clip tag such as ``"openai"`` or ``"laion2b_s34b_b79k"`` (needs
            internet or a populated Hugging Face cache; with no network, huggingface_hub retries
            for ~45 s before failing unless ``HF_HUB_OFFLINE=1`` is set); or a path to a local
            weights file (``.pt`` / ``.bin`` / ``.safetensors`` state dict of the same architecture).
        device: device to build the model on (``.to()`` moves it later).
        batch_size: optional chunk size for the image encoder, to bound memory.

    Raises:
        ValueError: bad ``text_prompts`` or ``batch_size``.
        CLIPWeightsError: (a ``RuntimeError``) the model, tokenizer or weights could not be
            created / loaded; the message names ``clip_pretrained``, the value, the model name,
            the underlying error and how to fix it. A missing local file raises
            :class:`CLIPCheckpointNotFoundError` (also a ``FileNotFoundError``) before anything
            is built.

    Shapes:
        samples ``[B, C, H, W]`` in ``[-1, 1]`` with ``C`` in {1, 3} -> ``[B]`` float32 on
        ``samples.device``.
    """

    input_range = (-1.0, 1.0)  # images in [-1, 1], the pixel tasks' convention

    def __init__(
        self,
        text_prompts: Sequence[str],
        model_name: str = "ViT-B-32",
        pretrained: Optional[Union[str, os.PathLike]] = None,
        device: Union[str, torch.device] = "cpu",
        batch_size: Optional[int] = None,
    ):
        super().__init__()
        if isinstance(text_prompts, str) or not isinstance(text_prompts, Sequence):
            raise ValueError(
                f"text_prompts must be a list of >= 1 strings, got {type(text_prompts).__name__} "
                f"{text_prompts!r}" + (" (wrap a single prompt in a list)" if isinstance(text_prompts, str) else "")
            )
        prompts = list(text_prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"text_prompts must be a list of >= 1 strings, got {text_prompts!r}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")
        self.text_prompts = prompts
        self.model_name = str(model_name)
        pretrained = os.fspath(pretrained) if pretrained is not None else None
        if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none"):
            pretrained = None  # "" / "none" from a YAML or command-line config mean random weights
        self.pretrained = pretrained
        self.batch_size = None if batch_size is None else int(batch_size)

        model, tokenizer = self._create(self.model_name, self.pretrained, torch.device(device))
        model.eval()
        model.requires_grad_(False)
        self.model = model

        visual = model.visual
        pp_cfg = getattr(visual, "preprocess_cfg", None) or {}
        size = getattr(visual, "image_size", None) or pp_cfg.get("size", 224)
        self.image_size = _as_pair(size)
        mean, std = pp_cfg.get("mean"), pp_cfg.get("std")
        if mean is None or std is None:
            try:
                from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

                mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
            except ImportError:  # pragma: no cover - very old / new open_clip layouts
                mean, std = _OPENAI_MEAN, _OPENAI_STD
        dev = torch.device(device)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1), persistent=False)

        with torch.no_grad():
            tokens = tokenizer(prompts).to(dev)
            text_features = F.normalize(model.encode_text(tokens).float(), dim=-1)
        self.register_buffer("text_features", text_features, persistent=False)

    @staticmethod
    def _create(model_name: str, pretrained: Optional[str], device: torch.device):
        """Builds (model, tokenizer) or raises :class:`CLIPWeightsError` with a fix-it message."""
        if pretrained is not None and not _has_schema(model_name):
            expanded = os.path.expanduser(pretrained)
            if _looks_like_path(pretrained) and not os.path.isfile(expanded):
                what = "is a directory, not a file" if os.path.isdir(expanded) else "does not exist"
                raise _weights_error(
                    model_name, pretrained,
                    f"checkpoint file {expanded!r} {what}.",
                    cls=CLIPCheckpointNotFoundError,
                )
            if os.path.isfile(expanded):
                pretrained = expanded
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - open_clip is a dependency
            raise CLIPWeightsError(
                f"CLIPReward needs open_clip (pip install open_clip_torch): {e}"
            ) from e

        if not _has_schema(model_name):
            name = model_name.replace("/", "-")
            known_models = open_clip.list_models()
            if name not in known_models:
                raise _weights_error(
                    model_name, pretrained,
                    f"unknown open_clip architecture {model_name!r} (config key `clip_model`)."
                    f"{_suggest(name, known_models)} See open_clip.list_models() for the {len(known_models)} known names.",
                )
            if pretrained is not None and not os.path.isfile(pretrained):
                tags = open_clip.list_pretrained_tags_by_model(name)
                if _clean_tag(pretrained) not in tags:
                    raise _weights_error(
                        model_name, pretrained,
                        f"{pretrained!r} is neither an existing file nor a known open_clip pretrained tag "
                        f"for {name}.{_suggest(_clean_tag(pretrained), tags)} "
                        f"Known tags for {name}: {tags or 'none'}.",
                    )
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        except Exception as e:
            problem = f"open_clip.create_model_and_transforms failed: {_describe_exc(e)}."
            if pretrained is not None and not os.path.isfile(pretrained):
                problem += (
                    " Pretrained tags are downloaded from the Hugging Face Hub, which needs internet access "
                    "or a copy in the local Hugging Face cache (offline, set HF_HUB_OFFLINE=1 to fail at once "
                    "instead of retrying for ~45 s)."
                )
            raise _weights_error(model_name, pretrained, problem) from e
        try:
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as e:
            raise _weights_error(
                model_name, pretrained, f"open_clip.get_tokenizer failed: {_describe_exc(e)}."
            ) from e
        return model, tokenizer

    def train(self, mode: bool = True) -> "CLIPReward":
        """Sets the reward's mode; the CLIP model always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def _check(self, samples: torch.Tensor) -> None:
        if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] not in (1, 3):
            got = f"shape {list(samples.shape)}" if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"CLIP needs images [B, C, H, W] with C in {{1, 3}} and values in [-1, 1], got {got}")

    def preprocess(self, samples: torch.Tensor) -> torch.Tensor:
        """Maps images to the CLIP encoder's input.

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3} (on the model's device).

        Returns:
            ``[B, 3, H', W']`` normalised images at the model's input size.
        """
        self._check(samples)
        x = ((samples.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 pipeline clamps too
        return (x - self.mean) / self.std

    def image_features(self, samples: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings.

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3}.

        Returns:
            ``[B, D]`` float32 on the model's device.
        """
        self._check(samples)
        dev = self.text_features.device
        dtype = next(self.model.visual.parameters()).dtype
        chunks = [samples] if self.batch_size is None else samples.split(self.batch_size)
        feats = [self.model.encode_image(self.preprocess(c.to(dev)).to(dtype)).float() for c in chunks]
        return F.normalize(torch.cat(feats), dim=-1)

    def logits(self, samples: torch.Tensor) -> torch.Tensor:
        """Image-prompt logits ``logit_scale.exp() * img @ text.T`` (``+ logit_bias`` if any).

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3}.

        Returns:
            ``[B, P]`` float32 on the model's device.
        """
        logits = self.model.logit_scale.exp().float() * self.image_features(samples) @ self.text_features.T
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            logits = logits + bias.float()
        return logits

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        """Scores a batch of images (see the class docstring for the formula).

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3}.

        Returns:
            ``[B]`` float32 on ``samples.device``.

        Raises:
            ValueError: if ``samples`` is not a 4-D image batch with 1 or 3 channels.
        """
        self._check(samples)
        logits = self.logits(samples)
        n = logits.shape[1]
        if n == 1:
            reward = logits[:, 0]
        else:
            probs = logits.softmax(dim=-1)
            reward = probs[:, 0] - probs[:, 1] if n == 2 else probs[:, 0]
        return reward.to(samples.device)

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"prompts={self.text_prompts!r}, image_size={self.image_size}, batch_size={self.batch_size}"
        )
