"""What every diffusers text-to-image flow shares: prompt embeddings, CFG, time grid, decoding.

A :class:`PipelineFlow` adapts one diffusers pipeline (its transformer, VAE, text encoders and
scheduler; the pipeline's own ``__call__`` is never used) to the library's velocity contract::

    flow.velocity(t, x, cond) -> v      # torchcfm's convention: t = 0 noise, t = 1 data, v = x_1 - x_0

with ``x`` ``[B, *flow.sample_shape]`` latents in the transformer's native layout and ``cond`` the
tuple of per-sample prompt tensors from :meth:`PipelineFlow.encode`. The family subclasses
(:mod:`~orwcfm_fast.flows.sd3`, :mod:`~orwcfm_fast.flows.flux`) supply the transformer call,
the latent layout and the scheduler's time grid; :mod:`~orwcfm_fast.flows.conventions` holds the
sign and time mapping. The transformer's adapter state (policy / last policy / reference) is
set by the caller (:class:`~orwcfm_fast.flows.lora.LoraRoles`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from orwcfm_fast.flows.conventions import cfg_combine, shifted_time_grid
from orwcfm_fast.sampling import integrate

__all__ = ["PipelineFlow", "parse_resolution"]


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

    Subclasses define ``family``, ``timestep_scale``, :attr:`sample_shape`,
    :meth:`_transformer_call`, :meth:`_encode_prompts`, :meth:`_scheduler_grid`,
    :meth:`to_vae_latents` and :meth:`_guided`.
    """

    family = "diffusers"
    timestep_scale = 1000.0

    def __init__(self, pipe, *, resolution=None, guidance_scale: float = 1.0, negative_prompt: str = "",
                 time_shift: float | None = None, max_sequence_length: int = 256, device=None,
                 text_encoder_batch_size: int | None = 32, prompt_cache_size: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.device = torch.device(device) if device is not None else self.transformer.device
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
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
        """``[B, C, h, w]`` VAE latents (scaled, as the transformer sees them) of samples ``x``."""
        raise NotImplementedError

    def _guided(self) -> bool:
        """Whether :meth:`velocity` runs two-pass classifier-free guidance."""
        return self.guidance_scale != 1.0

    def default_guidance_scale(self) -> float:
        """The guidance of config ``guidance_scale: None``: 1 (classifier-free guidance off)."""
        return 1.0

    def dynamic_shift_mu(self) -> float | None:
        """The scheduler's resolution-dependent shift ``mu`` (``use_dynamic_shifting``), or ``None``."""
        return None

    def sampling_shift(self) -> float:
        """The static shift ``s`` of the sampling grid: ``sigma' = s sigma / (1 + (s - 1) sigma)``.

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
        return tuple(self._to_device([rows[p][k] for p in prompts]) for k in range(len(rows[prompts[0]])))

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
        """Move the text encoders to the CPU (their embeddings are cached); new prompts still encode, there."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(self.pipe, name, None)
            if enc is not None:
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
        both = tuple(torch.cat([n, c]) for n, c in zip(neg, cond))
        v = self.transformer_velocity(torch.cat([t, t]), torch.cat([x, x]), both, transformer)
        v_uncond, v_cond = v.chunk(2)
        return cfg_combine(v_uncond, v_cond, self.guidance_scale)

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
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        chunk = batch_size or z.shape[0]
        dtype = self.vae.dtype
        images = [self.vae.decode(z[i:i + chunk].to(dtype), return_dict=False)[0] for i in range(0, z.shape[0], chunk)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0.0, 1.0)

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
