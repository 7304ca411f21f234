"""Fakes of ``torch.cuda`` functions for CPU tests of GPU-only code paths (CUDA graphs, the allocator).

A fake that accepts calls the real function would refuse hides a wrong call in the library, so
each fake is installed behind the real function's signature: :func:`patch_checked`.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["fake_stream_class", "patch_checked"]


def patch_checked(monkeypatch, name: str, fake) -> None:
    """Replace ``torch.cuda.<name>`` with ``fake`` for the test; every call must bind to the real signature.

    Raises (in the call): ``TypeError`` for arguments the real ``torch.cuda.<name>`` does not accept.
    """
    signature = inspect.signature(getattr(torch.cuda, name))

    def call(*args, **kwargs):
        signature.bind(*args, **kwargs)
        return fake(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, name, call)


def fake_stream_class(on_wait=None) -> type:
    """A stand-in class for ``torch.cuda.Stream``: built with what the real constructor accepts.

    The real signature is read here, before a test installs the class as ``torch.cuda.Stream``
    (read later, it would be the fake's own). ``on_wait(stream, other)``, if given, is called by
    ``wait_stream``.
    """
    signature = inspect.signature(torch.cuda.Stream)

    class Stream:
        def __init__(self, device=None, priority=0):
            signature.bind(device, priority=priority)

        def wait_stream(self, other):
            if on_wait is not None:
                on_wait(self, other)

    return Stream
