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

os.environ.setdefault("TRITON_INTERPRET", "1")
