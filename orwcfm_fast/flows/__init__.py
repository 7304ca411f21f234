"""Model families behind one velocity contract, in torchcfm's convention (t = 0 noise, t = 1 data).

- :mod:`~orwcfm_fast.flows.conventions`: the one mapping of diffusers' time and sign conventions;
- :mod:`~orwcfm_fast.flows.sd3`: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``);
- :mod:`~orwcfm_fast.flows.flux`: Flux (``FluxPipeline``);
- :mod:`~orwcfm_fast.flows.lora`: policy / last policy / reference as one LoRA-adapted transformer;
- :mod:`~orwcfm_fast.flows.tiny`: tiny random-init pipelines for tests, demos and CPU benchmarks.

diffusers, transformers and peft are the ``diffusers`` extra (``pip install .[diffusers]``);
nothing here imports them before a pipeline is used (:func:`flow_for_pipeline`).
"""

from __future__ import annotations

__all__ = ["MissingExtraError", "flow_for_pipeline", "is_pipeline", "require_diffusers"]

_PIPELINE_FLOWS = {
    "StableDiffusion3Pipeline": ("orwcfm_fast.flows.sd3", "SD3Flow"),
    "FluxPipeline": ("orwcfm_fast.flows.flux", "FluxFlow"),
}


class MissingExtraError(ImportError):
    """The text-to-image path needs packages of the ``diffusers`` extra."""


def require_diffusers() -> None:
    """Import diffusers, transformers and peft, or raise :class:`MissingExtraError` naming the extra."""
    missing = []
    for name in ("diffusers", "transformers", "peft"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"text-to-image fine-tuning needs {', '.join(missing)}: install the extra with "
            "`pip install 'orwcfm_fast[diffusers]'` (or `pip install -e '.[diffusers]'` in a checkout)"
        )


def is_pipeline(model) -> bool:
    """Whether ``model`` is a diffusers pipeline this library adapts (checked by class name: no import)."""
    return any(cls.__name__ in _PIPELINE_FLOWS for cls in type(model).__mro__)


def flow_for_pipeline(pipe, **kwargs):
    """The flow adapter of a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (kwargs: :class:`PipelineFlow`'s)."""
    import importlib

    require_diffusers()
    for cls in type(pipe).__mro__:
        if cls.__name__ in _PIPELINE_FLOWS:
            module, name = _PIPELINE_FLOWS[cls.__name__]
            return getattr(importlib.import_module(module), name)(pipe, **kwargs)
    raise TypeError(f"{type(pipe).__name__} is not a supported pipeline; supported: {', '.join(_PIPELINE_FLOWS)}")
