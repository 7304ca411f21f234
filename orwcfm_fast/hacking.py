"""The reward-hacking alarm: the training reward keeps rising while what it should stand for falls.

:func:`~orwcfm_fast.evaluation.evaluate_policy` appends one summary per evaluation to ``trainer.eval_history``
(:func:`evaluation_summary`: ``epoch``, ``global_step``, ``reward``, ``held_out_reward`` or None, ``diversity``,
``vendi``, ``setting``) and asks :func:`check_hacking` about the series. The rule, with ``W`` config
``hacking_window``:

- the series is the history's summaries of the same evaluation setting as the newest one (same prompts,
  samples per prompt, noise seed and embedding: other evaluations are not comparable), and of a training step
  evaluated more than once only the latest summary (re-evaluating one policy is not a new point);
- the alarm needs at least ``W`` points; over the last ``W`` the training ``reward`` rose at every step
  (strictly: each value above the one before), and
- a watched signal, ``held_out_reward`` (when configured) or ``diversity``, fell over the same ``W`` points:
  the last value below the first. The path in between is free (noise may lift a middle point).

"Above" / "below" ignore differences within :data:`RELATIVE_TOLERANCE` of the larger magnitude: a float32
mean's round-off is not a rise or a fall, so flat series (re-evaluations of a policy that does not move) never
alarm. The decision reads nothing but the history, so a trainer resumed from a checkpoint (which keeps
``eval_history``) decides exactly as the uninterrupted run did. Every evaluation whose window qualifies alarms
(and warns) again: a fall that goes on is reported at each evaluation until the window no longer shows it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["RELATIVE_TOLERANCE", "WATCHED", "HackingAlarm", "RewardHackingWarning", "check_hacking",
           "comparable_series", "evaluation_setting", "evaluation_summary"]

#: changes smaller than this fraction of the larger magnitude are neither rises nor falls (float32 means carry
#: ~1e-7 relative round-off, summed over a handful of terms and prompts; 1e-6 stays clear of it and far below
#: any change worth an alarm)
RELATIVE_TOLERANCE = 1e-6

#: the signals whose fall, while the training reward rises, is the alarm (summary key -> words for the message)
WATCHED = {"held_out_reward": "held-out reward", "diversity": "diversity"}


class RewardHackingWarning(UserWarning):
    """The training reward rose over ``hacking_window`` evaluations while the held-out reward or the diversity fell."""


def evaluation_setting(prompts: Sequence[str], samples_per_prompt: int, seed: int, embedding: str) -> str:
    """A short fingerprint of what makes two evaluations comparable (the prompts, their number of samples, the
    noise seed, the embedding's name)."""
    text = json.dumps([list(prompts), int(samples_per_prompt), int(seed), str(embedding)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluation_summary(result: Mapping[str, Any], epoch: int, global_step: int) -> dict[str, Any]:
    """The ``eval_history`` entry of one evaluation's ``result`` (plain numbers and strings: it goes into
    checkpoints, which load with ``weights_only``)."""
    held_out = result.get("held_out_reward")
    return {"epoch": int(epoch), "global_step": int(global_step), "reward": float(result["reward"]),
            "held_out_reward": None if held_out is None else float(held_out),
            "diversity": float(result["diversity"]), "vendi": float(result["vendi"]),
            "setting": evaluation_setting(result["prompts"], result["samples_per_prompt"], result["seed"],
                                          result["embedding"])}


def _rose(before: float, after: float) -> bool:
    return after - before > RELATIVE_TOLERANCE * max(abs(before), abs(after))


def comparable_series(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The summaries of ``history`` the alarm compares with its newest one: those of the newest one's setting, in
    order, keeping of each ``global_step`` only the latest."""
    if not history:
        return []
    setting = history[-1].get("setting")
    series: list[Mapping[str, Any]] = []
    for entry in history:
        if entry.get("setting") != setting:
            continue
        if series and series[-1]["global_step"] == entry["global_step"]:
            series[-1] = entry
        else:
            series.append(entry)
    return series


@dataclass(frozen=True)
class HackingAlarm:
    """One alarm: the ``window`` of summaries it read and what fell there.

    Attributes:
        window: the last ``hacking_window`` comparable summaries, oldest first.
        fell: ``{signal: (first, last)}`` for each watched signal that fell (keys of :data:`WATCHED`, in its order).
    """

    window: tuple[Mapping[str, Any], ...]
    fell: Mapping[str, tuple[float, float]]

    @property
    def signals(self) -> list[str]:
        """The names of the signals that fell."""
        return list(self.fell)

    def message(self, w2_coefficient: float | None = None, temperature: float | None = None, *,
                temperature_applies: bool = True) -> str:
        """The warning's text: what fell, by how much, over which epochs, and what to do (lowering the temperature
        only where the objective weights by it: not DiffusionNFT)."""
        first, last = self.window[0], self.window[-1]
        epochs = ", ".join(str(s["epoch"]) for s in self.window)
        falls = []
        for name, (a, b) in self.fell.items():
            relative = f", {(b - a) / abs(a) * 100:+.1f}%" if a else ""
            falls.append(f"the {WATCHED[name]} fell by {a - b:.4g} ({a:.4g} -> {b:.4g}{relative})")
        now = lambda value: "" if value is None else f" (now {value:g})"  # noqa: E731
        return (f"possible reward hacking at epoch {last['epoch']} (global step {last['global_step']}): the training "
                f"reward rose at each of the last {len(self.window)} evaluations (epochs {epochs}: "
                f"{first['reward']:.4g} -> {last['reward']:.4g}) while {' and '.join(falls)}. The policy may be "
                f"exploiting the training reward: raise w2_coefficient{now(w2_coefficient)}"
                + (f" or lower temperature{now(temperature)}" if temperature_applies else "")
                + f", or stop at the checkpoint of epoch {first['epoch']}, before the fall.")


def check_hacking(history: Sequence[Mapping[str, Any]], window: int) -> HackingAlarm | None:
    """The alarm of the module docstring's rule for the newest summary of ``history``, or None.

    Args:
        history: ``eval_history`` summaries (:func:`evaluation_summary`), oldest first.
        window: ``W`` (config ``hacking_window``), >= 2.

    Returns:
        A :class:`HackingAlarm` when the training reward rose at every step of the last ``W`` comparable summaries
        and the held-out reward (when both ends have one) or the diversity is lower at the last than at the first;
        otherwise None (also with fewer than ``W`` comparable summaries).
    """
    if window < 2:
        raise ValueError(f"check_hacking: the window must be >= 2 evaluations, got {window!r}")
    series = comparable_series(history)
    if len(series) < window:
        return None
    last_w = tuple(series[-window:])
    rewards = [float(s["reward"]) for s in last_w]
    if not all(_rose(a, b) for a, b in zip(rewards, rewards[1:])):
        return None
    fell = {}
    for name in WATCHED:
        a, b = last_w[0].get(name), last_w[-1].get(name)
        if a is not None and b is not None and _rose(float(b), float(a)):
            fell[name] = (float(a), float(b))
    return HackingAlarm(last_w, fell) if fell else None
