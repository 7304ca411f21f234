"""orwcfm_fast: online reward-weighted fine-tuning of flow matching with W2 regularisation.

The public entry point is :class:`ORWCFMTrainer`, a drop-in for the published
ORW-CFM-W2 trainer (Fan et al., ICLR 2025). Submodules:

- :mod:`orwcfm_fast.sampling`  fixed-step ODE solvers for ``model(t, x)``
- :mod:`orwcfm_fast.rewards`   CLIP, JPEG compressibility, classifier, callables, sums
- :mod:`orwcfm_fast.coupling`  how noise x_0 is paired with samples x_1
- :mod:`orwcfm_fast.weighting` rewards -> loss weights
- :mod:`orwcfm_fast.ops`       the fused loss, path and ODE-step ops (torch, C++/CUDA, Triton)
- :mod:`orwcfm_fast.distributed` torchrun environment -> process group (the trainer is then data-parallel)

Importing the package does no work: heavy pieces (the trainer, open_clip) load on first use.
"""

__version__ = "0.1.0"

__all__ = ["ORWCFMTrainer", "TrainingInterrupted", "__version__"]


def __getattr__(name):
    # Lazy so that `import orwcfm_fast.sampling` does not import the trainer's dependencies.
    if name == "ORWCFMTrainer":
        from orwcfm_fast.trainer import ORWCFMTrainer

        return ORWCFMTrainer
    if name == "TrainingInterrupted":
        from orwcfm_fast.interrupt import TrainingInterrupted

        return TrainingInterrupted
    raise AttributeError(f"module 'orwcfm_fast' has no attribute {name!r}")
