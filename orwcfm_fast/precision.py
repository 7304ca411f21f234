"""Which low precision a device runs natively: the one automatic precision choice of the library.

bf16 pays only where the hardware computes in it. On a GPU of compute capability 8.0 or more
(A100, H100, H200, RTX 30xx and later) bf16 matmuls run on the tensor cores; on an older one
they are emulated. On a CPU, bf16 is native with AVX512-BF16 or AMX-BF16 (Cooper Lake, Sapphire
Rapids, Zen 4 and later) or the Arm BF16 extension; elsewhere (AVX2 only, e.g. an AMD EPYC
before Zen 4) PyTorch converts each bf16 operand and computes in a slow path: measured 30-45x
slower than fp32 on such a 2-core machine. So ``precision: "bf16"`` / ``autocast(bfloat16)``
is a speed-up on the first kind of device and a large slow-down on the second.

:func:`native_low_precision` answers once per device and caches the answer:

- CUDA: ``bf16`` when the device's compute capability is at least 8.0 (ROCm: when
  ``torch.cuda.is_bf16_supported()``), else ``fp32``. ``torch.cuda.is_bf16_supported()``
  itself is not used on NVIDIA: it also says True where bf16 is only emulated. fp16 is never
  chosen: the trainer's ``precision`` key offers ``fp32`` and ``bf16``
  (:data:`orwcfm_fast.config.PRECISIONS`).
- CPU: the flags of ``/proc/cpuinfo`` where the file exists (``avx512_bf16`` / ``amx_bf16``;
  Arm: ``bf16``) and a timed 256 x 256 matmul in bf16 against fp32 on one thread (a few ms
  where bf16 is native, ~0.1 s where it is not; the thread count is restored afterwards).
  bf16 is chosen when the flags say native and the measurement agrees (bf16 at most
  :data:`MAX_NATIVE_SLOWDOWN` times the fp32 time); without readable flags, when the measured
  bf16 matmul is faster than fp32.
- Other device types: ``fp32`` (no probe; the reference's math).

The returned :class:`PrecisionChoice` says why, e.g. ``"bf16: CUDA sm_90 (NVIDIA H200) runs
bf16 natively (compute capability >= 8.0)"`` or ``"fp32: this CPU has no native bf16 (AVX2; no
avx512_bf16 / amx_bf16 / bf16 flag in /proc/cpuinfo): bf16 would run ~38x slower than fp32 (measured)"``. Nothing runs at import.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PrecisionChoice", "native_low_precision", "resolve_precision", "MAX_NATIVE_SLOWDOWN", "CPU_BF16_FLAGS"]

#: A CPU that lists a native-bf16 flag still gets fp32 when its bf16 matmul measures slower than this times fp32.
MAX_NATIVE_SLOWDOWN = 1.5
#: ``/proc/cpuinfo`` flags that mean the CPU computes bf16 natively (x86: AVX512-BF16, AMX-BF16; Arm: BF16).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_PROBE_SIZE = 256
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a device runs natively, and why.

    Attributes:
        dtype_name: ``"bf16"`` or ``"fp32"`` (values of the trainer's ``precision`` key).
        reason: one line: what was chosen, on what evidence.
        bf16_slowdown: measured time of a bf16 matmul over the fp32 one (CPU only; None elsewhere).
    """

    dtype_name: str
    reason: str
    bf16_slowdown: float | None = None

    @property
    def dtype(self) -> torch.dtype:
        """``torch.bfloat16`` or ``torch.float32``."""
        return torch.bfloat16 if self.dtype_name == "bf16" else torch.float32


def native_low_precision(device: torch.device | str | None = None) -> PrecisionChoice:
    """The cheapest precision ``device`` runs natively: ``bf16`` where it is native, else ``fp32``.

    Probed once per device (type and index) per process; later calls return the cached answer
    (``native_low_precision.cache_clear()`` forgets it).

    Args:
        device: a torch device or its name; None = ``"cpu"``.

    Returns:
        PrecisionChoice: ``dtype_name`` in ``("bf16", "fp32")`` and the reason.
    """
    device = torch.device("cpu" if device is None else device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _probe(device.type, index)


def resolve_precision(value: str, device: torch.device | str | None = None) -> str:
    """A ``precision`` value with ``"auto"`` resolved by :func:`native_low_precision` (others are returned as is)."""
    return native_low_precision(device).dtype_name if value == "auto" else value


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index: int | None) -> PrecisionChoice:
    if device_type == "cuda":
        return _cuda_choice(index)
    if device_type == "cpu":
        return _cpu_choice()
    return PrecisionChoice("fp32", f"fp32: no bf16 probe for device type {device_type!r} (the reference's math)")


native_low_precision.cache_clear = _probe.cache_clear  # type: ignore[attr-defined]


def _cuda_choice(index: int | None) -> PrecisionChoice:
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if getattr(torch.version, "hip", None):  # ROCm: the capability numbers are not NVIDIA's
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"bf16: ROCm device ({name}) runs bf16 natively")
        return PrecisionChoice("fp32", f"fp32: ROCm device ({name}) reports no bf16 support")
    arch = f"CUDA sm_{major}{minor} ({name})"
    if (major, minor) >= (8, 0):
        return PrecisionChoice("bf16", f"bf16: {arch} runs bf16 natively (compute capability >= 8.0)")
    return PrecisionChoice("fp32", f"fp32: {arch} has no native bf16 (needs compute capability >= 8.0; emulated "
                                   "bf16 is slower than fp32, and fp16 is not a trainer precision)")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``), or None where unreadable."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _bf16_slowdown(n: int = _PROBE_SIZE, reps: int = 3) -> float:
    """Best-of-``reps`` time of an ``n x n`` bf16 matmul over the fp32 one, on one thread.

    One thread: on a shared machine a multi-thread team's scheduling noise (~10 ms) would swamp
    a matmul this small. The caller's thread count is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            torch.mm(x, y)  # warm-up: kernel selection, oneDNN primitive creation
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(x, y)
                best = min(best, time.perf_counter() - t0)
            times[dtype] = max(best, 1e-9)
        return times[torch.bfloat16] / times[torch.float32]
    finally:
        torch.set_num_threads(threads)


def _cpu_choice() -> PrecisionChoice:
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX2", "AVX512", "DEFAULT"
    flags = _cpu_flags()
    slowdown = _bf16_slowdown()
    measured = (f"bf16 would run ~{slowdown:.0f}x slower than fp32 (measured)" if slowdown >= 2 else
                f"a bf16 matmul takes {slowdown:.2f}x the fp32 time (measured)")
    if flags is None:  # no /proc/cpuinfo (macOS, Windows): the measurement decides
        if slowdown < 1.0:
            return PrecisionChoice("bf16", f"bf16: this CPU ({capability}) runs bf16 faster than fp32: {measured}",
                                   slowdown)
        return PrecisionChoice("fp32", f"fp32: this CPU ({capability}; CPU flags unreadable) shows no native bf16: "
                                       f"{measured}", slowdown)
    native = sorted(flags.intersection(CPU_BF16_FLAGS))
    if not native:
        return PrecisionChoice("fp32", f"fp32: this CPU has no native bf16 ({capability}; no "
                                       f"{' / '.join(CPU_BF16_FLAGS)} flag in /proc/cpuinfo): {measured}", slowdown)
    if slowdown > MAX_NATIVE_SLOWDOWN:
        return PrecisionChoice("fp32", f"fp32: this CPU lists {', '.join(native)} but {measured}", slowdown)
    return PrecisionChoice("bf16", f"bf16: this CPU runs bf16 natively ({capability}, {', '.join(native)}): "
                                   f"{measured}", slowdown)
