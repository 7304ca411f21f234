"""Text-to-image throughput of one ORW-CFM-W2 LoRA step: a peers'-style baseline and orwcfm_fast, side by side.

In one process, on the same architecture, random weights (same seed), config and device:

- ``baseline``, written the way the peers' text-to-image fine-tuning scripts are (Flow-GRPO,
  diffusers' LoRA training scripts): sampling is a ``pipe(...)`` call per batch
  (``num_inference_steps``, ``guidance_scale``, ``output_type="latent"``, ``latents=noise``: the
  pipeline's own Euler loop on its scheduler's grid, CFG as one batch of 2B); the reference is a
  ``copy.deepcopy`` of the transformer taken before the LoRA is added (a second transformer in
  memory); the policy is a peft LoRA on the pipeline's transformer (``add_adapter``, trainable
  weights cast to fp32 as diffusers' ``cast_training_params`` does); the reward is computed on
  ``vae.decode`` images post-processed by the pipeline's image processor; the loss, weighted flow
  matching plus ``alpha`` times the W2 term, is written out in plain torch; Adam on the LoRA
  parameters, ``clip_grad_norm_``, the step's metrics read with ``.item()``; eager.
- ``orwcfm_fast``: ``ORWCFMTrainer(pipe, config, device)`` with the same LoRA rank, alpha and
  target modules, steps, guidance, batch, resolution and reward (one transformer: the policy and
  the sampling policy are two adapters, the reference is the adapters switched off; on CUDA the
  sampling loop replays from a CUDA graph and Adam is fused).

Identical math: both sample with Euler on the scheduler's grid (``ode_steps`` transformer calls of
2B rows with CFG) and train with one policy forward with gradients and one reference forward of B
rows, loss times ``t ~ U(0, 1)``, weights ``exp(temperature * reward)``, Adam with the same
learning rate and clipping. ``identical_math`` in the output holds the evidence the run itself
gathers: the largest difference between the trainer's sampler and the ``pipe(...)`` call from the
same noise and embeddings (before any update, when both adapters are zero), and, on the CPU, the
transformer forwards counted by hooks in one step of each mode. On a bf16 pipeline the two differ
by rounding: the pipeline keeps its latents in the embeddings' dtype (bf16) between steps and
passes the timestep in fp32; the library keeps the ODE state in fp32 and casts the timestep to
the transformer's dtype.

Per mode: seconds per step split into phases ``sample`` (prompt-embedding lookup, noise, the ODE
solve), ``decode`` (VAE), ``reward`` (the reward, weights, and for orwcfm_fast its reward checks
and the coupling) and ``update`` (loss, backward, clipping, Adam); images/s; memory. For
orwcfm_fast the phases are the trainer's own calls: ``trainer._draw_batch_inputs()``,
``trainer._sampler(noise, *cond)``, ``trainer.models.reward_inputs(samples)``, the reward and
weights, the coupling, then ``trainer._train_step(batch)`` (what ``trainer._make_batch`` and
``train()`` run, split at their phase boundaries).

Memory, and what is measured:

- ``model_memory_GiB`` (both devices): bytes of the distinct parameter, buffer and optimiser-state
  tensors the mode holds on the benchmark's device (transformer(s), VAE, text encoders where they
  sit on that device, Adam moments). Activations are not in it.
- ``peak_gpu_memory_GiB`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the timed steps,
  the statistics reset after each mode's warm-up, with the previous mode's objects freed first:
  models plus activations (and the CUDA graph's pool), the figure the 0.6x goal is about;
  ``gpu_memory_allocated_before_mode_GiB`` shows what, if anything, an earlier mode left allocated.
- ``process_peak_rss_GiB`` (CPU only): the process's ``ru_maxrss`` when the mode finished. It only
  grows during a process, so it is not a per-mode figure; ``model_memory_GiB`` is the CPU's
  per-mode comparison.

Configurations:

- GPU (``--device cuda``, the default when one is available): the real SD3.5-medium architecture
  built from its config with random weights, no download needed (the compute is the same):
  ``SD3Transformer2DModel`` (24 layers, 24 heads of 64, dual attention in layers 0-12, RMS q/k
  norm, 2.24 B parameters) and the SD3 VAE's config (``AutoencoderKL`` with channels 128, 256,
  512, 512, 16 latent channels, shift 0.0609, scale 1.5035), in the precision the device runs
  natively (:func:`orwcfm_fast.precision.native_low_precision`: bf16 from compute capability 8.0,
  fp32 below; ``--dtype`` overrides; the JSON's ``config.dtype_reason`` says why); the scheduler with shift 3;
  512 px, ``ode_steps`` 10, CFG 4.5, batch 8, LoRA rank 32 / alpha 64 (Flow-GRPO's).
  Text encoders: not the released CLIP-L, CLIP-G and the 4.7 B-parameter T5-XXL but two-layer
  random ones with the output sizes the transformer takes (CLIP projections 768 + 1280 = the
  pooled 2048, T5 ``d_model`` 4096 = ``joint_attention_dim``; 77 + 256 text tokens), built on the
  tokenizers of :mod:`orwcfm_fast.flows.tiny`. Both modes encode each prompt once and cache the
  embeddings, so text encoding is outside the timed step in both, and both use the same encoders.
- CPU (``--device cpu`` or ``--quick``): the tiny SD3.5-style pipeline of
  :func:`orwcfm_fast.flows.tiny.tiny_sd3_pipeline` (fp32), 64 px, batch 4, ``ode_steps`` 4,
  CFG 4.5, LoRA rank 4 / alpha 8; one torch thread unless ``--threads`` says otherwise (a model this
  small gains nothing from a second thread, and on a shared 2-core machine a 2-thread OpenMP team
  competing with other processes made steps up to 35x slower); well under a minute. Its figures
  are overhead-dominated and say little about a GPU.

``--arch sd35m --num-layers N`` builds the SD3.5-medium architecture at full width with N layers
(a check of the GPU configuration's shapes on a CPU; not a benchmark).

The reward is the mean brightness of the decoded images, ``reward(images, prompts)``: cheap and
deterministic, so the phases measure the training machinery, not a reward model.

Run: ``python benchmarks/t2i_throughput.py [--device cpu] [--json PATH]``. ``--json`` (default
``benchmarks/results/t2i_throughput_<device>[_quick].json``) writes every figure with device,
date, commit and torch version.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from configs; never download

from _meta import provenance, write_results  # noqa: E402
from throughput import _sync, _Timer  # noqa: E402

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows.lora import DEFAULT_TARGET_MODULES  # noqa: E402
from orwcfm_fast.precision import native_low_precision  # noqa: E402

PROMPTS = [
    "a photo of a dog on a beach", "a red sports car in the rain", "a bowl of ramen, studio lighting",
    "an oil painting of a lighthouse at dusk", "a cat wearing a tiny hat", "a snowy mountain village at night",
    "a watercolor of a hummingbird", "a robot reading a newspaper in a cafe",
]

SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, shift_factor=0.0609, scaling_factor=1.5035,
    use_quant_conv=False, use_post_quant_conv=False,
)
CONFIGS = {
    "sd35m": dict(arch="sd35m", resolution=512, batch_size=8, ode_steps=10, lora_rank=32, lora_alpha=64.0,
                  dtype="native"),  # resolved by native_low_precision(device)
    "tiny": dict(arch="tiny", resolution=64, batch_size=4, ode_steps=4, lora_rank=4, lora_alpha=8.0, dtype="fp32"),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """The reward: mean brightness of each image ``[B, 3, H, W]`` in [0, 1] (the prompts are not used)."""
    return images.float().mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- the pipelines


def sd35_medium_pipeline(device: torch.device, dtype: torch.dtype, *, seed: int = 0, num_layers: int = 24):
    """SD3.5-medium's architecture with random weights (see the module docs for the text encoders)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from orwcfm_fast.flows.tiny import _clip_encoder, _clip_tokenizer, _t5_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    # Output sizes of CLIP-L / CLIP-G projections (768 + 1280 = pooled 2048) and T5-XXL (4096), two small layers each.
    text_encoder = _clip_encoder(tokenizer, 64, 768, with_projection=True)
    text_encoder_2 = _clip_encoder(tokenizer_2, 64, 1280, with_projection=True)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=256, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id)).eval()
    kwargs = dict(SD35_MEDIUM_TRANSFORMER, num_layers=num_layers,
                  dual_attention_layers=tuple(range(min(13, num_layers))))
    with torch.device(device):  # random init straight on the device (2.24 B parameters)
        transformer = SD3Transformer2DModel(**kwargs).eval()
        vae = AutoencoderKL(**SD3_VAE).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def build_pipeline(arch: str, device: torch.device, dtype: torch.dtype, *, seed: int = 0, num_layers: int = 24):
    """A fresh pipeline of ``arch``; the same seed gives the same weights (each mode builds its own)."""
    if arch == "tiny":
        from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(sd35=True, seed=seed)  # float32 on the CPU
        pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    else:
        pipe = sd35_medium_pipeline(device, dtype, seed=seed, num_layers=num_layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- measurement helpers


def _model_bytes(modules, optimizer, device: torch.device) -> int:
    """Bytes of the distinct parameters, buffers and optimiser-state tensors on ``device``."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type == device.type and t.numel():
            key = (t.untyped_storage().data_ptr(), t.dtype, t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            add(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                add(t)
    return total


class _ForwardCounter:
    """Counts forward calls (and their rows) of transformer modules inside the block (eager runs only)."""

    def __init__(self, modules):
        self.modules = list({id(m): m for m in modules}.values())
        self.rows: list[int] = []

    def __enter__(self):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.rows.append(int(x.shape[0]))

        self.handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def summary(self) -> dict:
        return {"calls": len(self.rows), "rows": sum(self.rows), "rows_per_call": list(self.rows)}


def _memory(device: torch.device, model_bytes: int) -> dict:
    row = {"model_memory_GiB": model_bytes / 2**30}
    if device.type == "cuda":
        row["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        row["process_peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the baseline


class PeerStyleBaseline:
    """One step as the peers' scripts take it (see the module docs); for timing, not for use."""

    def __init__(self, pipe, cfg: dict, device: torch.device, seed: int = 0):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.transformer = pipe.transformer
        # The frozen reference: a second copy of the transformer, taken before the LoRA.
        self.ref_transformer = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"],
                                                init_lora_weights=True, target_modules=list(DEFAULT_TARGET_MODULES)))
        cast_training_params(self.transformer, dtype=torch.float32)
        self.lora_params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.lora_params, lr=cfg["learning_rate"])
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rng = random.Random(seed)
        # Text embeddings once per prompt (and the negative prompt), cached.
        self.cache = {p: self._encode(p) for p in [*PROMPTS, cfg["negative_prompt"]]}
        self.h, self.w = cfg["resolution"], cfg["resolution"]
        f = pipe.vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels, self.h // f, self.w // f)

    @torch.no_grad()
    def _encode(self, prompt: str):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg["max_sequence_length"])
        return embeds, pooled

    def draw_prompts(self) -> list[str]:
        k = self.cfg["images_per_prompt"]
        return [p for p in self.rng.choices(PROMPTS, k=self.cfg["batch_size"] // k) for _ in range(k)]

    def embeddings(self, prompts):
        embeds, pooled = (torch.cat(parts) for parts in zip(*(self.cache[p] for p in prompts)))
        neg_e, neg_p = self.cache[self.cfg["negative_prompt"]]
        n = len(prompts)
        return embeds, pooled, neg_e.expand(n, *neg_e.shape[1:]), neg_p.expand(n, *neg_p.shape[1:])

    def sample(self, noise: torch.Tensor, embeds, pooled, neg_embeds, neg_pooled) -> torch.Tensor:
        """The pipeline's own sampling loop: latents (the transformer's space) from ``noise``."""
        return self.pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_embeds,
            negative_pooled_prompt_embeds=neg_pooled, height=self.h, width=self.w,
            num_inference_steps=self.cfg["ode_steps"], guidance_scale=self.cfg["guidance_scale"],
            latents=noise, output_type="latent", return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def _velocity(self, transformer, x, sigma, embeds, pooled):
        dtype = transformer.dtype
        return transformer(hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]

    def step(self, timer: _Timer) -> None:
        cfg = self.cfg
        b = cfg["batch_size"]
        with timer("sample"):
            prompts = self.draw_prompts()
            embeds, pooled, neg_e, neg_p = self.embeddings(prompts)
            noise = torch.randn((b, *self.latent_shape), generator=self.generator, device=self.device)
            self.transformer.eval()
            latents = self.sample(noise, embeds, pooled, neg_e, neg_p)
        with timer("decode"):
            images = self.decode(latents)
        with timer("reward"):
            rewards = brightness(images, prompts)
            weights = torch.exp(cfg["temperature"] * rewards)
        with timer("update"):
            x1 = latents.float()
            x0 = torch.randn(x1.shape, generator=self.generator, device=self.device)
            t = torch.rand(b, generator=self.generator, device=self.device)  # 0 = noise, 1 = data
            sigma = 1 - t
            s = sigma.view(-1, 1, 1, 1)
            xt = s * x0 + (1 - s) * x1
            target = x0 - x1  # diffusers' velocity: noise - data
            self.transformer.train()
            v = self._velocity(self.transformer, xt, sigma, embeds, pooled).float()
            with torch.no_grad():
                v_ref = self._velocity(self.ref_transformer, xt, sigma, embeds, pooled).float()
            fm = ((v - target) ** 2).mean(dim=(1, 2, 3))
            w2 = ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
            loss = (weights * fm + cfg["w2_coefficient"] * w2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, cfg["grad_clip"])
            self.optimizer.step()
            _ = {"loss": loss.item(), "fm": (weights * fm).mean().item(), "w2": w2.mean().item(),
                 "reward": rewards.mean().item(), "grad_norm": grad_norm.item()}

    def model_bytes(self) -> int:
        p = self.pipe
        modules = [p.transformer, self.ref_transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3]
        return _model_bytes(modules, self.optimizer, self.device)

    def transformers(self):
        return [self.transformer, self.ref_transformer]


# ----------------------------------------------------------------------------- orwcfm_fast


class FastSteps:
    """``ORWCFMTrainer``'s step on a pipeline, split at its phase boundaries (the same calls, timed)."""

    def __init__(self, pipe, cfg: dict, device: torch.device, seed: int = 0):
        self.pipe, self.device = pipe, device
        keys = ("resolution", "guidance_scale", "ode_steps", "lora_rank", "lora_alpha", "batch_size",
                "images_per_prompt", "learning_rate", "temperature", "w2_coefficient", "grad_clip",
                "max_sequence_length", "negative_prompt")
        config = {k: cfg[k] for k in keys}
        # the peers' math: guided sampling, the unguided conditional velocity trained, raw weights (the library's
        # defaults train the guided velocity, cfg_mode "guided", on group-normalised weights)
        config.update(prompts=PROMPTS, reward=brightness, ode_solver="euler", warmup_steps=0, precision="fp32",
                      seed=seed, savedir="/tmp/orwcfm_t2i_throughput", handle_signals=False,
                      cfg_mode="sampling_only", weight_normalization="none")
        self.trainer = ORWCFMTrainer(pipe, config, device)

    def step(self, timer: _Timer) -> None:
        from orwcfm_fast.coupling import couple
        from orwcfm_fast.rewards import check_rewards
        from orwcfm_fast.trainer import _Batch

        tr = self.trainer
        with timer("sample"):
            noise, x_0, prompts = tr._draw_batch_inputs()
            cond = tr.models.encode(prompts, tr.batch_size)  # cached embeddings
            with tr._autocast():
                samples = tr._sampler(noise, *cond)
        with timer("decode"):
            images = tr.models.reward_inputs(samples)
        with timer("reward"):
            out = tr.reward_fn(images, prompts) if getattr(tr.reward_fn, "takes_prompts", False) else tr.reward_fn(images)
            rewards = check_rewards(out, samples.shape[0], device=tr.device)
            weights = tr._weights(rewards)
            x0, x1, pair_weights = couple(tr.config["coupling"], x_0, samples, weights, generator=tr.cpu_generator)
            batch = _Batch(samples, rewards, weights, x0, x1, pair_weights, cond, prompts)
        with timer("update"):
            tr._train_step(batch)

    @torch.no_grad()
    def sampler_vs_pipeline(self) -> float:
        """Largest |difference| of the trainer's sampler and ``pipe(...)`` from the same noise and embeddings."""
        tr = self.trainer
        noise, _, prompts = tr._draw_batch_inputs()
        embeds, pooled = tr.models.encode(prompts, tr.batch_size)
        neg_e, neg_p = tr.models.flow._negative_cond(tr.batch_size)
        with tr._autocast():
            ours = tr._sampler(noise, embeds, pooled)
        h, w = tr.models.flow.height, tr.models.flow.width
        theirs = self.pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_e,
            negative_pooled_prompt_embeds=neg_p, height=h, width=w, num_inference_steps=tr.config["ode_steps"],
            guidance_scale=tr.config["guidance_scale"], latents=noise, output_type="latent", return_dict=False,
        )[0]
        return float((ours.float() - theirs.float()).abs().max())

    def model_bytes(self) -> int:
        p = self.pipe
        modules = [p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3]
        return _model_bytes(modules, self.trainer.optimizer, self.device)

    def transformers(self):
        return [self.pipe.transformer]


# ----------------------------------------------------------------------------- the run


def _measure(name: str, runner, device: torch.device, warmup: int, steps: int, batch: int) -> dict:
    calls = None
    if device.type != "cuda":  # hooks see every forward only on eager runs (CUDA graphs replay without them)
        with _ForwardCounter(runner.transformers()) as counter:
            runner.step(_Timer(device))
        calls = counter.summary()
    for _ in range(warmup):
        runner.step(_Timer(device))
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = _Timer(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(timer)
    _sync(device)
    total = (time.perf_counter() - t0) / steps
    phases = {k: timer.totals.get(k, 0.0) / steps for k in ("sample", "decode", "reward", "update")}
    row = {"mode": name, "s_per_step": total, "phases_s": phases, "images_per_s": batch / total,
           **_memory(device, runner.model_bytes()), "transformer_forwards_per_step": calls}
    mem = (f"peak {row['peak_gpu_memory_GiB']:.2f} GiB, " if device.type == "cuda" else "") + \
        f"models {row['model_memory_GiB']:.3f} GiB"
    print(f"  {name:>12}: {total:8.3f} s/step  (sample {phases['sample']:.3f}, decode {phases['decode']:.3f}, "
          f"reward {phases['reward']:.3f}, update {phases['update']:.3f})  {row['images_per_s']:7.2f} images/s  "
          f"{mem}", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny pipeline (the default on the CPU)")
    parser.add_argument("--arch", choices=tuple(CONFIGS), default=None,
                        help="sd35m: SD3.5-medium (default on CUDA); tiny: the tiny pipeline (default on the CPU)")
    parser.add_argument("--num-layers", type=int, default=24, help="sd35m only: transformer layers (24 = the model)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="pipeline dtype (default: the preset's: sd35m what the device runs natively, tiny fp32)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ode-steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens per prompt")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny pipeline on the CPU, else torch's default)")
    parser.add_argument("--modes", default="baseline,orwcfm_fast")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    arch = args.arch or ("tiny" if args.quick or device.type != "cuda" else "sd35m")
    threads = args.threads or (1 if arch == "tiny" and device.type == "cpu" else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, parser, device, arch)
    finally:
        torch.set_num_threads(saved_threads)


def _run(args, parser, device: torch.device, arch: str) -> dict:
    preset = dict(CONFIGS[arch])
    cfg = {
        **preset,
        "resolution": args.resolution or preset["resolution"],
        "batch_size": args.batch_size or preset["batch_size"],
        "ode_steps": args.ode_steps or preset["ode_steps"],
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
        "images_per_prompt": 2 if (args.batch_size or preset["batch_size"]) % 2 == 0 else 1,
        "negative_prompt": "",
        "learning_rate": 1e-4, "temperature": 0.5, "w2_coefficient": 1.0, "grad_clip": 1.0,
    }
    if arch == "sd35m":
        cfg["num_layers"] = args.num_layers
    if args.dtype:
        cfg["dtype"] = args.dtype
    elif cfg["dtype"] == "native":
        native = native_low_precision(device)
        cfg["dtype"], cfg["dtype_reason"] = native.dtype_name, native.reason
    dtype = DTYPES[cfg["dtype"]]
    steps = args.steps or 5
    warmup = args.warmup if args.warmup is not None else (1 if arch == "tiny" else 2)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"baseline", "orwcfm_fast"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: baseline, orwcfm_fast")
    batch = cfg["batch_size"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

    info: dict = {}

    def build():
        """Each mode's own pipeline (same seed, same weights); the first build describes the run."""
        pipe = build_pipeline(arch, device, dtype, seed=0, num_layers=args.num_layers)
        if not info:
            f = pipe.vae_scale_factor
            info["transformer_parameters"] = sum(p.numel() for p in pipe.transformer.parameters())
            info["latent_shape"] = [pipe.transformer.config.in_channels, cfg["resolution"] // f, cfg["resolution"] // f]
            print(f"ORW-CFM-W2 text-to-image LoRA step on {device_name}: {arch} transformer "
                  f"{info['transformer_parameters'] / 1e9:.3g} B parameters ({cfg['dtype']}), {cfg['resolution']} px "
                  f"(latents {info['latent_shape']}), batch {batch}, Euler {cfg['ode_steps']} on the scheduler's "
                  f"grid, CFG {cfg['guidance_scale']}, LoRA r {cfg['lora_rank']}", flush=True)
        return pipe

    def leftover() -> dict:
        """CUDA: memory still allocated before a mode is built (what an earlier mode left would inflate its peak)."""
        if device.type != "cuda":
            return {}
        return {"gpu_memory_allocated_before_mode_GiB": torch.cuda.memory_allocated(device) / 2**30}

    rows, identical = {}, {}
    if "baseline" in modes:
        before = leftover()
        runner = PeerStyleBaseline(build(), cfg, device)
        rows["baseline"] = {**_measure("baseline", runner, device, warmup, steps, batch), **before}
        del runner
        _free(device)
    if "orwcfm_fast" in modes:
        before = leftover()
        runner = FastSteps(build(), cfg, device)
        identical["sampler_vs_pipeline_max_abs_diff"] = runner.sampler_vs_pipeline()
        rows["orwcfm_fast"] = {**_measure("orwcfm_fast", runner, device, warmup, steps, batch), **before}
        del runner
        _free(device)
    if all(r["transformer_forwards_per_step"] is not None for r in rows.values()) and len(rows) == 2:
        a, b = (rows[m]["transformer_forwards_per_step"] for m in ("baseline", "orwcfm_fast"))
        identical["same_transformer_forwards"] = a["rows_per_call"] == b["rows_per_call"]

    result = {
        **provenance(device_name),
        "config": {**cfg, **info,
                   "reward": "mean brightness of the decoded images", "timed_steps": steps,
                   "warmup_steps_untimed": warmup,
                   "text_encoders": ("tiny pipeline's" if arch == "tiny" else
                                     "two-layer random CLIP x2 (projections 768, 1280) and T5 (d_model 4096); "
                                     "embeddings cached per prompt in both modes")},
        "memory_measured": ("peak_gpu_memory_GiB: torch.cuda.max_memory_allocated over the timed steps (reset per "
                            "mode); model_memory_GiB: parameters, buffers and Adam state on the device"
                            if device.type == "cuda" else
                            "model_memory_GiB: parameters, buffers and Adam state on the device (per mode); "
                            "process_peak_rss_GiB: ru_maxrss of the whole process so far (not per mode)"),
        "modes": rows,
        "identical_math": identical,
        "goals": {"peak_memory_ratio_at_most": 0.6, "images_per_s_ratio_at_least": 2.0,
                  "note": "the goals are for a GPU (images/s: an H100) at the sd35m configuration"},
    }
    if len(rows) == 2:
        base, fast = rows["baseline"], rows["orwcfm_fast"]
        result["speedup"] = base["s_per_step"] / fast["s_per_step"]
        result["images_per_s_ratio"] = fast["images_per_s"] / base["images_per_s"]
        result["model_memory_ratio"] = fast["model_memory_GiB"] / base["model_memory_GiB"]
        if device.type == "cuda":
            result["peak_memory_ratio"] = fast["peak_gpu_memory_GiB"] / base["peak_gpu_memory_GiB"]
        print(f"orwcfm_fast vs baseline: {result['images_per_s_ratio']:.2f}x images/s, model memory "
              f"{result['model_memory_ratio']:.2f}x" +
              (f", peak memory {result['peak_memory_ratio']:.2f}x" if "peak_memory_ratio" in result else ""))
    if identical:
        print(f"identical math: {identical}")
    suffix = "_quick" if arch == "tiny" else ("" if args.num_layers == 24 else f"_{args.num_layers}layers")
    path = args.json or ROOT / "benchmarks" / "results" / f"t2i_throughput_{device.type}{suffix}.json"
    write_results(result, path, rows)
    return result


if __name__ == "__main__":
    main()
