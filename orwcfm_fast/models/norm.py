"""GroupNorm for torchcfm UNets without ``GroupNorm32``'s fp32 round trip where a kernel allows it.

torchcfm's ``GroupNorm32.forward`` is ``super().forward(x.float()).type(x.dtype)``: with a bf16/fp16
activation ``x`` (autocast, or a ``use_fp16`` UNet) it writes a full fp32 copy of ``x``, normalises
that into a second fp32 tensor, and casts the result back: three passes over memory and two
activation-sized fp32 temporaries (kept alive for backward) per norm, where one pass would do.

:class:`FastGroupNorm32` is a subclass of :class:`torch.nn.GroupNorm` with the same parameters
(``weight``, ``bias``: the ``state_dict`` is unchanged) whose forward picks per call:

* **fp32 input** (the common fp32-training case): ``F.group_norm(x)``. ``x.float()`` was a no-op, so
  this is the very same computation as ``GroupNorm32``, bit for bit.
* **bf16/fp16 input on CPU** with fp32 (or same-dtype) affine parameters: ``F.group_norm`` on the
  low-precision tensor itself, with autocast disabled around the call. PyTorch's CPU kernel
  (``aten/src/ATen/native/cpu/group_norm_kernel.cpp``) supports this "mixed type" call: it computes
  the moments in fp32 (``opmath``), applies ``(x - mean) * rstd * gamma + beta`` in fp32 with the
  fp32 ``gamma``/``beta``, rounds once to bf16/fp16, and saves fp32 ``mean``/``rstd`` for backward.
  That is exactly ``GroupNorm32``'s arithmetic without the fp32 copies (measured: bf16 outputs
  bit-identical to ``GroupNorm32``; fp16 outputs differ in ~0.02% of elements by one ulp, with the
  same max error against an fp64 oracle).
* **bf16/fp16 input on any other device (CUDA included)**: the fp32 path, ``F.group_norm(x.float())``
  cast back, i.e. ``GroupNorm32``'s computation. There is no cheaper *correct* eager path on CUDA:
  the CUDA kernel (``aten/src/ATen/native/cuda/group_norm_kernel.cu``) reads ``gamma``/``beta`` with
  the input's dtype, so a bf16 call needs bf16-rounded affine parameters (up to ~2 extra bf16
  roundings in the forward), and it saves ``mean``/``rstd`` *in bf16* for the backward, which
  loses the fp32 statistics there (``x - mean`` with a bf16 mean). Under ``torch.compile`` Inductor
  decomposes the norm and fuses the ``x.float()`` upcast, the fp32 statistics, the affine and the
  downcast (and a following SiLU) into its generated kernels, so the fp32 temporaries disappear
  there without any change here; that is the recommended route on CUDA (verified on CPU codegen,
  unverified on GPU). :attr:`FastGroupNorm32.native_lowp_devices` lists the device types that
  take the native path.
* **fp64 input**: computed in fp64 (the affine parameters are upcast, exactly). ``GroupNorm32``
  instead rounds the input to fp32 (and cannot run a ``.double()`` model at all: the CPU kernel
  rejects fp32 input with fp64 parameters); fp64 is for checking code, and this way an fp64 model
  is an fp64 computation.

Under autocast this module returns ``x.dtype``, like ``GroupNorm32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastGroupNorm32"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _mixed_type_ok(weight, bias, x_dtype) -> bool:
    # The native kernel takes affine parameters that are both fp32 or both of the input's dtype.
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    p = weight if weight is not None else bias
    return p is None or p.dtype == torch.float32 or p.dtype == x_dtype


class FastGroupNorm32(nn.GroupNorm):
    """Drop-in for torchcfm's ``GroupNorm32``; same parameters and ``state_dict`` keys.

    ``forward(x)``: ``[N, C, *]`` (any memory format) ``-> [N, C, *]`` with ``x``'s dtype; ``C`` must
    equal ``num_channels``. Statistics and the affine transform are computed in fp32 (fp64 for fp64
    input); see the module docstring for which path each dtype/device takes.
    """

    #: Device types whose native ``group_norm`` kernel takes a bf16/fp16 input with fp32 affine
    #: parameters and computes (and saves) the statistics in fp32. Only the CPU kernel does.
    native_lowp_devices: frozenset[str] = frozenset({"cpu"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (
            x.dtype in _LOW_PRECISION
            and x.device.type in self.native_lowp_devices
            and _mixed_type_ok(weight, bias, x.dtype)
        ):
            # Autocast off: the kernel itself does the fp32 arithmetic, and an autocast policy
            # that casts group_norm's input to fp32 would bring the copy back.
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        if x.dtype == torch.float64:
            if weight is not None:
                weight = weight.double()
            if bias is not None:
                bias = bias.double()
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        # GroupNorm32's computation; `x.float()` and `.to(x.dtype)` are no-ops for fp32 input.
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
