"""fp32 master weights for a model trained in bf16 / fp16.

Adam's update is about ``lr`` per weight (``m / sqrt(v)`` is O(1)); bf16 keeps 8 bits of mantissa,
so a weight of magnitude 0.02 moves only in steps of 2^-14 ~ 6e-5 and an update of 1e-5 rounds
away: full fine-tuning at ``lr 1e-5`` on bf16 weights changes almost nothing. The cure is the
usual mixed-precision one: the optimiser (and the EMA) hold fp32 copies, the forwards run on the
low-precision weights, and each step

1. moves the gradients from the low-precision weights to the fp32 copies (:meth:`MasterWeights.take_gradients`),
2. updates the fp32 copies (the optimiser),
3. rounds them into the weights the forwards use (:meth:`MasterWeights.push`).

Memory per trained parameter: 2 bytes (bf16 weight) + 4 (fp32 master) + 4 (fp32 gradient, while it
lives) + 8 (Adam's two moments) + 4 per fp32 EMA copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MasterWeights", "needs_master_weights"]


def needs_master_weights(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether any of ``params`` is a floating-point tensor narrower than float32."""
    return any(p.is_floating_point() and torch.finfo(p.dtype).bits < 32 for p in params)


class MasterWeights:
    """fp32 copies (:attr:`params`) of the low-precision trained weights ``model_params``.

    Args:
        model_params: the weights the forwards use (bf16 / fp16; float32 ones are copied too, for one code path).
    """

    def __init__(self, model_params: Sequence[torch.nn.Parameter]):
        self.model_params = list(model_params)
        self.params = [torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                       for p in self.model_params]

    def take_gradients(self) -> None:
        """Move each model weight's gradient (upcast to fp32) to its master copy; the model's become None."""
        for master, p in zip(self.params, self.model_params):
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Round the master copies into the model's weights (after an optimiser step, or a load)."""
        torch._foreach_copy_(self.model_params, self.params)

    @torch.no_grad()
    def pull(self) -> None:
        """Set the master copies from the model's weights (after the model's weights were loaded)."""
        torch._foreach_copy_(self.params, [p.detach().float() for p in self.model_params])
