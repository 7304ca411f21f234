"""Classifier-probability reward."""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import nn

from orwcfm_fast.rewards.base import Reward

__all__ = ["ClassifierReward"]


class ClassifierReward(Reward):
    """Probability (or log-probability) that a classifier assigns to a target class.

    ``reward = softmax(classifier(transform(samples)))[:, target_class]``, or
    ``log_softmax(...)`` with ``log_prob=True``. The classifier is put in eval mode with
    ``requires_grad`` off and stays in eval mode when the reward's ``.train()`` is called.
    The forward pass does not disable autograd, so gradients with respect to the samples
    are available if the caller wants them.

    Args:
        classifier: module or callable mapping ``[B, *sample_shape]`` to logits ``[B, K]``.
        target_class: class index in ``[0, K)`` (checked against ``K`` when called).
        log_prob: return ``log p(target | x)`` instead of ``p(target | x)``.
        transform: optional callable applied to the samples before the classifier
            (e.g. resizing or renormalising images).

    Shapes:
        samples ``[B, *sample_shape]`` -> ``[B]`` float32 on ``samples.device``.
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        target_class: int,
        log_prob: bool = False,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        super().__init__()
        if not callable(classifier):
            raise TypeError(f"classifier must be callable samples -> logits [B, K], got {type(classifier).__name__}")
        try:
            if isinstance(target_class, bool):
                raise TypeError
            target_class = operator.index(target_class)  # int, numpy / torch integer scalars
        except TypeError:
            raise ValueError(f"target_class must be an integer class index, got {target_class!r}") from None
        if target_class < 0:
            raise ValueError(f"target_class must be a class index >= 0, got {target_class}")
        self.classifier = classifier
        if isinstance(classifier, nn.Module):
            classifier.eval()
            classifier.requires_grad_(False)
        self.target_class = int(target_class)
        self.log_prob = bool(log_prob)
        self.transform = transform

    def train(self, mode: bool = True) -> "ClassifierReward":
        """Sets the reward's mode; the wrapped classifier always stays in eval mode."""
        super().train(mode)
        if isinstance(self.classifier, nn.Module):
            self.classifier.eval()
        return self

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        """Scores a batch.

        Args:
            samples: ``[B, *sample_shape]``.

        Returns:
            ``[B]`` float32 on ``samples.device``.

        Raises:
            ValueError: if the classifier does not return ``[B, K]`` logits or
                ``target_class`` is not in ``[0, K)``.
        """
        x = self.transform(samples) if self.transform is not None else samples
        logits = self.classifier(x)
        if not isinstance(logits, torch.Tensor):
            logits = torch.as_tensor(logits)
        b = samples.shape[0]
        if logits.dim() != 2 or logits.shape[0] != b:
            raise ValueError(
                f"classifier must return logits of shape [B, K] = [{b}, K], got shape {list(logits.shape)}"
            )
        k = logits.shape[1]
        if not 0 <= self.target_class < k:
            raise ValueError(
                f"target_class={self.target_class} is out of range for a classifier with K={k} classes "
                f"(valid: 0..{k - 1})"
            )
        logits = logits.float()
        scores = torch.log_softmax(logits, dim=-1) if self.log_prob else torch.softmax(logits, dim=-1)
        return scores[:, self.target_class].to(samples.device)

    def extra_repr(self) -> str:
        return f"target_class={self.target_class}, log_prob={self.log_prob}"
