"""The standard text-to-image preference rewards: shared base, config reading, registration.

Registered names (:func:`register_preference_rewards`, called from :mod:`orwcfm_fast.rewards.registry`):

- ``clip_score``  :class:`~orwcfm_fast.rewards.clip_score.CLIPScoreReward`, CLIP cosine (transformers CLIP)
- ``pickscore``   :class:`~orwcfm_fast.rewards.pickscore.PickScoreReward`, PickScore v1 (transformers CLIP-H)
- ``hpsv2``       :class:`~orwcfm_fast.rewards.hpsv2.HPSv2Reward`, HPS v2.1 (open_clip ViT-H-14)
- ``aesthetic``   :class:`~orwcfm_fast.rewards.aesthetic.AestheticReward`, LAION aesthetic predictor v2
- ``imagereward`` not available: its factory raises a ValueError saying why (:data:`IMAGEREWARD_UNAVAILABLE`)

Each loads its weights from the local paths of config key ``reward_paths`` (nothing is downloaded) and uses
``reward_batch_size`` (images per forward) and ``reward_dtype`` (``auto``: bf16 on CUDA for a reward whose class
declares :attr:`PreferenceReward.bf16_safe`, else fp32). Importing this module imports neither transformers nor
open_clip; the rewards import them when built.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from orwcfm_fast.rewards.base import Reward

__all__ = [
    "IMAGEREWARD_UNAVAILABLE",
    "PreferenceReward",
    "config_settings",
    "existing_path",
    "features_of",
    "load_error",
    "register_preference_rewards",
    "resolve_dtype",
    "reward_paths_entry",
]

DeviceLike = Optional[Union[str, torch.device]]

#: Why ``imagereward`` is not implemented (the message of its factory's ValueError).
IMAGEREWARD_UNAVAILABLE = (
    "reward 'imagereward' is not available: ImageReward's only implementation, the `image-reward` package "
    "(1.5, 2023, unmaintained), cannot be built offline with this project's transformers 5: "
    "(1) its BLIP text encoder (ImageReward/models/BLIP/med.py) imports apply_chunking_to_forward, "
    "find_pruneable_heads_and_indices and prune_linear_layer from transformers.modeling_utils (ImportError on "
    "transformers 5; find_pruneable_heads_and_indices no longer exists anywhere) and calls "
    "PreTrainedModel.get_head_mask / invert_attention_mask, which transformers 5 removed; "
    "(2) it pins timm==0.6.13 and fairscale==0.4.13 (fairscale is archived; its ViT imports "
    "fairscale's checkpoint_wrapper); "
    "(3) building the model calls BertTokenizer.from_pretrained('bert-base-uncased') with the name hard-coded "
    "(a download; no argument takes a local folder); "
    "(4) `import ImageReward` also imports the GitHub-only `clip` package and, through ReFL.py, `datasets`, "
    "`diffusers` and `accelerate`. "
    "Use 'hpsv2' or 'pickscore' (human-preference rewards that load offline), or serve ImageReward from a "
    "separate environment with an older transformers 4.x and point config key `reward` at it "
    "(reward: 'http://127.0.0.1:PORT', see orwcfm_fast.reward_server)."
)


#: rewards already warned about an explicit ``reward_dtype: bf16`` (one warning per reward name and process)
_WARNED_BF16: set = set()


def resolve_dtype(value: Any, device: DeviceLike, bf16_safe: bool = False, name: Optional[str] = None) -> torch.dtype:
    """The weights' dtype for config key ``reward_dtype``.

    Args:
        value: ``"auto"`` / None (bf16 on CUDA if ``bf16_safe``, else fp32; fp32 off CUDA, where bf16 is not
            native), ``"fp32"``, ``"bf16"`` or a torch dtype.
        device: where the reward runs.
        bf16_safe: whether bf16 keeps the reward's within-prompt rankings (the class's
            :attr:`PreferenceReward.bf16_safe`, measured by ``benchmarks/reward_precision.py``).
        name: the reward's name; given, an explicit bf16 for a reward that is not ``bf16_safe`` warns (once per name).

    Raises:
        ValueError: any other value (the message names ``reward_dtype``).
    """
    if isinstance(value, torch.dtype) and value in (torch.float32, torch.bfloat16):
        dtype = value
    elif value is None or value == "auto":
        cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and bf16_safe else torch.float32
    elif value == "fp32":
        dtype = torch.float32
    elif value == "bf16":
        dtype = torch.bfloat16
    else:
        raise ValueError(f"config key `reward_dtype` must be 'auto', 'fp32' or 'bf16', got {value!r}")
    if dtype == torch.bfloat16 and not bf16_safe and name is not None and name not in _WARNED_BF16:
        _WARNED_BF16.add(name)
        warnings.warn(f"reward {name!r} runs in bf16 (config key `reward_dtype` = {value!r}), but bf16 rounding "
                      "reorders its scores within a prompt's group of images (benchmarks/reward_precision.py; "
                      "'group' weight normalisation amplifies it); `reward_dtype: auto` runs it in fp32",
                      UserWarning, stacklevel=3)
    return dtype


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    from orwcfm_fast.rewards.registry import _get  # at call time: the registry imports this module

    return _get(config, key, default)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def reward_paths_entry(config: Any, name: str, parts: Sequence[str], default_part: str,
                       required: Sequence[str], what: str) -> Dict[str, str]:
    """The local paths of reward ``name`` from config key ``reward_paths``, as ``{part: path}``.

    A plain path entry means ``{default_part: path}``. Keys of ``reward_paths`` match ``name`` case-insensitively
    with ``-`` and ``_`` equivalent, as reward names do.

    Args:
        config: dict-like or attribute-style config.
        name: the reward's registered name.
        parts: the parts a dict entry may have.
        default_part: the part a plain path stands for (None: the entry must be a dict).
        required: parts that must be present.
        what: what the entry should be (quoted in the error messages).

    Raises:
        ValueError: no entry for ``name``, a part missing or unknown, or a value that is not a path (each
            message names the config key, e.g. ``reward_paths['pickscore']``).
    """
    paths = _config_get(config, "reward_paths", None) or {}
    key = f"reward_paths[{name!r}]"
    if not isinstance(paths, Mapping):
        raise ValueError(f"reward {name!r} needs config key `reward_paths` to be a dict {{reward name: local path}}; "
                         f"got {type(paths).__name__}. {key} should be {what}")
    matches = [k for k in paths if isinstance(k, str) and _normalise(k) == name]
    if not matches:
        close = difflib.get_close_matches(name, [str(k) for k in paths], n=1, cutoff=0.6)
        hint = f" (reward_paths has {close[0]!r}: a typo?)" if close else ""
        raise ValueError(f"reward {name!r} needs config key `{key}`: {what}{hint}")
    entry = paths[matches[0]]
    if isinstance(entry, (str, os.PathLike)):
        if default_part is None:
            raise ValueError(f"config key `{key}` must be a dict {{part: path}}: {what}; got the plain path {entry!r}")
        entry = {default_part: entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"config key `{key}` must be a local path or a dict {{part: path}}: {what}; got {entry!r}")
    out = {}
    for part, path in entry.items():
        if part not in parts:
            close = difflib.get_close_matches(str(part), list(parts), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"config key `{key}` has an unknown part {part!r}.{hint} Known parts: "
                             f"{', '.join(parts)} ({what})")
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"config key `{key}[{part!r}]` must be a local path, got {path!r}")
        out[part] = os.fspath(path)
    for part in required:
        if part not in out:
            raise ValueError(f"reward {name!r} needs config key `{key}[{part!r}]`: {what}")
    return out


def existing_path(path: str, key: str, kind: str, what: str) -> str:
    """``path`` with ``~`` expanded, checked to be an existing folder (``kind="dir"``) or file (``"file"``).

    Raises:
        FileNotFoundError: it does not exist or is the wrong kind (the message names ``key`` and the path).
    """
    expanded = os.path.expanduser(path)
    ok = os.path.isdir(expanded) if kind == "dir" else os.path.isfile(expanded)
    if not ok:
        if os.path.exists(expanded):
            problem = "is a file, not a folder" if kind == "dir" else "is a folder, not a file"
        else:
            problem = "does not exist"
        raise FileNotFoundError(f"config key `{key}`: {expanded!r} {problem}; expected {what}")
    return expanded


def load_error(name: str, key: str, path: str, e: BaseException) -> RuntimeError:
    """A RuntimeError saying that reward ``name`` could not load ``path`` (config key ``key``) and why."""
    text = str(e).strip()
    if len(text) > 1500:
        text = text[:1500] + " ..."
    return RuntimeError(f"reward {name!r}: could not load config key `{key}` = {path!r}: {type(e).__name__}: {text}")


def features_of(output: Any) -> torch.Tensor:
    """The embedding tensor of a transformers ``get_*_features`` output (a tensor, or a ModelOutput whose
    ``pooler_output`` holds the projected embeddings since transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"expected an embedding tensor or a ModelOutput with pooler_output, got {type(output).__name__}")


class PreferenceReward(Reward):
    """Base of the preference rewards: input checks, batching, text-embedding cache, eval-mode models.

    Subclasses set ``image_preprocess`` (an :class:`~orwcfm_fast.rewards.preprocess.ImagePreprocess`) and implement
    :meth:`encode_images` (``[b, 3, h, w]`` preprocessed -> ``[b, D]`` float32 embeddings)
    and :meth:`score` (``[B, D]`` image embeddings, prompts -> ``[B]``); text rewards also
    :meth:`encode_text` (prompts -> ``[n, D]`` float32, unnormalised) and use :meth:`text_features`.

    Args:
        batch_size: images (and prompts) per forward (config key ``reward_batch_size``); None: all at once.
        text_cache_size: how many prompts' L2-normalised text embeddings are kept (least recently used go first);
            0 disables the cache.

    Shapes:
        ``forward(images [B, 3, H, W] in [0, 1], prompts: B strings) -> [B]`` float32 on ``images.device``.
    """

    takes_prompts = True
    input_range = (0.0, 1.0)
    #: the registered name (error messages, logs)
    name = "preference"
    #: whether bf16 weights keep the reward's within-prompt rankings (mean within-prompt Spearman of bf16 vs fp32
    #: scores >= 0.99 in ``benchmarks/reward_precision.py``); ``reward_dtype: auto`` runs it in bf16 on CUDA only
    #: then. False until measured: fp32 is never wrong, only slower.
    bf16_safe = False

    def __init__(self, batch_size: Optional[int] = None, text_cache_size: int = 4096):
        super().__init__()
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"config key `reward_batch_size` must be None or a positive integer, got {batch_size!r}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.text_cache_size = int(text_cache_size)
        self._text_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    # -- to implement -----------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` in [0, 1] on the model's device -> the image encoder's input (by default the
        subclass's :class:`~orwcfm_fast.rewards.preprocess.ImagePreprocess` module ``image_preprocess``)."""
        return self.image_preprocess(images)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Preprocessed ``[b, 3, h, w]`` -> ``[b, D]`` float32 embeddings."""
        raise NotImplementedError

    def encode_text(self, prompts: List[str]) -> torch.Tensor:  # pragma: no cover - abstract
        """``n`` prompts -> ``[n, D]`` float32 embeddings (not normalised)."""
        raise NotImplementedError

    def score(self, image_features: torch.Tensor, prompts: Optional[List[str]]) -> torch.Tensor:  # pragma: no cover
        """``[B, D]`` float32 image embeddings and the prompts -> ``[B]`` float32 rewards."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the reward's weights are."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> "PreferenceReward":
        """Sets the reward's flag; its networks always stay in eval mode (no dropout)."""
        super().train(mode)
        for m in self.children():
            m.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()  # cached embeddings live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    def _chunks(self, n: int) -> List[Tuple[int, int]]:
        step = n if self.batch_size is None else self.batch_size
        return [(i, min(i + step, n)) for i in range(0, n, max(step, 1))]

    def check_inputs(self, images: Any, prompts: Optional[Sequence[str]], need_prompts: bool) -> Optional[List[str]]:
        """Validates ``images`` (``[B, 3, H, W]`` floating) and, if needed, ``prompts`` (``B`` strings).

        Raises:
            ValueError: wrong shape / dtype or prompt count (the message names the reward).
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = f"shape {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r} needs images [B, 3, H, W] with values in [0, 1], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"reward {self.name!r} needs floating images in [0, 1], got dtype {images.dtype}")
        if not need_prompts:
            return None if prompts is None else list(prompts)
        if prompts is None or isinstance(prompts, str):
            raise ValueError(f"reward {self.name!r} needs the {images.shape[0]} prompts of the images "
                             f"(reward(images, prompts)), got {prompts!r}")
        prompts = list(prompts)
        if len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"reward {self.name!r} needs one prompt string per image: {images.shape[0]} images, "
                             f"got {len(prompts)} prompts")
        return prompts

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, in chunks of ``batch_size``.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1] (clamped), any device.

        Returns:
            ``[B, D]`` float32 on the model's device.
        """
        dev = self.device
        feats = [self.encode_images(self.preprocess(images[a:b].to(dev, non_blocking=True)))
                 for a, b in self._chunks(images.shape[0])]
        return F.normalize(torch.cat(feats).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, cached per prompt string.

        Args:
            prompts: ``B`` strings.

        Returns:
            ``[B, D]`` float32 on the model's device.
        """
        todo = list(OrderedDict.fromkeys(p for p in prompts if p not in self._text_cache))
        fresh = {}
        for a, b in self._chunks(len(todo)):
            feats = F.normalize(self.encode_text(todo[a:b]).float(), dim=-1)
            fresh.update(zip(todo[a:b], feats))
        rows = []
        for p in prompts:
            feat = fresh.get(p)
            if feat is None:
                feat = self._text_cache[p]
                self._text_cache.move_to_end(p)
            rows.append(feat)
        if self.text_cache_size > 0:
            for p, feat in fresh.items():
                self._text_cache[p] = feat
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack(rows)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Scores a batch.

        Args:
            images: ``[B, 3, H, W]`` floating, values in [0, 1] (clamped), any device.
            prompts: the ``B`` prompts the images were made for (ignored by prompt-free rewards).

        Returns:
            ``[B]`` float32 on ``images.device``.

        Raises:
            ValueError: bad images or prompts (see :meth:`check_inputs`).
        """
        prompts = self.check_inputs(images, prompts, need_prompts=self.takes_prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return self.score(self.image_features(images), prompts).float().to(images.device)

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}, text_cache_size={self.text_cache_size}"


# ---------------------------------------------------------------------------------------------------------------
# Factories (lazy: each imports its reward module, which imports transformers / open_clip when the reward is built)


def _factory(module: str, cls: str) -> Callable[[Any, DeviceLike], Reward]:
    def factory(config: Any, device: DeviceLike) -> Reward:
        import importlib

        return getattr(importlib.import_module(module), cls).from_config(config, device)

    factory.__name__ = f"{cls}_factory"
    return factory


def _imagereward_factory(config: Any, device: DeviceLike) -> Reward:
    raise ValueError(IMAGEREWARD_UNAVAILABLE)


def register_preference_rewards(register: Callable[..., None]) -> None:
    """Registers ``clip_score``, ``pickscore``, ``hpsv2``, ``aesthetic`` and ``imagereward`` with ``register``
    (:func:`orwcfm_fast.rewards.registry.register_reward`); builds nothing."""
    register("clip_score", _factory("orwcfm_fast.rewards.clip_score", "CLIPScoreReward"))
    register("pickscore", _factory("orwcfm_fast.rewards.pickscore", "PickScoreReward"))
    register("hpsv2", _factory("orwcfm_fast.rewards.hpsv2", "HPSv2Reward"))
    register("aesthetic", _factory("orwcfm_fast.rewards.aesthetic", "AestheticReward"))
    register("imagereward", _imagereward_factory)


def config_settings(config: Any, device: DeviceLike, reward_cls: Optional[type] = None) -> Dict[str, Any]:
    """``device``, ``dtype`` and ``batch_size`` of a preference reward from config keys ``reward_dtype`` and
    ``reward_batch_size`` (device None: CPU). ``reward_cls``: the reward's class, whose ``bf16_safe`` decides
    ``auto`` and whose ``name`` the bf16 warning names (None: not bf16-safe)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "device": dev,
        "dtype": resolve_dtype(_config_get(config, "reward_dtype", "auto"), dev,
                               bf16_safe=bool(getattr(reward_cls, "bf16_safe", False)),
                               name=getattr(reward_cls, "name", None)),
        "batch_size": _config_get(config, "reward_batch_size", None),
    }
