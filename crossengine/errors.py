"""Errors a user sees: one line, naming the file, the line and the field that is wrong."""

from __future__ import annotations

import re
from typing import Any

# Parts of a pydantic error location that name a type, not a field: the member of a union that was
# tried ("float", "list[float]"), a validator wrapper ("function-after[...]"). Never shown to a user.
_TYPE_TAGS = {"float", "int", "str", "bool", "none", "list", "dict", "tuple", "set", "bytes"}


def field_location(loc: tuple) -> tuple:
    """A pydantic error's location as the user's fields: type tags dropped, list indices kept."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or re.fullmatch(r"[a-z]+(-[a-z]+)+", p))))


def validation_message(err: dict[str, Any]) -> str:
    """One pydantic error as a sentence naming what was wrong, never a documentation URL or an internal type."""
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    kind = err.get("type")
    if kind == "extra_forbidden":
        return f"unknown key {err['loc'][-1]!r}"
    if kind == "missing":
        return "required field is missing"
    if "input" in err and kind not in ("engine_field",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r:.60})"
    return msg


def first_problem(exc) -> tuple[tuple, str]:
    """(field location, message) of a pydantic ValidationError's first problem. Where a union's members each
    failed (a number, or a [low, high] list), the deepest location is the one the user meant."""
    errors = exc.errors()
    first = field_location(tuple(errors[0]["loc"]))
    same_field = [e for e in errors if field_location(tuple(e["loc"]))[: len(first)] == first]
    err = max(same_field, key=lambda e: len(field_location(tuple(e["loc"]))))
    return field_location(tuple(err["loc"])), validation_message(err)


def pydantic_summary(text: str) -> str | None:
    """The meaningful line of a pydantic ValidationError's text, as an engine's output holds it
    ("1 validation error for X / field / Value error, reason [type=...]"): `field: reason`, or the reason
    alone for a check of the whole model; None where the text holds none."""
    m = re.search(r"validation errors? for \S+\n(?:(\S[^\n]*)\n)?[ \t]+(?:Value error, |Assertion failed, )?([^\n]*?)(?: \[type=[^\n]*)?$", text, re.M)
    if not m:
        return None
    return f"{m.group(1)}: {m.group(2)}" if m.group(1) else m.group(2)


class CrossengineError(Exception):
    """Any error that the CLI prints as one line and exits 2 on."""


class ExperimentError(CrossengineError):
    def __init__(self, file: str, line: int | None, field: str, message: str):
        self.file, self.line, self.field, self.message = file, line, field, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {field}: {message}")


class EngineFailure(CrossengineError):
    """An engine's worker died or raised mid-run: one line; the traceback is in the run's log."""


class EngineDied(EngineFailure):
    """An engine's process is gone (a dead actor, vLLM's EngineCore): a candidate's death stops that
    engine alone, the reference's stops the run."""
