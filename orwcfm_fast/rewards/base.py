"""Reward interface, callable / weighted-sum wrappers and output validation.

A *reward* maps a batch of samples ``[B, *sample_shape]`` (images ``[B, C, H, W]`` in
``[-1, 1]``, or arbitrary tensors such as 2-D points ``[B, 2]``) to a ``[B]`` float32
tensor on the samples' device. The trainer calls rewards under ``torch.no_grad``. For samples
made for prompts (text-to-image pipelines) a reward may take the prompts too,
``reward(images, prompts) -> [B]`` with images ``[B, 3, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "Reward",
    "CallableReward",
    "WeightedSum",
    "accepts_prompts",
    "check_rewards",
    "convert_range",
    "FRAME_REDUCTIONS",
    "score_terms",
]

# How many offending indices an error message lists before eliding the rest.
_MAX_LISTED = 8


class Reward(nn.Module):
    """Abstract base class of rewards.

    Subclasses implement :meth:`forward`. Being an :class:`torch.nn.Module`, a reward
    can hold networks and buffers that ``.to(device)`` moves. A reward whose
    :attr:`takes_prompts` is True is called ``reward(images, prompts)`` by the trainer when
    the samples were made for prompts.
    """

    #: whether ``forward`` takes the batch's prompts as a second argument
    takes_prompts: bool = False
    #: the value range of the images ``forward`` expects: ``(-1.0, 1.0)`` (the pixel tasks' convention),
    #: ``(0.0, 1.0)`` (decoded images, what the preference rewards take) or ``None`` (the samples as the
    #: model family gives them: [0, 1] images for pipelines, the raw samples of pixel tasks)
    input_range: Optional[Tuple[float, float]] = None

    def forward(self, samples: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Scores a batch.

        Args:
            samples: ``[B, *sample_shape]`` batch of samples.

        Returns:
            ``[B]`` float32 tensor of rewards on ``samples.device``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(samples) -> [B]")


def _to_float_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """Converts a tensor / array / list to a float32 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.as_tensor(value, dtype=torch.float32, device=device)


class CallableReward(Reward):
    """Wraps any callable ``samples -> [B]`` (tensor, numpy array, list, ...) as a :class:`Reward`.

    The output is converted to a float32 tensor on the samples' device; its shape is not
    checked here (see :func:`check_rewards`). If ``fn`` is an :class:`torch.nn.Module` it is
    registered as a submodule, so ``.to(device)`` moves it.

    Args:
        fn: callable mapping ``[B, *sample_shape]`` samples to ``B`` rewards.
        name: optional display name (defaults to the callable's ``__name__``).

    Example:
        >>> r = CallableReward(lambda x: -(x ** 2).sum(dim=1), name="neg_sq_norm")
        >>> r(torch.ones(4, 2)).shape
        torch.Size([4])
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], name: Optional[str] = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableReward needs a callable samples -> [B] rewards, got {type(fn).__name__}")
        self.fn = fn  # registered as a submodule when it is an nn.Module
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.takes_prompts = accepts_prompts(fn)

    def forward(self, samples: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Calls the wrapped function.

        Args:
            samples: ``[B, *sample_shape]`` (images ``[B, 3, H, W]`` in [0, 1] for pipelines).
            prompts: the ``B`` prompts the samples were made for; passed on only when the
                callable takes a second argument (:func:`accepts_prompts`).

        Returns:
            The callable's output as a float32 tensor on ``samples.device`` (normally ``[B]``).
        """
        if prompts is not None and self.takes_prompts:
            return _to_float_tensor(self.fn(samples, list(prompts)), samples.device)
        return _to_float_tensor(self.fn(samples), samples.device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def accepts_prompts(fn: Callable) -> bool:
    """Whether ``fn`` can be called ``fn(samples, prompts)`` (two positional parameters, or ``*args``).

    A :class:`Reward` answers with its :attr:`~Reward.takes_prompts`; a one-argument callable
    ``fn(samples)`` (every reward of the pixel tasks) is called without the prompts.
    """
    if isinstance(fn, Reward):
        return bool(fn.takes_prompts)
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2


def _as_reward(reward: Any) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(f"expected a Reward or a callable samples -> [B], got {type(reward).__name__}")


class WeightedSum(Reward):
    """Linear combination ``sum_k weight_k * reward_k(samples)``.

    Args:
        terms: sequence of ``(weight, reward)`` pairs; each reward is a :class:`Reward`,
            an :class:`torch.nn.Module` or a plain callable ``samples -> [B]`` (plain callables
            and non-Reward modules are wrapped in :class:`CallableReward`). The rewards are kept in
            an :class:`torch.nn.ModuleList`, so ``.to(device)`` moves them.

    Raises:
        ValueError: if ``terms`` is empty or a term is not a ``(weight, reward)`` pair.

    Example:
        >>> r = WeightedSum([(1.0, JPEGCompressibility()), (0.5, lambda x: x.mean(dim=(1, 2, 3)))])
    """

    def __init__(self, terms: Sequence[Tuple[float, Union[Reward, Callable[[torch.Tensor], Any]]]],
                 names: Optional[Sequence[str]] = None):
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term, got none")
        weights, rewards = [], []
        for k, term in enumerate(terms):
            try:
                weight, reward = term
            except (TypeError, ValueError):
                raise ValueError(
                    f"WeightedSum term {k} must be a (weight, reward) pair, got {term!r}"
                ) from None
            weights.append(float(weight))
            rewards.append(_as_reward(reward))
        self.weights = weights
        self.rewards = nn.ModuleList(rewards)
        if names is None:  # each term's name, made distinct with its index where two share one
            names = [str(getattr(r, "name", None) or type(r).__name__) for r in rewards]
            names = [f"{n}_{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]
        names = [str(n) for n in names]
        if len(names) != len(rewards) or len(set(names)) != len(names):
            raise ValueError(f"WeightedSum needs one distinct name per term, got {names!r} for {len(rewards)} terms")
        self.names = names
        self.takes_prompts = any(accepts_prompts(r) for r in rewards)

    def forward(self, samples: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Evaluates every term and sums them (each term gets the samples in its own ``input_range``
        when ``samples`` are images in [-1, 1]; use :func:`score_terms` for other ranges).

        Args:
            samples: ``[B, *sample_shape]``.
            prompts: the ``B`` prompts, passed to the terms that take them.

        Returns:
            ``[B]`` float32 tensor on ``samples.device``.

        Raises:
            ValueError: if a term returns something that is not ``B`` finite floats
                (the message names the term).
        """
        return score_terms(self, samples, prompts)[0]

    def extra_repr(self) -> str:
        return f"names={self.names}, weights={self.weights}"


def convert_range(images: torch.Tensor, source: Optional[Tuple[float, float]],
                  target: Optional[Tuple[float, float]]) -> torch.Tensor:
    """``images`` mapped affinely from the value range ``source`` to ``target`` (unchanged when either is None
    or they are equal).

    Args:
        images: ``[B, ...]`` floating tensor with values in ``source``.
        source: ``(low, high)`` of ``images``, or None (unknown: returned as is).
        target: ``(low, high)`` wanted, or None (as given).

    Returns:
        a tensor of the same shape and dtype.
    """
    if source is None or target is None or tuple(source) == tuple(target):
        return images
    (s0, s1), (t0, t1) = source, target
    scale = (t1 - t0) / (s1 - s0)
    return (images - s0) * scale + t0


#: how an image reward's per-frame scores of a video become one score (config ``video_frame_reduction``)
FRAME_REDUCTIONS = ("mean", "min")


def score_terms(reward: Any, samples: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                samples_range: Optional[Tuple[float, float]] = (-1.0, 1.0),
                frame_reduction: Optional[str] = None) -> Tuple[torch.Tensor, dict]:
    """Checked rewards of ``samples`` and, for a :class:`WeightedSum`, each term's own (unweighted) rewards.

    Every (sub-)reward gets the samples converted from ``samples_range`` to its :attr:`Reward.input_range`
    and the prompts when it takes them (:func:`accepts_prompts`).

    Videos (``frame_reduction`` set): ``samples`` are ``[B, C, F, H, W]``. A reward that scores images gets
    the ``B F`` frames ``[B F, C, H, W]`` (each with its video's prompt) and each video's ``F`` scores are
    reduced to one: ``"mean"``, or ``"min"`` ("every frame must pass"). A reward with a true
    ``takes_videos`` attribute gets the videos whole. In a :class:`WeightedSum` each term is reduced on
    its own, then weighted and summed (so with ``"min"`` each term's worst frame counts).

    Args:
        reward: a :class:`Reward` or callable.
        samples: ``[B, *sample_shape]`` (images with values in ``samples_range``), or videos ``[B, C, F, H, W]``.
        prompts: the ``B`` prompts the samples were made for, or None.
        samples_range: the value range of ``samples``; None for samples that are not images.
        frame_reduction: None (score ``samples`` as they are), or one of :data:`FRAME_REDUCTIONS` for videos.

    Returns:
        ``(total [B] float32, {term name: [B] float32})``; the dict is empty unless ``reward`` is a
        :class:`WeightedSum`.

    Raises:
        ValueError: a (term's) output is not ``B`` (``B F`` for frames) finite floats (the message names the
            term), an unknown ``frame_reduction``, or ``frame_reduction`` with samples that are not ``[B, C, F, H, W]``.
    """
    batch_size = samples.shape[0]
    if frame_reduction is not None:
        if frame_reduction not in FRAME_REDUCTIONS:
            raise ValueError(f"config key 'video_frame_reduction' must be one of {FRAME_REDUCTIONS}, got {frame_reduction!r}")
        if samples.dim() != 5:
            raise ValueError(f"frame_reduction {frame_reduction!r} scores videos [B, C, F, H, W]; got samples of "
                             f"shape {tuple(samples.shape)}")
    if isinstance(reward, WeightedSum):
        total = torch.zeros(batch_size, dtype=torch.float32, device=samples.device)
        terms = {}
        for k, (name, weight, term) in enumerate(zip(reward.names, reward.weights, reward.rewards)):
            try:
                value, _ = score_terms(term, samples, prompts, samples_range, frame_reduction)
            except ValueError as e:
                raise ValueError(f"reward term {k} {name!r} ({type(term).__name__}): {e}") from e
            terms[name] = value
            total = total + weight * value
        return total, terms
    if frame_reduction is not None and not getattr(reward, "takes_videos", False):
        b, c, f, h, w = samples.shape
        frames = samples.transpose(1, 2).reshape(b * f, c, h, w)  # video i's frames are rows i F .. i F + F - 1
        frame_prompts = None if prompts is None else [p for p in prompts for _ in range(f)]
        try:
            per_frame = _score_one(reward, frames, frame_prompts, samples_range).view(b, f)
        except ValueError as e:
            raise ValueError(f"scoring the {f} frames of each of {b} videos: {e}") from e
        return (per_frame.mean(dim=1) if frame_reduction == "mean" else per_frame.amin(dim=1)), {}
    return _score_one(reward, samples, prompts, samples_range), {}


def _score_one(reward: Any, samples: torch.Tensor, prompts: Optional[Sequence[str]],
               samples_range: Optional[Tuple[float, float]]) -> torch.Tensor:
    """One reward's checked ``[B]`` output on ``samples`` (converted to its input range, with prompts if it takes them)."""
    inputs = convert_range(samples, samples_range, getattr(reward, "input_range", None))
    if prompts is not None and accepts_prompts(reward):
        out = reward(inputs, list(prompts))
    else:
        out = reward(inputs)
    return check_rewards(out, samples.shape[0], device=samples.device)


def _describe_indices(mask: torch.Tensor) -> str:
    idx = torch.nonzero(mask, as_tuple=False).flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_MAX_LISTED])
    more = f", ... ({len(idx) - _MAX_LISTED} more)" if len(idx) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def check_rewards(
    rewards: Any, batch_size: int, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """Validates a reward function's output.

    Accepts a tensor or anything :func:`torch.as_tensor` converts (numpy array, list) of
    shape ``[B]`` or ``[B, 1]`` (squeezed), with a floating dtype and only finite values.

    Args:
        rewards: the reward output to check.
        batch_size: expected ``B``.
        device: device of the returned tensor (default: where ``rewards`` already lives).

    Returns:
        ``[B]`` float32 tensor.

    Raises:
        ValueError: on a non-convertible value, a wrong shape, a non-floating dtype, or
            NaN / inf values (the message names how many and the first few sample indices).
    """
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards)
        except Exception as e:
            raise ValueError(
                f"reward must return a tensor of shape [{batch_size}] (one float per sample), "
                f"got {type(rewards).__name__} that cannot be converted to a tensor: {e}"
            ) from e
    shape = tuple(rewards.shape)
    if shape == (batch_size, 1):
        rewards = rewards.reshape(batch_size)
    elif shape != (batch_size,):
        raise ValueError(
            f"reward returned shape {list(shape)} (dtype {rewards.dtype}), expected [{batch_size}] "
            f"(or [{batch_size}, 1]): one scalar per sample of the batch of {batch_size}"
        )
    if not rewards.is_floating_point():
        raise ValueError(
            f"reward returned dtype {rewards.dtype} (shape {list(shape)}), expected a floating "
            f"dtype (float32 preferred); convert with .float()"
        )
    if device is not None:
        rewards = rewards.to(device)
    rewards = rewards.to(torch.float32)
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        nan = torch.isnan(rewards)
        posinf = torch.isposinf(rewards)
        neginf = torch.isneginf(rewards)
        parts = []
        if bool(nan.any()):
            parts.append(f"{int(nan.sum())} NaN at sample indices {_describe_indices(nan)}")
        if bool(posinf.any()):
            parts.append(f"{int(posinf.sum())} +inf at sample indices {_describe_indices(posinf)}")
        if bool(neginf.any()):
            parts.append(f"{int(neginf.sum())} -inf at sample indices {_describe_indices(neginf)}")
        raise ValueError(
            f"reward returned {int((~finite).sum())} non-finite value(s) out of {batch_size}: "
            + "; ".join(parts)
        )
    return rewards
