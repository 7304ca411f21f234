"""What an SD3.5-medium or Flux-dev fine-tuning run keeps in GPU memory, part by part (computed, not measured).

Builds each transformer from its published config on the meta device (no weights, no download) and
counts exactly: base parameters, LoRA parameters for ``--rank`` over the library's default target
modules (``r * (in + out)`` per adapted ``Linear``). From the counts it computes the bytes of each part
of a LoRA run (bf16 base, two fp32 adapters: policy and last policy, fp32 gradients, Adam's two fp32
moments, an optional fp32 EMA) and of a full fine-tuning run (three bf16 transformers: policy, last
policy, reference; fp32 master weights, their fp32 gradients and the bf16 ones, Adam, EMA).

Activations are an *estimate*: the training forward of one transformer block keeps about ``34 h``
bytes per token in bf16 with a fused attention kernel (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"); with gradient checkpointing each block keeps its input
(``2 h`` bytes per token) and one block is recomputed at a time. Tokens per image: latent patches plus
text tokens. ``cfg_mode: guided`` runs the loss forward on ``2B`` (both CFG branches). Measure on a GPU
before trusting the activation rows: ``make gpu-check`` does not yet.

Run: ``python benchmarks/t2i_memory.py [--rank 32] [--batch 8] [--resolution 1024] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30

#: published transformer configs (diffusers' config.json of each release)
MODELS = {
    "sd3.5-medium": {
        "cls": "SD3Transformer2DModel",
        "config": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                       dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "hidden": 1536, "blocks": 24 + 13,  # the 13 dual-attention layers run a second attention: counted as blocks
        "patch": 2, "text_tokens": 77 + 256, "text_encoders_gib": (123e6 + 695e6 + 4.76e9) * 2 / GIB,
    },
    "flux-dev": {
        "cls": "FluxTransformer2DModel",
        "config": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "hidden": 3072, "blocks": 19 + 38, "patch": 2, "text_tokens": 512,
        "text_encoders_gib": (123e6 + 4.76e9) * 2 / GIB,
    },
}


def count(name: str, rank: int) -> dict:
    """Exact base and LoRA parameter counts of ``name``'s transformer (meta device)."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    from orwcfm_fast.flows.lora import DEFAULT_TARGET_MODULES

    spec = MODELS[name]
    with init_empty_weights():
        model = getattr(diffusers, spec["cls"])(**spec["config"])
    base = sum(p.numel() for p in model.parameters())
    lora = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in DEFAULT_TARGET_MODULES))
    return {"base_params": base, "lora_params": lora}


def budget(name: str, counts: dict, *, batch: int, resolution: int, ema: bool, guided: bool) -> dict:
    """GiB per part for LoRA and full fine-tuning (see the module docs for what each row assumes)."""
    spec = MODELS[name]
    n, lora = counts["base_params"], counts["lora_params"]
    tokens = (resolution // 8 // spec["patch"]) ** 2 + spec["text_tokens"]
    rows = (2 if guided else 1) * batch
    per_block = 34 * spec["hidden"] * tokens * rows
    act_full = per_block * spec["blocks"] / GIB
    act_ckpt = (2 * spec["hidden"] * tokens * rows * spec["blocks"] + per_block) / GIB
    lora_parts = {
        "base weights (bf16)": 2 * n / GIB,
        "adapters: policy + last policy (fp32)": 2 * 4 * lora / GIB,
        "gradients (fp32)": 4 * lora / GIB,
        "Adam moments (fp32)": 8 * lora / GIB,
        "EMA (fp32)": (4 * lora / GIB) if ema else 0.0,
    }
    full_parts = {
        "three transformers: policy, last policy, reference (bf16)": 3 * 2 * n / GIB,
        "fp32 master weights": 4 * n / GIB,
        "gradients (bf16 on the model, then fp32 on the masters)": (2 + 4) * n / GIB,
        "Adam moments (fp32)": 8 * n / GIB,
        "EMA (fp32)": (4 * n / GIB) if ema else 0.0,
    }
    return {"tokens_per_image": tokens, "loss_forward_rows": rows,
            "activations_gib_estimate": {"no checkpointing": act_full, "gradient checkpointing": act_ckpt},
            "lora_gib": lora_parts, "lora_total_gib_without_activations": sum(lora_parts.values()),
            "full_gib": full_parts, "full_total_gib_without_activations": sum(full_parts.values()),
            "text_encoders_gib_bf16 (offloaded to the CPU after encoding)": spec["text_encoders_gib"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per loss forward (per GPU)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--cfg-mode", default="guided", choices=("guided", "cfg_free", "sampling_only"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = {"computed": "parameter counts exact (meta-device models); bytes computed; activations estimated",
           "rank": args.rank, "batch": args.batch, "resolution": args.resolution, "models": {}}
    for name in MODELS:
        counts = count(name, args.rank)
        out["models"][name] = {**counts, **budget(name, counts, batch=args.batch, resolution=args.resolution,
                                                  ema=args.ema, guided=args.cfg_mode == "guided" and name != "flux-dev")}
        m = out["models"][name]
        print(f"{name}: {counts['base_params'] / 1e9:.2f} B base, {counts['lora_params'] / 1e6:.1f} M LoRA (r {args.rank}); "
              f"LoRA run {m['lora_total_gib_without_activations']:.1f} GiB + activations ~"
              f"{m['activations_gib_estimate']['no checkpointing']:.0f} GiB "
              f"({m['activations_gib_estimate']['gradient checkpointing']:.1f} GiB checkpointed); full FT "
              f"{m['full_total_gib_without_activations']:.0f} GiB + activations")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
