"""User-facing errors.

Anything a user can cause (a bad name, a missing file, an impossible budget) raises a :class:`DmeError` whose message
says what was wrong and how to fix it. The CLI prints these as one line and exits non-zero, never with a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class DmeError(Exception):
    """An error the user can fix; its message is shown as-is."""


class UnknownNameError(DmeError, KeyError):
    """A name that is not in a registry. The message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class BudgetExhausted(DmeError):
    """The oracle refused a query because it would exceed the query budget."""

    def __init__(self, requested: int, remaining: int, budget: int):
        self.requested, self.remaining, self.budget = requested, remaining, budget
        super().__init__(
            f"query budget exhausted: {requested} queries requested but only {remaining} of {budget} remain"
        )


class DataNotFound(DmeError):
    """A data file or folder is missing; the message says where to put it or how to download it."""


class BundleError(DmeError):
    """A victim bundle that is missing, unreadable or corrupt."""


def explain_validation_error(e: Exception, what: str) -> DmeError:
    """Turn a pydantic ``ValidationError`` into one message, one ``;``-separated clause per problem: field, bad value,
    what is allowed (one line, so the CLI's ``error:`` line stays one line)."""
    lines = []
    for err in getattr(e, "errors", lambda: [])():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if not loc:  # a whole-model check: its message names the fields itself
            lines.append(f"{what}: {msg}")
            continue
        value = repr(err.get("input"))
        value = value if len(value) <= 200 else value[:200] + "…"
        lines.append(f"{what} field {loc!r} = {value}: {msg}")
    return DmeError("; ".join(lines) or f"invalid {what}: {e}")
