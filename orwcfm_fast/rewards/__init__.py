"""Rewards: callables mapping a batch ``[B, *sample_shape]`` to ``[B]`` float32 scores.

- :class:`Reward`             abstract base (an ``nn.Module``)
- :class:`CallableReward`     wraps any ``samples -> [B]`` callable
- :class:`WeightedSum`        ``sum_k w_k * r_k(samples)`` (config ``reward: {name: weight}``), each term logged
- :func:`score_terms`         a reward's checked ``[B]`` output (and its terms'), inputs in each reward's range
- :func:`convert_range`       images from one value range to another ([-1, 1] <-> [0, 1])
- :class:`CLIPReward`         CLIP text-image agreement (the ORW-CFM-W2 reference reward)
- :class:`JPEGCompressibility` negative JPEG size in kB (DDPO compression task)
- :class:`ClassifierReward`   classifier probability of a target class
- :func:`make_reward`, :func:`register_reward`, :func:`available_rewards`  name registry
- :func:`check_rewards`       validates a reward's output (shape, dtype, finiteness)

Importing this package does not import open_clip; :class:`CLIPReward` imports it when built.
"""

from orwcfm_fast.rewards.base import CallableReward, Reward, WeightedSum, check_rewards, convert_range, score_terms
from orwcfm_fast.rewards.classifier import ClassifierReward
from orwcfm_fast.rewards.clip import CLIPReward
from orwcfm_fast.rewards.jpeg import JPEGCompressibility
from orwcfm_fast.rewards.registry import available_rewards, make_reward, register_reward

__all__ = [
    "Reward",
    "CallableReward",
    "WeightedSum",
    "CLIPReward",
    "JPEGCompressibility",
    "ClassifierReward",
    "register_reward",
    "make_reward",
    "available_rewards",
    "check_rewards",
    "score_terms",
    "convert_range",
]
