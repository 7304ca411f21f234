"""The velocities a LoRA export test compares: the trainer's policy, a loaded transformer, the base."""

from __future__ import annotations

import torch

__all__ = ["policy_loaded_and_base"]


def policy_loaded_and_base(trainer, transformer, t: torch.Tensor, x: torch.Tensor, cond) -> tuple:
    """``(policy, loaded, base)`` conditional velocities at ``(t, x, cond)``, without gradients.

    Args:
        trainer: an ``ORWCFMTrainer`` on a LoRA pipeline.
        transformer: another transformer of the same family (e.g. a fresh pipeline's with the exported LoRA).
        t: ``[B]`` times; x: ``[B, *sample_shape]``; cond: ``trainer.models.flow.encode(prompts)`` for ``B`` prompts.

    Returns:
        Three ``[B, *sample_shape]`` tensors: the trainer's policy, ``transformer``, and the trainer's
        reference (its adapters disabled: the base weights).
    """
    flow = trainer.models.flow
    with torch.no_grad():
        policy = flow.transformer_velocity(t, x, cond, trainer.net_model)
        loaded = flow.transformer_velocity(t, x, cond, transformer)
        with trainer.models.roles.role("reference"):
            base = flow.transformer_velocity(t, x, cond, trainer.net_model)
    return policy, loaded, base
