"""What an engine's libraries print, kept apart from the terminal.

Why: vLLM, transformers and Ray print from C and Python alike; a run shows one line per
problem and keeps the rest in the run's log, so an engine's own output is captured at the
file-descriptor level while it loads and scores.
"""

from __future__ import annotations

import os
import re
import tempfile
import traceback

from crossengine.adapters.base import EngineDead, EngineError, SampleError
from crossengine.errors import pydantic_summary


class OutputCapture:
    """Everything the worker process and its children (vLLM's EngineCore and workers, a native
    factory's subprocesses) write to stdout/stderr goes to one file, so that when an engine fails,
    its real error reaches the user instead of staying in a Ray log file nobody is pointed to."""

    CAUSE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\b.*)$")

    def __init__(self):

        # a temporary file, not the run folder: a run that fails to start leaves no folder behind;
        # on failure the driver copies what matters into the run's crossengine.log
        fd, self.path = tempfile.mkstemp(prefix="crossengine-engine-", suffix=".log")
        for target in (1, 2):
            os.dup2(fd, target)
        os.close(fd)

    def remove(self) -> None:

        try:
            os.unlink(self.path)
        except OSError:
            pass

    def size(self) -> int:

        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def tail(self, max_bytes: int = 64_000, since: int = 0) -> str:
        """The last `max_bytes` of the output, or of what was written after offset `since`."""
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(since, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")

    def root_cause(self, text: str | None = None) -> str | None:
        """The last line of the output that reads like an exception ('RuntimeError: ...'), without a logger's prefix."""
        causes = []
        text = text if text is not None else self.tail()
        for line in text.splitlines():
            line = re.sub(r"^\(\w+ pid=\d+\)\s*", "", line.strip())  # Ray's / vLLM's process prefix
            line = re.sub(r"^(ERROR|WARNING|INFO|CRITICAL)\s+\S+ \S+ \[[^\]]*\]\s*", "", line)  # vLLM's logger prefix
            m = self.CAUSE.match(line)
            if m and not m.group(1).startswith(("EngineDeadError", "EngineError")):
                causes.append(m.group(1))
        own = [c for c in causes if not re.search(r"root cause|stack trace", c)]  # wrappers point elsewhere: prefer what they point at
        cause = (own or causes)[-1] if causes else None
        if cause and "validation error" in cause:  # pydantic's headline: the field and the reason are on the lines after it
            cause = f"{cause.split(':', 1)[0]}: {pydantic_summary(text) or cause.split(':', 1)[-1].strip()}"
        return cause

    def wrap(self, exc: BaseException, since: int = 0) -> BaseException:
        """`exc` with the root cause its process printed while the failing call ran (from offset
        `since`; for a dead engine, anything it printed before too), as an EngineError. A
        SampleError passes as it is."""

        if isinstance(exc, (SampleError, EngineError)):
            return exc
        text = self.tail()
        cause = self.root_cause(self.tail(since=since)) or (self.root_cause(text) if isinstance(exc, EngineDead) else None)

        lines = [x.strip() for x in str(exc).splitlines() if x.strip() and not x.strip().startswith("For further information visit")]
        message = f"{type(exc).__name__}: {pydantic_summary(str(exc)) or (lines[-1] if lines else '')}".rstrip(": ")
        if cause and cause not in message:
            message = f"{message}; its process said: {cause}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return EngineError(message, f"{trace}\n--- the engine's output ({self.path}), last part ---\n{text}", dead=isinstance(exc, EngineDead))
