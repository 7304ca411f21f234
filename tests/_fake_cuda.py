"""Fakes of ``torch.cuda`` functions for CPU tests of GPU-only code paths (CUDA graphs, the allocator).

A fake that accepts calls the real function would refuse hides a wrong call in the library, so
each fake is installed behind the real function's signature: :func:`patch_checked`.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["patch_checked"]


def patch_checked(monkeypatch, name: str, fake) -> None:
    """Replace ``torch.cuda.<name>`` with ``fake`` for the test; every call must bind to the real signature.

    Raises (in the call): ``TypeError`` for arguments the real ``torch.cuda.<name>`` does not accept.
    """
    signature = inspect.signature(getattr(torch.cuda, name))

    def call(*args, **kwargs):
        signature.bind(*args, **kwargs)
        return fake(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, name, call)
