"""The ``"torch"`` backend: the pure-PyTorch references behind the backend interface.

Every backend module exposes ``is_available()`` and the three ops with the same
signatures; the public functions in :mod:`orwcfm_fast.ops` validate inputs first.
"""

from __future__ import annotations

from orwcfm_fast.ops.reference import conditional_path_reference, ode_step_reference, orw_cfm_w2_loss_reference

__all__ = ["is_available", "orw_cfm_w2_loss", "conditional_path", "ode_step"]


def is_available() -> tuple[bool, str]:
    """Always ``(True, "")``: PyTorch is all it needs."""
    return True, ""


orw_cfm_w2_loss = orw_cfm_w2_loss_reference
conditional_path = conditional_path_reference
ode_step = ode_step_reference
