"""Rewards: callables mapping a batch ``[B, *sample_shape]`` to ``[B]`` float32 scores.

- :class:`Reward`             abstract base (an ``nn.Module``)
- :class:`CallableReward`     wraps any ``samples -> [B]`` callable
- :class:`WeightedSum`        ``sum_k w_k * r_k(samples)`` (config ``reward: {name: weight}``), each term logged
- :func:`score_terms`         a reward's checked ``[B]`` output (and its terms'), inputs in each reward's range
- :func:`convert_range`       images from one value range to another ([-1, 1] <-> [0, 1])
- :class:`CLIPReward`         CLIP text-image agreement (the ORW-CFM-W2 reference reward)
- :class:`JPEGCompressibility` negative JPEG size in kB (DDPO compression task)
- :class:`ClassifierReward`   classifier probability of a target class
- :class:`HTTPReward`         a reward served by ``orwcfm-fast reward-server`` (config ``reward: "http://..."``)
- :class:`CLIPScoreReward`, :class:`PickScoreReward`, :class:`HPSv2Reward`, :class:`AestheticReward`  the preference
  rewards ``clip_score``, ``pickscore``, ``hpsv2``, ``aesthetic`` (local weights from config ``reward_paths``)
- :func:`make_reward`, :func:`register_reward`, :func:`available_rewards`  name registry
- :func:`check_rewards`       validates a reward's output (shape, dtype, finiteness)
- videos: :func:`score_terms` with ``frame_reduction`` scores each frame with an image reward, one score per video

Importing this package does not import open_clip or transformers; the rewards that use them import them when built.
"""

from orwcfm_fast.rewards.aesthetic import AestheticReward
from orwcfm_fast.rewards.base import (FRAME_REDUCTIONS, CallableReward, Reward, WeightedSum, check_rewards, convert_range,
                                      score_terms)
from orwcfm_fast.rewards.classifier import ClassifierReward
from orwcfm_fast.rewards.clip import CLIPReward
from orwcfm_fast.rewards.clip_score import CLIPScoreReward
from orwcfm_fast.rewards.hpsv2 import HPSv2Reward
from orwcfm_fast.rewards.http import HTTPReward
from orwcfm_fast.rewards.jpeg import JPEGCompressibility
from orwcfm_fast.rewards.pickscore import PickScoreReward
from orwcfm_fast.rewards.registry import available_rewards, make_reward, register_reward

__all__ = [
    "Reward",
    "CallableReward",
    "WeightedSum",
    "CLIPReward",
    "JPEGCompressibility",
    "HTTPReward",
    "ClassifierReward",
    "CLIPScoreReward",
    "PickScoreReward",
    "HPSv2Reward",
    "AestheticReward",
    "register_reward",
    "make_reward",
    "available_rewards",
    "check_rewards",
    "score_terms",
    "convert_range",
    "FRAME_REDUCTIONS",
]
