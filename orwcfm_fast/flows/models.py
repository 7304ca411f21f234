"""The trainer's side of a model family: its three roles and what surrounds them.

ORW-CFM-W2 trains ``net_model`` (the policy), samples from ``last_policy`` (refreshed once an
epoch) and regularises toward ``ref_model`` (frozen). :class:`TrainingModels` is the contract
the trainer wires, whatever the family:

- ``net_model``, ``last_policy``, ``ref_model``: the reference trainer's attributes;
- :meth:`forwards`: ``(policy, reference, sampler)`` callables ``(t, x, *cond) -> v`` in the
  library's convention (the sampler includes classifier-free guidance where configured);
- :meth:`trainable_parameters` (what the optimiser and EMA hold), :meth:`reduce_gradients` (after
  backward) and :meth:`sync_weights` (after the optimiser step), :meth:`update_last_policy`;
- :meth:`encode` (prompts -> per-sample ``cond`` tuple; ``()`` for unconditional models) and
  :meth:`reward_inputs` (samples -> what the reward scores: the samples themselves, or decoded
  images);
- :meth:`time_grid` (``None``: the uniform grid), :meth:`state` / :meth:`load_state` (the
  checkpoint's model part); for sharded runs (:attr:`~TrainingModels.sharded`) :meth:`sharded_state` and
  :meth:`checkpoint_meta` instead.

:class:`ModuleModels` is the family of plain velocity modules ``model(t, x)`` and conditional
ones ``model(t, x, *cond)``: three modules, the policy trained in place, two frozen copies.
:class:`~orwcfm_fast.flows.pipeline_models.PipelineModels` is the diffusers family.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from orwcfm_fast.checkpoints import CheckpointError, load_state_strict, unwrap_model

__all__ = ["ModuleModels", "TrainingModels", "blend_into", "check_velocity"]


class TrainingModels:
    """The contract between the trainer and a model family (see the module docs)."""

    net_model: torch.nn.Module
    last_policy: torch.nn.Module
    ref_model: torch.nn.Module
    sample_shape: tuple[int, ...]
    #: whether samples are made for prompts (``encode`` gives them their ``cond``)
    conditional: bool = False
    #: config keys this family ignores
    ignored_keys: tuple[str, ...] = ()
    #: whether config ``cuda_graphs: None`` captures the sampling ODE in one CUDA graph on CUDA devices
    capture_sampling: bool = True

    def forwards(self, compile_backend: str | None) -> tuple[Callable, Callable, Callable]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def update_last_policy(self, decay: float = 0.0) -> None:
        """``last_policy``'s weights become ``decay * last_policy + (1 - decay) * policy``, in place (no new
        module, so captured sampling graphs stay valid). ``0``: a copy (ORW-CFM-W2's per-epoch refresh);
        ``> 0``: an EMA (DiffusionNFT's old policy)."""
        raise NotImplementedError

    def encode(self, prompts: Sequence[str] | None, batch: int) -> tuple[torch.Tensor, ...]:
        return ()

    def old_policy_forward(self, sampler_forward: Callable) -> Callable:
        """The last policy as the loss sees it (DiffusionNFT's old policy), given the sampler's velocity (the third
        of :meth:`forwards`): that one where the loss and the sampler use the same guidance (plain modules)."""
        return sampler_forward

    def forward_passes(self, role: str) -> int:
        """Model passes per sample of one call of a role's velocity (:mod:`orwcfm_fast.compute`'s unit):
        ``role`` is ``"sampling"`` (the sampler's velocity) or ``"policy"`` / ``"reference"`` / ``"old_policy"``
        (the loss's). 2 where that velocity runs classifier-free guidance, else 1."""
        return 1

    #: whether ``train`` may make the next batch (with the sampling policy) while the policy's
    #: backward runs: not when the two are adapters of one module, switched as module state
    can_overlap: bool = True

    #: the value range of :meth:`reward_inputs` when they are images (the pixel tasks' [-1, 1]); each reward
    #: gets them converted to its own ``input_range`` (:func:`orwcfm_fast.rewards.score_terms`)
    reward_inputs_range: tuple[float, float] | None = (-1.0, 1.0)

    #: None when :meth:`reward_inputs` are scored as they are; for videos ``[B, C, F, H, W]`` how an image
    #: reward's frame scores reduce to one per video (``"mean"`` / ``"min"``, :func:`orwcfm_fast.rewards.score_terms`)
    reward_frame_reduction: str | None = None

    def reward_inputs(self, samples: torch.Tensor) -> torch.Tensor:
        """What the reward scores: the samples themselves (pixel tasks) or the decoded images (pipelines),
        with values in :attr:`reward_inputs_range`."""
        return samples

    def time_grid(self, steps: int) -> list[float] | None:
        return None

    def reduce_gradients(self) -> None:
        """After backward: put the gradients on :meth:`trainable_parameters` (from low-precision weights, where
        the family keeps fp32 master copies) and average them over ranks when the family does not (DDP does it
        for modules)."""

    def sync_weights(self) -> None:
        """Write :meth:`trainable_parameters` into the weights the forwards use, where they differ (fp32 master
        weights of a bf16 model): after each optimiser step, and around EMA swaps."""

    def policy_sampling_velocity(self) -> Callable:
        """What :meth:`ORWCFMTrainer.sample` integrates: the current policy (with guidance, where configured)."""
        return self.policy_module()

    def train_mode(self, dropout: bool) -> None:
        """Put the trained model in training mode (dropout on only with ``dropout``)."""
        self.net_model.train(dropout)

    def policy_module(self) -> torch.nn.Module:
        """The trained network without data-parallel wrappers (sampling outside DDP, EMA)."""
        return unwrap_model(self.net_model)

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    #: whether the trained model is sharded over the ranks (config ``parallelism: "fsdp"``): its parameters are
    #: ``DTensor`` s, gradients are reduced in the backward, and checkpoints are sharded
    #: (:mod:`orwcfm_fast.sharded_checkpoints`, through :meth:`sharded_state`)
    sharded: bool = False

    def sharded_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The checkpoint's model part as live tensors keyed by name (``{"lora": {name: param}}`` ...), which a
        sharded checkpoint saves from and loads into in place; families that can be sharded implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded (config parallelism 'fsdp')")

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a sharded checkpoint records beside :meth:`sharded_state` to check a resume (small, plain values)."""
        return {}

    def check_checkpoint_meta(self, meta: Mapping[str, Any], source: str) -> None:
        """Raise :class:`CheckpointError` if a sharded checkpoint's :meth:`checkpoint_meta` does not fit; change nothing."""

    def check_state(self, ckpt: Mapping[str, Any], source: str) -> None:
        """Raise :class:`CheckpointError` if ``ckpt``'s model part does not fit; change nothing."""
        raise NotImplementedError

    def load_state(self, ckpt: Mapping[str, Any], source: str) -> None:
        raise NotImplementedError


@torch.no_grad()
def blend_into(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """``target``'s state becomes ``decay * target + (1 - decay) * source``, in place.

    ``decay == 0`` is ``target.load_state_dict(source.state_dict())`` (bit-equal copies); otherwise
    floating-point parameters and buffers are lerped and the others (counters) copied.
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        target.load_state_dict(source.state_dict())
        return
    mine = target.state_dict()
    for name, value in source.state_dict().items():
        if value.is_floating_point():
            mine[name].lerp_(value.to(mine[name].dtype), 1.0 - decay)
        else:
            mine[name].copy_(value)


def check_velocity(fn: Callable, sample_shape: tuple[int, ...], device: torch.device,
                   cond: tuple[torch.Tensor, ...] = ()) -> None:
    """Call ``fn(t, x, *cond)`` on a 2-sample batch; raise ``ValueError`` unless it returns ``x``'s shape."""
    x = torch.zeros((2, *sample_shape), device=device)
    t = torch.full((2,), 0.5, device=device)
    try:
        with torch.no_grad():
            out = fn(t, x, *cond)
    except Exception as err:
        raise ValueError(
            f"model(t, x) failed for x of shape {tuple(x.shape)} (config 'sample_shape' = {sample_shape}): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model(t, x) returned {got} for x of shape {tuple(x.shape)}: the velocity must have the "
            f"sample's shape (check config 'sample_shape' = {sample_shape})"
        )


class ModuleModels(TrainingModels):
    """Plain ``model(t, x)`` (or conditional ``model(t, x, *cond)``) velocity modules, fully fine-tuned.

    Args:
        model: the velocity module; becomes ``net_model`` (trained in place, possibly wrapped by
            ``wrap``); ``last_policy`` and ``ref_model`` are eval-mode, frozen deep copies.
        sample_shape: shape of one sample.
        device: where the models live.
        wrap: ``module -> module`` applied to the policy (DDP / DataParallel), or ``None``.
        prepare: ``module -> None`` run on the model before the copies (weight-preserving speed-ups,
            rank-0 broadcast), or ``None``.
        prompt_encoder: ``list[str] -> tensor or tuple of tensors`` for conditional models.
    """

    def __init__(self, model: torch.nn.Module, sample_shape: tuple[int, ...], device: torch.device, *,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 prepare: Callable[[torch.nn.Module], None] | None = None,
                 prompt_encoder: Callable[[list[str]], Any] | None = None):
        model = unwrap_model(model).to(device)
        if prepare is not None:
            prepare(model)
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.prompt_encoder = prompt_encoder
        self.conditional = prompt_encoder is not None
        self.last_policy = copy.deepcopy(model).eval().requires_grad_(False)
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.net_model = wrap(model) if wrap is not None else model

    def forwards(self, compile_backend):
        models = (self.net_model, self.ref_model, self.last_policy)
        if compile_backend is None:
            return models
        return tuple(torch.compile(m, backend=compile_backend) for m in models)

    def trainable_parameters(self):
        return list(self.net_model.parameters())

    def update_last_policy(self, decay=0.0):
        blend_into(self.last_policy, unwrap_model(self.net_model), decay)

    def encode(self, prompts, batch):
        if prompts is None:
            return ()
        cond = self.prompt_encoder(list(prompts))
        cond = cond if isinstance(cond, tuple) else (cond,)
        for i, c in enumerate(cond):
            if not isinstance(c, torch.Tensor) or c.shape[:1] != (batch,):
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"prompt_encoder returned {got} as its output {i} for {batch} prompts: "
                                 f"expected a tensor (or a tuple of tensors) of batch size {batch}")
        return tuple(c.to(self.device) for c in cond)

    def state(self):
        return {"net_model": unwrap_model(self.net_model).state_dict(),
                "last_policy": self.last_policy.state_dict(),
                "ref_model": self.ref_model.state_dict()}

    def check_state(self, ckpt, source):
        missing = [k for k in ("net_model", "last_policy") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{source} is not a trainer checkpoint: it lacks {missing} "
                                  "(for pretrained weights use load_pretrained)")
        for key, model in (("net_model", self.net_model), ("last_policy", self.last_policy),
                           ("ref_model", self.ref_model)):
            if key in ckpt:
                _check_fits(model, ckpt[key], f"{source} [{key}]")

    def load_state(self, ckpt, source):
        load_state_strict(self.net_model, ckpt["net_model"], f"{source} [net_model]")
        load_state_strict(self.last_policy, ckpt["last_policy"], f"{source} [last_policy]")
        if "ref_model" in ckpt:
            load_state_strict(self.ref_model, ckpt["ref_model"], f"{source} [ref_model]")


def _check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` (``load_state_strict``'s message) if ``state`` does not fit; load nothing."""
    own = unwrap_model(model).state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        load_state_strict(model, state, source)  # raises, listing the differences
