"""Pieces shared by the Triton kernels: launch policy, tile sizes, exact scalars, output rounding.

Importing this module imports :mod:`triton` and defines ``@triton.jit`` helpers, so only the
kernel modules import it, and :mod:`orwcfm_fast.ops.triton` imports those at first use: whether
``@triton.jit`` builds a GPU ``JITFunction`` or an ``InterpretedFunction`` is decided by
``TRITON_INTERPRET`` *when the decorator runs*, and deferring it to first use lets a test
configuration set the variable first.

Policy implemented here:

- **Launching.** Each op body launches through ``wrap_triton`` so that ``torch.compile`` sees the
  kernels (a ``triton_kernel_wrapper`` node in the graph that Inductor can inline). Under the
  interpreter ``wrap_triton`` hands back the plain interpreted kernel, which cannot run on fake
  tensors; there :func:`should_launch` skips the launch during fake-tensor propagation (only the
  outputs' metadata matters) and :func:`keep_opaque_if_interpreted` keeps the op opaque in
  ``torch.compile`` graphs instead of decomposing it into its body.
- **Scalars.** Triton passes Python floats as float32 (the interpreter ignores ``tl.float64``
  annotations), so float64 scalars travel as the int64 bit pattern of the double
  (:func:`float_bits`, decoded by :func:`bits_to_float`): exact in every mode.
- **Rounding.** The interpreter converts float32 to bfloat16 by truncation; :func:`round_to`
  rounds to nearest even by hand so results are identical on the GPU and in the interpreter.
- **Device.** Triton launches on the *current* CUDA device and its current stream, not on the
  device of the tensors it is given; every launch runs inside :func:`device_guard` of its
  tensors, as flash-attention's Triton ops do (``with torch.cuda.device(x.device.index)``).
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "MAX_TILE",
    "bits_to_float",
    "check_runnable",
    "device_guard",
    "elementwise_block",
    "float_bits",
    "is_interpreted",
    "keep_opaque_if_interpreted",
    "require_mode",
    "round_to",
    "row_tile",
    "should_launch",
]

MAX_TILE = 2048
"""Elements a program holds per tensor at once: 8 per thread at 8 warps. (4096, 16 per thread,
needs about twice the registers on sm_90, e.g. 124 vs 48 for the four-stage ODE step.)"""


# --------------------------------------------------------------------------------------------
# Device-side helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def bits_to_float(bits):
    """The float64 whose IEEE-754 bit pattern is the integer ``bits`` (int32 or int64 scalar)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` (float32 or float64 block) rounded to nearest even in ``dtype``.

    float32 -> bfloat16 is done on the bits: the Triton interpreter truncates instead of rounding,
    and the integer recipe (add ``0x7FFF`` plus the kept lsb, shift) gives the hardware's result
    everywhere, NaN kept NaN and overflow going to infinity.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (runs in numpy on the host)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


INTERPRETED: bool = is_interpreted(round_to)
"""Whether this process's Triton kernels are interpreted, fixed when this module was imported."""


def require_mode(*kernels) -> None:
    """Raise if ``kernels`` were defined in another mode than :data:`INTERPRETED` (the variable changed)."""
    for kernel in kernels:
        if is_interpreted(kernel) != INTERPRETED:
            raise RuntimeError(
                "TRITON_INTERPRET changed after the first orwcfm_fast Triton kernels were defined "
                f"(interpreted: {INTERPRETED}); set it once, before the first Triton op call of the process"
            )


def float_bits(value: float) -> int:
    """The IEEE-754 float64 bit pattern of ``value`` as a signed int64 (see :func:`bits_to_float`)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def row_tile(d: int) -> tuple[int, int, int]:
    """``(rows, block_d, num_warps)`` for kernels that tile ``[B, D]`` as ``[rows, block_d]`` blocks.

    ``block_d`` is the next power of two of ``D`` capped at :data:`MAX_TILE` (longer rows loop or
    take several programs); small rows are stacked so a block holds about ``MAX_TILE`` elements
    (B = 512, D = 2 is one program). Depends on ``D`` only, so ``torch.compile`` guards on the
    sample shape and not on the batch size.
    """
    d = int(d)
    block_d = min(triton.next_power_of_2(max(d, 1)), MAX_TILE)
    rows = max(MAX_TILE // block_d, 1)
    return rows, block_d, _num_warps(rows * block_d)


def elementwise_block(n: int) -> tuple[int, int]:
    """``(block, num_warps)`` for flat elementwise kernels over ``n`` elements."""
    block = min(triton.next_power_of_2(max(int(n), 16)), MAX_TILE)
    return block, _num_warps(block)


def _num_warps(tile: int) -> int:
    # 8 elements per thread: 2048 -> 8 warps, 1024 -> 4, <= 256 -> 1 (fewer for smaller tiles).
    return max(1, min(8, tile // 256))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def check_runnable(op_name: str, kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error when ``kernel`` cannot run on the tensors' device.

    Compiled kernels need CUDA tensors; the interpreter takes any device it can copy from.
    """
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise RuntimeError(
                f"{op_name}: the Triton kernels were compiled for the GPU but got a tensor on {t.device}. "
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before the first Triton op "
                "call of the process (the kernels are defined then), or use another backend."
            )


def device_guard(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is the current one (a no-op for other devices).

    Triton compiles for, and launches on, the current device and its current stream: tensors on
    ``cuda:1`` launched while device 0 is current would run on device 0 (reading memory of another
    device, or failing). The CUDA extension's ops guard the device in C++; the Triton launchers
    wrap each launch in this. Entering it when the device is already current costs a device
    query. CPU tensors (the interpreter) need no guard, and a CPU-only torch has no CUDA device
    to select.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def should_launch(kernel, *tensors: torch.Tensor) -> bool:
    """False only for an interpreted kernel during fake-tensor propagation, which must not launch.

    Compiled kernels always "launch": during tracing ``wrap_triton`` records the launch instead.
    """
    return not (is_interpreted(kernel) and any(_is_fake(t) for t in tensors))


def keep_opaque_if_interpreted(op, *kernels) -> None:
    """Under the interpreter, keep ``op`` as one opaque node in ``torch.compile`` graphs.

    ``triton_op`` decomposes its op into the body when AOTAutograd functionalizes, which needs
    traceable kernels; interpreted ones are not (``wrap_triton`` returns them unwrapped), so the op
    stays a call that runs its body on real tensors at run time. This is what ``triton_op`` itself
    does under ``torch.export``.
    """
    if not any(is_interpreted(k) for k in kernels):
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, _opaque)
