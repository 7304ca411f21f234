"""What every diffusers text-to-image flow shares: prompt embeddings, CFG, time grid, decoding.

A :class:`PipelineFlow` adapts one diffusers pipeline (its transformer, VAE, text encoders and
scheduler; the pipeline's own ``__call__`` is never used) to the library's velocity contract::

    flow.velocity(t, x, cond) -> v      # torchcfm's convention: t = 0 noise, t = 1 data, v = x_1 - x_0

with ``x`` ``[B, *flow.sample_shape]`` latents in the transformer's native layout (``[C, F, h, w]`` for
video families) and ``cond`` the tuple of per-sample prompt tensors from :meth:`PipelineFlow.encode`.
The family subclasses (one file each, registered in :data:`orwcfm_fast.flows.PIPELINE_FLOWS`) supply
the transformer call, the latent layout, the text encoding, the scheduler's time grid and the VAE's
latent normalisation; :mod:`~orwcfm_fast.flows.conventions` holds the sign and time mapping. The
transformer's adapter state (policy / last policy / reference) is set by the caller
(:class:`~orwcfm_fast.flows.lora.LoraRoles`).

What a family may rely on, and must provide:

- prompt rows of different lengths (text encoders that drop padding, e.g. Qwen's) are zero-padded at the
  end of their first (sequence) dimension to the longest row of the batch; such a family returns its
  attention mask among its conditioning tensors (1 = token, 0 = padding), so the padding is masked;
- classifier-free guidance combines the library-convention velocities with :meth:`PipelineFlow._combine_guidance`
  (plain ``v_u + g (v_c - v_u)`` unless the family's pipeline rescales), in one ``2B`` forward unless the
  family sets ``cfg_batched = False`` (two forwards, as pipelines with true CFG run them);
- :meth:`PipelineFlow.decode` returns images ``[B, 3, H, W]``, or videos ``[B, 3, F, H, W]`` when the family
  sets ``video``; rewards score video frames (:func:`orwcfm_fast.rewards.score_terms`);
- :meth:`PipelineFlow.default_lora_targets` names the attention projections LoRA adapts by default;
- :meth:`PipelineFlow.shard_units` names the blocks FSDP shards one by one (config ``parallelism: "fsdp"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from orwcfm_fast.flows.conventions import cfg_combine, shifted_time_grid
from orwcfm_fast.sampling import integrate

__all__ = ["PipelineFlow", "pad_rows", "parse_resolution"]


def pad_rows(rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` (per-sample tensors, no batch dimension) zero-padded at the end of dimension 0 to the longest.

    Rows that already agree are returned as they are. Only the first dimension may differ.
    """
    rows = list(rows)
    longest = max(r.shape[0] for r in rows) if rows and rows[0].dim() else None
    if longest is None or all(r.shape[0] == longest for r in rows):
        return rows
    if any(r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"prompt rows differ beyond their first dimension: {[tuple(r.shape) for r in rows]}")
    return [torch.nn.functional.pad(r, (0, 0) * (r.dim() - 1) + (0, longest - r.shape[0])) for r in rows]


def parse_resolution(resolution, multiple: int) -> tuple[int, int]:
    """``(height, width)`` from an int or ``[h, w]``, each a positive multiple of ``multiple``.

    Raises:
        ValueError: naming the config key ``resolution`` and the multiple it must respect.
    """
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        hw = (resolution, resolution)
    elif isinstance(resolution, Sequence) and not isinstance(resolution, str) and len(resolution) == 2 \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in resolution):
        hw = (int(resolution[0]), int(resolution[1]))
    else:
        raise ValueError(f"config key 'resolution' must be an int or [height, width], got {resolution!r}")
    if any(v <= 0 or v % multiple for v in hw):
        raise ValueError(
            f"config key 'resolution' is {list(hw)}, but height and width must be positive multiples of "
            f"{multiple} (the VAE's downsampling times the transformer's patch size)"
        )
    return hw


def _pad_batches(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches ``[B, L_a, ...]`` and ``[B, L_b, ...]`` zero-padded in dimension 1 to a common length."""
    if a.dim() < 2 or a.shape[1] == b.shape[1]:
        return a, b
    longest = max(a.shape[1], b.shape[1])
    pad = lambda z: torch.nn.functional.pad(z, (0, 0) * (z.dim() - 2) + (0, longest - z.shape[1]))  # noqa: E731
    return pad(a), pad(b)


class PipelineFlow:
    """Base of the diffusers flows; see the module docs.

    Args:
        pipe: the diffusers pipeline (its components are used, never its ``__call__``).
        resolution: image size (int or ``[h, w]``); ``None``: the transformer's default.
        guidance_scale: classifier-free guidance while sampling (1 = off; Flux-dev: its guidance input);
            ``None``: :meth:`default_guidance_scale`.
        negative_prompt: the unconditional prompt of CFG.
        time_shift: ``None``: the scheduler's own time grid (the pipeline's); a float: a
            uniform grid with this static shift.
        max_sequence_length: T5 tokens per prompt.
        device: where the transformer and VAE run.
        text_encoder_batch_size: prompts per text-encoder forward (``None``: all missing prompts at once).
        prompt_cache_size: prompts whose embeddings are kept, least recently used dropped first
            (``None``: every prompt ever encoded). The cache is in host memory, see :meth:`encode`.
        num_frames: video families: frames per video (``None``: the family's default); images: must be None.

    Subclasses define ``family``, ``timestep_scale``, :attr:`sample_shape`,
    :meth:`_transformer_call`, :meth:`_encode_prompts`, :meth:`_scheduler_grid`,
    :meth:`to_vae_latents` and :meth:`_guided`; where their pipeline differs, also ``video``,
    ``cfg_batched``, :meth:`_vae_scale_factor`, :meth:`_combine_guidance`, :meth:`default_lora_targets`,
    :meth:`decode` and :meth:`encode_images`.
    """

    family = "diffusers"
    timestep_scale = 1000.0
    #: whether the family makes videos (samples ``[C, F', h, w]``, decoded ``[B, 3, F, H, W]``, F = :attr:`frames`)
    video: bool = False
    #: frames per decoded video (set by video families from ``num_frames``); None: images
    frames: int | None = None
    #: classifier-free guidance as one ``2B`` forward (True), or as two ``B`` forwards like true-CFG pipelines
    cfg_batched: bool = True

    def __init__(self, pipe, *, resolution=None, guidance_scale: float = 1.0, negative_prompt: str = "",
                 time_shift: float | None = None, max_sequence_length: int = 256, device=None,
                 text_encoder_batch_size: int | None = 32, prompt_cache_size: int | None = None,
                 num_frames: int | None = None):
        if num_frames is not None and not self.video:
            raise ValueError(f"config key 'num_frames' is for video pipelines; {type(pipe).__name__} makes images: "
                             "leave it None")
        self.num_frames = None if num_frames is None else int(num_frames)
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.device = torch.device(device) if device is not None else self.transformer.device
        self.vae_scale_factor = int(self._vae_scale_factor())
        if resolution is None:
            resolution = self.default_resolution()
        self.height, self.width = parse_resolution(resolution, self.resolution_multiple())
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else self.default_guidance_scale())
        self.negative_prompt = negative_prompt
        self.time_shift = time_shift
        self.max_sequence_length = int(max_sequence_length)
        for key, value in (("text_encoder_batch_size", text_encoder_batch_size), ("prompt_cache_size", prompt_cache_size)):
            if value is not None and int(value) < 1:
                raise ValueError(f"config key {key!r} must be None or an integer >= 1, got {value!r}")
        self.text_encoder_batch_size = None if text_encoder_batch_size is None else int(text_encoder_batch_size)
        self.prompt_cache_size = None if prompt_cache_size is None else int(prompt_cache_size)
        # prompt -> its embedding rows (one tensor per conditioning input, no batch dimension), on the CPU
        self._cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self._negative: tuple[torch.Tensor, ...] | None = None  # [1, ...] rows on the device

    # ------------------------------------------------------------------ to define per family

    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _vae_scale_factor(self) -> int:
        """Pixels per latent cell (spatial): the pipeline's own ``vae_scale_factor`` where it has an int one."""
        factor = getattr(self.pipe, "vae_scale_factor", None)
        if isinstance(factor, int) and not isinstance(factor, bool):
            return factor
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_lora_targets(self) -> tuple[str, ...]:
        """Module-name suffixes LoRA adapts when config ``lora_target_modules`` is None (the attention projections)."""
        from orwcfm_fast.flows.lora import DEFAULT_TARGET_MODULES

        return DEFAULT_TARGET_MODULES

    def shard_units(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The sub-modules config ``parallelism: "fsdp"`` shards one by one (FSDP2 units), in forward order.

        Every element of the transformer's top-level ``ModuleList`` s: the transformer blocks of every family
        registered today (SD3's ``transformer_blocks``, Flux's double and single stream blocks, Z-Image's
        refiners and ``layers``, Wan's ``blocks``). A family whose blocks sit deeper overrides this.
        """
        return [block for child in transformer.children() if isinstance(child, torch.nn.ModuleList)
                for block in child]

    def default_resolution(self) -> int:
        raise NotImplementedError

    def resolution_multiple(self) -> int:
        raise NotImplementedError

    def _transformer_call(self, t: torch.Tensor, x: torch.Tensor, cond: tuple[torch.Tensor, ...],
                          transformer: torch.nn.Module) -> torch.Tensor:
        """``transformer``'s own prediction (diffusers' convention) at library time ``t``."""
        raise NotImplementedError

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """Per-prompt tensors ``[n, ...]`` of ``prompts`` from the pipeline's text encoders."""
        raise NotImplementedError

    def _scheduler_grid(self, steps: int) -> list[float]:
        raise NotImplementedError

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE latents of samples ``x`` in the VAE's input layout (``[B, C, h, w]``; ``[B, C, F, h, w]`` for 3-D VAEs),
        normalised as the transformer sees them, which :meth:`decode` undoes (FLUX.2 undoes its batch-norm
        statistics here: what it returns is the VAE decoder's input)."""
        raise NotImplementedError

    def _guided(self) -> bool:
        """Whether :meth:`velocity` runs two-pass classifier-free guidance."""
        return self.guidance_scale != 1.0

    def _combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
        """The guided velocity from the unconditional and conditional ones (library convention):
        ``v_u + g (v_c - v_u)``. Families whose pipeline rescales the result override it."""
        return cfg_combine(v_uncond, v_cond, self.guidance_scale)

    def default_guidance_scale(self) -> float:
        """The guidance of config ``guidance_scale: None``: 1 (classifier-free guidance off)."""
        return 1.0

    def dynamic_shift_mu(self) -> float | None:
        """The scheduler's resolution-dependent shift ``mu`` (``use_dynamic_shifting``), or ``None``."""
        return None

    def sampling_shift(self, steps: int | None = None) -> float:
        """The static shift ``s`` of the sampling grid: ``sigma' = s sigma / (1 + (s - 1) sigma)``.

        ``steps``: the sampler's step count, for families whose shift depends on it (FLUX.2); unused here.

        Config ``time_shift`` if set; else, with dynamic shifting (Flux), the shift its ``mu`` applies at
        this resolution (``e^mu``, or ``mu`` for the scheduler's ``"linear"`` shift type: the same map);
        else the scheduler's static ``shift``. ``time_sampling: "shifted"`` draws loss times with it, so
        training sees the times sampling steps through.
        """
        if self.time_shift is not None:
            return float(self.time_shift)
        mu = self.dynamic_shift_mu()
        if mu is not None:
            return float(mu) if self.scheduler.config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
        return float(self.scheduler.config.get("shift", 1.0))

    # ------------------------------------------------------------------ prompts

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Per-sample conditioning of ``prompts`` (one entry each): a tuple of ``[B, ...]`` tensors on the flow's device.

        Each distinct prompt is encoded once, at most ``text_encoder_batch_size`` prompts per
        text-encoder forward, and its rows are cached in host memory in the encoders' output dtype
        (at most ``prompt_cache_size`` prompts, least recently used dropped). Only this batch's
        rows go to the device: on CUDA gathered into a pinned staging buffer and copied
        non-blocking. The cache itself is not pinned: the pinned allocator rounds every block up
        to a power of two and page-locks it, which at tens of GB of embeddings would cost up to
        twice the memory and take it from the operating system. See also :meth:`precompute`
        and :meth:`release_text_encoders`.
        """
        prompts = list(prompts)
        if not prompts:
            return ()
        rows = self._host_rows(prompts)
        return tuple(self._to_device(pad_rows([rows[p][k] for p in prompts])) for k in range(len(rows[prompts[0]])))

    def precompute(self, prompts: Sequence[str]) -> None:
        """Encode ``prompts`` into the host cache now, in chunks (nothing goes to the device), and the negative prompt when guiding.

        With a bounded ``prompt_cache_size`` only the last that many prompts stay cached.
        """
        self._host_rows(list(prompts), collect=False)
        if self._guided():
            self._negative_cond(1)

    def _host_rows(self, prompts: list[str], collect: bool = True) -> dict[str, tuple[torch.Tensor, ...]]:
        """``{prompt: rows}`` of the distinct ``prompts`` (CPU tensors), encoding the uncached ones in chunks.

        The returned rows stay valid when the bounded cache drops them (a batch may hold more
        distinct prompts than the cache). ``collect=False`` returns ``{}`` and only fills the cache.
        """
        rows: dict[str, tuple[torch.Tensor, ...]] = {}
        missing = []
        for p in dict.fromkeys(prompts):
            cached = self._cache.get(p)
            if cached is None:
                missing.append(p)
            else:
                self._cache.move_to_end(p)
                if collect:
                    rows[p] = cached
        missing.sort()  # a deterministic batching, whatever the order the prompts come in
        chunk = self.text_encoder_batch_size or max(len(missing), 1)
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            host = tuple(e.detach().to("cpu") for e in self._encode_prompts(part))
            for i, p in enumerate(part):
                row = tuple(h[i] for h in host)
                if self.prompt_cache_size is not None:
                    row = tuple(r.clone() for r in row)  # own storage: dropping the row frees it
                if collect:
                    rows[p] = row
                self._cache[p] = row
                if self.prompt_cache_size is not None:
                    while len(self._cache) > self.prompt_cache_size:
                        self._cache.popitem(last=False)
        return rows

    def _to_device(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``[len(parts), ...]`` on the flow's device from CPU rows ``parts``."""
        if self.device.type == "cuda":
            staging = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
            torch.stack(parts, out=staging)
            # the caching host allocator records the copy's stream on this block: it is not handed
            # out again before the copy has finished, so dropping `staging` now is safe
            return staging.to(self.device, non_blocking=True)
        return torch.stack(parts).to(self.device)

    def release_text_encoders(self) -> None:
        """Move the text encoders (every ``text_encoder*`` component) to the CPU (their embeddings are cached);
        new prompts still encode, there."""
        for name, enc in self.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(enc, torch.nn.Module):
                enc.to("cpu")
        self._text_device = torch.device("cpu")

    def _text_encoder_device(self) -> torch.device:
        return getattr(self, "_text_device", self.device)

    def _negative_cond(self, batch: int) -> tuple[torch.Tensor, ...]:
        if self._negative is None:
            # one row, kept on the device and outside the prompt cache (never dropped)
            self._negative = tuple(e.detach().to(self.device) for e in self._encode_prompts([self.negative_prompt]))
        return tuple(e.expand(batch, *e.shape[1:]) for e in self._negative)

    # ------------------------------------------------------------------ velocity and sampling

    def transformer_velocity(self, t: torch.Tensor, x: torch.Tensor, cond: tuple[torch.Tensor, ...],
                             transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """The transformer's velocity in the library's convention, no guidance (the loss's forwards).

        Args:
            t: ``[B]`` times (0 = noise). x: ``[B, *sample_shape]``. cond: from :meth:`encode`.
            transformer: another transformer of the same architecture (full fine-tuning's copies);
                default: the pipeline's.

        Returns:
            ``[B, *sample_shape]`` in the transformer's output dtype.
        """
        return -self._transformer_call(t, x, cond, self.transformer if transformer is None else transformer)

    def velocity(self, t: torch.Tensor, x: torch.Tensor, cond: tuple[torch.Tensor, ...],
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """The sampling velocity: :meth:`transformer_velocity`, with CFG when ``guidance_scale != 1``.

        CFG runs the unconditional and conditional halves as one batch of ``2B`` (as the
        pipelines do) and combines ``v_u + g (v_c - v_u)``.
        """
        if not self._guided():
            return self.transformer_velocity(t, x, cond, transformer)
        b = x.shape[0]
        neg = self._negative_cond(b)
        if not self.cfg_batched:
            v_uncond = self.transformer_velocity(t, x, neg, transformer)
            return self._combine_guidance(v_uncond, self.transformer_velocity(t, x, cond, transformer))
        both = tuple(torch.cat(_pad_batches(n, c)) for n, c in zip(neg, cond))
        v = self.transformer_velocity(torch.cat([t, t]), torch.cat([x, x]), both, transformer)
        v_uncond, v_cond = v.chunk(2)
        return self._combine_guidance(v_uncond, v_cond)

    def time_grid(self, steps: int) -> list[float]:
        """The ``steps + 1`` sampling times: the scheduler's (config ``time_shift`` None) or a shifted uniform grid."""
        if self.time_shift is None:
            return self._scheduler_grid(steps)
        return shifted_time_grid(steps, float(self.time_shift))

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, *sample_shape]`` float32 standard normal latents on the flow's device."""
        return torch.randn((n, *self.sample_shape), generator=generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def sample(self, x_0: torch.Tensor, cond: tuple[torch.Tensor, ...], *, steps: int, solver: str = "euler",
               backend: str | None = None, velocity=None) -> torch.Tensor:
        """Integrate from noise ``x_0`` to latents on :meth:`time_grid` (the state stays in ``x_0``'s dtype).

        With ``solver="euler"`` and the scheduler's grid this is the pipeline's own sampling loop.
        """
        velocity = velocity or self.velocity
        return integrate(lambda t, x: velocity(t, x, cond), x_0, solver=solver, steps=steps,
                         time_grid=self.time_grid(steps), backend=backend)

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] of latents ``x``, decoded in chunks of ``batch_size``."""
        z = self.to_vae_latents(x)
        cfg = self.vae.config
        return self._vae_decode(z / cfg.scaling_factor + (cfg.shift_factor or 0.0), batch_size)

    def _vae_decode(self, z: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """The VAE's output for de-normalised latents ``z`` (its own input layout), ``batch_size`` at a time,
        mapped from [-1, 1] to float32 [0, 1]."""
        chunk = batch_size or z.shape[0]
        dtype = self.vae.dtype
        out = [self.vae.decode(z[i:i + chunk].to(dtype), return_dict=False)[0] for i in range(0, z.shape[0], chunk)]
        return (torch.cat(out).float() / 2 + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (the flow's layout) of images ``[B, 3, H, W]`` in [0, 1]: the VAE's posterior mode, scaled."""
        cfg = self.vae.config
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        z = (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return self.from_vae_latents(z)

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vae_latents`."""
        raise NotImplementedError

    def image_tokens(self) -> int:
        """Number of latent tokens of one image at the configured resolution (for dynamic shifts)."""
        patch = self.transformer.config.patch_size
        return math.prod((s // self.vae_scale_factor) // (patch or 1) for s in (self.height, self.width))
