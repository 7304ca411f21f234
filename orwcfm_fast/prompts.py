"""Prompt lists for text-to-image fine-tuning: loading them and drawing a batch's prompts.

Config ``prompts`` / ``eval_prompts`` is a list of strings, or a path to a ``.txt`` file (one
prompt a line; blank lines and lines starting with ``#`` are skipped) or a ``.jsonl`` file (one
JSON object a line with a ``"prompt"`` string). A batch of ``batch_size`` samples holds
``batch_size / images_per_prompt`` prompts drawn uniformly with replacement, each repeated
``images_per_prompt`` times in a row (a group), per rank: the group size never depends on the
number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

import torch

__all__ = ["PromptError", "check_prompt_groups", "config_prompts", "draw_prompts", "load_prompts"]


class PromptError(ValueError):
    """A prompt list or file is missing, empty or malformed; the message names the config key."""


def load_prompts(value, key: str = "prompts") -> list[str]:
    """The prompts of config key ``key``: a list of non-empty strings, or a .txt / .jsonl path.

    Raises:
        PromptError: a missing or unreadable file, an unknown suffix, a malformed JSONL line,
            an empty list, or a prompt that is not a non-empty string.
    """
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise PromptError(f"config key {key!r}: prompt file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise PromptError(f"config key {key!r}: cannot read {str(path)!r}: {err}") from None
        if suffix == ".txt":
            prompts = [line.strip() for line in text.splitlines()]
            prompts = [p for p in prompts if p and not p.startswith("#")]
        elif suffix == ".jsonl":
            prompts = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptError(f"config key {key!r}: {str(path)!r} line {number} is not JSON: {err}") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise PromptError(f"config key {key!r}: {str(path)!r} line {number} has no \"prompt\" string")
                prompts.append(record["prompt"])
        else:
            raise PromptError(f"config key {key!r}: {str(path)!r} must be a .txt (one prompt a line) or .jsonl "
                              "(a \"prompt\" field a line) file")
        source = repr(str(path))
    elif isinstance(value, Sequence):
        prompts, source = list(value), "the list"
    else:
        raise PromptError(f"config key {key!r}: expected a list of prompts or a .txt/.jsonl path, got {value!r}")
    if not prompts:
        raise PromptError(f"config key {key!r}: {source} holds no prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"config key {key!r}: prompt {i} of {source} is {p!r}; prompts are non-empty strings")
    return prompts


def draw_prompts(prompts: Sequence[str], batch_size: int, images_per_prompt: int,
                 generator: torch.Generator) -> list[str]:
    """``batch_size`` prompts: ``batch_size // images_per_prompt`` draws, each repeated ``images_per_prompt`` times.

    Uses one ``torch.randint`` on ``generator`` (saved and restored with the trainer's other
    random states, so resumed runs draw the same prompts).
    """
    groups = batch_size // images_per_prompt
    idx = torch.randint(len(prompts), (groups,), generator=generator).tolist()
    return [prompts[i] for i in idx for _ in range(images_per_prompt)]


def check_prompt_groups(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`~orwcfm_fast.config.ConfigError` unless a prompted run's batches hold whole prompt groups
    (``batch_size`` a multiple of ``images_per_prompt``) and samples pair with their own noise (``coupling``
    independent)."""
    from orwcfm_fast.config import ConfigError

    if cfg["batch_size"] % cfg["images_per_prompt"]:
        raise ConfigError(
            f"config key 'batch_size' ({cfg['batch_size']}) must be a multiple of 'images_per_prompt' "
            f"({cfg['images_per_prompt']}): each rank's batch holds whole prompt groups"
        )
    if cfg["coupling"] != "independent":
        raise ConfigError(
            f"config key 'coupling' is {cfg['coupling']!r}, but samples made for prompts pair with their "
            "own noise only: use 'independent' (OT across prompts would mix conditions)"
        )


def config_prompts(cfg, pipeline: bool) -> tuple[list[str] | None, list[str] | None]:
    """A trainer config's ``prompts`` and ``eval_prompts``, loaded and checked against the model and batch size.

    Args:
        cfg: the validated config.
        pipeline: whether the model is a text-to-image pipeline (which needs prompts).

    Raises:
        ConfigError: missing prompts for a conditional model, prompts for one that takes none, a batch size that is
            not a multiple of ``images_per_prompt``, or a coupling across prompts.
    """
    from orwcfm_fast.config import ConfigError

    try:
        prompts = load_prompts(cfg["prompts"], "prompts") if cfg["prompts"] is not None else None
        eval_prompts = load_prompts(cfg["eval_prompts"], "eval_prompts") if cfg["eval_prompts"] is not None else None
    except PromptError as err:
        raise ConfigError(str(err)) from None
    conditional = pipeline or cfg["prompt_encoder"] is not None
    if conditional:
        if prompts is None:
            what = "a text-to-image pipeline" if pipeline else "a model with a 'prompt_encoder'"
            raise ConfigError(f"config key 'prompts' is required for {what}: a list, or a .txt/.jsonl file")
        check_prompt_groups(cfg)
    elif prompts is not None:
        raise ConfigError("config key 'prompts' is set but the model takes no prompts: pass a diffusers "
                          "pipeline, or a conditional model with config 'prompt_encoder'")
    return prompts, eval_prompts
