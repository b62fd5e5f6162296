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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .adapters.base import ATTENTIONS, MODALITIES
from .metrics import METRIC_COLUMNS

SCHEMA_VERSION = 1
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
}
TOKEN_SCHEMA = pa.schema(
    [pa.field(k, t) for k, t in KEY_COLUMNS.items()]
    + [pa.field(k, pa.type_for_alias(t)) for k, t in METRIC_COLUMNS.items()],
    metadata={"crossengine.schema_version": str(SCHEMA_VERSION)},
)
SEGMENTS = ("prompt", "completion")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def write_table(path: Path, table: pa.Table) -> None:
    _atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _codes(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names)))


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


@dataclass
class TokenRows:
    """Rows of one sample for one candidate, before they become Arrow columns."""

    sample_id: str
    positions: np.ndarray
    token_ids: np.ndarray
    modality: np.ndarray
    attention: np.ndarray
    attention_cand: np.ndarray
    segment: np.ndarray
    metrics: dict[str, np.ndarray]


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
    }
    for name, typ in METRIC_COLUMNS.items():
        values = np.concatenate([r.metrics[name] for r in rows]) if rows else np.empty(0)
        if typ == "float32":
            cols[name] = pa.array(values.astype(np.float32), from_pandas=True)  # NaN -> null
        elif typ == "int32":
            cols[name] = pa.array(values.astype(np.int32), mask=values < 0)  # -1 -> null (e.g. rank beyond k)
        else:
            cols[name] = pa.array(values.astype(bool))
    return pa.table(cols, schema=TOKEN_SCHEMA)


class RunDir:
    """A run's folder: parts, summary and run.json, and what a resumed run may skip."""

    def __init__(self, root: Path):
        self.root = root
        self.tokens = root / "tokens"
        self.run_json = root / "run.json"
        self.summary = root / "summary.parquet"

    def part(self, instance: str, batch: int) -> Path:
        return self.tokens / f"part-{instance}-{batch:05d}.parquet"

    def greedy_part(self, instance: str, batch: int) -> Path:
        return self.root / "greedy" / f"part-{instance}-{batch:05d}.parquet"

    def done(self, instance: str, batch: int) -> bool:
        return self.part(instance, batch).exists()

    def read_meta(self) -> dict[str, Any] | None:
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.run_json, meta)


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
