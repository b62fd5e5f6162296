"""Errors a user sees: one line, naming the file, the line and the field that is wrong."""

from __future__ import annotations


class CrossengineError(Exception):
    """Any error that the CLI prints as one line and exits 2 on."""


class ExperimentError(CrossengineError):
    def __init__(self, file: str, line: int | None, field: str, message: str):
        self.file, self.line, self.field, self.message = file, line, field, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {field}: {message}")


class AlignmentError(CrossengineError):
    """Two engines were asked to score different token ids for one sample."""

    def __init__(self, sample_id: str, engine: str, position: int, expected: int, got: int):
        super().__init__(
            f"sample {sample_id}: engine {engine!r} has token {got} at position {position}, "
            f"the reference has {expected} (first difference)"
        )
