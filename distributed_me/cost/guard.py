"""Guard rails: a step projected over the limit stops before it starts, saying what it would cost and what to do.

The limit is on projected **wall time** on the resources the work will run on (this machine, or the cluster a sweep
joins: a GPU cluster's projection is its own, so the limit never stops a sweep that cluster makes reasonable). Its
default, :data:`DEFAULT_LIMIT_HOURS`, lets an overnight job run and stops a week-long one started by accident;
``DME_COST_LIMIT_HOURS`` or ``--max-hours`` sets it, and ``--no-cost-limit`` goes on anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import DmeError
from .work import human

DEFAULT_LIMIT_HOURS = 12.0
LIMIT_ENV = "DME_COST_LIMIT_HOURS"
GO_ANYWAY = "--no-cost-limit"
#: a step projected over this many seconds is announced (projection printed) before it starts
ANNOUNCE_S = 60.0


class CostLimitError(DmeError):
    """A step projected over the limit: refused before any work."""


def limit_seconds(max_hours: float | None = None) -> float:
    """The limit in seconds: ``max_hours`` if given, else ``$DME_COST_LIMIT_HOURS``, else the default."""
    if max_hours is None:
        env = os.environ.get(LIMIT_ENV)
        try:
            max_hours = float(env) if env else DEFAULT_LIMIT_HOURS
        except ValueError:
            raise DmeError(f"{LIMIT_ENV}={env!r} is not a number of hours") from None
    if max_hours <= 0:
        raise DmeError(f"the cost limit must be a positive number of hours, got {max_hours}")
    return max_hours * 3600.0


def check_limit(what: str, projected_s: float, where: str, limit_s: float,
                alternative: Callable[[], str | None] | None) -> None:
    """Raise :class:`CostLimitError` if ``projected_s`` exceeds ``limit_s``, with the projection, the smaller
    alternative and the flag that goes on anyway. ``alternative`` is called only then: pricing it is work (another
    plan) that work within the limit must not pay."""
    if projected_s <= limit_s:
        return
    text = alternative() if alternative is not None else None
    alt = f" Smaller: {text}." if text else ""
    raise CostLimitError(
        f"{what} is projected to take {human(projected_s)} on {where}, over the limit of {human(limit_s)}; nothing "
        f"was started.{alt} To run it anyway: add {GO_ANYWAY} (or raise the limit: --max-hours H or {LIMIT_ENV}=H)")
