"""The diffusers text-to-image family for the trainer: a pipeline, its flow and its three roles.

With LoRA (config ``lora_rank``, default 32) there is one transformer in memory
(:class:`~orwcfm_fast.flows.lora.LoraRoles`): ``net_model`` is the pipeline's transformer with the
trained adapter active, ``last_policy`` the second adapter, ``ref_model`` the transformer with
adapters disabled. With ``lora_rank: None`` (full fine-tuning) the transformer is trained in
place and two frozen copies are made, as for plain models.

Checkpoints hold the trained weights only (both adapters, or the three transformers for full
fine-tuning) plus a fingerprint of the base weights, which a resume checks.

With config ``parallelism: "fsdp"`` (under torchrun) every transformer is sharded with FSDP2, one unit per
block (:meth:`PipelineFlow.shard_units`), moved to the device unit by unit as it is sharded (it is never whole on a
GPU): with LoRA the frozen base and both adapters, the roles switching as before; with full fine-tuning the trained transformer in float32 (its shards are the master weights; the
forwards gather it in the compute dtype) and its two frozen copies in the pipeline's dtype. Gradients are
reduce-scattered in the backward, in float32; the compute dtype is bf16 under ``precision: "bf16"``, else the
pipeline's dtype.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence

import torch

from orwcfm_fast import distributed as dist_utils
from orwcfm_fast.checkpoints import CheckpointError, load_state_strict
from orwcfm_fast.flows import flow_for_pipeline
from orwcfm_fast.flows.lora import LoraRoles
from orwcfm_fast.flows.master_weights import MasterWeights, needs_master_weights
from orwcfm_fast.flows.models import TrainingModels, blend_into

__all__ = ["PipelineModels", "RoleVelocity", "base_fingerprint", "cfg_roles", "lora_targets", "pipeline_flow",
           "role_passes"]


def _compute_dtype(transformer: torch.nn.Module, precision: str) -> torch.dtype | None:
    """The dtype FSDP gathers the weights in: bf16 under ``precision: "bf16"``, else the transformer's own
    (``None``, no casting, for float32) -- the dtype the forwards run in without sharding."""
    if precision == "bf16":
        return torch.bfloat16
    dtype = next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)
    return dtype if torch.finfo(dtype).bits < 32 else None


class RoleVelocity(torch.nn.Module):
    """``forward(t, x, *cond) -> v``: one role of a pipeline's transformer as a velocity module.

    Args:
        flow: the pipeline's flow (:class:`~orwcfm_fast.flows.diffusers_base.PipelineFlow`).
        transformer: the transformer to call (registered, so ``.eval()`` and graph capture see it).
        roles: the LoRA roles, or ``None`` (full fine-tuning: ``transformer`` is the role).
        role: ``"policy"``, ``"last_policy"`` or ``"reference"``.
        guided: apply the flow's classifier-free guidance (the sampling velocity).
    """

    def __init__(self, flow, transformer: torch.nn.Module, roles: LoraRoles | None, role: str, guided: bool):
        super().__init__()
        self.transformer = transformer
        self._flow, self._roles, self.role, self.guided = flow, roles, role, guided

    def forward(self, t: torch.Tensor, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        switch = self._roles.role(self.role) if self._roles is not None else contextlib.nullcontext()
        with switch:
            if self.guided:
                return self._flow.velocity(t, x, cond, self.transformer)
            return self._flow.transformer_velocity(t, x, cond, self.transformer)

    def extra_repr(self) -> str:
        return f"role={self.role!r}, guided={self.guided}"


def cfg_roles(mode: str) -> tuple[bool, bool]:
    """``(guided loss, guided sampling)`` of config ``cfg_mode``.

    - ``"guided"``: the loss's policy velocity is ``v_u + s (v_c - v_u)`` (both branches through the
      trained adapter) and W2 compares it with the reference's guided velocity: the trained
      object is the one that samples, so each epoch's target ``q w / Z`` is what the next epoch
      samples. Costs two transformer passes (one ``2B`` batch) per loss forward.
    - ``"cfg_free"``: sampling without guidance and the conditional velocity trained (DiffusionNFT's
      choice): also consistent, at one pass; the policy has to learn what guidance gave.
    - ``"sampling_only"``: the published peers' way: sample guided, train the unguided conditional
      velocity. Biased: the model absorbs the guidance into ``v_c`` and the next epoch guides again
      on top, so guidance compounds over epochs and the sampled policy is not the trained one.

    Families whose guidance is an input of one forward (Flux-dev) are the same in every mode.
    """
    if mode == "guided":
        return True, True
    if mode == "cfg_free":
        return False, False
    if mode == "sampling_only":
        return False, True
    raise ValueError(f"config key 'cfg_mode' must be one of 'guided', 'cfg_free', 'sampling_only', got {mode!r}")


def pipeline_flow(pipe, config: Mapping, device):
    """The pipeline's flow (:func:`~orwcfm_fast.flows.flow_for_pipeline`) as config sets it up: ``resolution``,
    ``guidance_scale``, ``negative_prompt``, ``time_shift``, ``max_sequence_length``, ``text_encoder_batch_size``,
    ``prompt_cache_size``, ``num_frames`` (the trainer's, and ``orwcfm-fast plan`` 's on the meta device)."""
    return flow_for_pipeline(
        pipe, resolution=config["resolution"], guidance_scale=config["guidance_scale"],
        negative_prompt=config["negative_prompt"], time_shift=config["time_shift"],
        max_sequence_length=config["max_sequence_length"], device=device,
        text_encoder_batch_size=config["text_encoder_batch_size"], prompt_cache_size=config["prompt_cache_size"],
        num_frames=config["num_frames"],
    )


def lora_targets(config: Mapping, flow) -> tuple[str, ...]:
    """The module-name suffixes LoRA adapts: config ``lora_target_modules``, else the family's default."""
    return tuple(config["lora_target_modules"] or flow.default_lora_targets())


def role_passes(flow, cfg_mode: str, role: str) -> int:
    """Transformer passes per sample of one call of a role's velocity (:meth:`PipelineModels.forward_passes`; also
    what ``orwcfm-fast plan`` counts): 2 where config ``cfg_mode`` guides that velocity and the flow guides with two
    passes, else 1.

    Args:
        flow: the pipeline's flow.
        cfg_mode: config ``cfg_mode`` (:func:`cfg_roles`).
        role: ``"sampling"`` (the sampler's velocity) or ``"policy"`` / ``"reference"`` / ``"old_policy"`` (the loss's).
    """
    if role not in ("sampling", "policy", "reference", "old_policy"):
        raise ValueError(f"unknown role {role!r}: one of 'sampling', 'policy', 'reference', 'old_policy'")
    guide_loss, guide_sampling = cfg_roles(cfg_mode)
    guided = guide_sampling if role == "sampling" else guide_loss
    return 2 if guided and flow._guided() else 1


def base_fingerprint(transformer: torch.nn.Module) -> str:
    """A SHA-256 of the architecture and of a strided sample of every base (non-LoRA) weight.

    Identifies the pretrained weights a LoRA checkpoint belongs to without saving them.
    """
    digest = hashlib.sha256()
    config = getattr(transformer, "config", None)
    digest.update(type(transformer).__name__.encode())
    if config is not None:
        digest.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                                 sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].double()
            digest.update(f"{name.replace('.base_layer', '')}:{tuple(p.shape)}:".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


class PipelineModels(TrainingModels):
    """A diffusers pipeline of a registered family (:data:`orwcfm_fast.flows.PIPELINE_FLOWS`) as the trainer's three models.

    Args:
        pipe: the pipeline; its transformer and VAE are moved to ``device``.
        config: the trainer's validated config (``resolution``, ``guidance_scale``,
            ``negative_prompt``, ``time_shift``, ``max_sequence_length``, ``lora_*``,
            ``gradient_checkpointing``, ``vae_batch_size``).
        device: where the transformer, VAE and (while encoding) the text encoders run.
        prompts: every prompt the run will use (training, evaluation): encoded now (in chunks of
            ``text_encoder_batch_size``, into host memory), after which the text encoders are moved
            to the CPU. With ``prompt_cache_size`` set, none is encoded now: prompts are encoded when
            drawn, the text encoders stay on ``device`` and the cache keeps that many.
        seed: seed of the LoRA initialisation.
    """

    conditional = True
    #: no CUDA graph of the whole sampling ODE by default: a captured CFG transformer solve keeps its peak
    #: activations (2B batch, every layer) in a private memory pool that the training step can then not use
    capture_sampling = False

    def __init__(self, pipe, config: Mapping, device: torch.device, prompts: Sequence[str], seed: int = 0):
        self.pipe = pipe
        self.device = device
        self.config = config
        self.sharded = config["parallelism"] == "fsdp"
        if self.sharded:
            # the transformer stays where it was loaded (host memory): FSDP moves it to the device block by block as
            # it shards it, so no GPU ever holds it whole (nor full fine-tuning's copies, made on the host)
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module) and component is not pipe.transformer:
                    component.to(device)
        else:
            pipe.to(device)
        self.flow = pipeline_flow(pipe, config, device)
        self.sample_shape = tuple(self.flow.sample_shape)
        self.reward_frame_reduction = config["video_frame_reduction"] if self.flow.video else None
        transformer = pipe.transformer
        transformer.requires_grad_(False)
        if config["gradient_checkpointing"]:
            transformer.enable_gradient_checkpointing()
        rank = config["lora_rank"]
        self._master: MasterWeights | None = None
        compute_dtype = _compute_dtype(transformer, config["precision"])
        if rank is not None:
            targets = lora_targets(config, self.flow)
            self.roles: LoraRoles | None = LoraRoles(transformer, rank, config["lora_alpha"], targets, seed=seed)
            self._fingerprint = base_fingerprint(transformer)  # of the whole weights: before sharding
            self.net_model = transformer
            transformers = (transformer, transformer, transformer)
            if self.sharded:
                dist_utils.shard_module(transformer, self.flow.shard_units(transformer), compute_dtype, device)
                self.roles.refresh_parameters()  # the adapters' parameters are DTensors now
        else:
            self.roles = None
            self._fingerprint = None
            transformer.requires_grad_(True)
            if self.sharded:
                # each frozen copy is sharded (moved to the device) before the next is made, so the host holds the
                # transformer and at most one copy; then the trained shards, in fp32, are the master weights (the
                # forwards gather them in compute_dtype)
                last, ref = (self._sharded_copy(transformer, compute_dtype) for _ in range(2))
                transformer.float()
                dist_utils.shard_module(transformer, self.flow.shard_units(transformer), compute_dtype, device)
            else:
                last = copy.deepcopy(transformer).eval().requires_grad_(False)
                ref = copy.deepcopy(transformer).eval().requires_grad_(False)
                # bf16 / fp16 weights: Adam's ~lr updates would round away; the optimiser trains fp32 copies
                params = list(transformer.parameters())
                self._master = MasterWeights(params) if needs_master_weights(params) else None
            self.net_model = transformer
            transformers = (transformer, last, ref)
        # config cfg_mode: which velocity the loss trains and which one samples (see cfg_roles)
        guide_loss, guide_sampling = cfg_roles(config["cfg_mode"])
        if not guide_sampling and self.flow._guided():
            warnings.warn(f"config cfg_mode 'cfg_free' samples and trains without classifier-free guidance: "
                          f"guidance_scale {self.flow.guidance_scale:g} is not used", stacklevel=3)
        self._policy = RoleVelocity(self.flow, transformers[0], self.roles, "policy", guided=guide_loss)
        self.last_policy = RoleVelocity(self.flow, transformers[1], self.roles, "last_policy", guided=guide_loss)
        self.ref_model = RoleVelocity(self.flow, transformers[2], self.roles, "reference", guided=guide_loss)
        self._sampler = RoleVelocity(self.flow, transformers[1], self.roles, "last_policy", guided=guide_sampling)
        self._policy_sampler = RoleVelocity(self.flow, transformers[0], self.roles, "policy", guided=guide_sampling)
        # not with LoRA (two adapters of one transformer), nor sharded (the sampler's and the backward's FSDP
        # collectives, issued from two threads, would interleave in a different order on each rank)
        self.can_overlap = self.roles is None and not self.sharded
        if config["prompt_cache_size"] is None:
            self.flow.precompute(prompts)
            self.flow.release_text_encoders()
        else:  # encode on demand, on the device: the negative prompt only now
            self.flow.precompute([])

    def _sharded_copy(self, transformer: torch.nn.Module, compute_dtype: torch.dtype | None) -> torch.nn.Module:
        """A frozen copy of ``transformer``, sharded at once (its host memory freed as FSDP moves it to the device)."""
        frozen = copy.deepcopy(transformer).eval().requires_grad_(False)
        dist_utils.shard_module(frozen, self.flow.shard_units(frozen), compute_dtype, self.device)
        return frozen

    # ------------------------------------------------------------------ the contract

    def forwards(self, compile_backend):
        if compile_backend is not None:
            self.pipe.transformer.compile(backend=compile_backend)
        return self._policy, self.ref_model, self._sampler

    def old_policy_forward(self, sampler_forward):
        # the loss's guidance (cfg_mode), not the sampler's: they differ under "sampling_only"
        return self.last_policy

    def forward_passes(self, role):
        return role_passes(self.flow, self.config["cfg_mode"], role)

    def policy_sampling_velocity(self) -> RoleVelocity:
        """The current policy with guidance: what :meth:`ORWCFMTrainer.sample` integrates."""
        return self._policy_sampler

    def trainable_parameters(self):
        if self.roles is not None:
            return self.roles.trainable_parameters()
        if self._master is not None:
            return list(self._master.params)
        return list(self.net_model.parameters())

    def sync_weights(self):
        """Full fine-tuning of a bf16 / fp16 transformer: round the fp32 master weights into it."""
        if self._master is not None:
            self._master.push()

    def update_last_policy(self, decay=0.0):
        if self.roles is not None:
            self.roles.update_last_policy(decay)
        else:
            blend_into(self.last_policy.transformer, self.net_model, decay)

    def train_mode(self, dropout):
        self.net_model.train(dropout)

    def policy_module(self):
        return self.net_model

    def reduce_gradients(self):
        """Average the trained gradients over ranks (torch.distributed): one all-reduce of them all, flattened.

        Every rank reduces the same size, whichever gradients it has: a parameter without a gradient
        on this rank contributes zeros, and one flag per parameter, reduced with them, says whether any
        rank had one. As under DDP, a parameter that some rank gave a gradient gets the average (the
        missing ones counted as zero) on every rank; one that no rank did keeps ``grad = None``.
        """
        if self._master is not None:
            self._master.take_gradients()
        if self.sharded or not dist_utils.is_distributed():  # FSDP reduce-scattered them in the backward
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = self.trainable_parameters()
        if not params:
            return
        present = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flags = torch.ones(len(params), dtype=grads[0].dtype, device=grads[0].device)
        for i, has in enumerate(present):
            if not has:
                flags[i] = 0.0
        tensors = [*grads, flags]
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat)
        flat /= dist_utils.world_size()
        reduced = _unflatten_dense_tensors(flat, tensors)
        # read the flags (a host sync) only where this rank lacks a gradient
        somewhere = reduced[-1].tolist() if not all(present) else None
        for i, (p, g, r) in enumerate(zip(params, grads, reduced)):
            if present[i]:
                g.copy_(r)
            elif somewhere[i] > 0:
                p.grad = g.copy_(r)

    def encode(self, prompts, batch):
        if prompts is None:
            raise ValueError("a text-to-image pipeline needs prompts: set config 'prompts'")
        return self.flow.encode(prompts)

    reward_inputs_range = (0.0, 1.0)  # decoded images; rewards with input_range (-1, 1) get them mapped

    def reward_inputs(self, samples):
        # [B, 3, H, W] in [0, 1]; video families [B, 3, F, H, W] (rewards score the frames, see score_terms)
        return self.flow.decode(samples, self.config["vae_batch_size"])

    def time_grid(self, steps):
        return self.flow.time_grid(steps)

    def training_shift(self) -> float:
        """The shift of ``time_sampling: "shifted"``: the sampler's (:meth:`PipelineFlow.sampling_shift`)."""
        return self.flow.sampling_shift(self.config["ode_steps"])

    # ------------------------------------------------------------------ checkpoints

    def state(self):
        if self.roles is not None:
            return {"lora": self.roles.state_dict(), "base_fingerprint": self._fingerprint,
                    "lora_rank": self.roles.rank}
        state = {"net_model": self.net_model.state_dict(), "last_policy": self.last_policy.transformer.state_dict(),
                 "ref_model": self.ref_model.transformer.state_dict()}
        if self._master is not None:  # the fp32 weights the optimiser trains (net_model holds them rounded)
            state["master_weights"] = [p.detach().clone() for p in self._master.params]
        return state

    def sharded_state(self):
        if self.roles is not None:
            return {"lora": self.roles.named_adapter_parameters()}
        if self._master is not None:
            raise NotImplementedError("this run fine-tunes a bf16 / fp16 transformer without sharding, through fp32 "
                                      "master weights, which sharded checkpoints do not hold: load it with "
                                      "parallelism 'fsdp'")
        # the reference is the pretrained transformer, loaded again by the resuming run
        return {"net_model": dict(self.net_model.named_parameters()),
                "last_policy": dict(self.last_policy.transformer.named_parameters())}

    def checkpoint_meta(self):
        if self.roles is not None:
            return {"base_fingerprint": self._fingerprint, "lora_rank": self.roles.rank}
        return {}

    def check_checkpoint_meta(self, meta, source):
        if self.roles is None:
            if "lora_rank" in meta:
                raise CheckpointError(f"{source} is a LoRA checkpoint (lora_rank {meta['lora_rank']}); this trainer "
                                      "fine-tunes the whole transformer (lora_rank None)")
            return
        if "lora_rank" not in meta:
            raise CheckpointError(f"{source} is a full fine-tuning checkpoint; this trainer trains LoRA adapters "
                                  f"(lora_rank {self.roles.rank})")
        self._check_fingerprint(meta.get("base_fingerprint"), source)

    def _check_fingerprint(self, saved, source):
        if saved != self._fingerprint:
            raise CheckpointError(
                f"{source} was trained from other base weights than this pipeline's transformer (fingerprint "
                f"{str(saved)[:12]} vs {self._fingerprint[:12]}): load the same pretrained model"
            )

    def check_state(self, ckpt, source):
        if self.roles is None:
            missing = [k for k in ("net_model", "last_policy") if k not in ckpt]
            if missing:
                raise CheckpointError(f"{source} is not a full fine-tuning checkpoint of this pipeline: it lacks {missing}")
            return
        if "lora" not in ckpt:
            raise CheckpointError(f"{source} has no LoRA weights ('lora'): not a LoRA checkpoint of this trainer")
        self._check_fingerprint(ckpt.get("base_fingerprint"), source)
        saved = ckpt["lora"]
        for key, own in (("policy", self.roles.trainable_parameters()), ("last_policy", self.roles.last_policy_parameters())):
            tensors = saved.get(key, [])
            if len(tensors) != len(own) or any(a.shape != b.shape for a, b in zip(tensors, own)):
                raise CheckpointError(f"{source}: its LoRA adapters do not fit this trainer's (lora_rank "
                                      f"{ckpt.get('lora_rank')} vs {self.roles.rank}, or other target modules)")

    def load_state(self, ckpt, source):
        if self.roles is not None:
            self.roles.load_state_dict(ckpt["lora"])
            return
        load_state_strict(self.net_model, ckpt["net_model"], f"{source} [net_model]")
        load_state_strict(self.last_policy.transformer, ckpt["last_policy"], f"{source} [last_policy]")
        if "ref_model" in ckpt:
            load_state_strict(self.ref_model.transformer, ckpt["ref_model"], f"{source} [ref_model]")
        if self._master is not None:
            master = ckpt.get("master_weights")
            if master is not None and len(master) == len(self._master.params) and all(
                    a.shape == b.shape for a, b in zip(master, self._master.params)):
                with torch.no_grad():
                    torch._foreach_copy_(self._master.params, [m.to(p.device) for m, p in zip(master, self._master.params)])
                self._master.push()
            else:  # a checkpoint of an fp32 run or an older version: start the masters from the loaded weights
                self._master.pull()

    # ------------------------------------------------------------------ export

    def save_lora(self, path, weights: Sequence[torch.Tensor] | None = None) -> None:
        """Write the policy adapter (or ``weights`` in its parameter order, e.g. an EMA) in diffusers' LoRA format.

        ``pipe.load_lora_weights(path)`` loads it into a fresh pipeline, at the trained scale: the file
        carries the adapter's ``LoraConfig`` (``lora_alpha`` included) as diffusers' adapter metadata.
        Under torch.distributed every rank calls it (a sharded adapter is gathered) and rank 0 writes.
        """
        if self.roles is None:
            raise ValueError("save_lora needs LoRA training (config 'lora_rank'); with full fine-tuning save "
                             "trainer.net_model with save_pretrained")
        params = self.roles.trainable_parameters()
        saved = None
        if weights is not None:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(dist_utils.local_tensors(params), dist_utils.local_tensors(weights))
        try:
            # copies (copy=True): on the CPU .to("cpu") would alias the parameters, which the finally
            # block then sets back to the policy's values (an EMA export would write the policy)
            state = {k: dist_utils.full_tensor(v.detach()).to("cpu", copy=True).contiguous()
                     for k, v in self.roles.policy_state_dict().items()}
        finally:
            if saved is not None:
                with torch.no_grad():
                    torch._foreach_copy_(dist_utils.local_tensors(params), dist_utils.local_tensors(saved))
        if not dist_utils.is_main_process():
            return
        # the adapter's LoraConfig as metadata: without it diffusers' loader takes lora_alpha = r
        type(self.pipe).save_lora_weights(str(path), transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=self.roles.policy_adapter_metadata())
