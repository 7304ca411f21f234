"""``optimize_unet``: in-place, weight-preserving speed-ups for torchcfm UNets.

What it does to a torchcfm ``UNetModel`` / ``UNetModelWrapper`` (or anything containing torchcfm's
attention and norm modules, e.g. ``EncoderUNetModel``):

* ``sdpa``: every ``QKVAttentionLegacy`` becomes :class:`~orwcfm_fast.models.SDPAQKVAttentionLegacy`
  and every ``QKVAttention`` becomes :class:`~orwcfm_fast.models.SDPAQKVAttention`.
* ``groupnorm``: every ``GroupNorm32`` becomes :class:`~orwcfm_fast.models.FastGroupNorm32`.
* ``channels_last``: 4-D parameters and buffers (the ``Conv2d`` weights) are stored channels-last.

The swaps change each module's ``__class__`` in place (the replacement classes have the same
attributes and parameters), so module objects, parameter objects (an optimizer built earlier keeps
working), hooks and ``state_dict`` keys and values are all unchanged: checkpoints load either way.
Pickling a whole model (``torch.save(model)``, not its ``state_dict``) after the swap records these
classes, so loading that pickle needs ``orwcfm_fast`` importable.

Only modules whose type is exactly torchcfm's class are swapped: a user subclass may override
``forward`` and is left alone. Nothing is imported or computed at import time; torchcfm is imported
on the first call.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
from torch import nn

from orwcfm_fast.checkpoints import unwrap_model  # peels torch.compile, DataParallel, DDP
from orwcfm_fast.models.attention import SDPAQKVAttention, SDPAQKVAttentionLegacy
from orwcfm_fast.models.norm import FastGroupNorm32

__all__ = [
    "UNetReport",
    "describe_unet",
    "optimize_unet",
    "to_channels_last",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


def _torchcfm_classes():
    """``(QKVAttentionLegacy, QKVAttention, GroupNorm32)`` from torchcfm, or ``None`` without it."""
    from orwcfm_fast.rng import keep_global_states

    try:
        with keep_global_states():  # torchcfm imports POT, which draws from Python's `random` on import
            from torchcfm.models.unet.nn import GroupNorm32
            from torchcfm.models.unet.unet import QKVAttention, QKVAttentionLegacy
    except ImportError:  # pragma: no cover - torchcfm is a dependency of orwcfm_fast
        return None
    return QKVAttentionLegacy, QKVAttention, GroupNorm32


@dataclasses.dataclass(frozen=True)
class UNetReport:
    """Counts of the swappable submodules of a model, as :func:`describe_unet` finds them.

    ``einsum_*`` / ``groupnorm32`` count torchcfm's original modules still in place,
    ``sdpa_*`` / ``fast_groupnorm`` the replacements, ``conv_weights_4d`` the 4-D parameters and
    buffers and ``channels_last`` how many of those are stored channels-last (a 1x1-kernel weight
    has the same layout in both formats and always counts as channels-last).
    """

    einsum_attention_legacy: int = 0
    einsum_attention: int = 0
    sdpa_attention_legacy: int = 0
    sdpa_attention: int = 0
    groupnorm32: int = 0
    fast_groupnorm: int = 0
    conv_weights_4d: int = 0
    channels_last: int = 0

    @property
    def is_unet(self) -> bool:
        """Whether the model has any torchcfm attention/norm module, original or replaced."""
        return (
            self.einsum_attention_legacy
            + self.einsum_attention
            + self.sdpa_attention_legacy
            + self.sdpa_attention
            + self.groupnorm32
            + self.fast_groupnorm
        ) > 0

    def __str__(self) -> str:
        return (
            f"attention: {self.sdpa_attention_legacy + self.sdpa_attention} SDPA "
            f"({self.sdpa_attention_legacy} legacy order), "
            f"{self.einsum_attention_legacy + self.einsum_attention} einsum "
            f"({self.einsum_attention_legacy} legacy order); "
            f"groupnorm: {self.fast_groupnorm} fast, {self.groupnorm32} GroupNorm32; "
            f"4-D weights: {self.channels_last}/{self.conv_weights_4d} channels_last"
        )


def _is_channels_last(t: torch.Tensor) -> bool:
    # A [O, I, 1, 1] (1x1 kernel) tensor is laid out the same in both formats and counts as both.
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def describe_unet(model: nn.Module) -> UNetReport:
    """Count the torchcfm attention/GroupNorm modules (original and replaced) and 4-D weights.

    Works through ``torch.compile``/DataParallel/DDP wrappers. Pure inspection: changes nothing.
    """
    model = unwrap_model(model)
    classes = _torchcfm_classes()
    counts = {f.name: 0 for f in dataclasses.fields(UNetReport)}
    kinds = {
        SDPAQKVAttentionLegacy: "sdpa_attention_legacy",
        SDPAQKVAttention: "sdpa_attention",
        FastGroupNorm32: "fast_groupnorm",
    }
    if classes is not None:
        legacy, new, gn32 = classes
        kinds.update(
            {legacy: "einsum_attention_legacy", new: "einsum_attention", gn32: "groupnorm32"}
        )
    for m in model.modules():
        kind = kinds.get(type(m))
        if kind is not None:
            counts[kind] += 1
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            counts["conv_weights_4d"] += 1
            counts["channels_last"] += int(_is_channels_last(t))
    return UNetReport(**counts)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the 4-D parameters and buffers (``Conv2d`` weights) of ``model`` channels-last, in place.

    Values are unchanged (and so is the ``state_dict``: ``load_state_dict`` copies values into
    whatever layout the destination has). Other tensors (1-D norm/bias, 3-D ``Conv1d`` weights of
    the attention blocks, linear layers) are untouched. Parameter objects are kept (their ``.data``
    is replaced), so call this before building DDP or fused/foreach optimizer state that captured
    the old storage.

    Feed the model ``x.contiguous(memory_format=torch.channels_last)`` (``x``: ``[N, C, H, W]``) so
    the convolutions run NHWC end to end; contiguous inputs still give the same values, with layout
    conversions inside the first convolution. Returns ``model`` (unwrapped wrappers included).
    """
    unwrap_model(model).to(memory_format=torch.channels_last)
    return model


def optimize_unet(
    model: nn.Module,
    *,
    sdpa: bool = True,
    groupnorm: bool = True,
    channels_last: bool = False,
) -> nn.Module:
    """Apply weight-preserving speed-ups to a torchcfm UNet in place and return ``model``.

    :param model: a torchcfm ``UNetModelWrapper``/``UNetModel`` (or any module containing torchcfm's
        ``QKVAttention``/``QKVAttentionLegacy``/``GroupNorm32``), possibly wrapped in
        ``torch.compile``, ``nn.DataParallel`` or DDP. Called as before, ``model(t, x)`` with
        ``t: [N]`` and ``x: [N, C, H, W]``, returning ``[N, C_out, H, W]``.
    :param sdpa: swap the einsum attention for ``scaled_dot_product_attention`` (both head orders).
    :param groupnorm: swap ``GroupNorm32`` for :class:`FastGroupNorm32` (no fp32 copy for bf16/fp16
        activations where the device's kernel allows it; identical in fp32).
    :param channels_last: also store the 4-D conv weights channels-last (:func:`to_channels_last`);
        then pass inputs as ``x.contiguous(memory_format=torch.channels_last)``.
    :return: ``model`` itself (same object), modified in place. Flags only add swaps; a ``False``
        flag does not undo an earlier call. Calling again is a no-op for what is already swapped.

    A model with none of torchcfm's attention/norm modules (original or swapped) is returned
    unchanged, with a ``UserWarning`` saying so. The swaps are logged at INFO level on the
    ``orwcfm_fast.models.optimize`` logger; :func:`describe_unet` reports the state at any time.

    With ``torch.compile``, optimize before the compiled model first runs. Optimizing afterwards
    works too (Dynamo guards on the submodules' types, so the next call re-traces with the new
    classes; checked with torch 2.14), at the cost of one recompilation.
    """
    inner = unwrap_model(model)
    before = describe_unet(inner)
    if not before.is_unet:
        warnings.warn(
            f"optimize_unet: {type(inner).__name__} has no torchcfm QKVAttention, "
            "QKVAttentionLegacy or GroupNorm32 submodules; returning it unchanged.",
            UserWarning,
            stacklevel=2,
        )
        return model

    classes = _torchcfm_classes()
    swaps: dict[type, type] = {}
    if classes is not None:
        legacy, new, gn32 = classes
        if sdpa:
            swaps[legacy] = SDPAQKVAttentionLegacy
            swaps[new] = SDPAQKVAttention
        if groupnorm:
            swaps[gn32] = FastGroupNorm32
    for m in inner.modules():
        target = swaps.get(type(m))  # exact type: a user subclass may override forward
        if target is not None:
            m.__class__ = target
    if channels_last:
        to_channels_last(inner)

    after = describe_unet(inner)
    logger.info(
        "optimize_unet(%s): swapped %d attention -> SDPA, %d GroupNorm32 -> FastGroupNorm32, "
        "%d 4-D weights -> channels_last; now %s",
        type(inner).__name__,
        (before.einsum_attention_legacy + before.einsum_attention)
        - (after.einsum_attention_legacy + after.einsum_attention),
        before.groupnorm32 - after.groupnorm32,
        after.channels_last - before.channels_last,
        after,
    )
    return model
