"""A sweep's console progress: one short line per trial state change, instead of Tune's status table.

Tune's default reporter reprints a table with every factor as a column at each update, which buries a long sweep's
output. :class:`TrialProgress` is a Tune callback (it runs in the driver) that says, per trial, when it started,
finished (with its fidelity and wall time) or failed (with the last line of the error), each line headed by the live
count of done, running and failed trials against the total. On a terminal it also keeps one status line under them,
rewritten in place: the count and each running trial's epoch as a small bar. In a log (a Ray job, a pipe) that line is
left out, so a thousand-trial sweep writes three lines per trial and no more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

#: the factors that name a trial in a progress line, in this order (others are shown in the final table)
LABEL = ("strategy", "victim", "policy", "pool", "budget", "arch", "optimizer", "lr", "seed")
BAR = 10  # characters of a running trial's epoch bar


def trial_label(config: dict[str, Any]) -> str:
    f = config.get("factors", {})
    return " ".join(f"{k}={f[k]}" for k in LABEL if k in f and f[k] is not None)


def epoch_bar(epoch: int, epochs: int, width: int = BAR) -> str:
    """``[####------] 4/10``: a trial's training progress in a fixed width."""
    filled = min(width, int(round(width * epoch / epochs))) if epochs > 0 else 0
    return f"[{'#' * filled}{'-' * (width - filled)}] {epoch}/{epochs}"


class TrialProgress(Callback):
    """Calls ``emit(line)`` when a trial starts, finishes or errors, and ``status(line)`` (when given: a terminal)
    with the live count and every running trial's epoch whenever a trial reports."""

    def __init__(self, total: int, emit: Callable[[str], None], status: Callable[[str], None] | None = None):
        self.total, self.emit, self.status = total, emit, status
        self.done = self.failed = 0
        self._counted = False
        self.started: dict[str, float] = {}
        self.epochs: dict[str, tuple[int, int]] = {}  # running trial id -> (epoch reached, epochs)

    def counts(self) -> str:
        return f"{self.done + self.failed}/{self.total} done · {len(self.epochs)} running · {self.failed} failed"

    def _line(self, trial: Any, what: str) -> None:
        self.emit(f"[{self.counts()}] {what:8s} {trial_label(trial.config)}")

    def _status(self) -> None:
        if self.status is None:
            return
        bars = "  ".join(f"{trial_id[-5:]} {epoch_bar(*e)}" for trial_id, e in sorted(self.epochs.items()))
        self.status(f"[{self.counts()}] {bars}")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once, before any trial runs: a resumed sweep's trials that finished (or failed) before count as done."""
        if not self._counted:
            self._counted = True
            self.done = sum(1 for t in trials if t.status == "TERMINATED")
            self.failed = sum(1 for t in trials if t.status == "ERROR")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self.epochs[trial.trial_id] = (0, int(trial.config.get("factors", {}).get("epochs") or 0))
        self._line(trial, "started")
        self._status()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self.epochs and isinstance(result.get("epoch"), (int, float)):
            self.epochs[trial.trial_id] = (int(result["epoch"]), self.epochs[trial.trial_id][1])
            self._status()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self.epochs.pop(trial.trial_id, None)
        r = trial.last_result or {}
        secs = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        extra = " (reused from MLflow)" if r.get("reused") else ""
        fid = r.get("fidelity")
        score = f"fidelity {fid:.4f}  " if isinstance(fid, (int, float)) else ""
        self._line(trial, "finished")
        self.emit(f"         {score}{secs:.1f} s{extra}")
        self._status()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self.epochs.pop(trial.trial_id, None)
        self._line(trial, "FAILED")
        err = getattr(trial, "error_msg", None) or ""
        if err:
            self.emit(f"         {err.strip().splitlines()[-1][:200]}")
        self._status()
