"""The ``plan`` command: will a text-to-image fine-tuning fit on the GPUs, and what will it cost?

``orwcfm-fast plan --pretrained DIR [--gpus N] [--gpu-memory GiB] [--config FILE | --set KEY=VALUE ...]``
builds the pipeline of ``DIR`` on the meta device (no weights are read: a folder holding only
``model_index.json`` and each component's ``config.json`` is enough) and reports, per GPU, for DDP and for
FSDP (``fully_shard`` per transformer block, parameters, gradients and optimiser state sharded over the GPUs):

- **computed** (exact counts from the meta-device modules): base weights (parameters and floating-point buffers;
  FSDP shards the parameters, dim 0 over the GPUs, and keeps buffers whole), the LoRA adapters (policy and last
  policy, fp32; counted as peft adds them), gradients, Adam's two fp32 moments, the EMA, full fine-tuning's
  frozen copies (last policy, reference) and fp32 master weights, FSDP's root layers gathered after a forward, DDP's
  flattened gradient copy (a phase of the optimiser step), the text encoders, the prompt-embedding cache
  (host memory), the VAE, the transformer forwards per training step (the trainer's own counting:
  :mod:`orwcfm_fast.compute`) and their FLOPs;
- **estimated** (analytic, per transformer block): the activations the policy's loss forward keeps for its
  backward, with and without gradient checkpointing. For SD3 / SD3.5 and FLUX.1 blocks the estimate lists what
  autograd saves op by op (SDPA / flash attention: no ``L x L`` score matrix); it is checked against the
  CPU's own accounting on tiny pipelines (``tests/test_plan.py``). Other families get a generic DiT-block
  estimate, marked as such. The sampler's and the VAE decode's working memory are rough estimates.

From those it recommends DDP or FSDP, gradient checkpointing, and the largest per-GPU batch that fits,
and, given a sustained TFLOP/s per GPU (``--tflops``; a stated assumption per known GPU otherwise), a time per
step and per epoch.

Everything here is pure (no GPU, no weights); :func:`make_plan` returns a :class:`PlanReport`,
:func:`render_text` prints it, ``--json`` writes :meth:`PlanReport.to_dict`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "GPUS",
    "DEFAULT_HEADROOM",
    "ALLREDUCE_PHASE",
    "PlanError",
    "PlanReport",
    "ActivationEstimate",
    "MemoryItem",
    "PlanOption",
    "load_meta_pipeline",
    "lora_parameter_count",
    "image_tokens",
    "text_tokens",
    "sampling_work",
    "vae_decode_work",
    "activation_estimate",
    "forward_flops",
    "forwards_per_step",
    "make_plan",
    "render_text",
    "add_parser",
    "run_plan",
]

GIB = 2 ** 30

#: known GPUs: (memory in GiB, sustained dense bf16 TFLOP/s ASSUMED for this workload). The memory is what
#: the device reports; the TFLOP/s are assumptions (about 40% of the bf16 dense peak for H100 / H200, a
#: typical large-transformer training utilisation), not measurements: pass --tflops for your own.
GPUS: dict[str, tuple[float, float]] = {
    "H200": (139.8, 400.0),
    "H100": (79.6, 400.0),
    "A100-80GB": (79.2, 150.0),
    "A100-40GB": (39.4, 150.0),
    "L40S": (44.4, 150.0),
    "RTX4090": (23.6, 80.0),
}
DEFAULT_GPU = "H100"

#: share of the GPU's memory left free: the CUDA context, allocator fragmentation, NCCL buffers, kernels' workspaces
DEFAULT_HEADROOM = 0.15

FP32 = 4

#: the phase of a step holding DDP's flattened fp32 gradient copy (PlanOption.phases)
ALLREDUCE_PHASE = "optimiser step (gradient all-reduce copy)"


class PlanError(ValueError):
    """The folder or the config cannot be planned for; the message names the argument or config key at fault."""


# ----------------------------------------------------------------------------------------------- the meta pipeline


def load_meta_pipeline(path: str | Path):
    """The diffusers pipeline of folder ``path`` with every model on the meta device (no weights read).

    Each component's class comes from ``model_index.json``; diffusers models are built with
    ``Cls.from_config(Cls.load_config(path / name))``, transformers models with
    ``Cls._from_config(AutoConfig.from_pretrained(path / name))``, schedulers from their config when present;
    tokenizers and processors are not loaded (``None``).

    Raises:
        PlanError: ``path`` is not a pipeline folder of a supported family, or a component's config is missing.
    """
    import torch

    from orwcfm_fast.flows import require_diffusers
    from orwcfm_fast.train_run import UsageError, pipeline_class_name

    path = Path(path)
    if not path.is_dir():
        raise PlanError(f"--pretrained {str(path)!r}: no such folder (plan takes a diffusers pipeline folder: its "
                        "model_index.json and each component's config.json are enough, no weights)")
    try:
        name = pipeline_class_name(path)
    except UsageError as err:
        raise PlanError(str(err)) from None
    require_diffusers()
    import diffusers
    import transformers

    index = json.loads((path / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for key, spec in index.items():
        if key.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        library, cls_name = spec
        sub = path / key
        if library is None or cls_name is None:
            components[key] = None
            continue
        if library == "diffusers" or library.startswith("diffusers"):
            cls = getattr(diffusers, cls_name, None)
            if cls is None:
                raise PlanError(f"--pretrained {str(path)!r}: model_index.json names {key} class {cls_name!r}, which "
                                f"diffusers {diffusers.__version__} does not have")
            try:
                config = cls.load_config(sub)
            except (OSError, ValueError) as err:
                if "Scheduler" in cls_name:
                    components[key] = None
                    continue
                raise PlanError(f"--pretrained {str(path)!r}: cannot read the config of component {key!r} "
                                f"({sub}/config.json): {err}") from None
            if "Scheduler" in cls_name:
                components[key] = cls.from_config(config)
            else:
                with torch.device("meta"):
                    components[key] = cls.from_config(config)
        elif library == "transformers":
            if _skippable(cls_name):
                components[key] = None  # tokenizers, processors: not needed to count or to plan
                continue
            cls = getattr(transformers, cls_name, None)
            if cls is None or not hasattr(cls, "_from_config"):
                raise PlanError(f"--pretrained {str(path)!r}: model_index.json names {key} class {cls_name!r}, which "
                                f"transformers {transformers.__version__} does not have as a model: its weights "
                                "cannot be counted")
            try:
                config = transformers.AutoConfig.from_pretrained(sub)
            except (OSError, ValueError) as err:
                raise PlanError(f"--pretrained {str(path)!r}: cannot read the config of component {key!r} "
                                f"({sub}/config.json): {err}") from None
            with torch.device("meta"):
                components[key] = cls._from_config(config)
        elif _skippable(cls_name):
            components[key] = None
        else:
            raise PlanError(f"--pretrained {str(path)!r}: model_index.json names {key} class {cls_name!r} of library "
                            f"{library!r}; the plan builds diffusers and transformers models only")
    if components.get("transformer") is None:
        raise PlanError(f"--pretrained {str(path)!r}: {name} has no transformer component in model_index.json")
    try:
        return getattr(diffusers, name)(**components)
    except (TypeError, ValueError) as err:
        raise PlanError(f"--pretrained {str(path)!r}: cannot assemble {name} from its components: {err}") from None


#: class-name parts of components the plan does not need (no weights on the GPU): left out of the pipeline
_SKIPPED_KINDS = ("Tokenizer", "Processor", "FeatureExtractor", "Scheduler")


def _skippable(cls_name: str) -> bool:
    return any(kind in cls_name for kind in _SKIPPED_KINDS)


# ----------------------------------------------------------------------------------------------- parameter counts


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of ``target_modules``: the module's name is a target or ends with ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_parameter_count(transformer, rank: int, targets: Sequence[str]) -> tuple[int, list[str]]:
    """Parameters of one LoRA adapter of rank ``rank`` on the modules of ``transformer`` matching ``targets``.

    peft's LoRA adds ``A [r, in]`` and ``B [out, r]`` to a ``Linear`` (``r (in + out)``), and
    ``A [r, in, k, k]``, ``B [out, r, 1, 1]`` to a ``Conv2d``. Counted by arithmetic (peft on a meta model builds
    the second adapter on the CPU); ``tests/test_plan.py`` checks it against peft.

    Returns:
        ``(parameters, adapted module names)``.

    Raises:
        PlanError: a matching module is neither a ``Linear`` nor a ``Conv2d``, or none matches.
    """
    import torch

    total, names = 0, []
    for name, module in transformer.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = math.prod(module.kernel_size)
            total += rank * module.in_channels // module.groups * k + module.out_channels * rank
        else:
            raise PlanError(f"config key 'lora_target_modules': {name} is a {type(module).__name__}; the plan counts "
                            "LoRA on Linear and Conv2d modules")
        names.append(name)
    if not names:
        raise PlanError(f"config key 'lora_target_modules' {list(targets)} match no module of "
                        f"{type(transformer).__name__}")
    return total, names


def _numel(module) -> int:
    """Parameters of ``module`` (0 for ``None``)."""
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _buffer_numel(module) -> int:
    """Floating-point buffers of ``module`` (SD3's ``pos_embed.pos_embed``): they go to the GPU with the weights, are
    cast with them, and FSDP does not shard them (0 for ``None``)."""
    return sum(t.numel() for t in module.buffers() if t.is_floating_point()) if module is not None else 0


def _shard_rows(rows: int, gpus: int) -> int:
    """Rows of dim 0 the first rank holds when FSDP2 shards ``rows`` over ``gpus`` (``ceil``: the largest shard)."""
    return -(-rows // gpus)


def _shard_numel(shapes, gpus: int) -> int:
    """Elements the first (largest) rank holds of tensors of ``shapes``, each sharded on dim 0 over ``gpus``."""
    total = 0
    for shape in shapes:
        shape = tuple(shape)
        total += _shard_rows(shape[0], gpus) * math.prod(shape[1:]) if shape else 1
    return total


def _lora_shapes(transformer, rank: int, names: Sequence[str]):
    """The shapes of one adapter's ``lora_A`` and ``lora_B`` weights on the modules ``names`` (peft's layout)."""
    import torch

    modules = dict(transformer.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, torch.nn.Conv2d):
            yield (rank, m.in_channels // m.groups, *m.kernel_size)
            yield (m.out_channels, rank, 1, 1)
        else:
            yield (rank, m.in_features)
            yield (m.out_features, rank)


# ----------------------------------------------------------------------------------------------- activations

#: transformer block classes whose saved tensors are listed op by op (checked against the CPU's accounting)
MMDIT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock")
SINGLE_STREAM_BLOCKS = ("FluxSingleTransformerBlock",)
CHECKED_BLOCKS = MMDIT_BLOCKS + SINGLE_STREAM_BLOCKS


@dataclass(frozen=True)
class _Precision:
    """What the policy's training forward keeps, by dtype.

    Attributes:
        act: bytes of an activation element (2: bf16 weights or bf16 autocast; 4: fp32).
        copy: bytes of the private copy of its input that each LoRA-adapted ``Linear`` keeps, or ``None`` when
            the adapters share the input tensor (fp32 weights, no autocast). peft casts a layer's input to the
            adapter's dtype (fp32) before ``lora_A``: on a bf16 base every adapted layer keeps its own fp32 copy
            (4 bytes, one per layer: q, k and v each); under bf16 autocast ``lora_A`` casts it back, a bf16 copy each.
        rank_bytes: bytes of an element of ``lora_A``'s output, which ``lora_B`` keeps (fp32 adapters: 4; autocast: 2).
    """

    act: int
    copy: int | None
    rank_bytes: int


def _precision(base_bytes: int, autocast: bool) -> _Precision:
    if autocast:  # fp32 weights under bf16 autocast: the norms and the residual stream stay fp32
        return _Precision(act=2 if base_bytes < FP32 else FP32, copy=2, rank_bytes=2)
    if base_bytes < FP32:
        return _Precision(act=base_bytes, copy=FP32, rank_bytes=FP32)
    return _Precision(act=FP32, copy=None, rank_bytes=FP32)


@dataclass
class _Ctx:
    prec: _Precision
    full: bool  # full fine-tuning: every weight trained (every Linear keeps its input, every product both factors)
    rank: int  # LoRA rank (0: full fine-tuning)
    adapted: frozenset  # names (from the transformer's root) of the LoRA-adapted modules


class _Ledger:
    """Bytes per loss-forward row, by what keeps them."""

    def __init__(self):
        self.items: dict[str, float] = {}
        self.work = 0.0  # the block's backward working memory per row (gradients alive at its peak), rough

    def add(self, label: str, elements: float, nbytes: int) -> None:
        if elements:
            self.items[label] = self.items.get(label, 0.0) + float(elements) * nbytes

    @property
    def total(self) -> float:
        return sum(self.items.values())


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if module is not None and len(module) > int(part) else None)
        if module is None:
            return None
    return module


def _linear_inputs(led: _Ledger, ctx: _Ctx, label: str, block, prefix: str, names: Sequence[str], tokens: int,
                   storage: float) -> None:
    """The inputs kept for the ``Linear`` s ``names`` of ``block`` that read one tensor of ``storage`` elements per row
    (``tokens`` rows of their ``in_features`` each): once if shared (fp32 LoRA, full fine-tuning), else one copy per
    adapted layer; plus ``lora_A`` 's ``[tokens, r]`` output per adapted layer."""
    mods = [(n, _get(block, n)) for n in names]
    mods = [(n, m) for n, m in mods if m is not None]
    adapted = [(n, m) for n, m in mods if f"{prefix}{n}" in ctx.adapted]
    if ctx.full:
        if mods:
            led.add(label, storage, ctx.prec.act)
        return
    if not adapted:
        return
    if ctx.prec.copy is None:
        led.add(label, storage, ctx.prec.act)
    else:
        led.add(label + " (a copy per adapted layer)", sum(tokens * m.in_features for _, m in adapted), ctx.prec.copy)
    led.add("LoRA A outputs", tokens * ctx.rank * len(adapted), ctx.prec.rank_bytes)


def _layer_norm(led: _Ledger, ctx: _Ctx, label: str, tokens: int, h: int, grad_in: bool) -> None:
    """LayerNorm without affine weights: its input and per-token mean and rstd (fp32), when its input needs a
    gradient."""
    if grad_in or ctx.full:
        led.add(label, tokens * h, ctx.prec.act)
        led.add("norm statistics (fp32)", tokens * 2, FP32)


def _rms_norm(led: _Ledger, ctx: _Ctx, label: str, norm, tokens: int, h: int, heads: int) -> None:
    """A q/k RMS norm on ``[B, heads, tokens, h / heads]``.

    diffusers' ``RMSNorm`` (SD3.5) keeps its input, the fp32 upcast its ``pow`` reads (a copy unless the input is
    fp32), the per-head rstd and, when its weight is trained, the normalised tensor. ``torch.nn.RMSNorm``
    (FLUX.1), as the CPU runs it, keeps the fp32 upcast instead of its input, two per-head statistics, and the
    fp32 normalised tensor when its weight is trained (a fused CUDA kernel may keep less: the input in its own dtype).
    """
    import torch

    if norm is None:
        return
    trained_weight = ctx.full and getattr(norm, "weight", None) is not None
    if isinstance(norm, torch.nn.RMSNorm):
        led.add(label + " (fp32)", tokens * h, FP32)
        led.add("q/k norm statistics (fp32)", 2 * tokens * heads, FP32)
        if trained_weight:
            led.add(label + " normalised (fp32)", tokens * h, FP32)
        return
    led.add(label, tokens * h, ctx.prec.act)
    led.add("q/k norm statistics (fp32)", tokens * heads, FP32)
    if ctx.prec.act != FP32:
        led.add(label + " fp32 upcast", tokens * h, FP32)
    if trained_weight:
        led.add(label + " normalised", tokens * h, ctx.prec.act)


def _sdpa(led: _Ledger, ctx: _Ctx, tokens: int, h: int, heads: int) -> None:
    """Flash / SDPA attention keeps q, k, v, its output and a per-head logsumexp (fp32): no ``L x L`` scores."""
    led.add("attention q, k, v, output", 4 * tokens * h, ctx.prec.act)
    led.add("attention logsumexp (fp32)", tokens * heads, FP32)


def _mmdit_block(block, prefix: str, n_img: int, n_txt: int, ctx: _Ctx, grad_in: bool) -> _Ledger:
    """SD3's ``JointTransformerBlock`` (SD3.5's dual attention and q/k RMS norms, the last block's ``context_pre_only``)
    and FLUX.1's ``FluxTransformerBlock``: two token streams, joint attention."""
    led = _Ledger()
    _conditioning(led, ctx, block)
    attn = block.attn
    h, heads = attn.to_q.in_features, attn.heads
    mlp = block.ff.net[0].proj.out_features
    pre_only = bool(getattr(block, "context_pre_only", False))
    dual = getattr(block, "attn2", None) is not None
    adapted_attn = ctx.full or any(n.startswith(f"{prefix}attn") for n in ctx.adapted)
    after = grad_in or adapted_attn  # the residual stream needs gradients after the attention
    streams = [("image", n_img, "", "norm1", ("attn.to_q", "attn.to_k", "attn.to_v"), (attn.norm_q, attn.norm_k))]
    streams.append(("text", n_txt, "_context", "norm1_context",
                    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                    (getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None))))
    for stream, tokens, sfx, norm1, qkv, qk_norms in streams:
        _layer_norm(led, ctx, f"{stream}: block input (norm1)", tokens, h, grad_in)
        if ctx.full:
            led.add(f"{stream}: norm1 output", tokens * h, ctx.prec.act)
        _linear_inputs(led, ctx, f"{stream}: q/k/v input", block, prefix, qkv, tokens, tokens * h)
        _rms_norm(led, ctx, f"{stream}: q norm input", qk_norms[0], tokens, h, heads)
        _rms_norm(led, ctx, f"{stream}: k norm input", qk_norms[1], tokens, h, heads)
        if stream == "image" and dual:
            a2 = block.attn2
            _linear_inputs(led, ctx, "image: attn2 q/k/v input", block, prefix,
                           ("attn2.to_q", "attn2.to_k", "attn2.to_v"), tokens, tokens * h)
            _rms_norm(led, ctx, "image: attn2 q norm input", a2.norm_q, tokens, h, heads)
            _rms_norm(led, ctx, "image: attn2 k norm input", a2.norm_k, tokens, h, heads)
            _sdpa(led, ctx, tokens, h, heads)
            # the self-attention's output reshapes to a view of the attention's own (already counted) output
            _linear_inputs(led, ctx, "image: attn2 output", block, prefix, ("attn2.to_out.0",), tokens, 0)
            if ctx.full:
                led.add("image: attn2 projected (gate)", tokens * h, ctx.prec.act)
        if stream == "text" and pre_only:
            continue
        if ctx.full:
            led.add(f"{stream}: attention projected (gate)", tokens * h, ctx.prec.act)
        _layer_norm(led, ctx, f"{stream}: norm2 input", tokens, h, after)
        if ctx.full:
            led.add(f"{stream}: norm2 output", tokens * h, ctx.prec.act)
        ff = f"ff{sfx}"
        _linear_inputs(led, ctx, f"{stream}: MLP input", block, prefix, (f"{ff}.net.0.proj",), tokens, tokens * h)
        if after:
            led.add(f"{stream}: MLP GELU input", tokens * mlp, ctx.prec.act)
        _linear_inputs(led, ctx, f"{stream}: MLP hidden (GELU output)", block, prefix, (f"{ff}.net.2",), tokens,
                       tokens * mlp)
        if ctx.full:
            led.add(f"{stream}: MLP output (gate)", tokens * h, ctx.prec.act)
    # joint attention over both streams, then its output split back into them
    _sdpa(led, ctx, n_img + n_txt, h, heads)
    led.work = 6 * (n_img + n_txt) * h * ctx.prec.act  # attention backward: dq, dk, dv, d_out, both streams' gradients
    outs = [("attn.to_out.0", n_img)] + ([] if pre_only else [("attn.to_add_out", n_txt)])
    present = [(n, t) for n, t in outs if ctx.full or f"{prefix}{n}" in ctx.adapted]
    if present:
        # each stream's slice of the output is copied into a contiguous tensor when a batch has more than one row
        # (reshape of a non-contiguous slice; FLUX's .contiguous()): only the slices that a Linear reads are kept
        shared = ctx.full or ctx.prec.copy is None
        led.add("attention output (to_out input)" if shared else "attention output (a copy per adapted layer)",
                sum(t * h for _, t in present), ctx.prec.act if shared else ctx.prec.copy)
        if not ctx.full:
            led.add("LoRA A outputs", sum(t for _, t in present) * ctx.rank, ctx.prec.rank_bytes)
    return led


def _flux_single_block(block, prefix: str, n_img: int, n_txt: int, ctx: _Ctx, grad_in: bool) -> _Ledger:
    """FLUX.1's ``FluxSingleTransformerBlock``: both streams concatenated, attention and MLP in parallel."""
    led = _Ledger()
    _conditioning(led, ctx, block)
    attn = block.attn
    tokens = n_img + n_txt
    h, heads, mlp = attn.to_q.in_features, attn.heads, block.proj_mlp.out_features
    _layer_norm(led, ctx, "joint: block input (norm)", tokens, h, grad_in)
    if ctx.full:
        led.add("joint: norm output", tokens * h, ctx.prec.act)
    _linear_inputs(led, ctx, "joint: q/k/v/MLP input", block, prefix,
                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), tokens, tokens * h)
    led.add("joint: MLP GELU input", tokens * mlp, ctx.prec.act)
    _rms_norm(led, ctx, "joint: q norm input", attn.norm_q, tokens, h, heads)
    _rms_norm(led, ctx, "joint: k norm input", attn.norm_k, tokens, h, heads)
    _sdpa(led, ctx, tokens, h, heads)
    _linear_inputs(led, ctx, "joint: [attention, MLP] (proj_out input)", block, prefix, ("proj_out",), tokens,
                   tokens * (h + mlp))
    if ctx.full:
        led.add("joint: proj_out output (gate)", tokens * h, ctx.prec.act)
    led.work = 2 * (h + mlp + h) * tokens * ctx.prec.act  # proj_out's input gradient twice over, the residual's
    return led


def _generic_block(block, prefix: str, n_img: int, n_txt: int, ctx: _Ctx, grad_in: bool) -> _Ledger:
    """Any other transformer block, as a pre-norm DiT block on all ``n_img + n_txt`` tokens: two norms, q/k/v (q/k RMS
    norms where the block has RMSNorm modules), flash attention, an MLP of the block's widest ``Linear``. Not checked
    against a measurement for any family."""
    led = _Ledger()
    linears = list(_linears(block))
    q = next((m for n, m in linears if n.endswith("to_q")), None)
    h = q.in_features if q is not None else max(m.in_features for _, m in linears)
    heads = getattr(_get(block, "attn") or _get(block, "attn1") or block, "heads", None) or max(1, h // 128)
    mlp = max([m.out_features for n, m in linears if "ff" in n or "mlp" in n] or [4 * h])
    tokens = n_img + n_txt
    has_rms = any(type(m).__name__ == "RMSNorm" for m in block.modules())
    adapted_here = sum(1 for n in ctx.adapted if n.startswith(prefix))
    _layer_norm(led, ctx, "generic: block input (norm1)", tokens, h, grad_in)
    if ctx.full:
        led.add("generic: norm outputs, projections, MLP hidden (full fine-tuning)", tokens * (5 * h + mlp),
                ctx.prec.act)
        led.add("generic: q/k/v input", tokens * h, ctx.prec.act)
    elif adapted_here:
        if ctx.prec.copy is None:
            led.add("generic: adapted layers' input", tokens * h, ctx.prec.act)
        else:
            led.add("generic: adapted layers' input (a copy per adapted layer)", tokens * h * adapted_here,
                    ctx.prec.copy)
        led.add("LoRA A outputs", tokens * ctx.rank * adapted_here, ctx.prec.rank_bytes)
    if has_rms:
        led.add("generic: q/k norm inputs", 2 * tokens * h, ctx.prec.act)
        if ctx.prec.act != FP32:
            led.add("generic: q/k norm fp32 upcasts", 2 * tokens * h, FP32)
    _sdpa(led, ctx, tokens, h, heads)
    led.add("generic: attention output", tokens * h, ctx.prec.act)
    _layer_norm(led, ctx, "generic: norm2 input", tokens, h, True)
    led.add("generic: MLP activation input", tokens * mlp, ctx.prec.act)
    led.work = 6 * tokens * h * ctx.prec.act
    return led


#: adaLN modules: (chunks of their modulation Linear's output, per-row vectors of width h their modulations keep):
#: the gates are views of the Linear's whole output (all its chunks), each ``1 + scale`` a new tensor
#: (AdaLayerNormZero 6 + 2, SD3.5's ZeroX 9 + 3, the single blocks' 3 + 1; AdaLayerNormContinuous keeps its
#: ``1 + scale`` only)
_ADALN = {"AdaLayerNormZero": (6, 8), "SD35AdaLayerNormZeroX": (9, 12), "AdaLayerNormZeroSingle": (3, 4),
          "AdaLayerNormContinuous": (2, 1)}


def _conditioning(led: _Ledger, ctx: _Ctx, module) -> None:
    """Per-row (not per-token) vectors the adaLN modulations in ``module`` keep (full fine-tuning: also each
    modulation Linear's input)."""
    for m in module.modules():
        spec = _ADALN.get(type(m).__name__)
        linear = getattr(m, "linear", None)
        if spec is None or linear is None:
            continue
        chunks, kept = spec
        led.add("modulation vectors (per row)", kept * linear.out_features // chunks, ctx.prec.act)
        if ctx.full:
            led.add("modulation vectors (per row)", linear.in_features, ctx.prec.act)


def _block_model(block):
    name = type(block).__name__
    if name in MMDIT_BLOCKS:
        return _mmdit_block
    if name in SINGLE_STREAM_BLOCKS:
        return _flux_single_block
    return _generic_block


@dataclass
class ActivationEstimate:
    """What the policy's loss forward keeps for its backward, per loss-forward row (bytes).

    Attributes:
        no_checkpointing: kept from the forward to the backward without gradient checkpointing.
        checkpointing_held: kept with gradient checkpointing (each block's inputs, what runs outside the blocks).
        checkpointing_recompute: the largest block's activations, recomputed during its backward (one block at a
            time): added to ``checkpointing_held`` at the peak.
        backward_work: the gradients alive during the largest block's backward (rough: its attention's dq, dk,
            dv, output gradient and the residual streams' gradients; for FLUX's single blocks their ``proj_out``
            input's): added at the peak in both modes.
        per_batch: bytes kept once per forward whatever the rows (FLUX's rotary tables).
        blocks: per block class, its bytes per row without checkpointing (one block).
        detail: the largest block's items (what keeps them), bytes per row.
        checked: whether every block is of a class whose model is checked against a measurement
            (:data:`CHECKED_BLOCKS`); else a generic estimate.
    """

    no_checkpointing: float
    checkpointing_held: float
    checkpointing_recompute: float
    backward_work: float
    per_batch: float
    blocks: dict[str, float]
    detail: dict[str, float]
    checked: bool

    def held(self, rows: int, checkpointing: bool) -> float:
        """Bytes the forward of ``rows`` rows leaves for the backward (what ``tests/test_plan.py`` measures)."""
        per_row = self.checkpointing_held if checkpointing else self.no_checkpointing
        return rows * per_row + self.per_batch

    def peak(self, rows: int, checkpointing: bool) -> float:
        """Bytes at the peak of the backward of ``rows`` rows: :meth:`held`, the recomputed block (checkpointing) and
        the backward's gradients."""
        extra = self.backward_work + (self.checkpointing_recompute if checkpointing else 0.0)
        return self.held(rows, checkpointing) + rows * extra


def activation_estimate(transformer, units: Sequence, n_img: int, n_txt: int, *, rank: int | None,
                        adapted: Sequence[str] = (), base_bytes: int = 2, autocast: bool = False) -> ActivationEstimate:
    """The activations one loss-forward row of ``transformer`` keeps for the backward (an analytic estimate).

    Args:
        transformer: the diffusers transformer (meta device is fine; without LoRA adapters: ``adapted`` names them).
        units: its blocks in forward order (``PipelineFlow.shard_units``).
        n_img, n_txt: image (latent patch) and text tokens per row.
        rank: LoRA rank, or ``None`` for full fine-tuning (every weight trained).
        adapted: names of the LoRA-adapted modules (from the transformer's root).
        base_bytes: bytes per weight of the base (2: bf16, 4: fp32).
        autocast: the forward runs under bf16 autocast (config ``precision: bf16``).

    Returns:
        An :class:`ActivationEstimate`. Batches of more than one row are assumed (a slice of a multi-row batch is
        copied where a one-row batch's is a view).
    """
    prec = _precision(base_bytes, autocast)
    full = rank is None
    ctx = _Ctx(prec=prec, full=full, rank=rank or 0, adapted=frozenset(adapted))
    names = {id(m): n for n, m in transformer.named_modules()}
    total, recompute, work, held = 0.0, 0.0, 0.0, 0.0
    blocks: dict[str, float] = {}
    detail: dict[str, float] = {}
    grad_in = full  # LoRA: the first blocks' inputs need no gradient (no adapter before them)
    checked = True
    h_in = 0
    for block in units:
        prefix = names[id(block)] + "."
        model = _block_model(block)
        checked &= model is not _generic_block
        led = model(block, prefix, n_img, n_txt, ctx, grad_in)
        grad_in = grad_in or any(n.startswith(prefix) for n in ctx.adapted)
        total += led.total
        whole = model(block, prefix, n_img, n_txt, ctx, True)  # recomputed in its backward, inputs requiring grad
        if whole.total > recompute:
            recompute, detail = whole.total, dict(whole.items)
        work = max(work, whole.work)
        blocks.setdefault(type(block).__name__, whole.total)
        h_in = _block_width(block)
        held += (n_img + n_txt) * h_in * prec.act  # a checkpointed block keeps its inputs (both streams)
    held += h_in * prec.act  # ... and the time embedding they all read (one vector per row)
    outside = _outside_blocks(transformer, n_img, n_txt, h_in, ctx)
    return ActivationEstimate(no_checkpointing=total + outside, checkpointing_held=held + outside,
                              checkpointing_recompute=recompute, backward_work=work,
                              per_batch=_rotary_tables(transformer, n_img + n_txt), blocks=blocks, detail=detail,
                              checked=checked)


def image_tokens(flow) -> int:
    """Latent tokens per sample the transformer sees: packed families (``[tokens, channels]`` samples) as they are,
    else the latent grid (``[C, (F,) h, w]``) over the transformer's patch size."""
    shape = tuple(flow.sample_shape)
    if len(shape) == 2:
        return int(shape[0])
    spatial = shape[1:]
    patch = flow._patch_size() if hasattr(flow, "_patch_size") else flow.transformer.config.get("patch_size", 1)
    if isinstance(patch, int):
        patch = (1,) * (len(spatial) - 2) + (patch, patch)
    patch = tuple(patch)[-len(spatial):]
    patch = (1,) * (len(spatial) - len(patch)) + patch
    return int(math.prod(s // p for s, p in zip(spatial, patch)))


def _block_width(block) -> int:
    q = _get(block, "attn.to_q")  # a Linear, or peft's LoRA layer around one (it has in_features too)
    if isinstance(getattr(q, "in_features", None), int):
        return q.in_features
    return max(m.in_features for n, m in _linears(block))


def _linears(module):
    """``(name, Linear)`` of ``module``, the base layers of peft's LoRA wrappers under their wrapper's name, the
    adapters' own ``lora_A`` / ``lora_B`` left out."""
    import torch

    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and ".lora_" not in f".{name}":
            yield name.removesuffix(".base_layer"), m


def _outside_blocks(transformer, n_img: int, n_txt: int, h: int, ctx: _Ctx) -> float:
    """After the last block: the final norm keeps its input (FLUX: a view of the last single block's joint output);
    full fine-tuning: the time embedding's inputs."""
    import torch

    joint = any(type(m).__name__ in SINGLE_STREAM_BLOCKS for m in transformer.modules())
    led = _Ledger()
    norm_out = getattr(transformer, "norm_out", None)
    if norm_out is not None:
        _conditioning(led, ctx, norm_out)
    if ctx.full:  # the time (and guidance, pooled-text) embedders keep the inputs they compute
        embed = getattr(transformer, "time_text_embed", None)
        for name, m in (embed.named_modules() if embed is not None else ()):
            if isinstance(m, torch.nn.Linear) and name != "text_embedder.linear_1":  # that one reads the input
                led.add("time embedding (per row)", m.in_features, ctx.prec.act)
    led.add("final norm input", (n_img + n_txt if joint else n_img) * h, ctx.prec.act)
    led.add("norm statistics (fp32)", n_img * 2, FP32)
    if ctx.full:
        led.add("final norm output, proj_out input", 2 * n_img * h, ctx.prec.act)
    return led.total


def _rotary_tables(transformer, tokens: int) -> float:
    """FLUX's rotary cos / sin tables, fp32 ``[L, head_dim]`` each, kept once per forward."""
    if type(transformer).__name__ != "FluxTransformer2DModel":
        return 0.0
    return 2 * tokens * transformer.config.attention_head_dim * FP32


def sampling_work(units: Sequence, n_img: int, n_txt: int, act: int) -> float:
    """Bytes per row a no-grad forward (the sampler's) holds at its peak, roughly: the residual streams and the widest
    block's MLP input and output (FLUX's single blocks: also their ``[attention, MLP]`` concatenation). Calibrated on
    the tiny SD3.5 and FLUX pipelines (11 and 15 ``L h`` elements per row measured on the CPU)."""
    tokens, worst = n_img + n_txt, 0.0
    for block in units:
        h = _block_width(block)
        if type(block).__name__ in SINGLE_STREAM_BLOCKS:
            mlp = block.proj_mlp.out_features
            worst = max(worst, tokens * (3 * h + 3 * mlp))
        else:
            mlp = _mlp_width(block, h)
            worst = max(worst, tokens * (3 * h + 2 * mlp))
    return worst * act


def _mlp_width(block, h: int) -> int:
    widths = [m.out_features for n, m in _linears(block) if ("ff" in n or "mlp" in n) and m.out_features > h]
    return max(widths) if widths else 4 * h


#: video frames a causal video VAE (Wan's) decodes at a time: one latent frame, four video frames
VIDEO_DECODE_FRAMES = 4


def vae_decode_work(vae, height: int, width: int, frames: int, act: int) -> float:
    """Bytes per decoded image (video: per video) the VAE decoder holds at its peak, roughly: five tensors of its
    full-resolution stage's channels at full resolution (measured on the tiny VAE: 161 bytes per pixel with 8
    channels, fp32); a video VAE decodes :data:`VIDEO_DECODE_FRAMES` frames at a time."""
    if vae is None:
        return 0.0
    config = vae.config
    channels = (config.get("block_out_channels") or [config.get("base_dim") or 128])[0]
    return 5.0 * channels * height * width * min(max(1, frames), VIDEO_DECODE_FRAMES) * act


# ----------------------------------------------------------------------------------------------- FLOPs


_PER_SAMPLE_PARTS = ("time", "guidance", "pooled", "adaln", "t_embedder", "condition_embedder")
_TEXT_WORDS = ("context", "txt", "caption", "text")  # anywhere in a name part (ff_context, norm1_context)
_TEXT_PREFIXES = ("add_", "to_add_out", "cap_", "encoder")


def _tokens_of(name: str, n_img: int, n_txt: int, joint: bool) -> int:
    """Tokens a module of ``name`` runs on per row: 1 (per-sample: time / guidance embeddings and adaLN modulations),
    the text stream's, the image stream's, or both (``joint``: single-stream blocks)."""
    parts = name.lower().split(".")
    if any(p.startswith(_PER_SAMPLE_PARTS) for p in parts) or (len(parts) >= 2 and "norm" in parts[-2]):
        return 1
    if joint:
        return n_img + n_txt
    if any(p.startswith(_TEXT_PREFIXES) or any(w in p for w in _TEXT_WORDS) for p in parts):
        return n_txt
    return n_img


def forward_flops(transformer, n_img: int, n_txt: int, *, rank: int | None = None,
                  adapted: Sequence[str] = ()) -> dict[str, float]:
    """FLOPs of one row's forward through ``transformer``.

    ``matmul``: ``2 x in x out x tokens`` for every ``Linear`` (``Conv2d``: ``in x k x k`` inputs per output token),
    each on the tokens of its stream (image, text, both in single-stream blocks, one per row for the time embedding
    and the adaLN modulations): the "2 x parameters x tokens" count of a transformer, per stream.
    ``attention``: ``4 x L_q x L_kv x d`` per attention layer (``q k^T`` and ``attention x v``), ``L`` the tokens it
    attends over (joint attention: image + text). ``lora``: the adapters, ``2 r (in + out)`` per adapted layer and
    token.
    The backward is taken as twice the forward (the usual convention; with LoRA the frozen weights get no gradient,
    so it is an upper bound there).
    """
    import torch

    joint_prefixes = [n + "." for n, m in transformer.named_modules() if type(m).__name__ in SINGLE_STREAM_BLOCKS]
    adapted = set(adapted)
    matmul = lora = attention = 0.0
    for name, m in transformer.named_modules():
        if ".lora_" in f".{name}":  # peft's adapter layers: counted as ``lora`` below
            continue
        name = name.removesuffix(".base_layer")  # the wrapped Linear under its wrapper's name
        joint = any(name.startswith(p) for p in joint_prefixes)
        if isinstance(m, torch.nn.Linear):
            tokens = _tokens_of(name, n_img, n_txt, joint)
            matmul += 2.0 * m.in_features * m.out_features * tokens
            if name in adapted and rank:
                lora += 2.0 * rank * (m.in_features + m.out_features) * tokens
        elif isinstance(m, torch.nn.Conv2d):
            tokens = _tokens_of(name, n_img, n_txt, joint)
            matmul += 2.0 * m.in_channels // m.groups * math.prod(m.kernel_size) * m.out_channels * tokens
        q = getattr(m, "to_q", None)  # an attention layer (its to_q a Linear, or peft's LoRA layer around one)
        if isinstance(getattr(q, "out_features", None), int):
            if joint or getattr(m, "add_q_proj", None) is not None:
                lq = lkv = n_img + n_txt
            elif getattr(m, "is_cross_attention", False):
                lq, lkv = n_img, n_txt
            else:
                lq = lkv = n_img
            attention += 4.0 * lq * lkv * q.out_features
    return {"matmul": matmul, "attention": attention, "lora": lora}


# ----------------------------------------------------------------------------------------------- forwards per step


def forwards_per_step(config: Mapping[str, Any], flow) -> dict[str, Any]:
    """Transformer passes of one training step (one sampled batch and its ``updates_per_batch`` updates), per GPU, in
    :mod:`orwcfm_fast.compute`'s unit (one sample through the transformer; classifier-free guidance 2, a ``k``-stage
    solver ``k`` per step), as the trainer counts them (``PipelineModels.forward_passes``: a role's velocity runs two
    passes when it is guided (config ``cfg_mode``) and the flow guides with two passes).

    Returns:
        ``{"forwards/sampling", "forwards/policy", "forwards/reference", "forwards/old_policy", "backwards",
        "forwards", "passes": {role: passes per sample}, "one_off_sampling"}`` (the last: offline-rwr's set, drawn
        once).
    """
    from orwcfm_fast.flows.pipeline_models import role_passes
    from orwcfm_fast.objectives import make_objective
    from orwcfm_fast.sampling.solvers import nfe

    passes = {role: role_passes(flow, config["cfg_mode"], role) for role in ("sampling", "policy")}
    objective = make_objective(config)
    batch, k, updates = config["batch_size"], config["loss_timesteps"], config["updates_per_batch"]
    solve = nfe(config["ode_solver"], config["ode_steps"]) * passes["sampling"]
    online = getattr(objective, "online", True)
    rows = updates * batch * k * passes["policy"]
    roles = set(objective.roles)
    if config["objective"] == "diffusion-nft" and not config["w2_coefficient"] > 0:
        roles.discard("reference")  # its loss skips the reference term at w2_coefficient 0
    out = {"forwards/sampling": batch * solve if online else 0,
           "forwards/policy": rows,
           "forwards/reference": rows if "reference" in roles else 0,
           "forwards/old_policy": rows if "old_policy" in roles else 0}
    out["backwards"] = out["forwards/policy"]
    out["forwards"] = sum(out[f"forwards/{kind}"] for kind in ("sampling", "policy", "reference", "old_policy"))
    out["passes"] = passes
    out["one_off_sampling"] = 0 if online else objective.size(batch) * solve
    return out


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class MemoryItem:
    """One part of a GPU's memory: bytes per GPU under DDP and under FSDP, and how the number was obtained."""

    name: str
    ddp: float
    fsdp: float
    kind: str  # "computed" (exact counts), "estimate" (analytic, checked), "rough" (not checked)
    note: str = ""


@dataclass
class PlanOption:
    """One way to run: DDP or FSDP, with or without gradient checkpointing, per GPU."""

    parallelism: str
    gradient_checkpointing: bool
    fixed_bytes: float  # weights, adapters, gradients, optimiser state, EMA, VAE (text encoders when kept)
    loading_bytes: float  # while the trainer is built (DDP: the whole pipeline; FSDP: shards + one block whole)
    # at the configured batch size: fixed + the largest phase (training step, sampling, decoding), or the loading
    peak_bytes: float
    fits: bool
    max_batch_size: int  # the largest per-GPU batch_size (a multiple of images_per_prompt) that fits; 0: none
    step_tflop: float  # per GPU per training step
    #: at the configured batch size, bytes on top of ``fixed_bytes`` in each phase of a step: the training step (the
    #: activations at the backward's peak), the optimiser step (DDP's flattened gradient copy), sampling, VAE decode
    phases: dict[str, float] = field(default_factory=dict)
    #: the next batch is sampled during the backward (full fine-tuning under DDP on CUDA): the training and optimiser
    #: steps' phases include the sampler's (or the VAE decode's) working memory
    overlapped: bool = False


@dataclass
class PlanReport:
    """Everything :func:`make_plan` found; :meth:`to_dict` is the ``--json`` output."""

    pretrained: str
    pipeline: str
    family: str
    dtype: str
    gpus: int
    gpu: str
    gpu_memory_gib: float
    headroom: float
    tflops: float
    tflops_assumed: bool
    config: dict[str, Any]
    parameters: dict[str, int]
    tokens: dict[str, int]
    memory: list[MemoryItem]
    activations: dict[str, Any]
    host: dict[str, Any]
    forwards: dict[str, Any]
    flops: dict[str, Any]
    options: list[PlanOption]
    recommendation: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_tokens(flow) -> int:
    """Text tokens per prompt row the transformer sees: ``max_sequence_length`` (SD3 / SD3.5: plus CLIP's 77 in
    front). Families that cut prompts to their own length (Qwen-Image, Z-Image) pad a batch to its longest: an
    upper bound there."""
    if flow.family == "sd3":
        return int(getattr(flow.pipe, "tokenizer_max_length", 77)) + flow.max_sequence_length
    return flow.max_sequence_length


def _text_width(transformer) -> tuple[int, int]:
    """``(embedding width, pooled width)`` of the prompt embeddings the transformer reads."""
    cfg = transformer.config
    width = next((cfg[k] for k in ("joint_attention_dim", "cap_feat_dim", "text_dim", "caption_channels",
                                   "cross_attention_dim") if isinstance(cfg.get(k), int)), 0)
    return width, int(cfg.get("pooled_projection_dim") or 0)


def _detect_gpu() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0).upper().replace(" ", "")
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for the default GPU
        return None
    if "A100" in name:
        return "A100-80GB" if "80" in name else "A100-40GB"
    return next((g for g in GPUS if g.replace("-", "") in name), None)


def _resolve_gpu(gpu: str | None, memory: float | None, tflops: float | None) -> tuple[str, float, float, bool]:
    """``(gpu name, memory GiB, TFLOP/s, whether the TFLOP/s are the table's assumption)``."""
    if gpu is not None and gpu not in GPUS and (memory is None or tflops is None):
        raise PlanError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}: give --gpu-memory and --tflops for it")
    name = gpu or _detect_gpu() or DEFAULT_GPU
    table_memory, table_tflops = GPUS.get(name, (None, None))
    return (name, float(memory if memory is not None else table_memory),
            float(tflops if tflops is not None else table_tflops), tflops is None)


def _check_numbers(*, gpus, gpu_memory_gib, tflops, headroom, steps_per_epoch) -> None:
    """The numeric arguments of :func:`make_plan`, each named by its command-line flag when out of range."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(gpus, int) and not isinstance(gpus, bool)) or gpus < 1:
        raise PlanError(f"--gpus must be an integer >= 1, got {gpus!r}")
    if gpu_memory_gib is not None and not (number(gpu_memory_gib) and gpu_memory_gib > 0):
        raise PlanError(f"--gpu-memory must be a number of GiB > 0, got {gpu_memory_gib!r}")
    if tflops is not None and not (number(tflops) and tflops > 0):
        raise PlanError(f"--tflops must be > 0, got {tflops!r}")
    if not (number(headroom) and 0.0 <= headroom < 1.0):
        raise PlanError(f"--headroom must be in [0, 1), got {headroom!r}")
    if steps_per_epoch is not None and not (isinstance(steps_per_epoch, int) and not isinstance(steps_per_epoch, bool)
                                            and steps_per_epoch >= 1):
        raise PlanError(f"--steps-per-epoch must be an integer >= 1, got {steps_per_epoch!r}")


def make_plan(pretrained: str | Path, config: Mapping[str, Any] | None = None, *, gpus: int = 1,
              gpu: str | None = None, gpu_memory_gib: float | None = None, tflops: float | None = None,
              dtype: str = "bf16", headroom: float = DEFAULT_HEADROOM,
              steps_per_epoch: int | None = None) -> PlanReport:
    """The memory, compute and recommendation of fine-tuning the pipeline in ``pretrained`` with ``config``.

    Args:
        pretrained: a diffusers pipeline folder (weights not needed: ``model_index.json`` and the configs).
        config: the trainer's config keys (validated; defaults filled in as the trainer does).
        gpus: GPUs the run uses (DDP replicates, FSDP shards over them).
        gpu: a name of :data:`GPUS` (default: this machine's CUDA device if known, else ``"H100"``).
        gpu_memory_gib: memory per GPU (default: the GPU's).
        tflops: sustained TFLOP/s per GPU (default: the GPU's assumed value in :data:`GPUS`).
        dtype: the pipeline's weights, ``"bf16"`` or ``"fp32"`` (``train --dtype``).
        headroom: share of the memory kept free (CUDA context, fragmentation, communication buffers).
        steps_per_epoch: for a time per epoch.

    Raises:
        PlanError: an unusable folder, config value or argument (the message names it).
    """
    from orwcfm_fast.config import ConfigError, validate_config
    from orwcfm_fast.flows.pipeline_models import lora_targets, pipeline_flow
    from orwcfm_fast.prompts import check_prompt_groups

    try:
        cfg = validate_config(config)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    if dtype not in ("bf16", "fp32"):
        raise PlanError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    _check_numbers(gpus=gpus, gpu_memory_gib=gpu_memory_gib, tflops=tflops, headroom=headroom,
                   steps_per_epoch=steps_per_epoch)
    try:  # what the trainer refuses for prompted runs (prompts.config_prompts)
        check_prompt_groups(cfg)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    gpu, memory_gib, tflops, assumed = _resolve_gpu(gpu, gpu_memory_gib, tflops)
    pipe = load_meta_pipeline(pretrained)
    try:
        flow = pipeline_flow(pipe, cfg, "cpu")
    except ValueError as err:
        raise PlanError(str(err)) from None
    transformer = flow.transformer
    units = flow.shard_units(transformer)
    b = 2 if dtype == "bf16" else 4
    autocast = cfg["precision"] in ("bf16", "auto")  # auto: bf16 on the GPUs this plans for (sm_80+)
    act = 2 if (b == 2 or autocast) else 4
    n_img, n_txt = image_tokens(flow), text_tokens(flow)
    rank = cfg["lora_rank"]
    lora = rank is not None
    base = _numel(transformer)
    buffers = _buffer_numel(transformer)  # whole on every GPU, in the weights' dtype (FSDP does not shard buffers)
    g = gpus
    if lora:
        targets = lora_targets(cfg, flow)
        adapter, adapted = lora_parameter_count(transformer, rank, targets)
        adapter_shard = _shard_numel(_lora_shapes(transformer, rank, adapted), g)
    else:
        adapter, adapted, adapter_shard = 0, [], 0
    unit_params = [_numel(u) for u in units]
    root = base - sum(unit_params)  # the root's own parameters (embedders, final layer): outside every block
    base_shard = _shard_numel((p.shape for p in transformer.parameters()), g)  # the largest rank's
    trained = adapter if lora else base
    trained_shard = adapter_shard if lora else base_shard

    # ---------------------------------------------------------------- memory that does not depend on the batch
    # (as PipelineModels builds it: FSDP's fully_shard per block, then the root, shards every parameter over the GPUs,
    # dim 0 split, the first rank holding the largest share; buffers stay whole; full fine-tuning under FSDP trains
    # fp32 shards, which are the master weights)
    mem: list[MemoryItem] = []
    dtype_name = "bf16" if b == 2 else "fp32"
    compute = 2 if (b == 2 or autocast) else FP32  # FSDP's gather dtype (PipelineModels' _compute_dtype)

    def sharded(nbytes_per_param: float) -> float:
        """One transformer at rest under FSDP: the largest rank's shards and the buffers, whole."""
        return (base_shard + buffers) * nbytes_per_param

    weights_note = "parameters and floating-point buffers; FSDP: every parameter sharded, the buffers whole"
    if lora:
        mem.append(MemoryItem(f"transformer weights ({dtype_name})", (base + buffers) * b, sharded(b), "computed",
                              weights_note))
        mem.append(MemoryItem("LoRA adapters: policy + last policy (fp32)", 2 * adapter * FP32,
                              2 * adapter_shard * FP32, "computed", f"{adapter:,} parameters each, rank {rank}"))
    else:
        mem.append(MemoryItem(f"transformer weights: policy ({dtype_name}; FSDP: fp32 shards)", (base + buffers) * b,
                              sharded(FP32), "computed", weights_note + "; FSDP: the fp32 shards are the masters"))
        mem.append(MemoryItem(f"frozen copies: last policy + reference ({dtype_name})", 2 * (base + buffers) * b,
                              2 * sharded(b), "computed", weights_note))
        if b < FP32:
            mem.append(MemoryItem("fp32 master weights", base * FP32, 0.0, "computed",
                                  "Adam's updates would round away in bf16 (master_weights.py)"))
    grad_note = ("bf16 on the weights during the backward, then fp32 on the masters: 4 B per parameter at the peak"
                 if not lora and b < FP32 else "")
    mem.append(MemoryItem("gradients (fp32)", trained * FP32, trained_shard * FP32, "computed", grad_note))
    mem.append(MemoryItem("Adam moments (fp32, two)", 2 * trained * FP32, 2 * trained_shard * FP32, "computed"))
    if cfg["ema_decay"] is not None:
        mem.append(MemoryItem("EMA (fp32)", trained * FP32, trained_shard * FP32, "computed",
                              f"ema_decay {cfg['ema_decay']}"))
    if g > 1:
        mem.append(MemoryItem("FSDP: two blocks gathered (the running one, the prefetched)", 0.0,
                              2 * max(unit_params or [0]) * compute, "estimate"))
        forwarding = 1 if lora else 3  # LoRA: one transformer; full fine-tuning: policy, last policy, reference
        mem.append(MemoryItem("FSDP: non-block layers gathered after a forward", 0.0, forwarding * root * compute,
                              "computed", "fully_shard(root) keeps the root's own parameters gathered after a forward "
                              f"without gradients, until its next: one copy per transformer that runs ({forwarding})"))
    vae = getattr(pipe, "vae", None)
    vae_bytes = (_numel(vae) + _buffer_numel(vae)) * b
    mem.append(MemoryItem(f"VAE ({dtype_name})", vae_bytes, vae_bytes, "computed"))
    encoders = {k: _numel(m) for k, m in pipe.components.items() if k.startswith("text_encoder") and m is not None}
    encoder_bytes = sum(_numel(m) + _buffer_numel(m) for k, m in pipe.components.items()
                        if k.startswith("text_encoder") and m is not None) * b
    if cfg["prompt_cache_size"] is not None:
        mem.append(MemoryItem(f"text encoders ({dtype_name}), kept on the GPU", encoder_bytes, encoder_bytes,
                              "computed", "prompt_cache_size set: prompts are encoded when drawn"))
    fixed = {"ddp": sum(m.ddp for m in mem), "fsdp": sum(m.fsdp for m in mem)}
    # DDP's gradient all-reduce (PipelineModels.reduce_gradients): every gradient flattened into one fp32 copy, alive
    # only during the optimiser step, after the backward freed the activations; FSDP reduce-scatters per block
    allreduce = {"ddp": trained * FP32 if g > 1 else 0.0, "fsdp": 0.0}
    # Loading (PipelineModels.__init__), gradients and Adam's moments come later, at the first step. DDP: the whole
    # pipeline goes to each GPU, with full fine-tuning's two copies (and fp32 masters of a bf16 base), then the
    # prompts are encoded with the text encoders there. FSDP: the VAE and text encoders go to the GPU; the
    # transformer (and full fine-tuning's copies, made in host memory) is moved block by block as fully_shard shards
    # it: the GPU holds the shards so far plus one unit whole, just moved, in its dtype (fp32 for the trained one).
    others = vae_bytes + encoder_bytes
    biggest_unit = max([*unit_params, root])
    if lora:
        whole_ddp = (base + buffers) * b + 2 * adapter * FP32 + others
        whole_fsdp = sharded(b) + 2 * adapter_shard * FP32 + biggest_unit * b + others
    else:
        whole_ddp = 3 * (base + buffers) * b + (base * FP32 if b < FP32 else 0) + others
        whole_fsdp = sharded(FP32) + 2 * sharded(b) + biggest_unit * FP32 + others
    loading = {"ddp": whole_ddp, "fsdp": whole_fsdp}

    # ---------------------------------------------------------------- what depends on the batch
    acts = activation_estimate(transformer, units, n_img, n_txt, rank=rank, adapted=adapted, base_bytes=b,
                               autocast=autocast)
    forwards = forwards_per_step(cfg, flow)
    passes = forwards["passes"]
    sample_row = sampling_work(units, n_img, n_txt, act)
    frames = (flow.frames or 1) if flow.video else 1
    decode_image = vae_decode_work(vae, flow.height, flow.width, frames, act)
    ipp = cfg["images_per_prompt"]

    # full fine-tuning under DDP on CUDA samples the next batch (sampling, VAE decode, reward) in the background
    # during the backward (the trainer's _overlap: config overlap_sampling None -> CUDA and models.can_overlap, which
    # is False with LoRA and under FSDP; nothing to overlap for an offline objective)
    online = forwards["one_off_sampling"] == 0
    overlapped = {par: not lora and par == "ddp" and cfg["overlap_sampling"] is not False and online
                  for par in ("ddp", "fsdp")}

    def phases(batch: int, checkpointing: bool, par: str) -> dict[str, float]:
        """Bytes on top of the fixed memory in each phase of a step at ``batch`` per GPU."""
        rows = batch * cfg["loss_timesteps"] * passes["policy"]
        sampling_rows = batch * (passes["sampling"] if flow.cfg_batched else 1)
        chunk = min(batch, cfg["vae_batch_size"] or batch)
        sampling, decode = sampling_rows * sample_row, chunk * decode_image
        background = max(sampling, decode) if overlapped[par] else 0.0  # the next batch, made meanwhile
        return {"training step (activations)": acts.peak(rows, checkpointing) + background,
                ALLREDUCE_PHASE: allreduce[par] + background,
                "sampling (no-grad forward)": sampling,
                "VAE decode": decode}

    f_row = forward_flops(transformer, n_img, n_txt, rank=rank, adapted=adapted)
    base_f = f_row["matmul"] + f_row["attention"]
    with_lora = base_f + f_row["lora"]

    def step_flops(checkpointing: bool) -> float:
        policy = forwards["forwards/policy"] * with_lora * (3 + (1 if checkpointing else 0))
        return (forwards["forwards/sampling"] * with_lora + policy + forwards["forwards/reference"] * base_f
                + forwards["forwards/old_policy"] * with_lora)

    usable = memory_gib * GIB * (1.0 - headroom)
    options = []
    choices = [("ddp", False), ("ddp", True)] + ([("fsdp", False), ("fsdp", True)] if g > 1 else [])
    for par, ckpt in choices:
        def peak_at(batch: int, par=par, ckpt=ckpt) -> float:
            return max(fixed[par] + max(phases(batch, ckpt, par).values()), loading[par])

        low, high = 0, 1 << 20  # the largest fitting number of prompt groups, by bisection (memory grows with it)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if peak_at(mid * ipp) <= usable else (low, mid - 1)
        peak = peak_at(cfg["batch_size"])
        options.append(PlanOption(par, ckpt, fixed[par], loading[par], peak, peak <= usable, low * ipp,
                                  step_flops(ckpt) / 1e12, phases(cfg["batch_size"], ckpt, par), overlapped[par]))
    recommendation = _recommend(options, cfg, g, usable)
    chosen = next((o for o in options if (o.parallelism, o.gradient_checkpointing)
                   == (recommendation.get("parallelism"), recommendation.get("gradient_checkpointing"))), None)
    step_ckpt = chosen.gradient_checkpointing if chosen is not None else cfg["gradient_checkpointing"]
    step_s = step_flops(step_ckpt) / (tflops * 1e12)

    width, pooled = _text_width(transformer)
    per_prompt = (n_txt * width + pooled) * b
    n_prompts = _count_prompts(cfg)
    cached = n_prompts
    if cfg["prompt_cache_size"] is not None and n_prompts is not None:
        cached = min(n_prompts, cfg["prompt_cache_size"])
    host = {"prompt_embedding_bytes_per_prompt": per_prompt, "prompts": n_prompts, "prompts_cached": cached,
            "prompt_cache_bytes": None if cached is None else cached * per_prompt,
            "text_encoder_bytes": encoder_bytes, "text_encoders": encoders,
            "note": "prompt embeddings live in host RAM (one copy per process under torchrun); the text encoders are "
                    "on the GPU while the prompts are encoded at the start, then moved to the CPU (unless "
                    "prompt_cache_size is set: then they stay on the GPU)"}
    checked = acts.checked
    notes = [
        "computed: exact counts of the meta-device modules (weights, adapters, optimiser state, forwards, FLOPs); "
        "estimate: analytic activations " + ("(this family's blocks are checked against the CPU's accounting: "
                                            "kept activations within 3%, backward peak within 30%)" if checked else
                                            "(GENERIC: this family's blocks have no checked model; treat as +-50%)"),
        "rough: the sampler's and the VAE decode's working memory (scaled from tiny pipelines); the VAE decode "
        "can be bounded with config vae_batch_size",
        "not counted: the CUDA context and kernels' workspaces (inside the headroom), the text encoders' own "
        "activations while encoding (text_encoder_batch_size prompts at a time, at the start)",
        f"time: FLOPs / ({tflops:g} TFLOP/s{' ASSUMED for ' + gpu + ', pass --tflops' if assumed else ''}); the "
        "backward counted as 2x the forward, gradient checkpointing adds one forward of the policy; VAE decode, "
        "rewards, text encoding and communication not included",
    ]
    if overlapped["ddp"]:
        notes.append("full fine-tuning under DDP samples the next batch during the backward (config overlap_sampling, "
                     "on by default on CUDA): DDP's training and optimiser steps hold the sampler's (or the VAE "
                     "decode's) working memory too; set overlap_sampling false to take it off")
    if flow.family == "sd3" and cfg["guidance_scale"] is None:
        notes.append("guidance_scale None: SD3's default 1 (no classifier-free guidance); set it (e.g. 4.5) to "
                     "plan a guided run")
    return PlanReport(
        pretrained=str(pretrained), pipeline=type(pipe).__name__, family=flow.family, dtype=dtype_name, gpus=g,
        gpu=gpu, gpu_memory_gib=memory_gib, headroom=headroom, tflops=tflops, tflops_assumed=assumed,
        config={k: cfg[k] for k in ("resolution", "batch_size", "images_per_prompt", "loss_timesteps",
                                    "updates_per_batch", "ode_solver", "ode_steps", "cfg_mode", "guidance_scale",
                                    "lora_rank", "ema_decay", "gradient_checkpointing", "precision",
                                    "max_sequence_length", "prompt_cache_size", "vae_batch_size", "objective")},
        parameters={"transformer": base, "lora_adapter": adapter, "lora_adapted_modules": len(adapted),
                    "trained": trained, "vae": _numel(vae), "text_encoders": sum(encoders.values()),
                    "largest_block": max(unit_params or [0]), "blocks": len(units)},
        tokens={"image": n_img, "text": n_txt, "height": flow.height, "width": flow.width,
                "loss_rows_per_step": cfg["batch_size"] * cfg["loss_timesteps"] * passes["policy"]},
        memory=mem,
        activations={"per_row_no_checkpointing": acts.no_checkpointing,
                     "per_row_checkpointing_held": acts.checkpointing_held,
                     "per_row_checkpointing_recompute": acts.checkpointing_recompute,
                     "per_row_backward_work": acts.backward_work, "per_forward": acts.per_batch,
                     "per_row_peak_no_checkpointing": acts.peak(1, False) - acts.per_batch,
                     "per_row_peak_checkpointing": acts.peak(1, True) - acts.per_batch,
                     "per_row_sampling_work": sample_row, "per_image_vae_decode": decode_image,
                     "checked": checked, "largest_block_items": acts.detail},
        host=host, forwards=forwards,
        flops={"per_row_forward": f_row, "per_step_no_checkpointing": step_flops(False),
               "per_step_checkpointing": step_flops(True), "step_seconds": step_s,
               "epoch_seconds": None if steps_per_epoch is None else step_s * steps_per_epoch,
               "steps_per_epoch": steps_per_epoch, "one_off_sampling_seconds":
                   forwards["one_off_sampling"] * with_lora / (tflops * 1e12)},
        options=options, recommendation=recommendation, notes=notes)


def _count_prompts(cfg: Mapping[str, Any]) -> int | None:
    if cfg["prompts"] is None:
        return None
    from orwcfm_fast.prompts import load_prompts

    try:
        return len(load_prompts(cfg["prompts"], "prompts"))
    except ValueError as err:
        raise PlanError(str(err)) from None


def _name(option: PlanOption) -> str:
    return option.parallelism.upper() + (" + gradient checkpointing" if option.gradient_checkpointing else "")


def _recommend(options: Sequence[PlanOption], cfg: Mapping[str, Any], gpus: int, usable: float) -> dict[str, Any]:
    """The first option (DDP, DDP + checkpointing, FSDP, FSDP + checkpointing) where the configured batch fits;
    else the first where some batch does, with its largest batch; else a plain 'does not fit'."""
    batch = cfg["batch_size"]
    for o in options:
        if o.fits:
            return {"fits": True, "parallelism": o.parallelism, "gradient_checkpointing": o.gradient_checkpointing,
                    "batch_size": batch, "max_batch_size": o.max_batch_size,
                    "message": f"{_name(o)}: batch_size {batch} per GPU fits ({o.peak_bytes / GIB:.1f} of "
                               f"{usable / GIB:.1f} GiB usable); up to {o.max_batch_size} per GPU"}
    for o in options:
        if o.max_batch_size > 0:
            return {"fits": False, "parallelism": o.parallelism, "gradient_checkpointing": o.gradient_checkpointing,
                    "batch_size": o.max_batch_size, "max_batch_size": o.max_batch_size,
                    "message": f"batch_size {batch} does not fit per GPU; {_name(o)} fits batch_size "
                               f"{o.max_batch_size} per GPU (set --set batch_size={o.max_batch_size}, or more GPUs)"}
    last = options[-1]
    how = "FSDP + gradient checkpointing" if gpus > 1 else "gradient checkpointing (FSDP needs --gpus > 1)"
    why = f"{last.fixed_bytes / GIB:.1f} GiB before activations"
    if last.loading_bytes > usable:
        why = (f"loading alone takes {last.loading_bytes / GIB:.1f} GiB (the VAE and text encoders, which encode the "
               "prompts on the GPU, and the transformer's shards with one block whole as FSDP moves it there)")
    return {"fits": False, "parallelism": None, "gradient_checkpointing": None, "batch_size": 0, "max_batch_size": 0,
            "message": f"does not fit even with {how} on {gpus} GPU{'s' if gpus > 1 else ''}: {why}; "
                       f"{usable / GIB:.1f} GiB usable per GPU"}


# ----------------------------------------------------------------------------------------------- text and the command


def _gib(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / GIB:.2f} GiB" if x >= GIB / 100 or x == 0 else f"{x / 2 ** 20:.2f} MiB"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return f"{n:g}"


def _background(option: PlanOption) -> float:
    """The overlapped sampling's bytes in ``option`` 's training and optimiser phases (0 when not overlapped)."""
    if not option.overlapped:
        return 0.0
    return max(option.phases.get("sampling (no-grad forward)", 0.0), option.phases.get("VAE decode", 0.0))


def render_text(report: PlanReport) -> str:
    """The plan as a table for a terminal."""
    r, c, p, t = report, report.config, report.parameters, report.tokens
    lora = (f"; LoRA rank {c['lora_rank']}: {_count(p['lora_adapter'])} per adapter on {p['lora_adapted_modules']} "
            "modules" if c["lora_rank"] is not None else "; full fine-tuning")
    lines = [f"orwcfm-fast plan: {r.pipeline} ({r.family}) from {r.pretrained}",
             f"  weights {r.dtype}, precision {c['precision']}, {t['height']}x{t['width']}: {t['image']} image + "
             f"{t['text']} text tokens per row",
             f"  transformer {_count(p['transformer'])} parameters ({p['blocks']} blocks, largest "
             f"{_count(p['largest_block'])}){lora}; VAE {_count(p['vae'])}; text encoders {_count(p['text_encoders'])}",
             "",
             f"per GPU: {r.gpu}, {r.gpu_memory_gib:g} GiB, {r.headroom:.0%} kept free -> "
             f"{r.gpu_memory_gib * (1 - r.headroom):.1f} GiB usable; "
             + (f"{r.gpus} GPUs (FSDP shards over them)" if r.gpus > 1 else "1 GPU (FSDP needs --gpus > 1)"),
             f"  {'part':58s} {'DDP':>11s} {'FSDP':>11s}  kind"]
    for m in r.memory:
        lines.append(f"  {m.name:58s} {_gib(m.ddp):>11s} {_gib(m.fsdp):>11s}  {m.kind}")
    fixed = {o.parallelism: o.fixed_bytes for o in r.options}
    loading = {o.parallelism: o.loading_bytes for o in r.options}
    lines.append(f"  {'total before activations':58s} {_gib(fixed.get('ddp')):>11s} {_gib(fixed.get('fsdp')):>11s}")
    lines.append(f"  {'while loading (text encoders on the GPU; FSDP: shards)':58s} {_gib(loading.get('ddp')):>11s} "
                 f"{_gib(loading.get('fsdp')):>11s}  computed")
    reduce = {o.parallelism: o.phases.get(ALLREDUCE_PHASE, 0.0) - _background(o) for o in r.options}
    if any(reduce.values()):
        lines.append(f"  {'optimiser step: + gradient all-reduce copy (flat, fp32)':58s} "
                     f"{_gib(reduce.get('ddp')):>11s} {_gib(reduce.get('fsdp')):>11s}  computed, a phase")
    a = r.activations
    kind = "estimate, checked" if a["checked"] else "GENERIC estimate, unchecked for this family"
    lines += ["",
              f"activations per loss-forward row ({kind}): {_gib(a['per_row_no_checkpointing'])} kept without "
              f"gradient checkpointing, {_gib(a['per_row_checkpointing_held'])} with it (+ "
              f"{_gib(a['per_row_checkpointing_recompute'])} for the block recomputed in its backward); the "
              f"backward's gradients + {_gib(a['per_row_backward_work'])}",
              f"  the loss forward has {t['loss_rows_per_step']} rows per step (batch_size {c['batch_size']} x "
              f"loss_timesteps {c['loss_timesteps']} x {r.forwards['passes']['policy']} for a guided loss); the "
              f"sampler {_gib(a['per_row_sampling_work'])} per row, the VAE decode "
              f"{_gib(a['per_image_vae_decode'])} per image (rough)",
              "",
              f"  {'option (batch_size ' + str(c['batch_size']) + ' per GPU)':40s} {'peak':>11s}  {'fits':4s}  "
              f"{'largest batch_size':>18s}  {'TFLOP/step':>10s}"]
    for o in r.options:
        lines.append(f"  {_name(o):40s} {_gib(o.peak_bytes):>11s}  {'yes' if o.fits else 'no':4s}  "
                     f"{o.max_batch_size:>18d}  {o.step_tflop:>10.1f}")
    lines += ["", "recommendation: " + r.recommendation["message"]]
    f = r.forwards
    once = f"; once: {f['one_off_sampling']} (offline set)" if f["one_off_sampling"] else ""
    lines += ["",
              f"transformer passes per training step per GPU (orwcfm_fast.compute's unit): sampling "
              f"{f['forwards/sampling']} ({c['batch_size']} x {c['ode_steps']} {c['ode_solver']} steps x "
              f"{f['passes']['sampling']}), policy {f['forwards/policy']}, reference {f['forwards/reference']}, "
              f"old policy {f['forwards/old_policy']}; backwards {f['backwards']}{once}"]
    fl, row = r.flops, r.flops["per_row_forward"]
    epoch = "" if fl["epoch_seconds"] is None else (f", {fl['epoch_seconds'] / 60:.1f} min per epoch of "
                                                   f"{fl['steps_per_epoch']} steps")
    lines.append(f"FLOPs: one row's forward {row['matmul'] / 1e12:.3f} (matmul) + {row['attention'] / 1e12:.3f} "
                 f"(attention) + {row['lora'] / 1e12:.4f} (LoRA) TFLOP; a step "
                 f"{fl['per_step_no_checkpointing'] / 1e12:.1f} TFLOP ({fl['per_step_checkpointing'] / 1e12:.1f} with "
                 f"checkpointing) -> ~{fl['step_seconds']:.2f} s per step{epoch} at {r.tflops:g} TFLOP/s per GPU"
                 f"{' (ASSUMED)' if r.tflops_assumed else ''}")
    h = r.host
    cache = ("" if h["prompt_cache_bytes"] is None else
             f"; {h['prompts_cached']} prompts cached: {_gib(h['prompt_cache_bytes'])}")
    lines.append(f"host RAM: prompt embeddings {h['prompt_embedding_bytes_per_prompt'] / 1e6:.2f} MB per prompt"
                 f"{cache}; text encoders {_gib(h['text_encoder_bytes'])} on the GPU while encoding")
    lines += ["", "notes:"] + [f"  - {n}" for n in r.notes]
    return "\n".join(lines)


def _arg_type(kind, low: float, high: float | None = None, *, closed_low: bool = True):
    """An argparse ``type``: ``kind`` (int or float) within ``[low, high)`` (``(low, ...)`` when not
    ``closed_low``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        ok = (value >= low if closed_low else value > low) and (high is None or value < high)
        if not ok or (kind is float and not math.isfinite(value)):
            where = ("[" if closed_low else "(") + f"{low:g}, " + (f"{high:g})" if high is not None else "...)")
            raise argparse.ArgumentTypeError(f"must be in {where}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's message: "invalid int value" when ``kind`` fails
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds ``plan`` to the ``orwcfm-fast`` subparsers."""
    from orwcfm_fast.train_run import parse_assignment

    p = sub.add_parser(
        "plan",
        help="will a text-to-image fine-tuning fit on the GPUs, and what will a step cost (no GPU, no weights)",
        description=(
            "Build the pipeline of --pretrained on the meta device (configs only: no weights are read) and print, per "
            "GPU, for DDP and FSDP: the weights, LoRA adapters, gradients, Adam state, EMA, full fine-tuning's copies "
            "and masters, VAE and text encoders (computed); the activations of the loss forward with and without "
            "gradient checkpointing (estimated); the transformer passes and FLOPs of a training step and a time per "
            "step; and which setting to use, with the largest per-GPU batch that fits."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pretrained", required=True, metavar="DIR",
                   help="a diffusers pipeline folder (model_index.json and each component's config.json suffice)")
    p.add_argument("--gpus", type=_arg_type(int, 1), default=1, help="GPUs of the run (DDP replicates, FSDP shards over them)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None,
                   help=f"the GPU (memory and assumed TFLOP/s); default: this machine's if known, else {DEFAULT_GPU}")
    p.add_argument("--gpu-memory", type=_arg_type(float, 0, closed_low=False), default=None, metavar="GiB",
                   help="memory per GPU (default: the GPU's)")
    p.add_argument("--tflops", type=_arg_type(float, 0, closed_low=False), default=None,
                   help="sustained TFLOP/s per GPU for the time estimate (default: the GPU's ASSUMED value: "
                        + ", ".join(f"{k} {v[1]:g}" for k, v in GPUS.items()) + ")")
    p.add_argument("--headroom", type=_arg_type(float, 0, 1), default=DEFAULT_HEADROOM,
                   help="share of each GPU's memory kept free (CUDA context, fragmentation, NCCL buffers)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="the pipeline's weights, as train --dtype (bf16: what it picks on CUDA sm_80+)")
    p.add_argument("--config", metavar="FILE.json", action="append", default=None, help="as for train")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", type=parse_assignment, default=None,
                   help="as for train (e.g. --set resolution=512 --set lora_rank=32 --set gradient_checkpointing=true)")
    p.add_argument("--steps-per-epoch", type=_arg_type(int, 1), default=None, help="for a time per epoch")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    return p


def run_plan(args: argparse.Namespace, prog: str = "orwcfm-fast plan") -> int:
    """Run the ``plan`` command for parsed ``args``; returns the exit status (0 done, 2 a bad argument, folder or
    config)."""
    from orwcfm_fast.flows import MissingExtraError
    from orwcfm_fast.train_run import UsageError, resolve_config

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        config = resolve_config("text-to-image", args.config or (), args.set or ())
        for key in ("reward", "seed", "savedir"):  # the task's defaults, irrelevant to the plan
            config.pop(key, None)
        report = make_plan(args.pretrained, config, gpus=args.gpus, gpu=args.gpu, gpu_memory_gib=args.gpu_memory,
                           tflops=args.tflops, dtype=args.dtype, headroom=args.headroom,
                           steps_per_epoch=args.steps_per_epoch)
    except (UsageError, PlanError, MissingExtraError) as err:
        return fail(str(err))
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else render_text(report), flush=True)
    return 0
