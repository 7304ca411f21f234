"""Ready-made tasks for demos and tests (8x8 digits).

Submodules are imported lazily: ``import orwcfm_fast.tasks`` does no work.

- :mod:`orwcfm_fast.tasks.digits` the 8x8 digits UNet, its pretraining, and a reward classifier
- :mod:`orwcfm_fast.tasks.plots`  sample grids and metric curves as PNG files
- :mod:`orwcfm_fast.tasks.demo`   the offline end-to-end fine-tuning demo (:func:`run_demo`)
- :mod:`orwcfm_fast.tasks.gaussians` the 2-D eight-Gaussians task (import it directly)
"""

__all__ = [
    "DigitsClassifier",
    "load_or_pretrain_digits_unet",
    "load_or_train_digits_classifier",
    "make_digits_unet",
    "pretrain_cfm",
    "run_demo",
    "save_curves",
    "save_sample_grid",
    "train_classifier",
]

_SOURCES = {
    "DigitsClassifier": "orwcfm_fast.tasks.digits",
    "load_or_pretrain_digits_unet": "orwcfm_fast.tasks.digits",
    "load_or_train_digits_classifier": "orwcfm_fast.tasks.digits",
    "make_digits_unet": "orwcfm_fast.tasks.digits",
    "pretrain_cfm": "orwcfm_fast.tasks.digits",
    "train_classifier": "orwcfm_fast.tasks.digits",
    "run_demo": "orwcfm_fast.tasks.demo",
    "save_curves": "orwcfm_fast.tasks.plots",
    "save_sample_grid": "orwcfm_fast.tasks.plots",
}


def __getattr__(name):
    if name in _SOURCES:
        import importlib

        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module 'orwcfm_fast.tasks' has no attribute {name!r}")
