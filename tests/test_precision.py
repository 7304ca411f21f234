"""orwcfm_fast.precision: the native-precision probe, its caching, and where it is used.

The CPU and CUDA decisions are tested on faked devices (the flags, the timing and the
``torch.cuda`` queries are monkeypatched: no GPU is needed or touched); one test runs the real
probe on this machine's CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from orwcfm_fast import precision
from orwcfm_fast.config import ConfigError, validate_config
from orwcfm_fast.precision import PrecisionChoice, native_low_precision, resolve_precision

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
AVX2_FLAGS = {"fpu", "sse2", "avx", "avx2", "fma", "avx512f"}  # avx512f alone is not bf16


@pytest.fixture(autouse=True)
def fresh_probe():
    """Every test probes anew, and no faked answer outlives its test (the trainer's "auto" reads the cache)."""
    native_low_precision.cache_clear()
    yield
    native_low_precision.cache_clear()


def fake_cpu(monkeypatch, flags, slowdown):
    """A CPU with these /proc/cpuinfo flags (None: unreadable) whose bf16 matmul takes ``slowdown`` x fp32."""
    calls = []

    def measure():
        calls.append(1)
        return slowdown

    monkeypatch.setattr(precision, "_cpu_flags", lambda: None if flags is None else set(flags))
    monkeypatch.setattr(precision, "_bf16_slowdown", measure)
    return calls


def fake_cuda(monkeypatch, capability, name, bf16_supported=True):
    calls = []

    def get_capability(index=None):
        calls.append(index)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(precision, "_bf16_slowdown", lambda: pytest.fail("CUDA must not time a CPU matmul"))
    return calls


# ----------------------------------------------------------------------------- CPU


def test_cpu_without_native_bf16_gets_fp32_and_says_why(monkeypatch):
    fake_cpu(monkeypatch, AVX2_FLAGS, 31.7)
    choice = native_low_precision("cpu")
    assert choice.dtype_name == "fp32" and choice.dtype == torch.float32
    assert choice.reason.startswith("fp32: this CPU has no native bf16")
    assert "~32x slower" in choice.reason and "measured" in choice.reason
    assert choice.bf16_slowdown == 31.7


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_cpu_with_native_bf16_gets_bf16(monkeypatch, flag):
    fake_cpu(monkeypatch, AVX2_FLAGS | {flag}, 0.6)
    choice = native_low_precision("cpu")
    assert choice.dtype_name == "bf16" and choice.dtype == torch.bfloat16
    assert choice.reason.startswith("bf16: this CPU runs bf16 natively") and flag in choice.reason


def test_cpu_flag_without_the_speed_gets_fp32(monkeypatch):
    """A native flag is not enough when the measured bf16 matmul is much slower than fp32."""
    fake_cpu(monkeypatch, AVX2_FLAGS | {"avx512_bf16"}, precision.MAX_NATIVE_SLOWDOWN * 2)
    choice = native_low_precision("cpu")
    assert choice.dtype_name == "fp32" and "lists avx512_bf16" in choice.reason


@pytest.mark.parametrize("slowdown, expected", [(0.5, "bf16"), (1.2, "fp32"), (40.0, "fp32")])
def test_cpu_without_readable_flags_is_decided_by_the_measurement(monkeypatch, slowdown, expected):
    fake_cpu(monkeypatch, None, slowdown)
    assert native_low_precision("cpu").dtype_name == expected


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 amx_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU part\t: 0xd40\n")
    monkeypatch.setattr(precision, "_CPUINFO", x86)
    assert precision._cpu_flags() == {"fpu", "sse2", "avx2", "amx_bf16"}
    monkeypatch.setattr(precision, "_CPUINFO", arm)
    assert "bf16" in precision._cpu_flags()
    monkeypatch.setattr(precision, "_CPUINFO", tmp_path / "absent")
    assert precision._cpu_flags() is None


def test_the_real_cpu_probe_agrees_with_this_machines_flags():
    """This machine's own answer: fp32 where /proc/cpuinfo lists no bf16 flag (the probe leaves the threads alone)."""
    threads = torch.get_num_threads()
    choice = native_low_precision("cpu")
    assert torch.get_num_threads() == threads
    assert choice.dtype_name in ("fp32", "bf16") and choice.reason.startswith(choice.dtype_name + ": ")
    assert choice.bf16_slowdown is not None and choice.bf16_slowdown > 0
    flags = precision._cpu_flags()
    if flags is not None and not flags & set(precision.CPU_BF16_FLAGS):
        assert choice.dtype_name == "fp32"


# ----------------------------------------------------------------------------- CUDA (faked)


def test_cuda_sm90_gets_bf16(monkeypatch):
    fake_cuda(monkeypatch, (9, 0), "NVIDIA H200")
    choice = native_low_precision("cuda")
    assert choice == PrecisionChoice("bf16", choice.reason)
    assert "sm_90" in choice.reason and "NVIDIA H200" in choice.reason and "natively" in choice.reason


def test_cuda_before_sm80_gets_fp32_even_where_torch_says_bf16_is_supported(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a V100 (emulated bf16): the capability decides."""
    fake_cuda(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB", bf16_supported=True)
    choice = native_low_precision(torch.device("cuda", 0))
    assert choice.dtype_name == "fp32"
    assert "sm_70" in choice.reason and "no native bf16" in choice.reason


def test_rocm_asks_torch(monkeypatch):
    fake_cuda(monkeypatch, (9, 4), "AMD Instinct MI300X", bf16_supported=True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert native_low_precision("cuda:0").dtype_name == "bf16"
    native_low_precision.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert native_low_precision("cuda:0").dtype_name == "fp32"


def test_other_device_types_get_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "_bf16_slowdown", lambda: pytest.fail("no probe for meta"))
    choice = native_low_precision("meta")
    assert choice.dtype_name == "fp32" and "'meta'" in choice.reason


# ----------------------------------------------------------------------------- caching


def test_the_cpu_probe_runs_once(monkeypatch):
    calls = fake_cpu(monkeypatch, AVX2_FLAGS, 30.0)
    first = native_low_precision("cpu")
    assert native_low_precision(torch.device("cpu")) is first
    assert native_low_precision(None) is first
    assert resolve_precision("auto", "cpu") == "fp32"
    assert len(calls) == 1
    native_low_precision.cache_clear()
    native_low_precision("cpu")
    assert len(calls) == 2


def test_the_cuda_probe_runs_once_per_device(monkeypatch):
    calls = fake_cuda(monkeypatch, (8, 0), "NVIDIA A100")
    for device in ("cuda", "cuda:0", torch.device("cuda", 0), "cuda:0"):
        assert native_low_precision(device).dtype_name == "bf16"
    native_low_precision("cuda:1")
    assert calls == [0, 1]


def test_nothing_is_probed_at_import():
    """Importing the package, the trainer and the benchmark probes nothing (a fresh process)."""
    import subprocess

    code = ("import sys; sys.path.insert(0, %r)\n"
            "import orwcfm_fast, orwcfm_fast.trainer, orwcfm_fast.train_run, throughput\n"
            "from orwcfm_fast import precision\n"
            "assert precision._probe.cache_info().currsize == 0, precision._probe.cache_info()\n" % str(BENCH))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ----------------------------------------------------------------------------- users of the probe


def test_resolve_precision_passes_explicit_values_through(monkeypatch):
    monkeypatch.setattr(precision, "_bf16_slowdown", lambda: pytest.fail("an explicit precision needs no probe"))
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_config_accepts_auto_and_keeps_fp32_as_default():
    assert validate_config({})["precision"] == "fp32"
    assert validate_config({"precision": "auto"})["precision"] == "auto"
    with pytest.raises(ConfigError, match="precision"):
        validate_config({"precision": "fp16"})


@pytest.mark.parametrize("slowdown, flags, expected", [(30.0, AVX2_FLAGS, "fp32"), (0.5, {"amx_bf16"}, "bf16")])
def test_trainer_resolves_auto_with_the_probe(monkeypatch, slowdown, flags, expected):
    from orwcfm_fast import ORWCFMTrainer

    fake_cpu(monkeypatch, flags, slowdown)
    model = torch.nn.Linear(2, 2)
    config = {"reward": lambda x: -x.pow(2).sum(1), "batch_size": 4, "ode_steps": 2, "sample_shape": (2,),
              "seed": 0, "warmup_steps": 0, "use_wandb": False, "savedir": "unused", "precision": "auto"}

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, t, x):
            return self.lin(x)

    trainer = ORWCFMTrainer(Velocity(), config, "cpu")
    assert trainer.config["precision"] == expected
    autocast = trainer._autocast()
    assert isinstance(autocast, torch.autocast) == (expected == "bf16")


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput as module

    yield module
    sys.modules.pop("throughput", None)


@pytest.mark.parametrize("native", ["fp32", "bf16"])
def test_throughput_recommended_modes_use_the_native_precision(throughput, native):
    configs = throughput.mode_configs(native, 100, "midpoint", 13)
    assert configs["fast_recommended"] == {"precision": native, "ode_solver": "midpoint", "ode_steps": 13}
    assert configs["fast_overlapped"]["precision"] == native and configs["fast_overlapped"]["overlap_sampling"]
    assert configs["fast_fp32"]["precision"] == "fp32" and configs["fast_bf16"]["precision"] == "bf16"


def test_throughput_skips_fast_bf16_by_default_only_without_native_bf16(throughput):
    modes, skipped = throughput.select_modes(None, "fp32")
    assert "fast_bf16" not in modes and "native bf16" in skipped["fast_bf16"]
    assert {"reference", "fast_fp32", "fast_recommended", "fast_overlapped"} <= set(modes)
    assert throughput.select_modes(None, "bf16") == (list(throughput.DEFAULT_MODES), {})
    assert throughput.select_modes("reference,fast_bf16", "fp32") == (["reference", "fast_bf16"], {})
