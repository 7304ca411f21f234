"""Fixed-step explicit Runge–Kutta solvers for velocity models ``model(t, x)``.

Samples are produced by integrating ``dx/dt = model(t, x)`` from ``t = 0`` (noise)
to ``t = 1`` (data) with :func:`integrate`. The available schemes live in
:data:`SOLVERS` as :class:`ButcherTableau` values; :func:`stage_point` and
:func:`rk_update` are the only places where stage values are combined.
"""

from orwcfm_fast.sampling.solvers import (
    SOLVERS,
    ButcherTableau,
    integrate,
    nfe,
    rk_update,
    stage_point,
)
from orwcfm_fast.sampling.graph import GraphCaptureWarning, GraphSampler

__all__ = [
    "ButcherTableau",
    "SOLVERS",
    "GraphCaptureWarning",
    "GraphSampler",
    "integrate",
    "nfe",
    "stage_point",
    "rk_update",
]
