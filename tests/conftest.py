"""Test-session setup shared by every test module.

``TRITON_INTERPRET=1`` (set here unless the environment already sets it) makes Triton kernels
run in Triton's numpy interpreter, so the Triton backend's tests run on CPU tensors on machines
without a GPU. Triton reads the variable when ``@triton.jit`` decorates a kernel, and
``orwcfm_fast.ops.triton`` defines its kernels at the first op call, so setting it here, before
any test module is imported, is early enough.

On a GPU machine run the suite with the kernels compiled instead, so the CUDA tests
(``-m cuda``) run and the interpreter-only CPU tests skip themselves::

    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q tests/test_ops_triton.py

(Left at 1, every Triton kernel of the process is interpreted, including the ones Inductor
generates when it compiles CUDA code.)
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``).

    Small CPU tensors run fastest on one thread, and on a busy 2-core machine several threads
    contend (a tiny forward can go from milliseconds to seconds).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """A folder of tiny random-init pipelines written once per session by ``save_pretrained``: ``sd3``, ``sd35``
    (SD3.5-style) and ``flux``, for tests of the real loading path (``from_pretrained``, offline).

    ``HF_HUB_OFFLINE=1`` is set from the first use to the end of the session. Skips without the diffusers extra.
    """
    pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
    from orwcfm_fast.flows.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("tiny_pipelines")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_sd3_pipeline(sd35=True).save_pretrained(root / "sd35")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(saved, tmp_path_factory):
    """``tiny_dir(name) -> Path``: the folder of tiny pipeline ``name`` (``orwcfm_fast.flows.tiny.TINY_PIPELINES``),
    written by ``save_pretrained`` at its first use in the session and shared from then on (``HF_HUB_OFFLINE=1``
    as for :func:`saved`, whose three pipelines it returns as they are)."""
    from orwcfm_fast.flows.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_families")
    built = {}

    def get(name: str):
        if (saved / name).is_dir():
            return saved / name
        if name not in built:
            build_tiny_pipeline(name).save_pretrained(root / name)
            built[name] = root / name
        return built[name]

    return get


@pytest.fixture
def exported_trainers(monkeypatch):
    """The ``ORWCFMTrainer`` objects whose ``save_lora`` runs during the test, in call order.

    For tests of commands that build their trainer inside (the CLI, the demos): the export is observed, not
    changed (the real ``save_lora`` runs), so the test can compare the exported file with that trainer's policy.
    """
    from orwcfm_fast import ORWCFMTrainer

    trainers = []
    real_save_lora = ORWCFMTrainer.save_lora

    def save_lora(self, path):
        trainers.append(self)
        return real_save_lora(self, path)

    monkeypatch.setattr(ORWCFMTrainer, "save_lora", save_lora)
    return trainers
