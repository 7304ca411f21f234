"""``scaled_dot_product_attention`` drop-ins for torchcfm's einsum QKV attention.

torchcfm (guided-diffusion's UNet) computes attention in :class:`~torchcfm.models.unet.unet.QKVAttention`
and :class:`~torchcfm.models.unet.unet.QKVAttentionLegacy` with two ``einsum`` calls and an
explicit ``softmax(weight.float())``, which materialises the ``[N*H, T, T]`` weight matrix (twice,
once in fp32). The classes here compute the same function with
:func:`torch.nn.functional.scaled_dot_product_attention` (SDPA), which picks a fused kernel
(FlashAttention / memory-efficient on CUDA, a flash-style kernel on CPU) when the inputs allow.

Both classes are parameter-free, keep the ``n_heads`` attribute of the originals and take and return
the same shapes, so :func:`orwcfm_fast.models.optimize_unet` swaps them in by changing the module's
class: the module object, its hooks and the model's ``state_dict`` are unchanged.

Conventions matched exactly (``H = n_heads``, ``C = width // (3 * H)`` per-head channels,
``T`` = sequence length = number of spatial positions):

* ``QKVAttentionLegacy`` ("split heads, then q/k/v"): the ``3*H*C`` input channels are laid out as
  ``[H, 3, C]``: head ``h`` owns channels ``h*3C : (h+1)*3C``, whose first ``C`` are its queries, the
  next ``C`` its keys, the last ``C`` its values.
* ``QKVAttention`` ("split q/k/v, then heads"): the channels are laid out as ``[3, H, C]``: queries are
  the first ``H*C`` channels (head ``h`` owns ``h*C : (h+1)*C`` of them), then keys, then values.
* Both: logits are ``q . k / sqrt(C)`` (torchcfm scales q and k by ``C**-0.25`` each; SDPA is called
  with ``scale=1/sqrt(C)``, the same value up to rounding), softmax over the key axis, output channel
  ``h*C + c`` is head ``h``'s channel ``c`` (``[N, H*C, T]``).

Only the order of floating-point operations differs from the einsum code (SDPA's fused kernels apply
the scale once to the fp32 logits and accumulate the softmax online), so fp32 outputs agree to a few
ulp and low-precision outputs are at least as accurate (the fused kernels keep logits and softmax
in fp32, where the einsum code rounds the logits to bf16/fp16 before its fp32 softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SDPAQKVAttention", "SDPAQKVAttentionLegacy", "sdpa_qkv_attention"]


def sdpa_qkv_attention(qkv: torch.Tensor, n_heads: int, *, legacy: bool) -> torch.Tensor:
    """Multi-head self-attention on a packed ``qkv`` tensor, computed with SDPA.

    :param qkv: ``[N, 3*H*C, T]`` queries, keys and values; channel layout ``[H, 3, C]`` when
        ``legacy`` (torchcfm's ``QKVAttentionLegacy``), ``[3, H, C]`` otherwise (``QKVAttention``).
    :param n_heads: ``H``, the number of heads.
    :param legacy: which channel layout ``qkv`` has (see the module docstring).
    :return: ``[N, H*C, T]``, head ``h``'s output in channels ``h*C : (h+1)*C``; same dtype as ``qkv``
        (or the autocast dtype under autocast).
    """
    bs, width, length = qkv.shape
    if width % (3 * n_heads) != 0:
        raise ValueError(
            f"qkv has {width} channels, which is not divisible by 3 * n_heads = {3 * n_heads}"
        )
    ch = width // (3 * n_heads)
    if legacy:
        # [N, H, 3, C, T] -> [N, H, T, 3, C]
        packed = qkv.reshape(bs, n_heads, 3, ch, length).permute(0, 1, 4, 2, 3)
    else:
        # [N, 3, H, C, T] -> [N, H, T, 3, C]
        packed = qkv.reshape(bs, 3, n_heads, ch, length).permute(0, 2, 4, 1, 3)
    # One copy into [N, H, T, 3, C] so that q, k and v have unit stride along the head dimension,
    # which the fused CUDA kernels (flash / memory-efficient) require; with stride T there SDPA
    # would fall back to its unfused "math" implementation.
    q, k, v = packed.contiguous().unbind(dim=3)  # each [N, H, T, C], stride(-1) == 1
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))  # [N, H, T, C]
    return out.transpose(-1, -2).reshape(bs, n_heads * ch, length)


def _count_flops_attn(model, _x, y):
    # Same count as torchcfm's count_flops_attn, so thop custom_ops tables keep working.
    b, c, *spatial = y[0].shape
    num_spatial = math.prod(spatial)
    model.total_ops += torch.DoubleTensor([2 * b * (num_spatial**2) * c])


class SDPAQKVAttentionLegacy(nn.Module):
    """SDPA version of torchcfm's ``QKVAttentionLegacy`` (split heads, then q/k/v).

    ``forward(qkv)``: ``[N, H*3*C, T] -> [N, H*C, T]``; see :func:`sdpa_qkv_attention`.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return sdpa_qkv_attention(qkv, self.n_heads, legacy=True)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"

    @staticmethod
    def count_flops(model, _x, y):
        return _count_flops_attn(model, _x, y)


class SDPAQKVAttention(nn.Module):
    """SDPA version of torchcfm's ``QKVAttention`` (split q/k/v, then heads).

    ``forward(qkv)``: ``[N, 3*H*C, T] -> [N, H*C, T]``; see :func:`sdpa_qkv_attention`.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return sdpa_qkv_attention(qkv, self.n_heads, legacy=False)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"

    @staticmethod
    def count_flops(model, _x, y):
        return _count_flops_attn(model, _x, y)
