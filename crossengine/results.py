"""results/<run_id>/: the public, typed output of a run, written atomically.

    run.json                      resolved experiment, engine infos, host, timings, errors
    tokens/part-<engine>-<n>.parquet   one row per (candidate, sample, position), batch n
    summary.parquet               one row per (candidate, variant, split)

Every file is written to a temporary name in the same folder and renamed, so a reader (or
a resumed run) never sees half a file. A batch whose part exists is finished work: a
resumed run skips it. The schemas are in crossengine/columns.py (public API, documented in
docs/reference/schemas.md); the comparison's rows become tables in crossengine/compare/tables.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from crossengine.errors import CrossengineError
from crossengine.run_meta import RunMeta

if TYPE_CHECKING:
    import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: files are created like any other tool's, 0666 & ~umask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_table(path: Path, table: pa.Table) -> None:
    _atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_parts(folder: Path, columns: list[str] | None = None, strings: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """A folder of per-batch parts (noise/, routing/) as one frame, in file order (engine, then batch), the
    `strings` columns as plain str; None where the folder holds none."""
    import pandas as pd  # lazy: results is imported in engine environments, which need not have pandas

    files = sorted(Path(folder).glob("*.parquet")) if Path(folder).is_dir() else []
    if not files:
        return None
    df = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
    for c in strings:
        df[c] = df[c].astype(str)
    return df


class RunDir:
    """A run's folder: parts, summary and run.json, and what a resumed run may skip.

    A run holds an exclusive lock on its folder (`flock` on `.lock`, which the kernel frees
    when the process dies, so a killed run never leaves a lock that blocks its resume).
    """

    LOCK = ".lock"
    LOG = "crossengine.log"

    def __init__(self, root: Path):
        self.root = root
        self.tokens = root / "tokens"
        self.run_json = root / "run.json"
        self.summary = root / "summary.parquet"
        self.log = root / self.LOG
        self._lock_fd: int | None = None
        self._created: list[Path] = []
        self.took_over: str | None = None  # the previous holder, when its lock was stale

    def acquire(self) -> None:
        """Create the folder and lock it; one-line errors for an unwritable place or a live holder."""
        missing = []
        p = self.root
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first
        except OSError as exc:
            raise CrossengineError(f"cannot write results to {self.root}: {exc.strerror or exc}") from None
        for _ in range(5):  # a holder that just finished unlinks the file: lock the one on disk
            fd = self._try_lock()
            if fd is not None:
                break
        else:
            raise CrossengineError(f"{self.root}: could not lock {self.LOCK}")
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            self.took_over = previous
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}".encode())
        self._lock_fd = fd

    def _try_lock(self) -> int | None:
        path = self.root / self.LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as exc:
            raise CrossengineError(f"cannot write results to {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CrossengineError(f"{self.root} is in use by a running crossengine ({holder}); wait for it to finish or choose another --run-id") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """Unlock; a folder this run created and left with nothing in it is removed again."""
        if self._lock_fd is None:
            return
        (self.root / self.LOCK).unlink(missing_ok=True)  # while still holding it
        os.close(self._lock_fd)
        self._lock_fd = None
        if self._created and not any(self.root.iterdir()):
            for d in self._created:  # deepest first; stops at the first one something else uses
                try:
                    d.rmdir()
                except OSError:
                    break

    def clear(self) -> None:
        """--overwrite: remove everything but the lock this run holds."""
        for child in self.root.iterdir():
            if child.name == self.LOCK:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def log_exception(self, headline: str, exc: BaseException) -> Path:
        """Append the full traceback (remote ones included) to the run's log; returns its path."""
        return self.append_log(headline, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def append_log(self, headline: str, text: str) -> Path:
        """The run's log: what the one-line errors leave out (tracebacks), under a dated headline."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {headline}\n{text}\n")
        return self.log

    def part(self, instance: str, batch: int) -> Path:
        return self.tokens / f"part-{instance}-{batch:05d}.parquet"

    def routing_part(self, instance: str, batch: int) -> Path:
        """Both sides' expert choices for one candidate and batch (compare/routing.py)."""
        return self.root / "routing" / f"part-{instance}-{batch:05d}.parquet"

    def noise_part(self, instance: str, batch: int) -> Path:
        """An engine's own floor for one batch: its scores under each noise condition (compare/noise.py)."""
        return self.root / "noise" / f"part-{instance}-{batch:05d}.parquet"

    def worst_part(self, instance: str, batch: int) -> Path:
        """The batch's highest-KL positions with both engines' top-5 (for the report's worst tokens)."""
        return self.root / "worst" / f"part-{instance}-{batch:05d}.parquet"

    def inputs_part(self, instance: str, batch: int) -> Path:
        """A candidate's own inputs vs the reference's (engines with `inputs: own`)."""
        return self.root / "inputs" / f"part-{instance}-{batch:05d}.parquet"

    def greedy_part(self, instance: str, batch: int) -> Path:
        return self.root / "greedy" / f"part-{instance}-{batch:05d}.parquet"

    def done(self, instance: str, batch: int) -> bool:
        return self.part(instance, batch).exists()

    def read_meta(self) -> RunMeta | None:
        return RunMeta.read(self.root) if self.run_json.exists() else None

    def write_meta(self, meta: RunMeta) -> None:
        write_json(self.run_json, meta.model_dump(mode="json"))


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
