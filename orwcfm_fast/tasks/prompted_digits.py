"""Offline proof that the text-to-image path learns: prompted 8x8 digits through a real SD3 pipeline.

Random pipelines cannot show learning, so this task builds a small one that can, in-process
and offline, and fine-tunes it through exactly the code path of a released SD3 checkpoint:

1. a tiny ``AutoencoderKL`` (3 x 8 x 8 images <-> 4 x 4 x 4 latents) trained on scikit-learn's
   digits, its latent ``shift_factor``/``scaling_factor`` set from the data as SD3's are;
2. an ``SD3Transformer2DModel`` pretrained with flow matching on those latents, conditioned on
   the prompts ``"a handwritten 0"`` ... ``"a handwritten 9"`` through the pipeline's own
   (random-init, frozen) CLIP and T5 encoders, with 10% of the prompts dropped to ``""`` so
   classifier-free guidance works. The captions are *noisy*, as web captions are: 40% of the
   images are captioned with a random digit, so the pretrained model follows its prompt only
   about two thirds of the time, and fine-tuning has text-image alignment to gain (the paper's
   SD3 experiment);
3. the three assembled as a ``StableDiffusion3Pipeline``, saved with ``save_pretrained`` and
   loaded back with ``from_pretrained`` (the real loading path), cached in ``cache_dir``;
4. ORW-CFM-W2 with LoRA (:class:`~orwcfm_fast.ORWCFMTrainer` on the pipeline) toward a
   prompt-dependent reward: the digits classifier's probability of *the prompt's* digit, given
   as ``reward(images, prompts)``.

Before and after fine-tuning it measures, per prompt, the mean reward and the within-prompt
diversity (mean pairwise distance of the decoded images), and writes sample grids (one row per
prompt), curves and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PROMPTED_DIGITS_DEFAULTS", "build_prompted_digits_pipeline", "digit_prompt",
           "digit_logits", "load_or_pretrain_prompted_digits", "prompted_digit_reward", "run_prompted_digits_demo",
           "target_drift"]

CACHE_VERSION = "prompted-digits-v3"
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt: the tiny T5 tokenizer spells "a handwritten 7" in 14
CLIP_MAX_LENGTH = 16  # CLIP tokens (SD3's are 77): the tiny byte-level tokenizer needs 15 for these prompts

#: Fine-tuning defaults of :func:`run_prompted_digits_demo`, chosen to fit a few CPU minutes.
PROMPTED_DIGITS_DEFAULTS: dict[str, Any] = {
    "digits": (1, 4, 7, 8),
    "epochs": 8,
    "steps_per_epoch": 15,
    "batch_size": 64,
    "images_per_prompt": 16,
    "temperature": 5.0,
    "w2_coefficient": 1.0,
    "learning_rate": 2e-3,
    "lora_rank": 8,
    "guidance_scale": 2.0,
    "ode_steps": 8,
    "eval_per_prompt": 64,
    "seed": 0,
    "cfg_mode": None,  # None: the trainer's default
}

#: Pretraining hyperparameters (VAE and transformer).
PRETRAIN: dict[str, Any] = {"vae_steps": 400, "flow_steps": 1000, "pretrain_batch_size": 64, "pretrain_lr": 2e-3,
                            "drop_prompt": 0.1, "caption_noise": 0.4, "pretrain_seed": 0}


def digit_prompt(d: int) -> str:
    return f"a handwritten {d}"


_DIGIT = re.compile(r"\b([0-9])\b")


def prompted_digit_reward(classifier):
    """``reward(images, prompts)``: the classifier's probability of the digit each prompt names.

    Images ``[B, 3, 8, 8]`` in [0, 1] (as the trainer gives them, decoded) are averaged over
    channels and mapped to the classifier's [-1, 1].
    """

    def reward(images: torch.Tensor, prompts) -> torch.Tensor:
        targets = []
        for p in prompts:
            m = _DIGIT.search(p)
            if m is None:
                raise ValueError(f"prompt {p!r} names no digit")
            targets.append(int(m.group(1)))
        gray = images.float().mean(1, keepdim=True) * 2 - 1
        with torch.no_grad():
            probs = torch.softmax(classifier(gray.to(next(classifier.parameters()).device)).float(), -1)
        idx = torch.tensor(targets, device=probs.device)
        return probs.gather(1, idx[:, None]).squeeze(1).to(images.device)

    return reward


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=8, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=4, qk_norm="rms_norm",
    )


def build_prompted_digits_pipeline(seed: int = 0):
    """The untrained pipeline: the demo's VAE and transformer with the tiny text encoders and SD3's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from orwcfm_fast.flows.tiny import _clip_encoder, _clip_tokenizer, _t5_encoder, _t5_tokenizer

    torch.manual_seed(seed)
    # Short CLIP sequences (16, not SD3's 77): the text tokens are most of the joint attention's
    # sequence and would dominate the CPU time; the pipeline reads the length from the tokenizer.
    tok, tok2, tok3 = _clip_tokenizer(CLIP_MAX_LENGTH), _clip_tokenizer(CLIP_MAX_LENGTH), _t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(),
        text_encoder=_clip_encoder(tok, 16, 8, with_projection=True), tokenizer=tok,
        text_encoder_2=_clip_encoder(tok2, 16, 8, with_projection=True), tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3, 32), tokenizer_3=tok3,
    )
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.eval().requires_grad_(False)
    return pipe


def _train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, gen: torch.Generator, log):
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


def _pretrain_flow(pipe, flow, latents: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                   lr: float, drop_prompt: float, caption_noise: float, gen: torch.Generator, log):
    """Rectified-flow pretraining of the transformer on captioned digits (the library's convention).

    A share ``caption_noise`` of the batch is captioned with a uniformly random digit, ``drop_prompt``
    with the empty prompt.
    """
    cond_all = flow.encode([digit_prompt(d) for d in range(10)])
    uncond = flow.encode([""])
    transformer = pipe.transformer
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        x_1, y = latents[idx], labels[idx]
        noisy = torch.rand(batch_size, generator=gen) < caption_noise
        y = torch.where(noisy, torch.randint(10, (batch_size,), generator=gen), y)
        drop = torch.rand(batch_size, generator=gen) < drop_prompt
        cond = tuple(torch.where(drop.view(-1, *[1] * (c.ndim - 1)), u.expand_as(c[y]), c[y])
                     for c, u in zip(cond_all, uncond))
        x_0 = torch.randn(x_1.shape, generator=gen)
        t = torch.rand(batch_size, generator=gen)
        x_t = t.view(-1, 1, 1, 1) * x_1 + (1 - t.view(-1, 1, 1, 1)) * x_0
        v = flow.transformer_velocity(t, x_t, cond)
        loss = F.mse_loss(v, x_1 - x_0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  flow step {step}: loss {loss.item():.4f}")
    transformer.eval()


def load_or_pretrain_prompted_digits(cache_dir: str | os.PathLike = "runs/cache", log=print,
                                     **overrides: Any) -> Path:
    """The pretrained prompted-digits pipeline's folder (``save_pretrained`` layout), made on first use.

    Returns:
        ``cache_dir/prompted-digits-<hash>/``, loadable with ``StableDiffusion3Pipeline.from_pretrained``.
    """
    import hashlib

    from orwcfm_fast.data.digits import load_digits_images
    from orwcfm_fast.flows.sd3 import SD3Flow

    hp = {**PRETRAIN, **overrides, "version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(hp, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"prompted-digits-{digest}"
    if (path / "model_index.json").exists():
        return path
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(hp["pretrain_seed"])
    pipe = build_prompted_digits_pipeline(hp["pretrain_seed"])
    images, labels = load_digits_images()
    rgb = images.repeat(1, 3, 1, 1)
    log(f"pretraining the prompted-digits VAE ({hp['vae_steps']} steps)")
    _train_vae(pipe.vae, rgb, hp["vae_steps"], hp["pretrain_batch_size"], hp["pretrain_lr"], gen, log)
    with torch.no_grad():
        z = pipe.vae.encode(rgb).latent_dist.mode()
    shift, scale = float(z.mean()), float(1.0 / z.std())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (z - shift) * scale
    flow = SD3Flow(pipe, resolution=8, max_sequence_length=MAX_SEQUENCE_LENGTH)
    log(f"pretraining the prompted-digits transformer ({hp['flow_steps']} steps)")
    _pretrain_flow(pipe, flow, latents, labels, hp["flow_steps"], hp["pretrain_batch_size"], hp["pretrain_lr"],
                   hp["drop_prompt"], hp["caption_noise"], gen, log)
    tmp = path.with_name(path.name + ".tmp")
    pipe.save_pretrained(tmp)
    os.replace(tmp, path)
    log(f"pretrained in {time.perf_counter() - t0:.0f} s -> {path}")
    return path


@torch.no_grad()
def _evaluate(trainer, reward, prompts: list[str], per_prompt: int, features=None) -> dict[str, Any]:
    """Per-prompt mean reward and within-prompt diversity of ``per_prompt`` samples from the policy (fixed noise).

    With ``features`` (images -> ``[N, F]``) the result also holds every sample's ``rewards`` and ``features``
    (for :func:`target_drift`).
    """
    from orwcfm_fast.metrics import mean_pairwise_distance

    state = torch.get_rng_state(), trainer.generator.get_state()
    trainer.generator.manual_seed(12345)  # the same noise before and after fine-tuning
    try:
        all_prompts = [p for p in prompts for _ in range(per_prompt)]
        latents = trainer.sample(len(all_prompts), batch_size=len(all_prompts), prompts=all_prompts)
        images = trainer.models.reward_inputs(latents)
    finally:
        torch.set_rng_state(state[0])
        trainer.generator.set_state(state[1])
    rewards = reward(images, all_prompts)
    out = {"per_prompt": {}, "images": images}
    for i, p in enumerate(prompts):
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        out["per_prompt"][p] = {"reward": float(rewards[rows].mean()),
                                "diversity": mean_pairwise_distance(images[rows].mean(1) * 2 - 1)}
    out["reward"] = sum(v["reward"] for v in out["per_prompt"].values()) / len(prompts)
    out["diversity"] = sum(v["diversity"] for v in out["per_prompt"].values()) / len(prompts)
    if features is not None:
        out["rewards"], out["features"] = rewards.detach().float().cpu(), features(images).detach().double().cpu()
    return out


def digit_logits(classifier):
    """``images [B, 3, H, W]`` in [0, 1] -> the digits classifier's ``[B, 10]`` logits (the drift's feature space)."""

    def features(images: torch.Tensor) -> torch.Tensor:
        gray = images.float().mean(1, keepdim=True) * 2 - 1
        with torch.no_grad():
            return classifier(gray.to(next(classifier.parameters()).device)).float()

    return features


def target_drift(before: dict[str, Any], after: dict[str, Any], prompts: list[str], per_prompt: int,
                 temperature: float) -> dict[str, float]:
    """How far an epoch's samples are from the distribution that epoch was asked to learn, per prompt, averaged.

    The target of one ORW-CFM epoch is the sampled distribution reweighted, ``q(x) exp(beta r(x)) / Z``
    (the W2 term then pulls toward the reference). ``before``'s samples (the sampler at the epoch's start)
    weighted by ``exp(beta r)`` stand for it; ``after``'s samples (the same sampler at the epoch's end) are
    what it learned. Returns the Fréchet distance of the two in the classifier's logit space and the reward
    overshoot (mean reward after minus the target's weighted mean reward): a sampler that drifts past its
    target, as compounding guidance does, shows a growing distance and a positive overshoot.
    """
    from orwcfm_fast.metrics import frechet_distance

    fds, overshoot = [], []
    for i, _ in enumerate(prompts):
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        r = before["rewards"][rows].double()
        w = torch.softmax(temperature * r, 0)
        fds.append(frechet_distance(after["features"][rows], before["features"][rows], w))
        overshoot.append(float(after["rewards"][rows].double().mean() - (w * r).sum()))
    return {"target_fd": sum(fds) / len(fds), "reward_overshoot": sum(overshoot) / len(overshoot)}


def run_prompted_digits_demo(outdir: str | os.PathLike = "runs/prompted-digits", cache_dir="runs/cache",
                             device: str | None = None, log=print, **overrides: Any) -> dict[str, Any]:
    """Pretrain (or load) the prompted-digits pipeline, fine-tune it with ORW-CFM-W2 + LoRA, report.

    Writes into ``outdir``: ``samples_before.png`` / ``samples_after.png`` (one row per prompt),
    ``curves.png`` (per-prompt reward and diversity per epoch) and ``metrics.json``.

    Returns:
        The metrics dict (also in ``metrics.json``).
    """
    from diffusers import StableDiffusion3Pipeline

    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.tasks.digits import load_or_train_digits_classifier
    from orwcfm_fast.tasks.plots import save_curves, save_sample_grid

    opts = {**PROMPTED_DIGITS_DEFAULTS, **overrides}
    pretrain = {k: opts.pop(k) for k in list(opts) if k in PRETRAIN}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    path = load_or_pretrain_prompted_digits(cache_dir, log=log, **pretrain)
    classifier, accuracy = load_or_train_digits_classifier(cache_dir, device)
    reward = prompted_digit_reward(classifier)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32)
    prompts = [digit_prompt(d) for d in opts["digits"]]
    config = {
        "prompts": prompts, "reward": reward, "resolution": 8, "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "guidance_scale": opts["guidance_scale"], "ode_steps": opts["ode_steps"], "lora_rank": opts["lora_rank"],
        "batch_size": opts["batch_size"], "images_per_prompt": opts["images_per_prompt"],
        "temperature": opts["temperature"], "w2_coefficient": opts["w2_coefficient"],
        "learning_rate": opts["learning_rate"], "warmup_steps": 0, "weight_normalization": "batch",
        "seed": opts["seed"], "savedir": str(outdir), "run_name": "prompted_digits", "handle_signals": False,
    }
    if opts["cfg_mode"] is not None:
        config["cfg_mode"] = opts["cfg_mode"]
    trainer = ORWCFMTrainer(pipe, config, device)
    per_prompt = opts["eval_per_prompt"]
    features = digit_logits(classifier)
    before = _evaluate(trainer, reward, prompts, per_prompt, features)
    curves = [{"epoch": 0, "reward": before["reward"], "diversity": before["diversity"]}]
    log(f"before: reward {before['reward']:.3f}, diversity {before['diversity']:.3f}")
    t_ft = time.perf_counter()
    ev = before
    for epoch in range(opts["epochs"]):
        trainer.train(1, opts["steps_per_epoch"])
        previous, ev = ev, _evaluate(trainer, reward, prompts, per_prompt, features)
        drift = target_drift(previous, ev, prompts, per_prompt, opts["temperature"])
        curves.append({"epoch": epoch + 1, "reward": ev["reward"], "diversity": ev["diversity"], **drift})
        log(f"epoch {epoch + 1}: reward {ev['reward']:.3f}, diversity {ev['diversity']:.3f}, "
            f"drift from target {drift['target_fd']:.3f} (reward overshoot {drift['reward_overshoot']:+.3f})")
    fine_tune_s = time.perf_counter() - t_ft
    after = ev if opts["epochs"] else before
    for name, result in (("before", before), ("after", after)):
        gray = result["images"].mean(1, keepdim=True) * 2 - 1
        k = min(16, per_prompt)
        rows = torch.stack([gray[i * per_prompt:i * per_prompt + k] for i in range(len(prompts))]).flatten(0, 1)
        save_sample_grid(rows, outdir / f"samples_{name}.png", nrow=k,
                         title=f"{name} fine-tuning: one row per prompt ({', '.join(prompts)})")
    save_curves(curves, ("reward", "diversity"), outdir / "curves.png",
                "prompted digits: mean per-prompt reward and within-prompt diversity")
    metrics = {
        "prompts": prompts, "classifier_accuracy": accuracy, "config": {k: v for k, v in opts.items()},
        "before": {"reward": before["reward"], "diversity": before["diversity"], "per_prompt": before["per_prompt"]},
        "after": {"reward": after["reward"], "diversity": after["diversity"], "per_prompt": after["per_prompt"]},
        "curves": curves, "fine_tune_seconds": fine_tune_s, "total_seconds": time.perf_counter() - t_start,
        "device": str(device), "cfg_mode": trainer.config["cfg_mode"],
    }
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.save_lora(outdir / "lora")
    # not in metrics.json: the evaluation images ([P * eval_per_prompt, 3, 8, 8] in [0, 1], prompt-major)
    metrics["images"] = {"before": before["images"], "after": after["images"]}
    return metrics
