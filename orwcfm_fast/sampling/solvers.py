"""Fixed-step explicit Runge–Kutta integration of ``dx/dt = model(t, x)``.

Every scheme is a :class:`ButcherTableau` in :data:`SOLVERS`; :func:`integrate`
is a single generic loop over those tableaus. The arithmetic that combines stage
derivatives lives only in :func:`stage_point` and :func:`rk_update`, so that a
fused kernel can replace both without touching the loop.

Shapes: ``x`` is ``[B, *sample_shape]`` (e.g. ``[B, 2]`` points or
``[B, C, H, W]`` images); the model is called as ``model(t, x)`` with ``t`` a
``[B]`` tensor of ``x``'s dtype and device and must return a tensor of ``x``'s
shape.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from orwcfm_fast.ops import ode_step

__all__ = ["ButcherTableau", "SOLVERS", "integrate", "nfe", "stage_point", "rk_update"]

VelocityModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit Runge–Kutta scheme with ``s`` stages.

    Stage ``i`` (0-based) evaluates the model at time ``t + c[i] * dt`` and state
    ``x + dt * sum_{j<i} a[i][j] * k_j``; the step is ``x + dt * sum_i b[i] * k_i``.

    Attributes:
        name: Key of the scheme in :data:`SOLVERS`.
        a: ``s`` rows of ``s`` floats; strictly lower-triangular (explicit scheme).
        b: ``s`` quadrature weights.
        c: ``s`` stage time fractions, ``c[i] == sum(a[i])``.
        order: Global order of accuracy.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self) -> None:
        s = len(self.b)
        if s == 0:
            raise ValueError(f"tableau {self.name!r} has no stages")
        if len(self.c) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            raise ValueError(
                f"tableau {self.name!r}: a must be {s}x{s} and c must have {s} entries "
                f"to match b"
            )
        if any(self.a[i][j] != 0.0 for i in range(s) for j in range(i, s)):
            raise ValueError(f"tableau {self.name!r} is not explicit (a must be strictly lower-triangular)")

    @property
    def stages(self) -> int:
        """Number of model evaluations per step."""
        return len(self.b)


SOLVERS: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        ButcherTableau(name="euler", a=((0.0,),), b=(1.0,), c=(0.0,), order=1),
        ButcherTableau(
            name="midpoint",
            a=((0.0, 0.0), (0.5, 0.0)),
            b=(0.0, 1.0),
            c=(0.0, 0.5),
            order=2,
        ),
        ButcherTableau(
            name="heun",
            a=((0.0, 0.0), (1.0, 0.0)),
            b=(0.5, 0.5),
            c=(0.0, 1.0),
            order=2,
        ),
        ButcherTableau(
            name="rk4",
            a=(
                (0.0, 0.0, 0.0, 0.0),
                (0.5, 0.0, 0.0, 0.0),
                (0.0, 0.5, 0.0, 0.0),
                (0.0, 0.0, 1.0, 0.0),
            ),
            b=(1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0),
            c=(0.0, 0.5, 0.5, 1.0),
            order=4,
        ),
    )
}


def _combine(x: torch.Tensor, dt: float, coeffs: Sequence[float], ks: Sequence[torch.Tensor],
             backend: str | None) -> torch.Tensor:
    if len(coeffs) > len(ks):
        raise ValueError(f"got {len(coeffs)} coefficients but only {len(ks)} stage values")
    return ode_step(x, list(ks[: len(coeffs)]), list(coeffs), dt, backend=backend)


def stage_point(
    x: torch.Tensor, dt: float, coeffs: Sequence[float], ks: Sequence[torch.Tensor], backend: str | None = None
) -> torch.Tensor:
    """State at which a Runge–Kutta stage evaluates the model.

    Computes ``x + dt * sum_j coeffs[j] * ks[j]``, skipping zero coefficients, in one
    fused pass (:func:`orwcfm_fast.ops.ode_step`).

    Args:
        x: State at the start of the step, ``[B, *sample_shape]``.
        dt: Step size (negative when integrating backwards).
        coeffs: The stage's row of ``a`` restricted to earlier stages, ``len(coeffs) <= len(ks)``.
        ks: Earlier stage derivatives, each ``[B, *sample_shape]``.
        backend: ops backend (``None``: the best available for ``x``'s device).

    Returns:
        ``[B, *sample_shape]``; ``x`` itself (not a copy) when every coefficient is zero.
        Inputs are never modified.
    """
    return _combine(x, dt, coeffs, ks, backend)


def rk_update(
    x: torch.Tensor, dt: float, b: Sequence[float], ks: Sequence[torch.Tensor], backend: str | None = None
) -> torch.Tensor:
    """State at the end of a Runge–Kutta step.

    Computes ``x + dt * sum_i b[i] * ks[i]``, skipping zero weights, in one fused pass
    (:func:`orwcfm_fast.ops.ode_step`).

    Args:
        x: State at the start of the step, ``[B, *sample_shape]``.
        dt: Step size (negative when integrating backwards).
        b: Quadrature weights of the tableau, ``len(b) == len(ks)``.
        ks: All stage derivatives of the step, each ``[B, *sample_shape]``.
        backend: ops backend (``None``: the best available for ``x``'s device).

    Returns:
        ``[B, *sample_shape]``; ``x`` itself when every weight is zero. Inputs are never modified.
    """
    if len(b) != len(ks):
        raise ValueError(f"got {len(b)} weights for {len(ks)} stage values")
    return _combine(x, dt, b, ks, backend)


def _resolve_solver(solver: str | ButcherTableau) -> ButcherTableau:
    if isinstance(solver, ButcherTableau):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]
    known = ", ".join(sorted(SOLVERS))
    hint = ""
    if isinstance(solver, str):
        close = difflib.get_close_matches(solver, list(SOLVERS), n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise ValueError(f"unknown solver {solver!r}{hint}; known solvers: {known}")


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return int(steps)


def nfe(solver: str | ButcherTableau, steps: int) -> int:
    """Number of model evaluations :func:`integrate` makes.

    Args:
        solver: Name in :data:`SOLVERS` or a :class:`ButcherTableau`.
        steps: Number of integration steps (positive int).

    Returns:
        ``stages * steps``.

    Raises:
        ValueError: Unknown solver or non-positive ``steps``.
    """
    return _resolve_solver(solver).stages * _check_steps(steps)


def integrate(
    model: VelocityModel,
    x_0: torch.Tensor,
    *,
    solver: str | ButcherTableau = "euler",
    steps: int = 100,
    t_0: float = 0.0,
    t_1: float = 1.0,
    return_trajectory: bool = False,
    backend: str | None = None,
    time_grid: Sequence[float] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = model(t, x)`` from ``t_0`` to ``t_1`` with a fixed-step RK scheme.

    The grid has ``steps`` uniform steps (or is ``time_grid``); ``t_1 < t_0`` integrates backwards. Grid
    times are computed in float64 on the host and passed as Python floats, so the
    loop makes no host–device syncs. The function neither changes grad mode (wrap
    it in ``torch.no_grad()`` for sampling) nor the model's train/eval mode, and
    never copies the model. A model whose output has another dtype than the state
    (e.g. under bf16 autocast) has it cast to the state's dtype: the state keeps
    ``x_0``'s precision across the steps.

    Args:
        model: Callable ``model(t, x) -> v`` with ``t`` ``[B]`` (``x``'s dtype and
            device) and ``x``, ``v`` ``[B, *sample_shape]``.
        x_0: Initial state ``[B, *sample_shape]`` at time ``t_0``.
        solver: Name in :data:`SOLVERS` (``"euler"``, ``"midpoint"``, ``"heun"``,
            ``"rk4"``) or a :class:`ButcherTableau`.
        steps: Number of steps, a positive int; the model is called
            :func:`nfe` ``(solver, steps)`` times.
        t_0: Start time.
        t_1: End time.
        return_trajectory: Return the states at all grid points instead of only the last.
        backend: ops backend of the stage/update arithmetic (:mod:`orwcfm_fast.ops`;
            ``None``: the best available for ``x_0``'s device).
        time_grid: the ``steps + 1`` times of a non-uniform grid (e.g. a diffusers scheduler's,
            :func:`orwcfm_fast.flows.conventions.scheduler_time_grid`), strictly monotone;
            it replaces ``t_0`` and ``t_1``.

    Returns:
        ``x_1`` of shape ``[B, *sample_shape]``, or with ``return_trajectory`` a tensor
        ``[steps + 1, B, *sample_shape]`` whose entry ``0`` is ``x_0`` and entry ``-1`` is ``x_1``.

    Raises:
        ValueError: Unknown solver, non-positive ``steps``, ``x_0`` without a batch
            dimension, non-finite times, or a model output whose shape differs from its input.
        TypeError: ``model`` is not callable or ``x_0`` is not a floating-point tensor.
    """
    tableau = _resolve_solver(solver)
    steps = _check_steps(steps)
    if not callable(model):
        raise TypeError(f"model must be callable as model(t, x), got {type(model).__name__}")
    if not isinstance(x_0, torch.Tensor):
        raise TypeError(f"x_0 must be a torch.Tensor, got {type(x_0).__name__}")
    if x_0.ndim < 1:
        raise ValueError("x_0 must have a batch dimension: expected shape [B, *sample_shape], got a 0-d tensor")
    if not x_0.is_floating_point():
        raise TypeError(f"x_0 must be a floating-point tensor, got dtype {x_0.dtype}")
    t_0, t_1 = float(t_0), float(t_1)
    if not (math.isfinite(t_0) and math.isfinite(t_1)):
        raise ValueError(f"t_0 and t_1 must be finite, got t_0={t_0}, t_1={t_1}")

    if time_grid is not None:
        grid = _check_time_grid(time_grid, steps)
    else:  # host-side float64 grid; endpoints are exact
        span = t_1 - t_0
        grid = [t_0 + span * (i / steps) for i in range(steps)] + [t_1]

    batch = x_0.shape[0]
    a, b, c = tableau.a, tableau.b, tableau.c
    checked = False
    x = x_0
    trajectory = [x_0] if return_trajectory else None
    for n in range(steps):
        t, dt = grid[n], grid[n + 1] - grid[n]
        ks: list[torch.Tensor] = []
        for i in range(tableau.stages):
            x_i = stage_point(x, dt, a[i][:i], ks, backend)
            t_i = x.new_full((batch,), t + c[i] * dt)
            k = model(t_i, x_i)
            if isinstance(k, torch.Tensor) and k.dtype != x.dtype:
                k = k.to(x.dtype)  # e.g. a bf16-autocast model: the state stays in x_0's precision
            if not checked:
                if not isinstance(k, torch.Tensor) or k.shape != x.shape:
                    got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
                    raise ValueError(
                        f"model returned shape {got} for input shape {tuple(x.shape)}; "
                        f"the velocity must have the same shape as x"
                    )
                checked = True
            ks.append(k)
        x = rk_update(x, dt, b, ks, backend)
        if trajectory is not None:
            trajectory.append(x)
    if trajectory is not None:
        return torch.stack(trajectory)
    return x


def _check_time_grid(time_grid: Sequence[float], steps: int) -> list[float]:
    grid = [float(t) for t in time_grid]
    if len(grid) != steps + 1:
        raise ValueError(f"time_grid has {len(grid)} times, but {steps} steps need {steps + 1}")
    if not all(math.isfinite(t) for t in grid):
        raise ValueError(f"time_grid must be finite, got {grid}")
    diffs = [b - a for a, b in zip(grid, grid[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"time_grid must be strictly increasing or decreasing, got {grid}")
    return grid
