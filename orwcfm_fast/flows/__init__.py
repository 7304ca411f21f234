"""Model families behind one velocity contract, in torchcfm's convention (t = 0 noise, t = 1 data).

- :mod:`~orwcfm_fast.flows.conventions`: the one mapping of diffusers' time and sign conventions;
- one file per model family, each a :class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow` registered in
  :data:`PIPELINE_FLOWS` by its pipeline's class name (nothing else in the library names a family):
  :mod:`~orwcfm_fast.flows.sd3` (SD3 / SD3.5), :mod:`~orwcfm_fast.flows.flux` (FLUX.1),
  :mod:`~orwcfm_fast.flows.qwen_image` (Qwen-Image), :mod:`~orwcfm_fast.flows.flux2` (FLUX.2, FLUX.2-klein),
  :mod:`~orwcfm_fast.flows.z_image` (Z-Image), :mod:`~orwcfm_fast.flows.wan` (Wan 2.1 / 2.2 text-to-video);
- :mod:`~orwcfm_fast.flows.lora`: policy / last policy / reference as one LoRA-adapted transformer;
- :mod:`~orwcfm_fast.flows.tiny`: tiny random-init pipelines for tests, demos and CPU benchmarks.

diffusers, transformers and peft are the ``diffusers`` extra (``pip install .[diffusers]``);
nothing here imports them before a pipeline is used (:func:`flow_for_pipeline`).
"""

from __future__ import annotations

__all__ = ["PIPELINE_FLOWS", "MissingExtraError", "flow_for_pipeline", "is_pipeline", "require_diffusers"]

#: diffusers pipeline class name -> (module, flow class) of its family; a new family adds one line here
PIPELINE_FLOWS: dict[str, tuple[str, str]] = {
    "StableDiffusion3Pipeline": ("orwcfm_fast.flows.sd3", "SD3Flow"),
    "FluxPipeline": ("orwcfm_fast.flows.flux", "FluxFlow"),
    "QwenImagePipeline": ("orwcfm_fast.flows.qwen_image", "QwenImageFlow"),
    "Flux2Pipeline": ("orwcfm_fast.flows.flux2", "Flux2Flow"),
    "Flux2KleinPipeline": ("orwcfm_fast.flows.flux2", "Flux2Flow"),
    "ZImagePipeline": ("orwcfm_fast.flows.z_image", "ZImageFlow"),
    "WanPipeline": ("orwcfm_fast.flows.wan", "WanFlow"),
}
_PIPELINE_FLOWS = PIPELINE_FLOWS


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
    """The flow adapter of a pipeline of a registered family (:data:`PIPELINE_FLOWS`; kwargs: :class:`PipelineFlow`'s)."""
    import importlib

    require_diffusers()
    for cls in type(pipe).__mro__:
        if cls.__name__ in _PIPELINE_FLOWS:
            module, name = _PIPELINE_FLOWS[cls.__name__]
            return getattr(importlib.import_module(module), name)(pipe, **kwargs)
    raise TypeError(f"{type(pipe).__name__} is not a supported pipeline; supported: {', '.join(_PIPELINE_FLOWS)}")
