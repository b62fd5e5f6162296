"""Ctrl-C and SIGTERM as exceptions the runner can finish a batch on and name in its exit code.

Why a module of its own: the sweep and the single run stop the same way (130 / 143).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before killing a job), handled exactly like Ctrl-C."""


class StopSignals:
    """Ctrl-C and SIGTERM become KeyboardInterrupt / Terminated wherever they land, and the signal is
    remembered, so the exit code says which one came (130 or 143) even where a library in between
    (Ray's ray.get) turns the exception into another. `install()` again after ray.init, which sets
    its own SIGTERM handler."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.received = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handler)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
