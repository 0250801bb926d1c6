"""A sweep's console progress: one short line per trial state change, instead of Tune's status table.

Tune's default reporter reprints a table with every factor as a column at each update, which buries a long sweep's
output. :class:`TrialProgress` is a Tune callback (it runs in the driver) that says, per trial, when it started,
finished (with its fidelity and wall time) or failed (with the first line of the error), counted against the total.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

#: the factors that name a trial in a progress line, in this order (others are shown in the final table)
LABEL = ("strategy", "victim", "policy", "pool", "budget", "arch", "optimizer", "lr", "seed")


def trial_label(config: dict[str, Any]) -> str:
    f = config.get("factors", {})
    return " ".join(f"{k}={f[k]}" for k in LABEL if k in f and f[k] is not None)


class TrialProgress(Callback):
    """Calls ``emit(line)`` when a trial starts, finishes or errors."""

    def __init__(self, total: int, emit: Callable[[str], None]):
        self.total, self.emit = total, emit
        self.done = self.failed = 0
        self.started: dict[str, float] = {}

    def _line(self, trial: Any, what: str) -> None:
        self.emit(f"[{self.done + self.failed}/{self.total}] {what:8s} {trial_label(trial.config)}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self._line(trial, "started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        r = trial.last_result or {}
        secs = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        extra = " (reused from MLflow)" if r.get("reused") else ""
        fid = r.get("fidelity")
        score = f"fidelity {fid:.4f}  " if isinstance(fid, (int, float)) else ""
        self._line(trial, "finished")
        self.emit(f"         {score}{secs:.1f} s{extra}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._line(trial, "FAILED")
        err = getattr(trial, "error_msg", None) or ""
        if err:
            self.emit(f"         {err.strip().splitlines()[-1][:200]}")
