"""The dtype a diffusers transformer computes in, read in O(1) on every forward.

diffusers' ``ModelMixin.dtype`` walks every submodule (looking for layerwise-casting hooks) and
then the parameters, on each access: thousands of modules per call for SD3.5 / Flux, on every
velocity evaluation. :func:`transformer_dtype` finds once, per transformer, the parameter whose
dtype ``ModelMixin.dtype`` reports (the first floating-point one outside ``_keep_in_fp32_modules``)
and afterwards reads that parameter's dtype only. The parameter is looked up again by name on each
call, so the answer follows ``.to(dtype)`` (which converts parameters in place) and
``load_state_dict(assign=True)`` (which replaces them); if the name no longer resolves (peft
wrapped the layer), the search runs again.

A transformer with diffusers' layerwise casting (``enable_layerwise_casting``: weights stored in
one dtype, computed in another) is answered by ``ModelMixin.dtype`` itself, on every call.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["transformer_dtype"]

_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> parameter name, or None
_UNKNOWN = object()


def _dtype_source(module: torch.nn.Module) -> str | None:
    """The name of the parameter that gives ``module.dtype``, or ``None`` when only ``module.dtype`` can tell."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            return None  # compute dtype != storage dtype
    keep_fp32 = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, param in module.named_parameters():
        if keep_fp32 and any(m in name for m in keep_fp32):
            continue
        if param.is_floating_point():
            return name
    return None


def transformer_dtype(module: torch.nn.Module) -> torch.dtype:
    """``module.dtype`` (diffusers' ``ModelMixin.dtype``) without a walk over the module on every call."""
    for attempt in range(2):
        name = _SOURCES.get(module, _UNKNOWN) if attempt == 0 else _UNKNOWN
        if name is _UNKNOWN:
            name = _SOURCES[module] = _dtype_source(module)
        if name is None:
            return module.dtype
        try:
            return module.get_parameter(name).dtype
        except AttributeError:  # the module's structure changed (e.g. peft wrapped that layer): look again
            continue
    return module.dtype
