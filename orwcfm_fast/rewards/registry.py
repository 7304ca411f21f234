"""Name -> reward factory registry, so configs can say ``reward: "clip"``.

A factory is ``factory(config, device) -> Reward``; it is only invoked by :func:`make_reward`,
never at import time.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from orwcfm_fast.rewards.base import CallableReward, Reward, WeightedSum

__all__ = ["register_reward", "available_rewards", "make_reward", "unknown_reward_hint"]

RewardFactory = Callable[[Any, Optional[Union[str, torch.device]]], Reward]

_MISSING = object()
_REGISTRY: Dict[str, RewardFactory] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _get(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Reads ``key`` from a dict-like or attribute-style config."""
    if config is None:
        value = _MISSING
    elif isinstance(config, Mapping):
        value = config.get(key, _MISSING)
    else:
        value = getattr(config, key, _MISSING)
    return default if value is _MISSING else value


def _is_url(spec: str) -> bool:
    return spec.strip().lower().startswith(("http://", "https://"))


def register_reward(name: str, factory: RewardFactory, overwrite: bool = False) -> None:
    """Registers a reward factory under ``name``.

    Names are matched case-insensitively, with ``-`` and ``_`` equivalent.

    Args:
        name: registry key (what a config's ``reward`` field names).
        factory: ``factory(config, device) -> Reward``, called by :func:`make_reward`.
        overwrite: replace an existing entry instead of raising.

    Raises:
        ValueError: if ``name`` is already registered and ``overwrite`` is False.
        TypeError: if ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"reward factory for {name!r} must be callable (config, device) -> Reward")
    key = _normalise(name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def unknown_reward_hint(name: str) -> Optional[str]:
    """None when ``name`` is registered; else ``"; did you mean 'x'? Known rewards: a, b, c"`` for an error message."""
    key = _normalise(name)
    known = available_rewards()
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return f"{hint} Known rewards: {', '.join(known)}"


def available_rewards() -> List[str]:
    """Registered reward names, sorted.

    Returns:
        list of names usable as ``make_reward``'s ``spec``.
    """
    return sorted(_REGISTRY)


def make_reward(spec: Any, config: Any = None, device: Optional[Union[str, torch.device]] = None) -> Reward:
    """Builds a reward from a config's ``reward`` field.

    Args:
        spec: a :class:`Reward` (returned as is, moved to ``device`` if given); another
            :class:`torch.nn.Module` or callable ``samples -> [B]`` (wrapped in
            :class:`CallableReward`); a registered name (see :func:`available_rewards`); the URL
            of a reward server, ``"http://127.0.0.1:PORT"`` (:class:`~orwcfm_fast.rewards.http.HTTPReward`);
            or a dict ``{name or URL: weight}``, a :class:`WeightedSum` whose terms are named by its keys.
        config: dict (or attribute-style object) with the factory's settings, e.g. for
            ``"clip"``: ``text_prompts``, ``clip_model``, ``clip_pretrained``.
        device: device for the reward's modules (``None`` keeps where they are; factories
            receive it as given).

    Returns:
        a :class:`Reward` mapping ``[B, *sample_shape]`` to ``[B]``.

    Raises:
        ValueError: unknown name (the message names the ``reward`` key, suggests close
            matches and lists the known names) or a bad factory setting.
        TypeError: ``spec`` is neither a string nor callable.
    """
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("config key `reward`: a reward dict needs at least one {name: weight} entry")
        terms, names = [], []
        for name, weight in spec.items():
            if not isinstance(name, str):
                raise TypeError(f"config key `reward`: reward dict keys are names or URLs, got {name!r}")
            terms.append((float(weight), make_reward(name, config, device)))
            names.append(name.strip() if _is_url(name) else _normalise(name))
        # A served term is named after the reward it serves, unless another term has that name (then its URL).
        for k, (name, (_, reward)) in enumerate(zip(list(names), terms)):
            served = _normalise(str(getattr(reward, "name", ""))) if _is_url(name) else ""
            if served and served not in names:
                names[k] = served
        return WeightedSum(terms, names=names)
    if isinstance(spec, str) and _is_url(spec):
        from orwcfm_fast.rewards.http import HTTPReward

        return HTTPReward.from_config(spec.strip(), config)
    if isinstance(spec, str):
        key = _normalise(spec)
        if key not in _REGISTRY:
            known = available_rewards()
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"unknown reward {spec!r} (config key `reward`).{hint} "
                f"Known rewards: {', '.join(known)}; or pass a Reward / callable samples -> [B] "
                "instead of a name."
            )
        reward = _REGISTRY[key](config if config is not None else {}, device)
        if not isinstance(reward, Reward):
            reward = CallableReward(reward, name=key)
        return reward if device is None else reward.to(device)
    if isinstance(spec, Reward):
        return spec if device is None else spec.to(device)
    if callable(spec):
        reward = CallableReward(spec)
        return reward if device is None else reward.to(device)
    raise TypeError(
        f"config key `reward` must be a registered name, a Reward or a callable samples -> [B], "
        f"got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Built-in factories (invoked lazily by make_reward).


def _clip_factory(config: Any, device: Optional[Union[str, torch.device]]) -> Reward:
    prompts = _get(config, "text_prompts", None)
    if (
        prompts is None
        or isinstance(prompts, str)
        or not isinstance(prompts, (list, tuple))
        or len(prompts) < 1
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise ValueError(
            "reward 'clip' needs config key `text_prompts`: a list of >= 1 strings "
            "(2 prompts = [target, contrast] gives the ORW-CFM-W2 reference reward "
            f"p(target) - p(contrast)), got {prompts!r}"
        )
    from orwcfm_fast.rewards.clip import CLIPReward

    return CLIPReward(
        list(prompts),
        model_name=_get(config, "clip_model", None) or "ViT-B-32",
        pretrained=_get(config, "clip_pretrained", None),
        device=device if device is not None else "cpu",
        batch_size=_get(config, "clip_batch_size", None),
    )


def _jpeg_factory(incompressibility: bool) -> RewardFactory:
    def factory(config: Any, device: Optional[Union[str, torch.device]]) -> Reward:
        from orwcfm_fast.rewards.jpeg import JPEGCompressibility

        quality = _get(config, "jpeg_quality", None)
        return JPEGCompressibility(quality=95 if quality is None else quality, incompressibility=incompressibility)

    return factory


register_reward("clip", _clip_factory)
register_reward("jpeg_compressibility", _jpeg_factory(False))
register_reward("jpeg_incompressibility", _jpeg_factory(True))

from orwcfm_fast.rewards.preference import register_preference_rewards  # noqa: E402 (no transformers import)
register_preference_rewards(register_reward)
