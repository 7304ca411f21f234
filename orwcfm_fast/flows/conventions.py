"""The one place where diffusers' flow conventions meet the library's (torchcfm's).

diffusers' rectified flows run time from noise to data as ``sigma`` = 1 -> 0, with
``x = sigma * noise + (1 - sigma) * data``, and their transformers predict ``noise - data``.
The library runs ``t`` = 0 (noise) -> 1 (data) on the same path and its velocities are
``u_t = x_1 - x_0`` (data - noise). So::

    t = 1 - sigma          x_t is the same tensor          v_cfm = -v_diffusers

Classifier-free guidance ``v = v_u + g (v_c - v_u)`` is linear, so it commutes with the sign
flip. Each model family's *timestep scale* (SD3 takes ``1000 * sigma``, Flux ``sigma``) is a
class attribute of its adapter (:mod:`orwcfm_fast.flows.sd3`, :mod:`orwcfm_fast.flows.flux`),
applied by :func:`model_timestep`.

Time grids: a pipeline's scheduler decides where its steps fall (the static shift ``s`` of
SD3/SD3.5, Flux's resolution-dependent dynamic shift); :func:`scheduler_time_grid` asks the
scheduler itself and maps its sigmas to ``t``, so a library sampler steps through exactly the
times the pipeline does. :func:`shifted_time_grid` is the explicit static-shift formula
``sigma' = s sigma / (1 + (s - 1) sigma)`` on a uniform grid (config ``time_shift``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

__all__ = [
    "cfg_combine",
    "cfm_velocity",
    "latent_statistics",
    "model_timestep",
    "scheduler_time_grid",
    "shift_sigma",
    "shifted_time_grid",
    "sigma_from_t",
    "time_grid_from_sigmas",
]


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``sigma`` (1 = noise) of the library's time ``t`` (0 = noise): ``1 - t``."""
    return 1.0 - t


def model_timestep(t: torch.Tensor, scale: float) -> torch.Tensor:
    """The ``timestep`` a diffusers transformer takes at library time ``t``: ``scale * (1 - t)``."""
    return sigma_from_t(t) * scale


def cfm_velocity(v_diffusers: torch.Tensor) -> torch.Tensor:
    """The library's velocity (``data - noise``) from a diffusers prediction (``noise - data``)."""
    return -v_diffusers


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + scale * (v_c - v_u)`` (either sign convention)."""
    return v_uncond + scale * (v_cond - v_uncond)


def time_grid_from_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """Library times ``1 - sigma`` of a decreasing sigma schedule that ends at 0 (data)."""
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(values) < 2 or any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must decrease over at least two entries, got {values}")
    return [1.0 - s for s in values]


def scheduler_time_grid(scheduler, steps: int, *, sigmas: Sequence[float] | None = None,
                        mu: float | None = None) -> list[float]:
    """The ``steps + 1`` library times at which ``scheduler`` (a ``FlowMatchEulerDiscreteScheduler``) steps.

    Runs ``set_timesteps`` on a copy (the pipeline's scheduler is untouched) with the same
    arguments its pipeline passes (``sigmas`` for Flux, ``mu`` for dynamic shifting) and maps
    the resulting sigmas, terminal 0 included, with :func:`time_grid_from_sigmas`.
    """
    scheduler = copy.deepcopy(scheduler)
    kwargs = {"mu": mu} if mu is not None else {}
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), device="cpu", **kwargs)
    else:
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
    grid = time_grid_from_sigmas(scheduler.sigmas.to(torch.float64))
    if len(grid) != steps + 1:
        raise ValueError(f"the scheduler made {len(grid) - 1} steps where {steps} were asked for")
    return grid


def latent_statistics(vae_config, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents_mean, 1 / latents_std)``, each ``[1, C, 1, 1, 1]``, of a VAE with per-channel latent statistics
    (Wan's ``AutoencoderKLWan``, Qwen-Image's): the pipelines map ``z / (1 / std) + mean`` before decoding and
    ``(z - mean) * (1 / std)`` after encoding, computed in this order to round as they do."""
    c = vae_config.z_dim
    mean = torch.tensor(vae_config.latents_mean).view(1, c, 1, 1, 1).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, c, 1, 1, 1).to(device, dtype)
    return mean, inv_std


def shift_sigma(sigma: float, shift: float) -> float:
    """SD3's static time shift ``s sigma / (1 + (s - 1) sigma)`` (``s = 1``: no shift)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shifted_time_grid(steps: int, shift: float) -> list[float]:
    """``steps + 1`` library times: a uniform sigma grid from 1 to 0, each sigma shifted once by ``shift``."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"time_shift must be > 0, got {shift}")
    return [1.0 - shift_sigma(1.0 - i / steps, shift) for i in range(steps)] + [1.0]
