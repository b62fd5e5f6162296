"""Errors a user sees: one line, naming the file, the line and the field that is wrong."""

from __future__ import annotations


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
