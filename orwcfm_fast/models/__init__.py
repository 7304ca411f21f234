"""Weight-preserving speed-ups for torchcfm UNets (the velocity models ``model(t, x)``).

Everything here keeps the model's parameters, buffers and ``state_dict`` exactly as they are (keys,
values, parameter objects), so checkpoints load unchanged in either direction; only the code that
runs changes:

- :func:`optimize_unet`: the entry point. ``optimize_unet(model, sdpa=True, groupnorm=True,
  channels_last=False)`` swaps, in place, torchcfm's einsum attention for
  ``scaled_dot_product_attention`` (:class:`SDPAQKVAttentionLegacy`, :class:`SDPAQKVAttention`) and
  ``GroupNorm32`` for :class:`FastGroupNorm32`, and optionally stores conv weights channels-last
  (:func:`to_channels_last`). Accepts ``torch.compile``/DataParallel/DDP-wrapped models.
- :func:`describe_unet` / :class:`UNetReport`: what is (still) swappable and what was swapped.

Shapes: ``model(t, x)`` takes ``t: [N]`` (or a scalar) and ``x: [N, C, H, W]`` and returns
``[N, C_out, H, W]``, before and after. With ``channels_last=True`` pass
``x.contiguous(memory_format=torch.channels_last)``.

Importing this package imports torch only: no torchcfm import, no GPU query, no work.
"""

from orwcfm_fast.models.attention import (
    SDPAQKVAttention,
    SDPAQKVAttentionLegacy,
    sdpa_qkv_attention,
)
from orwcfm_fast.models.norm import FastGroupNorm32
from orwcfm_fast.models.optimize import (
    UNetReport,
    describe_unet,
    optimize_unet,
    to_channels_last,
    unwrap_model,
)

__all__ = [
    "FastGroupNorm32",
    "SDPAQKVAttention",
    "SDPAQKVAttentionLegacy",
    "UNetReport",
    "describe_unet",
    "optimize_unet",
    "sdpa_qkv_attention",
    "to_channels_last",
    "unwrap_model",
]
