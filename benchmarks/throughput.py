"""Throughput of one ORW-CFM-W2 training step: a reference-style baseline and orwcfm_fast, side by side.

In one process, on the same model, config and device:

- ``reference``: the published algorithm written out as the published trainer runs it: eager
  fp32, a deep copy of the policy per sampling call, a torchdyn-style fixed-step Euler solve that
  keeps the whole trajectory, torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` (POT exact
  OT on the CPU), the reference model's forward with autograd on (then detached), Adam,
  ``clip_grad_norm_``, the CLIP reward;
- ``fast_fp32``: ``ORWCFMTrainer`` with the same math (Euler, same steps, exact OT, fp32);
- ``fast_bf16``: the same with ``precision: "bf16"``: an explicit comparison, run by default only
  where the device computes bf16 natively (skipped, with the reason printed, elsewhere; name it in
  ``--modes`` to run it anyway);
- ``fast_recommended``: the precision the device runs natively
  (:func:`orwcfm_fast.precision.native_low_precision`: bf16 on CUDA sm_80+ and on CPUs with
  AVX512-BF16 / AMX; fp32 elsewhere, e.g. an AVX2-only CPU, where bf16 runs ~30x slower) with the
  recommended solver of ``benchmarks/solver_accuracy.py`` (``--recommended SOLVER:STEPS``, default
  ``midpoint:13``: 26 NFE, as accurate as Euler-100 on the digits model).
- ``fast_overlapped``: ``fast_recommended`` run through ``ORWCFMTrainer.train`` with
  ``overlap_sampling: True``: the next batch is sampled, rewarded and coupled in a background
  thread (its own CUDA stream) while this step updates, and metrics stay on the device. Its
  phases overlap, so only its total time per step is reported (the first step of an epoch has
  nothing to overlap with; the timed epoch is ``--steps`` long).

Per mode it reports seconds per step split into phases (sample, reward, update), samples/s,
achieved TFLOP/s of the sampling phase against a matmul peak measured here, peak memory, and
the speedup over the baseline. ``--json PATH`` writes all of it, with ``device``, ``config``,
``reference_s_per_step``, ``fast_s_per_step`` (the identical-math ``fast_fp32`` mode),
``speedup``, ``best_speedup`` (the fastest mode), ``precision`` (the native choice: ``dtype_name``,
``reason``, measured ``bf16_slowdown`` on a CPU) and ``skipped_modes`` (mode -> why).

Default config on a GPU: the paper's (torchcfm CIFAR UNet, 35.7M parameters; batch 128; Euler
100; CLIP ViT-B/32 with random weights: none can be downloaded here, the compute is the same).
``--device cpu --quick``: a tiny UNet and batch 8 (still Euler 100), a few minutes on 2 cores.
Run: ``python benchmarks/throughput.py [--device cpu --quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import provenance, write_results  # noqa: E402

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.precision import native_low_precision  # noqa: E402
from orwcfm_fast.profiling import phase  # noqa: E402
from orwcfm_fast.rewards import CLIPReward  # noqa: E402
from orwcfm_fast.sampling import nfe  # noqa: E402

PROMPTS = ["An image of dog", "Not an image of dog"]
PAPER_UNET = dict(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                  num_head_channels=64, attention_resolutions="16", dropout=0.1)
QUICK_UNET = dict(dim=(3, 32, 32), num_res_blocks=1, num_channels=32, channel_mult=[1, 2], num_heads=2,
                  num_head_channels=16, attention_resolutions="16", dropout=0.1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Accumulates wall time per phase, synchronising the device at phase boundaries."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                _sync(timer.device)
                self.t0 = time.perf_counter()
                self.range = phase(name, timer.device)
                self.range.__enter__()

            def __exit__(self, *exc):
                self.range.__exit__(*exc)
                _sync(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()


# ----------------------------------------------------------------------------- the baseline


class ReferenceStyleTrainer:
    """The published trainer's step, written from its algorithm (for timing, not for use).

    What it does that costs time: ``copy.deepcopy`` of the policy on every sampling call; a
    fixed-step Euler solve in the torchdyn style that returns the whole trajectory; torchcfm's
    exact-OT flow matcher (POT on the CPU, plan sampled with replacement); the reference
    model's forward with autograd on, detached afterwards; per-step ``.item()`` of the metrics.
    """

    def __init__(self, model: torch.nn.Module, reward, config: dict, device: torch.device):
        from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

        self.device = device
        self.net_model = model.to(device)
        self.ref_model = copy.deepcopy(model).eval()
        self.last_policy = copy.deepcopy(model)
        self.reward = reward
        self.config = config
        self.FM = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        self.optimizer = torch.optim.Adam(self.net_model.parameters(), lr=config["learning_rate"])
        warmup = config["warmup_steps"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(s, warmup) / warmup)

    def _trajectory(self, model, x, steps: int) -> torch.Tensor:
        t_span = torch.linspace(0, 1, steps + 1, device=self.device)
        traj = [x]
        for i in range(steps):
            t = t_span[i]
            x = x + (t_span[i + 1] - t) * model(t.expand(x.shape[0]), x)
            traj.append(x)
        return torch.stack(traj)

    def sample(self, n: int) -> torch.Tensor:
        model = copy.deepcopy(self.last_policy).eval()
        with torch.no_grad():
            x0 = torch.randn(n, *self.config["sample_shape"], device=self.device)
            return self._trajectory(model, x0, self.config["ode_steps"])[-1]

    def step(self, timer: _Timer) -> None:
        with timer("sample"):
            x1 = self.sample(self.config["batch_size"])
        with timer("reward"):
            rewards = self.reward(x1)
        with timer("update"):
            weights = torch.exp(self.config["temperature"] * rewards)
            x0 = torch.randn_like(x1)
            t, xt, ut = self.FM.sample_location_and_conditional_flow(x0, x1)
            self.net_model.train()
            vt = self.net_model(t, xt)
            vt_ref = self.ref_model(t, xt).detach()
            fm = ((vt - ut) ** 2).mean(dim=(1, 2, 3))
            w2 = ((vt - vt_ref) ** 2).mean(dim=(1, 2, 3))
            loss = (weights * fm + self.config["w2_coefficient"] * w2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net_model.parameters(), self.config["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            _ = {"loss": loss.item(), "reward": rewards.mean().item(), "max_reward": rewards.max().item()}


# ----------------------------------------------------------------------------- orwcfm_fast


def _fast_step(trainer: ORWCFMTrainer, timer: _Timer) -> None:
    """``training_step`` split at its phase boundaries (the same calls, timed)."""
    with timer("sample"):
        samples = trainer._policy_samples()
    with timer("reward"):
        from orwcfm_fast.rewards import check_rewards

        rewards = check_rewards(trainer.reward_fn(samples), trainer.batch_size, device=trainer.device)
    with timer("update"):
        weights = trainer._weights(rewards)
        trainer.net_model.train(trainer.config["policy_dropout"])
        loss, _ = trainer.compute_loss(samples, weights)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in trainer.net_model.parameters() if p.grad is not None],
                                       trainer.grad_clip)
        trainer.optimizer.step()
        trainer.scheduler.step()


def _measure_train_loop(name: str, trainer: ORWCFMTrainer, device, warmup: int, steps: int, batch: int) -> dict:
    """Seconds per step of ``trainer.train(1, steps)``: the whole loop, phases overlapped (not split)."""
    trainer.train(1, max(warmup, 1) + 1)  # captures graphs, compiles, fills the caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    trainer.train(1, steps)
    _sync(device)
    total = (time.perf_counter() - t0) / steps
    row = {"mode": name, "s_per_step": total, "phases_s": None, "samples_per_s": batch / total,
           "sampling_TFLOPs": None, "sampling_fraction_of_peak": None, **_peak_memory(device)}
    print(f"  {name:>17}: {total:8.3f} s/step  (phases overlapped: train() loop)  {batch / total:8.1f} samples/s",
          flush=True)
    return row


# ----------------------------------------------------------------------------- measurement


def _forward_flops(model: torch.nn.Module, sample_shape, device) -> float:
    """FLOPs of one forward on one sample (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *sample_shape, device=device)
    t = torch.rand(2, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(t, x)
    return counter.get_total_flops() / 2


def _matmul_peak(device: torch.device, cuda_dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """Measured dense matmul FLOP/s (8192^2 in ``cuda_dtype`` on CUDA, fp32 1024^2 on CPU)."""
    if device.type == "cuda":
        n, dtype = 8192, cuda_dtype
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0), f"{dtype} {n}x{n} matmul"


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_GiB": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _measure(name: str, step, device, warmup: int, steps: int, batch: int, sample_nfe: int, fwd_flops: float,
             peak: float) -> dict:
    for _ in range(warmup):
        step(_Timer(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = _Timer(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(timer)
    _sync(device)
    total = (time.perf_counter() - t0) / steps
    phases = {k: v / steps for k, v in timer.totals.items()}
    sample_flops = sample_nfe * batch * fwd_flops
    row = {
        "mode": name,
        "s_per_step": total,
        "phases_s": phases,
        "samples_per_s": batch / total,
        "sampling_TFLOPs": sample_flops / phases["sample"] / 1e12,
        "sampling_fraction_of_peak": sample_flops / phases["sample"] / peak,
        **_peak_memory(device),
    }
    print(f"  {name:>17}: {total:8.3f} s/step  (sample {phases['sample']:.3f}, reward {phases['reward']:.3f}, "
          f"update {phases['update']:.3f})  {batch / total:8.1f} samples/s  sampling {row['sampling_TFLOPs']:.3g} "
          f"TFLOP/s ({100 * row['sampling_fraction_of_peak']:.1f}% of peak)", flush=True)
    return row


DEFAULT_MODES = ("reference", "fast_fp32", "fast_bf16", "fast_recommended", "fast_overlapped")


def mode_configs(precision: str, ode_steps: int, rec_solver: str, rec_steps: int) -> dict[str, dict]:
    """Each fast mode's trainer config on top of the shared one.

    Args:
        precision: the recommended and overlapped modes' precision: what the device runs
            natively (``native_low_precision(device).dtype_name``).
        ode_steps: Euler steps of the identical-math modes (fast_fp32, fast_bf16).
        rec_solver, rec_steps: the recommended solver.
    """
    return {
        "fast_fp32": {"precision": "fp32", "ode_solver": "euler", "ode_steps": ode_steps},
        "fast_bf16": {"precision": "bf16", "ode_solver": "euler", "ode_steps": ode_steps},
        "fast_recommended": {"precision": precision, "ode_solver": rec_solver, "ode_steps": rec_steps},
        "fast_overlapped": {"precision": precision, "ode_solver": rec_solver, "ode_steps": rec_steps,
                            "overlap_sampling": True},
    }


def select_modes(requested: str | None, native_dtype: str) -> tuple[list[str], dict[str, str]]:
    """The modes to run and those skipped (mode -> why).

    ``requested`` None (no ``--modes``): :data:`DEFAULT_MODES`, less ``fast_bf16`` on a device
    without native bf16 (``native_dtype`` not ``"bf16"``). Modes named in ``--modes`` always run.
    """
    if requested is not None:
        return [m for m in requested.split(",") if m], {}
    if native_dtype == "bf16":
        return list(DEFAULT_MODES), {}
    why = ("no native bf16 on this device (see precision.reason): bf16 autocast would be far slower than fp32; "
           "name it in --modes to run it anyway")
    return [m for m in DEFAULT_MODES if m != "fast_bf16"], {"fast_bf16": why}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny UNet, small batch (CPU-sized)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ode-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument("--recommended", default="midpoint:13",
                        help="SOLVER:STEPS of the fast_recommended mode (benchmarks/solver_accuracy.py's pick)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated (default: {','.join(DEFAULT_MODES)}; fast_bf16 only where the device "
                             "runs bf16 natively)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet forwards in the fast modes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from torchcfm.models.unet.unet import UNetModelWrapper

    device = torch.device(args.device)
    unet_kwargs = QUICK_UNET if args.quick else PAPER_UNET
    batch = args.batch_size or (8 if args.quick else 128)
    ode_steps = args.ode_steps or 100  # the paper's Euler-100, also in --quick
    steps = args.steps or (2 if args.quick else 5)
    rec_solver, rec_steps = args.recommended.split(":")
    native = native_low_precision(device)
    modes, skipped = select_modes(args.modes, native.dtype_name)

    torch.manual_seed(0)
    base_model = UNetModelWrapper(**unet_kwargs)
    n_params = sum(p.numel() for p in base_model.parameters())
    reward = CLIPReward(PROMPTS, model_name="ViT-B-32", pretrained=None).to(device)
    fwd_flops = _forward_flops(copy.deepcopy(base_model).to(device), unet_kwargs["dim"], device)
    peak, peak_what = _matmul_peak(device, native.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    config = {"learning_rate": 2e-4, "warmup_steps": 5000, "w2_coefficient": 1.0, "temperature": 0.5,
              "grad_clip": 1.0, "batch_size": batch, "sample_shape": tuple(unet_kwargs["dim"]), "ode_steps": ode_steps}
    print(f"ORW-CFM-W2 step throughput on {device_name}: UNet {n_params / 1e6:.2f}M parameters, "
          f"{fwd_flops / 1e9:.2f} GFLOP/sample/forward, batch {batch}, Euler {ode_steps}; "
          f"peak {peak / 1e12:.3g} TFLOP/s ({peak_what})", flush=True)
    print(f"precision of fast_recommended / fast_overlapped: {native.reason}", flush=True)
    for name, why in skipped.items():
        print(f"  skipping {name}: {why}", flush=True)

    rows = {}
    if "reference" in modes:
        ref = ReferenceStyleTrainer(copy.deepcopy(base_model), reward, config, device)
        rows["reference"] = _measure("reference", ref.step, device, args.warmup, steps, batch, ode_steps, fwd_flops, peak)
        del ref
    fast_modes = mode_configs(native.dtype_name, ode_steps, rec_solver, int(rec_steps))
    for name, extra in fast_modes.items():
        if name not in modes:
            continue
        cfg = {**{k: v for k, v in config.items() if k != "ode_steps"}, "reward": reward, "coupling": "exact_ot",
               "clip_pretrained": None, "seed": 0, "savedir": "/tmp/orwcfm_throughput", "compile": args.compile,
               **extra}
        trainer = ORWCFMTrainer(copy.deepcopy(base_model), cfg, device)
        sample_nfe = nfe(extra["ode_solver"], extra["ode_steps"])
        if extra.get("overlap_sampling"):
            rows[name] = _measure_train_loop(name, trainer, device, args.warmup, steps, batch)
        else:
            rows[name] = _measure(name, lambda timer, tr=trainer: _fast_step(tr, timer), device, args.warmup, steps,
                                  batch, sample_nfe, fwd_flops, peak)
        rows[name]["config"] = extra
        del trainer

    result = {
        **provenance(device_name),
        "config": {**config, "unet": unet_kwargs, "unet_parameters": n_params, "forward_GFLOP_per_sample": fwd_flops / 1e9,
                   "reward": "CLIP ViT-B-32 (random weights)", "quick": args.quick, "compile": args.compile,
                   "timed_steps": steps, "warmup_steps_untimed": args.warmup},
        "matmul_peak_TFLOPs": peak / 1e12,
        "matmul_peak_measured_with": peak_what,
        "precision": {"dtype_name": native.dtype_name, "reason": native.reason,
                      "bf16_slowdown": native.bf16_slowdown, "used_by": ["fast_recommended", "fast_overlapped"]},
        "skipped_modes": skipped,
        "modes": rows,
    }
    if "reference" in rows and "fast_fp32" in rows:
        result["reference_s_per_step"] = rows["reference"]["s_per_step"]
        result["fast_s_per_step"] = rows["fast_fp32"]["s_per_step"]
        result["speedup"] = result["reference_s_per_step"] / result["fast_s_per_step"]
        best = min((r for k, r in rows.items() if k != "reference"), key=lambda r: r["s_per_step"])
        result["best_mode"] = best["mode"]
        result["best_speedup"] = result["reference_s_per_step"] / best["s_per_step"]
        print(f"speedup over the reference-style baseline: {result['speedup']:.2f}x at identical math (fast_fp32), "
              f"{result['best_speedup']:.2f}x with {best['mode']}")
    path = args.json or ROOT / "benchmarks" / "results" / f"throughput_{device.type}{'_quick' if args.quick else ''}.json"
    write_results(result, path, rows)
    return result


if __name__ == "__main__":
    main()
