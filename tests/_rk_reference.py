"""An independent oracle for fixed-step explicit Runge-Kutta sampling, for tests.

Every scheme is written out by hand from its textbook Butcher tableau (Hairer, Norsett & Wanner,
*Solving Ordinary Differential Equations I*, II.1; Butcher, *Numerical Methods for ODEs*, 2016),
one small function per scheme, as a plain per-step loop. Nothing is imported from
``orwcfm_fast``: a wrong weight, stage time or time grid in ``orwcfm_fast.sampling.solvers``
cannot leak into the expectation. The state and the step arithmetic are float64.

Convention (torchcfm's, which the library follows): ``dx/dt = v(t, x)`` from ``t = 0`` (noise)
to ``t = 1`` (data) in ``steps`` uniform steps, ``t_n = n / steps`` (or a given grid of
``steps + 1`` times); a scheme with ``s`` stages calls ``v`` ``s`` times per step, the model
seeing ``t`` as a ``[B]`` tensor.

A step function is ``step(f, t, x, h) -> x_next`` with ``f(t: float, x) -> dx/dt``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "TEXTBOOK_SCHEMES",
    "euler_step",
    "midpoint_step",
    "heun_step",
    "rk4_step",
    "ralston_step",
    "explicit_rk_step",
    "uniform_grid",
    "rk_reference",
    "float64_copy",
    "evaluated_in",
]

Slope = Callable[[float, torch.Tensor], torch.Tensor]
Step = Callable[[Slope, float, torch.Tensor, float], torch.Tensor]


def euler_step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """Forward Euler (order 1): ``x + h f(t, x)``."""
    return x + h * f(t, x)


def midpoint_step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """Explicit midpoint (order 2): the slope at the half step, reached by an Euler half step."""
    k1 = f(t, x)
    k2 = f(t + h / 2, x + (h / 2) * k1)
    return x + h * k2


def heun_step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """Heun / explicit trapezoid (order 2): an Euler predictor to ``t + h``, then the mean of the two slopes."""
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + (h / 2) * (k1 + k2)


def rk4_step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """The classical Runge-Kutta method (order 4): weights 1/6, 2/6, 2/6, 1/6 at ``t, t + h/2, t + h/2, t + h``."""
    k1 = f(t, x)
    k2 = f(t + h / 2, x + (h / 2) * k1)
    k3 = f(t + h / 2, x + (h / 2) * k2)
    k4 = f(t + h, x + h * k3)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def ralston_step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """Ralston's second-order method: the second slope at ``t + 2h/3``, weights 1/4 and 3/4."""
    k1 = f(t, x)
    k2 = f(t + 2 * h / 3, x + (2 * h / 3) * k1)
    return x + (h / 4) * (k1 + 3 * k2)


def explicit_rk_step(a: Sequence[Sequence[float]], b: Sequence[float], c: Sequence[float]) -> Step:
    """A step for a tableau the *test* spells out (e.g. ``op_cases.dopri5_fixed_tableau``'s coefficients).

    Stage ``i`` evaluates ``f(t + c[i] h, x + h sum_{j<i} a[i][j] k_j)``; the step is ``x + h sum_i b[i] k_i``.
    Only for tableaus that have no textbook function above.
    """

    def step(f: Slope, t: float, x: torch.Tensor, h: float) -> torch.Tensor:
        ks: list[torch.Tensor] = []
        for i in range(len(b)):
            x_i = x
            for j in range(i):
                x_i = x_i + (h * a[i][j]) * ks[j]
            ks.append(f(t + c[i] * h, x_i))
        x_next = x
        for b_i, k in zip(b, ks):
            x_next = x_next + (h * b_i) * k
        return x_next

    return step


#: The library's scheme names, each with its textbook step.
TEXTBOOK_SCHEMES: dict[str, Step] = {
    "euler": euler_step,
    "midpoint": midpoint_step,
    "heun": heun_step,
    "rk4": rk4_step,
}


def uniform_grid(steps: int, t_0: float = 0.0, t_1: float = 1.0) -> list[float]:
    """``steps + 1`` uniform times ``t_0 + n (t_1 - t_0) / steps``, ``n = 0..steps``."""
    return [t_0 + n * (t_1 - t_0) / steps for n in range(steps + 1)]


def rk_reference(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_0: torch.Tensor,
    scheme: str | Step,
    steps: int,
    *,
    time_grid: Sequence[float] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(t, x)`` from ``x_0`` over the grid with a textbook scheme, in float64.

    Args:
        velocity: ``velocity(t, x) -> v``, ``t`` ``[B]`` and ``x``, ``v`` ``[B, *sample_shape]``, all
            float64 (see :func:`float64_copy` and :func:`evaluated_in`).
        x_0: initial state ``[B, *sample_shape]`` (any float dtype; cast to float64).
        scheme: a key of :data:`TEXTBOOK_SCHEMES` or a step function.
        steps: number of steps.
        time_grid: ``steps + 1`` times (``None``: :func:`uniform_grid` from 0 to 1).

    Returns:
        ``x`` at the last grid time, ``[B, *sample_shape]`` float64 (no autograd graph).
    """
    step = TEXTBOOK_SCHEMES[scheme] if isinstance(scheme, str) else scheme
    grid = uniform_grid(steps) if time_grid is None else [float(t) for t in time_grid]
    if len(grid) != steps + 1:
        raise ValueError(f"{steps} steps need {steps + 1} grid times, got {len(grid)}")
    batch = x_0.shape[0]

    def f(t: float, x: torch.Tensor) -> torch.Tensor:
        v = velocity(torch.full((batch,), t, dtype=torch.float64, device=x.device), x)
        if v.shape != x.shape:
            raise ValueError(f"velocity returned {tuple(v.shape)} for x {tuple(x.shape)}")
        return v.to(torch.float64)

    x = x_0.detach().to(torch.float64)
    with torch.no_grad():
        for n in range(steps):
            x = step(f, grid[n], x, grid[n + 1] - grid[n])
    return x


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` in eval mode (the state a sampler runs it in); ``model`` is untouched."""
    return copy.deepcopy(model).double().eval()


def evaluated_in(model: Callable, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model`` called in ``dtype`` (inputs cast down, output cast to float64).

    For models that cannot run in float64 (torchcfm's UNet casts its input to float32 itself):
    the oracle's step arithmetic stays float64, only the model evaluations are ``dtype``.
    """

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return model(t.to(dtype), x.to(dtype)).to(torch.float64)

    return velocity
