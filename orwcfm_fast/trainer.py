"""``ORWCFMTrainer``: the published ORW-CFM-W2 trainer's API over this library's pieces.

One training step (``training_step``):

1. ``sample_batch``: ``batch_size`` samples ``x_1`` from ``last_policy`` by integrating
   ``dx/dt = last_policy(t, x)`` from Gaussian noise (``ode_solver``, ``ode_steps``),
   then their rewards ``r`` (``objective: offline-rwr``: a draw from its fixed set);
2. weights ``w = exp(temperature * r)`` (``weight_normalization``) and the objective's other
   per-sample inputs (advantages);
3. ``compute_loss``: fresh noise ``x_0``, the ``coupling`` of ``x_0`` with ``x_1`` (weights
   travel with their samples), then the objective's loss (:mod:`orwcfm_fast.objectives`; ORW-CFM-W2:
   ``t ~ U(0, 1)``, ``x_t``, ``u_t = x_1 - x_0``, ``loss = mean_i(w_i * fm_i + alpha * w2_i)``);
4. backward, gradient clipping, Adam and warmup-scheduler steps (``updates_per_batch`` of them,
   fresh noise and times each).

``last_policy`` is refreshed from ``net_model`` once per epoch (``update_last_policy``: a copy, or
the objective's EMA). Model passes are counted by kind (:mod:`orwcfm_fast.compute`).
Each piece is a method or a module function so the fast paths can replace it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch

from orwcfm_fast import __version__, rng
from orwcfm_fast import distributed as dist_utils
from orwcfm_fast.checkpoints import (
    CheckpointError,
    CheckpointRotation,
    atomic_save,
    load_file,
    load_state_strict,
    read_model_state,
    unwrap_model,
)
from orwcfm_fast.config import ConfigError, serializable_config, validate_config
from orwcfm_fast.compute import ComputeCounter
from orwcfm_fast.coupling import couple
from orwcfm_fast.flows import is_pipeline
from orwcfm_fast.flows.conventions import shift_sigma
from orwcfm_fast.flows.models import ModuleModels, TrainingModels, check_velocity
from orwcfm_fast.prompts import config_prompts, draw_prompts
from orwcfm_fast.objectives import LossContext, make_objective
from orwcfm_fast.ops import BackendUnavailableError, resolve_backend
from orwcfm_fast.precision import native_low_precision
from orwcfm_fast.interrupt import StopRequests, TrainingInterrupted
from orwcfm_fast.models import describe_unet, optimize_unet
from orwcfm_fast.prefetch import BackgroundWorker, Pending
from orwcfm_fast.profiling import phase
from orwcfm_fast.rewards import make_reward, score_terms
from orwcfm_fast.run_log import EpochLog
from orwcfm_fast.step_metrics import MetricSums
from orwcfm_fast.sampling import GraphSampler, integrate, nfe
from orwcfm_fast.sharded_checkpoints import (
    STATE_FILE,
    check_layout,
    load_sharded,
    read_state,
    restore_optimizer,
    save_sharded,
    trainer_tensors,
)
from orwcfm_fast.weighting import checked_reward_weights, default_normalization, effective_sample_size

__all__ = ["ORWCFMTrainer", "LinearWarmup", "TrainingInterrupted", "checkpoint_directory", "infer_sample_shape"]


class LinearWarmup:
    """LR factor ``min(step, warmup_steps) / warmup_steps`` (1 when ``warmup_steps == 0``).

    A class rather than a lambda so ``LambdaLR.state_dict()`` can save it.
    """

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(step, self.warmup_steps) / self.warmup_steps


def infer_sample_shape(model: torch.nn.Module) -> tuple[int, ...] | None:
    """``(C, H, W)`` of a torchcfm ``UNetModel``/``UNetModelWrapper``; ``None`` for other models."""
    m = unwrap_model(model)
    channels, size = getattr(m, "in_channels", None), getattr(m, "image_size", None)
    if isinstance(channels, int) and isinstance(size, int):
        return (channels, size, size)
    return None


class _Batch(NamedTuple):
    """One step's training data, ready for the update (made by ``ORWCFMTrainer._make_batch``)."""

    samples: torch.Tensor  # [B, *sample_shape] x_1 as sampled from last_policy
    rewards: torch.Tensor  # [B] float32, checked finite
    weights: torch.Tensor  # [B] weights of `samples`, checked finite
    x_0: torch.Tensor  # [B, *sample_shape] noise after the coupling
    x_1: torch.Tensor  # [B, *sample_shape] samples after the coupling
    pair_weights: torch.Tensor  # [B] the weights that travel with (x_0, x_1)
    cond: tuple = ()  # per-sample conditioning of x_1 (prompt embeddings); () for unconditional models
    prompts: list | None = None  # the B prompts the samples were made for
    reward_terms: dict | None = None  # {name: [B]} each term's rewards, for a reward dict {name: weight}
    per_sample: dict | None = None  # {name: [B]} the objective's other per-sample inputs (advantages), x_1's order


def checkpoint_directory(config: Mapping[str, Any]) -> Path:
    """Where ``train`` writes its checkpoints: ``checkpoint_dir``, else ``<savedir>/checkpoints``."""
    return Path(config.get("checkpoint_dir") or Path(config["savedir"]) / "checkpoints")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class ORWCFMTrainer:
    """Online reward-weighted CFM fine-tuning with a W2 bound to the frozen reference.

    A drop-in for the published ``ORWCFMTrainer(model, config, device)``: same attributes
    (``net_model``, ``last_policy``, ``ref_model``, ``optimizer``, ``scheduler``, ``alpha``,
    ``beta``, ``grad_clip``, ``config``), methods and config keys; see
    :mod:`orwcfm_fast.config` for every key.

    Args:
        model: velocity model ``model(t, x) -> v`` with ``t`` ``[B]`` and ``x`` ``[B, *sample_shape]``.
            It becomes ``net_model`` (trained in place); ``last_policy`` and ``ref_model`` are copies.
        config: option dict; unknown keys and invalid values raise :class:`ConfigError`.
        device: where everything runs; default: the model's device.
    """

    def __init__(self, model, config: Mapping[str, Any] | None = None, device=None):
        self.config = validate_config(config)
        cfg = self.config
        pipeline = is_pipeline(model)
        if device is not None:
            self.device = torch.device(device)
        else:
            self.device = _model_device(model.transformer if pipeline else model)
        if cfg["precision"] == "auto":  # resolved once (a cached probe); the saved config records the choice
            cfg["precision"] = native_low_precision(self.device).dtype_name
        self.alpha = cfg["w2_coefficient"]
        self.beta = cfg["temperature"]
        self.grad_clip = cfg["grad_clip"]
        self.batch_size = cfg["batch_size"]
        self.prompts, self.eval_prompts = self._load_prompts(pipeline)
        if cfg["weight_normalization"] is None:  # resolved once; the saved config records the choice
            cfg["weight_normalization"] = default_normalization(self.prompts is not None, cfg["images_per_prompt"])
        self._warned_raw_weights = False

        # Data-parallel when a process group is initialised (torchrun): each rank samples its own
        # batch_size with its own seed (rank 0's is the single-process seed), gradients are averaged.
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.distributed = dist_utils.is_distributed()
        self.seed = self._base_seed(cfg["seed"])
        rank_seed = self.seed + 1_000_003 * self.rank
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed)
        self.cpu_generator = torch.Generator().manual_seed(rank_seed + 1)

        if cfg["ops_backend"] is not None:
            try:
                resolve_backend(cfg["ops_backend"], self.device.type)
            except BackendUnavailableError as err:
                raise ConfigError(f"config key 'ops_backend': {err}") from None

        # The loss (config objective): one file each in orwcfm_fast/objectives
        self.objective = make_objective(cfg)
        allowed = self.objective.couplings
        if allowed is not None and cfg["coupling"] not in allowed:
            raise ConfigError(
                f"config key 'coupling' is {cfg['coupling']!r}, but objective {cfg['objective']!r} carries per-sample "
                f"advantages that must stay with their samples: use one of {list(allowed)}")
        # model passes run for sampling, the loss's roles and the backward (orwcfm_fast.compute)
        self.compute = ComputeCounter()
        self._batch_stats: tuple[torch.Tensor, dict] | None = None  # _weights' (weights, per-sample inputs)

        if cfg["cuda_graphs"] and self.device.type != "cuda":
            raise ConfigError(f"config key 'cuda_graphs' is True but the trainer runs on {self.device}; "
                              "CUDA graphs need a CUDA device (None: use them where available)")

        # The model family behind one contract: three roles, prompts -> cond, samples -> reward inputs.
        self.models: TrainingModels = self._build_models(model, pipeline)
        self.sample_shape = self.models.sample_shape
        self.net_model, self.last_policy, self.ref_model = (
            self.models.net_model, self.models.last_policy, self.models.ref_model)
        self._check_model_output()

        self._policy_forward, self._ref_forward, self._last_policy_forward = self._forwards()
        self._old_policy_forward = self.models.old_policy_forward(self._last_policy_forward)  # DiffusionNFT's loss
        # Sampling from last_policy: one CUDA graph per batch shape on CUDA (eager elsewhere).
        # update_last_policy copies weights in place, so the captured graph stays valid.
        self._sampler = GraphSampler(
            self._last_policy_forward, solver=cfg["ode_solver"], steps=cfg["ode_steps"], backend=cfg["ops_backend"],
            use_graphs=self._use_graphs(), sample_shape=self.sample_shape,
            time_grid=self.models.time_grid(cfg["ode_steps"]),
        )
        # Fused Adam on CUDA (one kernel for all parameters); the same update rule as Adam.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(self.models.trainable_parameters(), lr=cfg["learning_rate"], **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LinearWarmup(cfg["warmup_steps"]))
        try:
            self.reward_fn = make_reward(cfg["reward"], cfg, self.device)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        # An EMA of the trained weights (config ema_decay): fp32 copies, updated after each step.
        self._ema: list[torch.Tensor] | None = None
        if cfg["ema_decay"] is not None:
            self._ema = [p.detach().float().clone() for p in self.models.trainable_parameters()]

        self.epoch = 0
        self.global_step = 0
        self.step_in_epoch = 0  # > 0 only after resuming from a checkpoint taken mid-epoch
        self._epoch_sums: MetricSums | None = None  # that partial epoch's metric sums
        self.history: list[dict[str, float]] = []
        # evaluate()'s summaries in order (epoch, rewards, diversity): the reward-hacking alarm reads them
        self.eval_history: list[dict[str, Any]] = []
        self._log: EpochLog | None = None
        self._rotation: CheckpointRotation | None = None
        self._skipped_steps: torch.Tensor | None = None  # CUDA: non-finite-gradient steps skipped on device
        self._reward_terms: dict = {}  # sample_batch's per-term rewards (reward dicts), for training_step
        self._sampled: tuple[tuple, list | None] = ((), None)  # sample_batch's (cond, prompts), for compute_loss
        # train() makes the next batch in the background while this one trains (overlap_sampling).
        self._worker = BackgroundWorker(self.device)

    def _load_prompts(self, pipeline: bool) -> tuple[list[str] | None, list[str] | None]:
        """Config ``prompts`` / ``eval_prompts`` loaded and checked against the model and batch size."""
        return config_prompts(self.config, pipeline)

    def _build_models(self, model, pipeline: bool) -> TrainingModels:
        cfg = self.config
        if cfg["parallelism"] == "fsdp":
            if not pipeline:
                raise ConfigError("config key 'parallelism' is 'fsdp', which shards a diffusers pipeline's transformer; "
                                  f"a plain velocity module ({type(unwrap_model(model)).__name__}) runs data-parallel: "
                                  "use 'ddp'")
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ConfigError("config key 'parallelism' is 'fsdp' but no torch.distributed process group is "
                                  "initialised: start the run under torchrun (orwcfm_fast.distributed.init_from_env)")
        if pipeline:
            from orwcfm_fast.flows.pipeline_models import PipelineModels

            try:
                models = PipelineModels(model, cfg, self.device, prompts=self.prompts + (self.eval_prompts or []),
                                        seed=self.seed)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if cfg["overlap_sampling"] and models.sharded:
                raise ConfigError(
                    "config key 'overlap_sampling' is True, but with parallelism 'fsdp' every forward gathers the "
                    "transformer's blocks from all ranks: sampling in the background would interleave its collectives "
                    "with the backward's differently on each rank (set it to None/False)")
            if cfg["cuda_graphs"] and models.sharded:
                raise ConfigError("config key 'cuda_graphs' is True, but a sharded transformer (parallelism 'fsdp') "
                                  "gathers its weights with collectives a CUDA graph cannot replay: set it to None")
            if cfg["overlap_sampling"] and not models.can_overlap:
                raise ConfigError(
                    "config key 'overlap_sampling' is True, but with LoRA the sampling policy and the trained "
                    "policy are adapters of one transformer, switched as module state: they cannot run at once "
                    "(set it to None/False, or lora_rank None for full fine-tuning)"
                )
            if cfg["sample_shape"] is not None and tuple(cfg["sample_shape"]) != models.sample_shape:
                raise ConfigError(f"config key 'sample_shape' is {cfg['sample_shape']} but the pipeline's latents "
                                  f"are {models.sample_shape} at this resolution")
            return models
        inferred = infer_sample_shape(model)
        if cfg["sample_shape"] is None and inferred is None:
            raise ConfigError(
                f"config key 'sample_shape' is required for {type(unwrap_model(model)).__name__} "
                "(it is inferred only for torchcfm UNets): give the shape of one sample, e.g. (2,) or (3, 32, 32)"
            )
        if cfg["sample_shape"] is not None and inferred is not None and tuple(cfg["sample_shape"]) != inferred:
            raise ConfigError(
                f"config key 'sample_shape' is {cfg['sample_shape']} but the UNet is built for {inferred}"
            )

        def prepare(module: torch.nn.Module) -> None:
            if cfg["unet_speedups"] and describe_unet(module).is_unet:
                optimize_unet(module)  # in place, before the copies: all three models run the same code
            dist_utils.broadcast_module(module)  # distributed: every rank starts from rank 0's weights

        return ModuleModels(model, tuple(cfg["sample_shape"] or inferred), self.device, wrap=self._maybe_parallel,
                            prepare=prepare, prompt_encoder=cfg["prompt_encoder"])

    # ------------------------------------------------------------------ setup helpers

    def _forwards(self):
        """Callables for the policy's training forward, the reference and the sampling policy.

        With config ``compile`` they are ``torch.compile`` d (backend ``compile_backend``, default
        mode: no Inductor CUDA graphs, so they compose with the sampler's own graphs); the
        modules themselves stay plain (attributes, ``state_dict`` keys and checkpoints unchanged).
        """
        return self.models.forwards(self.config["compile_backend"] if self.config["compile"] else None)

    def _use_graphs(self) -> bool | None:
        """The sampler's ``use_graphs``: config ``cuda_graphs``; ``None`` (where available) only for families that
        capture by default (:attr:`TrainingModels.capture_sampling`: not pipelines)."""
        flag = self.config["cuda_graphs"]
        if flag is None and not self.models.capture_sampling:
            return False
        return None if flag is None else flag

    def _autocast(self):
        """bf16 autocast for ``precision: "bf16"`` (weights, ODE state, loss stay fp32; "auto": see ``__init__``)."""
        if self.config["precision"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _base_seed(self, seed: int | None) -> int:
        if seed is None:  # one run, one base seed: rank 0's
            seed = dist_utils.broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        return seed

    def _maybe_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        return dist_utils.wrap_data_parallel(model, self.device, self.config["parallel"])

    def _check_model_output(self) -> None:
        cond = self.models.encode([self.prompts[0]] * 2, 2) if self.prompts is not None else ()
        try:
            check_velocity(self.ref_model, self.sample_shape, self.device, cond)
        except ValueError as err:
            raise ConfigError(str(err)) from err.__cause__

    # ------------------------------------------------------------------ sampling

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=self.generator, device=self.device)

    @torch.no_grad()
    def _integrate(self, model, n: int, cond: tuple = ()) -> torch.Tensor:
        cfg = self.config
        velocity = model if not cond else (lambda t, x: model(t, x, *cond))
        with self._autocast():
            return integrate(velocity, self._noise(n), solver=cfg["ode_solver"], steps=cfg["ode_steps"],
                             backend=cfg["ops_backend"], time_grid=self.models.time_grid(cfg["ode_steps"]))

    def _overlap(self) -> bool:
        """Whether ``train`` makes the next batch in the background (config ``overlap_sampling``)."""
        flag = self.config["overlap_sampling"]
        if not self.objective.online:  # offline-rwr: a batch is a draw from its fixed set, nothing to overlap
            return False
        if flag is None:  # on CUDA, where the family allows it (not LoRA: two adapters of one transformer)
            return self.device.type == "cuda" and self.models.can_overlap
        return flag

    def _uses_own_steps(self) -> bool:
        """False when a subclass overrides a step method: ``train`` then calls ``training_step`` as is."""
        cls = type(self)
        return all(getattr(cls, name) is getattr(ORWCFMTrainer, name)
                   for name in ("training_step", "sample_batch", "compute_loss"))

    def _draw_prompts(self) -> list[str] | None:
        """The batch's prompts (``images_per_prompt`` in a row each) from ``cpu_generator``; None without prompts."""
        if self.prompts is None:
            return None
        return draw_prompts(self.prompts, self.batch_size, self.config["images_per_prompt"], self.cpu_generator)

    def _draw_batch_inputs(self) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """The random inputs of one batch, in the order the sequential step draws them.

        Returns:
            ``(noise, x_0, prompts)``: the sampler's initial noise and the loss's noise ``x_0``,
            both ``[batch_size, *sample_shape]`` float32, from ``self.generator``; the batch's
            prompts (``None`` for unconditional models), drawn first, from ``cpu_generator``.
        """
        prompts = self._draw_prompts()
        noise = self._noise(self.batch_size)
        x_0 = torch.randn(noise.shape, generator=self.generator, device=self.device, dtype=noise.dtype)
        return noise, x_0, prompts

    @torch.no_grad()
    def _make_batch(self, noise: torch.Tensor, x_0: torch.Tensor, prompts: list[str] | None = None) -> _Batch:
        """Sample from ``noise``, reward, weight and couple with ``x_0``: all a step needs before its update.

        The same computations, in the same order, as ``sample_batch`` + ``_weights`` + the start of
        ``compute_loss``; runs in the background worker when ``train`` overlaps batches. Raises on
        non-finite rewards or weights before anything is updated. The objective says where the samples
        come from (the last policy; ``offline-rwr``: its fixed set, ignoring ``noise`` and ``prompts``).
        """
        samples, rewards, terms, prompts, cond = self.objective.make_samples(self, noise, prompts)
        with phase("reward", self.device):
            weights, per_sample = self._batch_inputs(rewards)
        with phase("coupling", self.device):
            x_0, x_1, pair_weights = couple(self.config["coupling"], x_0, samples, weights,
                                            generator=self.cpu_generator)
        return _Batch(samples, rewards, weights, x_0, x_1, pair_weights, cond, prompts, terms, per_sample)

    def _encode(self, prompts: list[str] | None) -> tuple:
        """The conditioning of ``prompts`` (``()`` for ``None``)."""
        return self.models.encode(prompts, len(prompts)) if prompts is not None else ()

    @torch.no_grad()
    def _sample_last_policy(self, noise: torch.Tensor | None, cond: tuple = ()) -> torch.Tensor:
        """Integrate ``noise`` (``None``: ``batch_size`` fresh draws from ``generator``) with the last policy;
        the passes are counted."""
        n = self.batch_size if noise is None else noise.shape[0]
        self.compute.add("sampling", n * self._solve_passes("sampling"))
        with phase("sample", self.device):
            if noise is None:
                return self._policy_samples(cond)
            with self._autocast():
                return self._sampler(noise, *cond)

    def _score(self, samples: torch.Tensor, prompts: list[str] | None) -> tuple[torch.Tensor, dict]:
        """Checked ``[B]`` rewards of ``samples`` (decoded for pipelines, each reward in its input range, with the
        prompts when it takes them) and, for a reward dict, each term's ``{name: [B]}``."""
        inputs = self.models.reward_inputs(samples)
        total, terms = score_terms(self.reward_fn, inputs, prompts, self.models.reward_inputs_range,
                                   self.models.reward_frame_reduction)
        return total.to(self.device), terms

    @torch.no_grad()
    def _policy_samples(self, cond: tuple = ()) -> torch.Tensor:
        """``batch_size`` samples from ``last_policy``: one CUDA-graph replay on CUDA, eager elsewhere."""
        with self._autocast():
            return self._sampler.sample(self.batch_size, *cond, generator=self.generator, device=self.device)

    def _solve_passes(self, role: str) -> int:
        """Model passes per sample of one ODE solve with ``role``'s velocity."""
        return nfe(self.config["ode_solver"], self.config["ode_steps"]) * self.models.forward_passes(role)

    @torch.no_grad()
    def sample_batch(self, ep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` samples from ``last_policy`` and score them.

        Args:
            ep: the epoch (kept for the reference's signature; sampling does not depend on it).

        Returns:
            ``(samples [batch_size, *sample_shape], rewards [batch_size] float32)``. With prompts,
            the batch's prompts and conditioning are kept for the next :meth:`compute_loss`
            (and the prompts are in :attr:`last_prompts`). With ``objective: offline-rwr`` the
            samples are a draw from its fixed set.
        """
        prompts = self._draw_prompts()
        samples, rewards, self._reward_terms, prompts, cond = self.objective.make_samples(self, None, prompts)
        self._sampled = (cond, prompts)
        return samples, rewards

    @property
    def last_prompts(self) -> list[str] | None:
        """The prompts of the last :meth:`sample_batch` (``None`` for unconditional models)."""
        return self._sampled[1]

    @torch.no_grad()
    def sample(self, n: int, batch_size: int | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        """``n`` samples from the current policy ``net_model`` (dropout off; the EMA weights with
        ``ema_decay``), in chunks of ``batch_size``.

        Args:
            n: number of samples.
            batch_size: samples per solve (default: the trainer's).
            prompts: for conditional models, ``n`` prompts (default: the training prompts, cycled).

        Returns:
            ``[n, *sample_shape]`` tensor on the trainer's device (latents for pipelines).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample(n): n must be a positive integer, got {n!r}")
        if self.prompts is None and prompts is not None:
            raise ValueError("sample(prompts=...): this model takes no prompts")
        if self.prompts is not None:
            prompts = list(prompts) if prompts is not None else [self.prompts[i % len(self.prompts)] for i in range(n)]
            if len(prompts) != n:
                raise ValueError(f"sample(n={n}, prompts=...): got {len(prompts)} prompts, need one per sample")
        chunk = batch_size or self.batch_size
        self.compute.add_evaluation(n * self._solve_passes("sampling"))
        module = self.models.policy_module()  # not DDP's forward: one rank may sample alone
        velocity = self.models.policy_sampling_velocity()
        was_training = module.training
        module.eval()
        try:
            with self._ema_weights():
                parts = []
                for i in range(0, n, chunk):
                    m = min(chunk, n - i)
                    cond = self.models.encode(prompts[i:i + m], m) if prompts is not None else ()
                    parts.append(self._integrate(velocity, m, cond))
        finally:
            module.train(was_training)
        return torch.cat(parts)

    @contextlib.contextmanager
    def _ema_weights(self):
        """The trained parameters hold the EMA's values for the block (no-op without ``ema_decay``)."""
        if self._ema is None:
            yield
            return
        params = self.models.trainable_parameters()
        saved = [p.detach().clone() for p in params]
        local = dist_utils.local_tensors  # sharded (FSDP): shard by shard
        with torch.no_grad():
            torch._foreach_copy_(local(params), local(self._ema))
        self.models.sync_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(local(params), local(saved))
            self.models.sync_weights()

    def save_lora(self, path) -> None:
        """Write the trained LoRA adapter (the EMA's weights with ``ema_decay``) in diffusers' format.

        ``pipe.load_lora_weights(path)`` loads it into a fresh pipeline of the same base model.
        Under ``torch.distributed`` every rank must call it (a sharded adapter is gathered); rank 0 writes.
        """
        save = getattr(self.models, "save_lora", None)
        if save is None:
            raise ValueError("save_lora is for diffusers pipelines trained with LoRA; save net_model's state_dict instead")
        save(path, weights=self._ema)
        dist_utils.barrier()

    # ------------------------------------------------------------------ loss and step

    def compute_loss(self, x1: torch.Tensor, weights: torch.Tensor,
                     cond: tuple | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss (config ``objective``; ORW-CFM-W2 by default) on samples ``x1``.

        Args:
            x1: ``[B, *sample_shape]`` samples (constants).
            weights: ``[B]`` weights of those samples. Objectives that also need the advantages
                (``adrpo``, ``diffusion-nft``) take them from the :meth:`_weights` call that made
                ``weights`` (as :meth:`training_step` does).
            cond: the samples' conditioning (default: that of the last :meth:`sample_batch`;
                ``()`` for unconditional models).

        Returns:
            ``(loss, metrics)``: the differentiable 0-dim loss; metrics are detached 0-dim tensors,
            at least ``fm_loss`` (ORW-CFM-W2: ``mean_i w_i fm_i``), ``w2_loss`` (``mean_i w2_i``),
            ``total_loss``.
        """
        cond = self._sampled[0] if cond is None else tuple(cond)
        extra = None
        if self._batch_stats is not None and self._batch_stats[0] is weights:
            extra = self._batch_stats[1]
        x0 = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        x0, x1, weights = couple(self.config["coupling"], x0, x1, weights, generator=self.cpu_generator)
        return self._coupled_loss(x0, x1, weights, cond, extra)

    def _loss_times(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[n]`` loss times from config ``time_sampling`` (``uniform`` is the reference's ``t ~ U(0, 1)``)."""
        kind = self.config["time_sampling"]
        if kind == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=self.generator, device=like.device, dtype=like.dtype))
        t = torch.rand(n, generator=self.generator, device=like.device, dtype=like.dtype)
        if kind == "shifted":  # uniform sigma, shifted as the sampler's times are
            t = 1 - shift_sigma(1 - t, self._training_shift())
        return t

    def _training_shift(self) -> float:
        get = getattr(self.models, "training_shift", None)
        if get is not None:
            return get()
        return float(self.config["time_shift"] or 1.0)

    def _coupled_loss(self, x0: torch.Tensor, x1: torch.Tensor, weights: torch.Tensor, cond: tuple = (),
                      per_sample: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``compute_loss`` after the coupling: the objective's loss on ``(x0, x1)`` with ``weights`` and the
        other per-sample inputs ``per_sample`` (in ``x1``'s order)."""
        inputs = {**(per_sample or {}), "weights": weights}
        missing = [name for name in self.objective.per_sample_names if name not in inputs]
        if missing:
            raise ValueError(f"objective {self.objective.name!r} needs the per-sample {missing} of the batch: make "
                             "the weights with trainer._weights(rewards) (as training_step does) and pass them on")
        ctx = LossContext(self.config, self.alpha, self.generator, self.config["ops_backend"], self._loss_times,
                          self._forward)
        return self.objective.loss(ctx, x0, x1, inputs, cond)

    def _forward(self, role: str, t: torch.Tensor, x_t: torch.Tensor, cond: tuple = ()) -> torch.Tensor:
        """A loss forward of ``role`` (``policy`` with gradient; ``reference`` / ``old_policy`` without) under the
        run's autocast, in ``x_t``'s dtype (bf16 forwards: the loss is taken in fp32); its passes counted."""
        fn = {"policy": self._policy_forward, "reference": self._ref_forward,
              "old_policy": self._old_policy_forward}[role]
        self.compute.add(role, x_t.shape[0] * self.models.forward_passes(role))
        with self._autocast():
            if role == "policy":
                v = fn(t, x_t, *cond)
            else:
                with torch.no_grad():
                    v = fn(t, x_t, *cond)
        return v.to(x_t.dtype)

    def _batch_inputs(self, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weights, other per-sample inputs)`` of a batch's rewards, for the objective."""
        weights = self._weights(rewards)
        return weights, self._batch_stats[1]

    def _weights(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[B]`` loss weights ``exp(temperature * r)`` (config ``weight_normalization``; ones for objectives that
        do not weight by reward); the objective's other per-sample inputs are kept for :meth:`compute_loss`."""
        group = self.config["images_per_prompt"] if self.prompts is not None else None  # None: the batch
        if self.objective.uses_reward_weights:
            weights = self._reward_weights(rewards, group)
        else:
            weights = torch.ones_like(rewards, dtype=torch.float32)
        extra = self.objective.per_sample(rewards, weights, group)
        extra.pop("weights", None)
        self._batch_stats = (weights, extra)
        return weights

    def _reward_weights(self, rewards: torch.Tensor, group: int | None) -> torch.Tensor:
        weights, warned = checked_reward_weights(rewards, self.beta, self.config["weight_normalization"], group,
                                                 self.alpha, warn_scale=not self._warned_raw_weights)
        self._warned_raw_weights |= warned
        return weights

    def training_step(self, ep: int | None = None) -> dict[str, float]:
        """Sample, weight, and take one optimiser step.

        Returns:
            Python floats: ``fm_loss``, ``w2_loss``, ``total_loss``, ``reward`` (batch mean),
            ``max_reward``, ``weight_ess`` (effective sample size fraction of the weights),
            ``grad_norm`` (before clipping) and ``lr``, and the step's model passes (``forwards/<kind>``,
            ``backwards``; :mod:`orwcfm_fast.compute`). With ``updates_per_batch`` k > 1 the batch
            takes k optimiser steps (fresh times and noise each) and the values are their means.
            Reading them is a host sync; ``train`` does not call this method (unless a subclass
            overrides a step method) and reads its metrics once per ``log_every`` steps instead.
        """
        before = self.compute.state()
        samples, rewards = self.sample_batch(ep)
        weights = self._weights(rewards)
        updates = self.config["updates_per_batch"]
        sums: dict[str, float] = {}
        for _ in range(updates):
            self.models.train_mode(self.config["policy_dropout"])
            with phase("loss", self.device):
                loss, metrics = self.compute_loss(samples, weights)
            metrics, lr, _ = self._optimize(loss, metrics, rewards, weights, check_now=True, terms=self._reward_terms)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["lr"] = sums.get("lr", 0.0) + lr
        out = {k: v / updates for k, v in sums.items()}
        out.update(self.compute.step_counts(before))
        return out

    def _train_step(self, batch: _Batch, meanwhile: Callable[[], Any] | None = None):
        """``training_step`` on a ready batch, metrics left on the device.

        Args:
            batch: from :meth:`_make_batch`.
            meanwhile: called once the forwards are queued, before the backward (``train``
                submits the next batch here, so the background worker overlaps the backward).

        Returns:
            ``(metrics, lr, meanwhile_result)``: metrics are 0-dim device tensors.
        """
        self.models.train_mode(self.config["policy_dropout"])
        with phase("loss", self.device):
            loss, metrics = self._coupled_loss(batch.x_0, batch.x_1, batch.pair_weights, batch.cond, batch.per_sample)
        return self._optimize(loss, metrics, batch.rewards, batch.weights, meanwhile,
                              check_now=not self._defers_gradient_check(), terms=batch.reward_terms)

    def _reuse_batch(self, batch: _Batch) -> _Batch:
        """``batch`` for one more optimiser step (config ``updates_per_batch``): fresh noise ``x_0`` coupled with
        its samples (the loss then draws fresh times), as :meth:`compute_loss` does."""
        x_0 = torch.randn(batch.samples.shape, generator=self.generator, device=batch.samples.device,
                          dtype=batch.samples.dtype)
        x_0, x_1, pair_weights = couple(self.config["coupling"], x_0, batch.samples, batch.weights,
                                        generator=self.cpu_generator)
        return batch._replace(x_0=x_0, x_1=x_1, pair_weights=pair_weights)

    def _defers_gradient_check(self) -> bool:
        """CUDA with fused Adam: non-finite gradients skip the update on the device (no host sync)."""
        return self.device.type == "cuda" and bool(self.optimizer.defaults.get("fused"))

    def _optimize(self, loss, metrics, rewards, weights, meanwhile=None, *, check_now: bool = True, terms=None):
        """Backward, clipping (no host sync), optimiser and scheduler steps; adds the batch metrics.

        Non-finite gradients never reach the parameters: with ``check_now`` the step raises before
        the optimiser runs; otherwise (CUDA, fused Adam) the optimiser skips the update on the
        device (``found_inf``, as under a GradScaler) and ``train`` raises at its next metrics read.
        """
        side = meanwhile() if meanwhile is not None else None
        with phase("backward", self.device):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer", self.device):
            self.models.reduce_gradients()
            params = [p for p in self.models.trainable_parameters() if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip is not None else math.inf
            grad_norm = dist_utils.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))  # FSDP: replicated
            if check_now:
                if not bool(torch.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"non-finite gradient (norm {float(grad_norm)}) at step {self.global_step}: the update was "
                        f"not applied, parameters are unchanged (loss {float(loss.detach())}); look for NaN/inf in "
                        "the model's outputs, or lower 'learning_rate' / use precision 'fp32'"
                    )
            else:
                found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
                self.optimizer.found_inf = found_inf
                self._skipped_steps = found_inf if self._skipped_steps is None else self._skipped_steps + found_inf
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.models.sync_weights()
            self.scheduler.step()
            self.optimizer.found_inf = None
            if self._ema is not None:
                with torch.no_grad():
                    current = [p.detach().float() for p in self.models.trainable_parameters()]
                    torch._foreach_lerp_(dist_utils.local_tensors(self._ema), dist_utils.local_tensors(current),
                                         1.0 - self.config["ema_decay"])
        self.global_step += 1
        metrics.update(
            reward=rewards.mean(),
            max_reward=rewards.max(),
            weight_ess=effective_sample_size(weights),
            grad_norm=grad_norm,
        )
        for name, values in (terms or {}).items():  # a reward dict: each term's batch mean, unweighted
            metrics[f"reward/{name}"] = values.mean()
        return metrics, lr, side

    def update_last_policy(self) -> None:
        """Refresh ``last_policy`` from ``net_model`` in place (no new module; for LoRA: adapter to adapter).

        A copy for ORW-CFM-W2 and ADRPO; DiffusionNFT's EMA with its decay schedule; nothing for ``offline-rwr``
        (its last policy stays the pretrained model, the sampler of its fixed set).
        """
        if self.objective.online:
            self.models.update_last_policy(self.objective.last_policy_decay(self.global_step))

    # ------------------------------------------------------------------ the loop

    def _epoch_log(self) -> EpochLog | None:
        if self._log is None and dist_utils.is_main_process():
            cfg = self.config
            self._log = EpochLog(
                cfg["savedir"], cfg["run_name"], use_wandb=cfg["use_wandb"],
                wandb_project=cfg["wandb_project"], config=serializable_config(cfg),
                use_tensorboard=cfg["use_tensorboard"],
            )
        return self._log

    @property
    def checkpoints(self) -> CheckpointRotation:
        """The periodic and interruption checkpoints: ``checkpoint_dir`` (default ``<savedir>/checkpoints``)."""
        if self._rotation is None:
            self._rotation = CheckpointRotation(checkpoint_directory(self.config),
                                                keep_last=self.config["keep_checkpoints"])
        return self._rotation

    def train(self, num_epochs: int, steps_per_epoch: int) -> list[dict[str, float]]:
        """Run ``num_epochs`` more epochs of ``steps_per_epoch`` steps.

        Each epoch shows a tqdm bar (reward, loss; refreshed every ``log_every`` steps), appends its
        means to ``history``, the CSV under ``savedir`` and wandb (when ``use_wandb``), then
        refreshes ``last_policy``. Calling again continues from the current epoch; after
        :meth:`load_checkpoint` of a checkpoint taken mid-epoch, the first epoch run is the rest of
        that epoch.

        The hot loop does not wait for the device: metrics are summed on the device and read back
        once per ``log_every`` steps and at the end of the epoch. With ``overlap_sampling`` (default:
        on CUDA) the next step's batch (sampling, reward, weights, coupling) is made by a background
        thread, on its own CUDA stream, while this step's backward and optimiser step run; the
        random draws happen in the same order either way, so the results are the same.

        Checkpoints: every ``checkpoint_every`` epochs (keeping the last ``keep_checkpoints``) in
        :attr:`checkpoints`' folder. With ``handle_signals``, SIGINT/SIGTERM finish the current step,
        save a checkpoint there and raise :class:`TrainingInterrupted` (a ``SystemExit``). Under
        ``torch.distributed`` every rank must call ``train`` (rank 0 logs and writes files), and a
        signal is acted on at the next ``log_every`` boundary, by all ranks together.

        Returns:
            The new epochs' mean metrics (each dict has ``epoch``; ``max_reward`` is the epoch's max).
        """
        from tqdm.auto import tqdm

        for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train(): {name} must be a positive integer, got {value!r}")
        if self.step_in_epoch >= steps_per_epoch:
            raise ValueError(
                f"train(): the checkpoint stopped epoch {self.epoch + 1} after {self.step_in_epoch} steps, "
                f"but steps_per_epoch is {steps_per_epoch}: pass the run's steps_per_epoch to finish it"
            )
        log = self._epoch_log()
        cfg = self.config
        new = []
        with StopRequests(cfg["handle_signals"]) as stop:
            for _ in range(num_epochs):
                ep = self.epoch
                sums = self._epoch_sums or MetricSums()
                self._epoch_sums = sums
                bar = tqdm(total=steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {ep + 1}", leave=False,
                           dynamic_ncols=True, disable=not dist_utils.is_main_process() or None)
                try:
                    stopped = self._run_epoch(ep, steps_per_epoch, sums, bar, stop)
                finally:
                    bar.close()
                if stopped:
                    raise TrainingInterrupted(stop.signum, self._save_rotating())
                means = sums.means()
                means.update(self.compute.epoch_metrics(steps_per_epoch))
                self.compute.start_epoch()
                self.update_last_policy()
                self.epoch += 1
                self.step_in_epoch = 0
                self._epoch_sums = None
                means["epoch"] = self.epoch
                if log is not None:
                    log.log(means, step=self.epoch)
                wants_grid = cfg["log_samples"] > 0 and log is not None and log.wants_images
                if self.models.sharded:  # its forwards are collectives: every rank samples the grid rank 0 logs
                    wants_grid = dist_utils.broadcast_object(wants_grid)
                if wants_grid:
                    self._log_sample_grid(log)
                self.history.append(means)
                new.append(means)
                if dist_utils.is_main_process():
                    tqdm.write(
                        f"epoch {self.epoch}: reward {means['reward']:.4f} (max {means['max_reward']:.4f}) "
                        f"fm {means['fm_loss']:.4f} w2 {means['w2_loss']:.4g} loss {means['total_loss']:.4f}"
                    )
                every = cfg["checkpoint_every"]
                if every is not None and self.epoch % every == 0:
                    self._save_rotating()
                if self._stop_requested(stop):
                    raise TrainingInterrupted(stop.signum, self._save_rotating())
        return new

    def _log_sample_grid(self, log: EpochLog | None) -> None:
        """This epoch's grid of ``log_samples`` policy samples (fixed noise; random states untouched) to TensorBoard / wandb."""
        from orwcfm_fast.evaluation import sample_grid

        grid = sample_grid(self, self.config["log_samples"], seed=self.seed)
        if grid is not None and log is not None:
            log.log_images("samples", grid, step=self.epoch)

    def evaluate(self, prompts: list[str] | None = None, samples_per_prompt: int | None = None, *,
                 outdir=None, seed: int = 0) -> dict[str, Any]:
        """Per-prompt reward (every configured reward term) and within-prompt diversity of the current policy.

        Args:
            prompts: default: config ``eval_prompts``, else the training prompts (None for models without prompts).
            samples_per_prompt: default: config ``eval_samples_per_prompt`` (16).
            outdir: where ``evaluation.json`` and one sample grid per prompt go (default ``<savedir>/eval``;
                ``False``: write nothing).
            seed: the evaluation noise's seed (the same noise for every model evaluated with it).

        Returns:
            ``{"reward", "held_out_reward"`` (config ``eval_reward``; None without), ``"diversity", "vendi",
            "per_prompt": {prompt: {...}}, "forwards", "hacking_alarm", "hacking_signals", "hacking_message", ...}``
            (see :func:`orwcfm_fast.evaluation.evaluate_policy`). Appends its summary to :attr:`eval_history`
            (the reward-hacking alarm's memory, :mod:`orwcfm_fast.hacking`). Training's random states are untouched.
            Under ``torch.distributed`` every rank must call it.
        """
        from orwcfm_fast.evaluation import evaluate_policy

        if outdir is None:
            outdir = Path(self.config["savedir"]) / "eval"
        return evaluate_policy(self, prompts, samples_per_prompt, outdir=outdir or None, seed=seed)

    def _stop_requested(self, stop: StopRequests) -> bool:
        """Whether a signal asks to stop; under torch.distributed a collective: all ranks get the same answer."""
        return dist_utils.agree_on_stop(stop)

    def _run_epoch(self, ep: int, steps: int, sums: MetricSums, bar, stop: StopRequests) -> bool:
        """Steps ``step_in_epoch .. steps - 1`` of epoch ``ep``; True if a stop request ended it early."""
        own_steps = self._uses_own_steps()
        overlap = own_steps and self._overlap()
        log_every = self.config["log_every"]
        pending: Pending | None = None
        rng_before_pending: dict | None = None
        counts_before_pending: dict | None = None

        def submit_next() -> Pending:
            nonlocal rng_before_pending, counts_before_pending
            if stop.may_stop:  # a stop would discard this batch: keep the states to rewind its draws
                rng_before_pending = self._rng_state()
                counts_before_pending = self.compute.state()  # its sampling passes are undone with it
            return self._worker.submit(self._make_batch, *self._draw_batch_inputs())

        try:
            for i in range(self.step_in_epoch, steps):
                if not own_steps:
                    out = self.training_step(ep)
                    lr = out.pop("lr")
                    metrics = {k: torch.tensor(v) for k, v in out.items()}
                else:
                    batch = pending.result() if pending is not None else self._make_batch(*self._draw_batch_inputs())
                    # last_policy changes after the epoch's last step: nothing to prefetch then.
                    meanwhile = submit_next if overlap and i + 1 < steps else None
                    updates = self.config["updates_per_batch"]
                    for u in range(updates):  # more steps on the same samples: fresh noise and times
                        # the next batch is submitted in the last update: its draws follow all of this batch's
                        last = u == updates - 1
                        metrics, lr, pending = self._train_step(batch if u == 0 else self._reuse_batch(batch),
                                                                meanwhile if last else None)
                        if not last:
                            sums.add(metrics, lr)
                sums.add(metrics, lr)
                self.step_in_epoch = i + 1
                bar.update(1)
                boundary = (i + 1) % log_every == 0 or i + 1 == steps
                if boundary:
                    self._read_step_metrics(sums, bar)
                # Distributed: decided at log boundaries only (a collective); else after every step.
                if i + 1 < steps and (boundary or not self.distributed) and self._stop_requested(stop):
                    if pending is not None:
                        pending.wait()
                        pending = None
                        self._set_rng_state(rng_before_pending)
                        self.compute.load_state(counts_before_pending)
                    return True
        finally:
            if pending is not None:  # an error stopped the epoch: let the background batch finish, unused
                pending.wait()
        return False

    def _read_step_metrics(self, sums: MetricSums, bar) -> None:
        """The once-per-log-interval host read: progress bar values and the skipped-step count."""
        values = sums.last_floats("reward", "total_loss")
        if self._skipped_steps is not None:
            skipped, self._skipped_steps = int(self._skipped_steps.item()), None
            if skipped:
                raise FloatingPointError(
                    f"{skipped} step(s) before step {self.global_step} had non-finite gradients; their updates "
                    "were skipped (the parameters never saw them). Look for NaN/inf in the model's outputs, or "
                    "lower 'learning_rate' / use precision 'fp32'"
                )
        bar.set_postfix(reward=f"{values['reward']:.4f}", loss=f"{values['total_loss']:.4f}", refresh=False)

    # ------------------------------------------------------------------ checkpoints

    def load_pretrained(self, path, *, ema: bool = False, load_optimizer: bool = False) -> None:
        """Load pretrained weights into ``net_model``, ``last_policy`` and ``ref_model``.

        Args:
            path: a torchcfm checkpoint (``net_model``, ``ema_model``, ``optim``, ``sched``, ``step``),
                one of ours, a plain state dict, or any of these with ``module.`` prefixes.
            ema: load torchcfm's ``ema_model`` weights instead of ``net_model``.
            load_optimizer: also restore the checkpoint's ``optim``/``sched`` states, as the
                published trainer does (off by default: pretraining's Adam moments and a
                schedule at step 400k are not a fine-tuning start).
        """
        if not isinstance(self.models, ModuleModels):
            raise ValueError("load_pretrained loads velocity-model checkpoints; a pipeline is loaded with "
                             "its from_pretrained before the trainer is built")
        state, ckpt = read_model_state(path, ema=ema, map_location="cpu")  # copied into the models' devices
        for model in (self.net_model, self.last_policy, self.ref_model):
            load_state_strict(model, state, f"{str(path)!r}")
        if load_optimizer:
            if "optim" not in ckpt:
                raise CheckpointError(f"load_optimizer=True but {str(path)!r} has no 'optim' state")
            self.optimizer.load_state_dict(ckpt["optim"])
            if "sched" in ckpt:
                self.scheduler.load_state_dict(ckpt["sched"])

    def _rng_state(self) -> dict[str, Any]:
        return rng.capture({"generator": self.generator, "cpu_generator": self.cpu_generator},
                           self.device if self.device.type == "cuda" else None)

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        rng.restore(state, {"generator": self.generator, "cpu_generator": self.cpu_generator},
                    self.device if self.device.type == "cuda" else None)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_checkpoint` needs; the reference's keys are kept.

        Models (for LoRA pipelines: the adapters, and a fingerprint of the base weights instead of
        them), the EMA, optimiser, scheduler, config, epoch and step counters (also within an epoch, with
        that epoch's metric sums), history, and every random state (the trainer's generators,
        torch CPU and CUDA, numpy, Python: one set per rank). Under ``torch.distributed`` this is a
        collective: every rank must call it. Not for sharded runs (config ``parallelism: "fsdp"``), whose
        checkpoints are folders (:meth:`save_checkpoint`).
        """
        if self.models.sharded:
            raise RuntimeError("state_dict() holds whole tensors; a sharded run (config parallelism 'fsdp') has none: "
                               "save_checkpoint(path) writes a sharded checkpoint folder")
        return {
            **self.models.state(),  # net_model / last_policy / ref_model (LoRA: both adapters + base fingerprint)
            "ema": [e.clone() for e in self._ema] if self._ema is not None else None,
            "optim": self.optimizer.state_dict(),
            **self._run_state(),
        }

    def _run_state(self) -> dict[str, Any]:
        """The checkpoint's part beside the tensors of models, EMA and optimiser (a collective when distributed)."""
        rng_states = [self._rng_state()]
        if self.distributed:
            import torch.distributed as dist

            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, self._rng_state())
        partial = self._epoch_sums is not None and self.step_in_epoch > 0
        return {
            "sched": self.scheduler.state_dict(),
            "config": serializable_config(self.config),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "epoch_sums": self._epoch_sums.state() if partial else None,
            "rng": rng_states,
            "seed": self.seed,
            "world_size": self.world_size,
            "history": list(self.history),
            "eval_history": list(self.eval_history),
            "compute": self.compute.state(),
            "objective": self.objective.state(),
            "version": __version__,
        }

    def _save_sharded(self, path: Path) -> None:
        """A sharded checkpoint folder at ``path`` (:mod:`orwcfm_fast.sharded_checkpoints`; a collective)."""
        stepped = bool(self.optimizer.state)
        tensors = trainer_tensors(self.models, self.optimizer, self._ema, optimizer_state=stepped)
        state = {**self._run_state(), **self.models.checkpoint_meta(), "parallelism": self.config["parallelism"],
                 "has_ema": self._ema is not None, "has_optim": stepped}
        save_sharded(path, tensors, state)

    def save_checkpoint(self, path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (parent folders are created).

        Under ``torch.distributed`` every rank must call it; rank 0 writes the file. A sharded run (config
        ``parallelism: "fsdp"``) writes a folder at ``path`` instead, each rank its shards
        (:mod:`orwcfm_fast.sharded_checkpoints`; on a filesystem every node shares).
        """
        if self.models.sharded:
            self._save_sharded(Path(path))
            return
        state = self.state_dict()
        if dist_utils.is_main_process():
            atomic_save(state, path)
        dist_utils.barrier()

    def _save_rotating(self):
        """A numbered checkpoint in :attr:`checkpoints` (the newest ``keep_checkpoints`` are kept); its path."""
        if self.models.sharded:
            path = self.checkpoints.path_for(self.epoch, self.step_in_epoch, sharded=True)
            if dist_utils.is_main_process():
                self.checkpoints.remove_stale_temporaries()
            self._save_sharded(path)
            if dist_utils.is_main_process():
                self.checkpoints.prune(path)
            dist_utils.barrier()
            return path
        state = self.state_dict()
        if dist_utils.is_main_process():
            self.checkpoints.save(state, self.epoch, self.step_in_epoch)
        dist_utils.barrier()
        return self.checkpoints.path_for(self.epoch, self.step_in_epoch)

    def load_checkpoint(self, path, *, reshard: bool = False) -> None:
        """Resume from :meth:`save_checkpoint`'s file (or sharded folder): models, optimiser, scheduler, counters, RNG.

        The trainer's own config (passed to the constructor) stays in force. A following
        ``train(num_epochs, steps_per_epoch)`` continues exactly where the saved run was (the rest
        of its epoch first, if it was saved mid-epoch); on the CPU the result is bit-identical to an
        uninterrupted run. Under ``torch.distributed`` every rank loads the same file and takes its
        own random state; a different world size resumes the weights and optimiser but not the
        random streams (a warning says so).

        A sharded checkpoint (config ``parallelism: "fsdp"``) resumes exactly on as many ranks as wrote it, with
        the same ``parallelism``. Another world size or parallelism is refused unless ``reshard``: then the
        weights, EMA and optimiser are loaded into this run's layout (any number of ranks, sharded or not) and
        the random streams are reseeded, as above.

        Raises:
            CheckpointError: missing or unreadable file, not a trainer checkpoint, or weights of
                another architecture, or a sharded checkpoint of another layout without ``reshard``
                (nothing is changed then).
        """
        if Path(path).is_dir():
            self._load_sharded(Path(path), reshard)
            return
        source = f"{str(path)!r}"
        if self.models.sharded:
            raise CheckpointError(
                f"{source} is a single-file checkpoint, written without sharding; this run shards the transformer "
                "(config parallelism 'fsdp') and resumes from sharded checkpoint folders (.dcp): resume it with "
                "parallelism 'ddp'")
        # on the CPU first: every tensor is then copied into its place on the device (no second full copy there)
        ckpt = load_file(path, map_location="cpu")
        missing = [k for k in ("optim", "sched") if not (isinstance(ckpt, Mapping) and k in ckpt)]
        if missing:
            raise CheckpointError(
                f"{source} is not a trainer checkpoint: it lacks {missing} (for pretrained weights use load_pretrained)"
            )
        # Check every model (and the EMA) before changing any, so a mismatch leaves the trainer as it was.
        self.models.check_state(ckpt, source)
        ema = ckpt.get("ema")
        if self._ema is not None and ema is not None and (
                len(ema) != len(self._ema) or any(a.shape != b.shape for a, b in zip(ema, self._ema))):
            raise CheckpointError(f"{source}: its EMA does not fit this trainer's parameters")
        self.models.load_state(ckpt, source)
        if self._ema is not None:
            if ema is not None:
                torch._foreach_copy_(self._ema, [e.to(self.device) for e in ema])
            else:  # a checkpoint of a run without EMA: start it from the loaded weights
                self._ema = [p.detach().float().clone() for p in self.models.trainable_parameters()]
        self.optimizer.load_state_dict(ckpt["optim"])
        self._restore_run_state(ckpt, path)

    def _load_sharded(self, path: Path, reshard: bool) -> None:
        source = f"{str(path)!r}"
        state = read_state(path)
        if "sched" not in state:
            raise CheckpointError(f"{source} is not a trainer checkpoint: its {STATE_FILE} lacks 'sched'")
        saved_world, saved_layout = int(state.get("world_size", 1)), state.get("parallelism")
        if not reshard and (saved_world != self.world_size or saved_layout != self.config["parallelism"]):
            raise CheckpointError(
                f"{source} was written by {saved_world} rank(s) with parallelism {saved_layout!r}; this run has "
                f"{self.world_size} with {self.config['parallelism']!r}. An exact resume needs the same ranks and "
                "layout: start as many (torchrun --nproc_per_node / --nnodes), or pass reshard=True (orwcfm-fast "
                "train --reshard) to load the weights, EMA and optimiser into this layout with reseeded random streams")
        self.models.check_checkpoint_meta(state, source)
        load_ema = self._ema is not None and bool(state.get("has_ema"))
        fresh = not self.optimizer.state  # asking for its state gives it one (a zero step): undone on a refusal
        try:
            tensors = trainer_tensors(self.models, self.optimizer, self._ema if load_ema else None,
                                      optimizer_state=bool(state.get("has_optim")))
            check_layout(path, tensors)  # before anything changes
        except BaseException as err:
            if fresh:
                self.optimizer.state.clear()
            if isinstance(err, NotImplementedError):  # a family without sharded_state (plain modules)
                raise CheckpointError(f"{source} is a sharded checkpoint: {err}") from None
            raise
        load_sharded(path, tensors)
        restore_optimizer(self.models, self.optimizer, tensors)
        self.models.sync_weights()
        if self._ema is not None and not load_ema:  # a run without EMA: start it from the loaded weights
            self._ema = [p.detach().float().clone() for p in self.models.trainable_parameters()]
        self._restore_run_state(state, path)

    def _restore_run_state(self, ckpt: Mapping[str, Any], path) -> None:
        """The counters, history, scheduler and random states of a checkpoint (:meth:`_run_state`)."""
        self.scheduler.load_state_dict(ckpt["sched"])
        self.epoch = int(ckpt.get("epoch", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self.step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        sums = ckpt.get("epoch_sums")
        self._epoch_sums = MetricSums.from_state(sums, self.device) if sums else None
        self.history = list(ckpt.get("history", []))
        self.eval_history = list(ckpt.get("eval_history", []))
        self.compute.load_state(ckpt.get("compute"))
        self.objective.load_state(ckpt.get("objective"))
        self.seed = int(ckpt.get("seed", self.seed))
        rng_states = ckpt.get("rng")
        saved_world = int(ckpt.get("world_size", 1))
        if rng_states is not None and saved_world == self.world_size and len(rng_states) == self.world_size:
            self._set_rng_state(rng_states[self.rank])
        elif rng_states is not None:
            warnings.warn(
                f"{str(path)!r} was written by a run of {saved_world} processes, this one has {self.world_size}: "
                "weights, optimiser and counters are restored, the random streams are reseeded (not an exact resume)"
            )
            rank_seed = self.seed + 1_000_003 * self.rank + 7919 * self.global_step
            self.generator.manual_seed(rank_seed)
            self.cpu_generator.manual_seed(rank_seed + 1)
        else:  # checkpoints of earlier versions: the trainer's generators only
            if "generator" in ckpt:
                self.generator.set_state(ckpt["generator"].cpu())
            if "cpu_generator" in ckpt:
                self.cpu_generator.set_state(ckpt["cpu_generator"].cpu())

