"""results/<run_id>/: the public, typed output of a run, written atomically.

    run.json                      resolved experiment, engine infos, host, timings, errors
    tokens/part-<engine>-<n>.parquet   one row per (candidate, sample, position), batch n
    summary.parquet               one row per (candidate, variant, split)

Every file is written to a temporary name in the same folder and renamed, so a reader (or
a resumed run) never sees half a file. A batch whose part exists is finished work: a
resumed run skips it. The schema below is the public API; README.md documents it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossengine.adapters.base import ATTENTIONS, MODALITIES
from crossengine.compare.tokens import TokenRows
from crossengine.run_meta import RunMeta
from crossengine.compare.metrics import METRIC_COLUMNS
from crossengine.compare.noise import NOISE_COLUMNS
from crossengine.compare.routing import ROUTING_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 3  # 2: + nonfinite; 3: + noise_ref, noise_cand, noise_kl_ref, noise_kl_cand, above_noise, routing_flips
_DICT = pa.dictionary(pa.int32(), pa.string())
KEY_COLUMNS: dict[str, pa.DataType] = {
    "run_id": _DICT,
    "sample_id": _DICT,
    "position": pa.int32(),
    "token_id": pa.int32(),
    "token_text": _DICT,
    "modality": _DICT,
    "attention": _DICT,
    "attention_cand": _DICT,
    "segment": _DICT,
    "ref_engine": _DICT,
    "cand_engine": _DICT,
    "variant": _DICT,
    "nonfinite": _DICT,
}
TOKEN_SCHEMA = pa.schema(
    [pa.field(k, t) for k, t in KEY_COLUMNS.items()]
    + [pa.field(k, pa.type_for_alias(t)) for k, t in METRIC_COLUMNS.items()]
    + [pa.field(k, pa.type_for_alias(t)) for k, t in NOISE_COLUMNS.items()]
    + [pa.field(k, pa.type_for_alias(t)) for k, t in ROUTING_COLUMNS.items()],
    metadata={"crossengine.schema_version": str(SCHEMA_VERSION)},
)
WORST_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("position", pa.int32()), ("cand_engine", pa.string()), ("variant", pa.string()), ("kl", pa.float32()),
    ("top5_ref_ids", pa.list_(pa.int32())), ("top5_ref_lp", pa.list_(pa.float32())),
    ("top5_cand_ids", pa.list_(pa.int32())), ("top5_cand_lp", pa.list_(pa.float32())),
])
# inputs/: one row per (candidate with `inputs: own`, sample, input); see crossengine/inputs.py
INPUTS_SCHEMA = pa.schema([
    ("cand_engine", pa.string()), ("variant", pa.string()), ("sample_id", pa.string()), ("input", pa.string()), ("status", pa.string()),
    ("first_difference", pa.int32()), ("ref_token", pa.string()), ("cand_token", pa.string()), ("ref_context", pa.string()),
    ("cand_context", pa.string()), ("ref_shape", pa.list_(pa.int64())), ("cand_shape", pa.list_(pa.int64())), ("ref_dtype", pa.string()),
    ("cand_dtype", pa.string()), ("max_abs_diff", pa.float64()), ("mean_abs_diff", pa.float64()), ("detail", pa.string()), ("scored", pa.string()),
    ("own_prompt_tokens", pa.int32()), ("own_prompt_abs_lp_diff_mean", pa.float64()), ("own_prompt_abs_lp_diff_max", pa.float64()),
    ("own_prompt_lp_sum_diff", pa.float64()),
])
# noise/: one row per (engine, sample, condition, position): an engine's own floor (crossengine/compare/noise.py)
NOISE_SCHEMA = pa.schema([
    ("engine", _DICT), ("sample_id", _DICT), ("condition", _DICT), ("position", pa.int32()), ("token_id", pa.int32()), ("token_text", _DICT),
    ("lp_base", pa.float32()), ("lp", pa.float32()), ("abs_diff", pa.float32()), ("kl", pa.float32()),
])
SEGMENTS = ("prompt", "completion")
NONFINITE = ("ref", "cand", "both")  # which side's numbers were NaN/inf at a position; null: neither
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


def _codes(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names)))


def _nullable_codes(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    """Codes 1..len(names) name a value; 0 is null."""
    codes = codes.astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(codes - 1, mask=codes == 0), pa.array(list(names)))


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def token_table(rows: list[TokenRows], run_id: str, ref: str, cand: str, variant: str, vocab_text: pa.Array) -> pa.Table:
    """One Arrow table with TOKEN_SCHEMA; strings are dictionary-encoded, never per-row objects."""
    n = sum(len(r.positions) for r in rows)
    cat = lambda f: np.concatenate([getattr(r, f) for r in rows]) if rows else np.empty(0)  # noqa: E731
    token_ids = cat("token_ids").astype(np.int32)
    sample_names = [r.sample_id for r in rows]
    sample_codes = np.repeat(np.arange(len(rows), dtype=np.int32), [len(r.positions) for r in rows])
    cols: dict[str, pa.Array] = {
        "run_id": _constant(run_id, n),
        "sample_id": pa.DictionaryArray.from_arrays(pa.array(sample_codes), pa.array(sample_names, pa.string())),
        "position": pa.array(cat("positions").astype(np.int32)),
        "token_id": pa.array(token_ids),
        "token_text": pa.DictionaryArray.from_arrays(pa.array(np.clip(token_ids, 0, len(vocab_text) - 1)), vocab_text),
        "modality": _codes(cat("modality"), MODALITIES),
        "attention": _codes(cat("attention"), ATTENTIONS),
        "attention_cand": _codes(cat("attention_cand"), ATTENTIONS),
        "segment": _codes(cat("segment"), SEGMENTS),
        "ref_engine": _constant(ref, n),
        "cand_engine": _constant(cand, n),
        "variant": _constant(variant, n),
        "nonfinite": _nullable_codes(cat("nonfinite"), NONFINITE),
    }
    for name, typ in METRIC_COLUMNS.items():
        values = np.concatenate([r.metrics[name] for r in rows]) if rows else np.empty(0)
        if typ == "float32":
            cols[name] = pa.array(values.astype(np.float32), from_pandas=True)  # NaN -> null
        elif typ == "int32":
            cols[name] = pa.array(values.astype(np.int32), mask=values < 0)  # -1 -> null (e.g. rank beyond k)
        else:  # top1_match/top1_tie: null where a side has no top-1 (a dump without top-k)
            unknown = np.concatenate([(r.metrics["top1_ref"] < 0) | (r.metrics["top1_cand"] < 0) for r in rows]) if rows else np.empty(0, bool)
            cols[name] = pa.array(values.astype(bool), mask=unknown if unknown.any() else None)
    for name, typ in NOISE_COLUMNS.items():  # NaN: that side has no floor (no `noise:`), null in the table
        values = np.concatenate([r.metrics[name] for r in rows]).astype(np.float32) if rows else np.empty(0, np.float32)
        cols[name] = pa.array(values, from_pandas=True) if typ == "float32" else pa.array(values == 1, mask=np.isnan(values))
    for name in ROUTING_COLUMNS:  # -1: no routing on a side, null
        values = np.concatenate([r.metrics[name] for r in rows]).astype(np.int32) if rows else np.empty(0, np.int32)
        cols[name] = pa.array(values, mask=values < 0)
    return pa.table(cols, schema=TOKEN_SCHEMA)


def read_parts(folder: Path, columns: list[str] | None = None, strings: tuple[str, ...] = ()) -> "pd.DataFrame | None":
    """A folder of per-batch parts (noise/, routing/) as one frame, in file order (engine, then batch), the
    `strings` columns as plain str; None where the folder holds none."""
    import pandas as pd

    files = sorted(Path(folder).glob("*.parquet")) if Path(folder).is_dir() else []
    if not files:
        return None
    df = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
    for c in strings:
        df[c] = df[c].astype(str)
    return df


def noise_table(rows: list, engine: str, vocab_text: pa.Array) -> pa.Table:
    """noise.NoiseRows of one engine and batch as NOISE_SCHEMA rows: every condition against base, at
    every position base scored (kl null where the engine gives no full logits)."""
    cols: dict[str, list] = {k: [] for k in ("sample", "condition", "position", "ids", "lp_base", "lp", "kl")}
    names: list[str] = []
    conditions: list[str] = []
    for n, r in enumerate(rows):
        names.append(r.sample_id)
        scored = np.flatnonzero(~np.isnan(r.logprobs[0]))
        for c, cond in enumerate(r.conditions[1:], start=1):
            if cond not in conditions:
                conditions.append(cond)
            cols["sample"].append(np.full(len(scored), n, np.int32))
            cols["condition"].append(np.full(len(scored), conditions.index(cond), np.int32))
            cols["position"].append(scored.astype(np.int32))
            cols["ids"].append(r.token_ids[scored].astype(np.int32))
            cols["lp_base"].append(r.logprobs[0][scored])
            cols["lp"].append(r.logprobs[c][scored])
            cols["kl"].append(r.kl[c - 1][scored] if r.kl is not None else np.full(len(scored), np.nan, np.float32))
    cat = {k: np.concatenate(v) if v else np.empty(0, np.float32 if k in ("lp_base", "lp", "kl") else np.int32) for k, v in cols.items()}
    ids = cat["ids"]
    n = len(cat["position"])
    return pa.table({
        "engine": _constant(engine, n),
        "sample_id": pa.DictionaryArray.from_arrays(pa.array(cat["sample"]), pa.array(names, pa.string())),
        "condition": pa.DictionaryArray.from_arrays(pa.array(cat["condition"]), pa.array(conditions, pa.string())),
        "position": pa.array(cat["position"]),
        "token_id": pa.array(ids),
        "token_text": pa.DictionaryArray.from_arrays(pa.array(np.clip(ids, 0, len(vocab_text) - 1)), vocab_text),
        "lp_base": pa.array(cat["lp_base"].astype(np.float32)),
        "lp": pa.array(cat["lp"].astype(np.float32)),
        "abs_diff": pa.array(np.abs(cat["lp"] - cat["lp_base"]).astype(np.float32)),
        "kl": pa.array(cat["kl"].astype(np.float32), from_pandas=True),
    }, schema=NOISE_SCHEMA)


# routing/: one row per (candidate, sample, input position, MoE layer) where both sides report routing (compare/routing.py)
ROUTING_SCHEMA = pa.schema([
    ("cand_engine", _DICT), ("variant", _DICT), ("sample_id", _DICT), ("position", pa.int32()), ("token_id", pa.int32()), ("layer", pa.int16()),
    ("ref_experts", pa.list_(pa.int16())), ("cand_experts", pa.list_(pa.int16())), ("flip", pa.bool_()),
    ("margin_ref", pa.float32()), ("margin_cand", pa.float32()),
])


def routing_table(rows: list, cand_engine: str, variant: str) -> pa.Table:
    """routing.RoutingRows of one candidate and batch as ROUTING_SCHEMA rows."""
    sids, pos, tok, layer, ref, cand, flip, mref, mcand = [], [], [], [], [], [], [], [], []
    for n, r in enumerate(rows):
        t, L, k = r.ref.shape
        sids.append(np.full(t * L, n, np.int32))
        pos.append(np.repeat(np.arange(t, dtype=np.int32), L))
        tok.append(np.repeat(r.token_ids[:t].astype(np.int32), L))
        layer.append(np.tile(np.arange(L, dtype=np.int16), t))
        ref.append(r.ref.reshape(t * L, k))
        cand.append(r.cand.reshape(t * L, k))
        flip.append(r.flip.reshape(-1))
        mref.append(r.margin_ref.reshape(-1))
        mcand.append(r.margin_cand.reshape(-1))
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)  # noqa: E731
    n = sum(len(x) for x in sids)
    lists = lambda parts: pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(parts).reshape(-1).astype(np.int16)), parts[0].shape[1]).cast(pa.list_(pa.int16())) if parts else pa.array([], pa.list_(pa.int16()))  # noqa: E731
    return pa.table({
        "cand_engine": _constant(cand_engine, n), "variant": _constant(variant, n),
        "sample_id": pa.DictionaryArray.from_arrays(pa.array(cat(sids, np.int32)), pa.array([r.sample_id for r in rows], pa.string())),
        "position": pa.array(cat(pos, np.int32)), "token_id": pa.array(cat(tok, np.int32)), "layer": pa.array(cat(layer, np.int16)),
        "ref_experts": lists(ref), "cand_experts": lists(cand), "flip": pa.array(cat(flip, bool)),
        "margin_ref": pa.array(cat(mref, np.float32)), "margin_cand": pa.array(cat(mcand, np.float32)),
    }, schema=ROUTING_SCHEMA)


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
        from crossengine.errors import CrossengineError

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
        import fcntl

        from crossengine.errors import CrossengineError

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
        import shutil

        for child in self.root.iterdir():
            if child.name == self.LOCK:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def log_exception(self, headline: str, exc: BaseException) -> Path:
        """Append the full traceback (remote ones included) to the run's log; returns its path."""
        import traceback

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
    import platform

    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
