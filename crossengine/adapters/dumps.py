"""A dump of per-token log-probs read record by record, each record checked field by field.

Why apart from the engine: the driver indexes a dump (ids and byte offsets, never the records) to
make the experiment's samples, and the engine reads one batch's records in its worker; both read
through DumpFile, so a bad record is the same one line wherever it is found (FILE:LINE and field).
The layouts (generic, prime-rl, slime) are described in crossengine/adapters/logprobs.py. A `.pt`
file (slime's `--save-debug-rollout-data`) is read with `torch.load(weights_only=True)`: tensors,
numeric numpy arrays and plain containers only; a file that needs any other class unpickled is
refused in one line, and nothing in it runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core.multiarray import _reconstruct  # how a pickled array rebuilds itself: allowed to torch.load(weights_only=True)

POSITIVE_TOLERANCE = 1e-6  # a log-prob above this is not a log-prob (float rounding gives at most ~1e-7 above 0)


@dataclass(frozen=True)
class Layout:
    """Where a layout keeps each field, and whether its arrays are aligned with token_ids (else they start at prompt_len)."""

    fields: dict[str, str]
    aligned: bool
    prompt_from: str = "prompt_len"  # the field giving where scoring starts: prompt_len itself, or response_length (counted from the end)
    batch_of_one: bool = False  # every value is wrapped in a batch of one ([x]), arrays padded to the batch: unwrapped, cut at `length`
    length: str | None = None  # the field giving each record's true length (padding after it is dropped)


LAYOUTS: dict[str, Layout] = {
    "generic": Layout({k: k for k in ("id", "token_ids", "prompt_len", "logprobs", "mask", "top_ids", "top_logprobs", "messages", "images", "routed_experts")}, aligned=False),
    "prime-rl": Layout({"token_ids": "token_ids", "logprobs": "inference_logprobs", "mask": "loss_mask"}, aligned=True),
    # NeMo-RL's per-step training data, nemo_rl/algorithms/grpo.py (`train_data_step{N}.jsonl`), one line per sample as
    # nemo_rl/utils/logger.py Logger.log_batched_dict_as_jsonl writes it: each value a batch of one, arrays padded, `idx` the line
    "nemo-rl": Layout(
        {"id": "idx", "token_ids": "token_ids", "logprobs": "generation_logprobs", "mask": "token_loss_mask"},
        aligned=True,
        batch_of_one=True,
        length="input_lengths",
    ),
    # slime/miles Sample.to_dict() (slime/utils/types.py), saved by RolloutManager._save_debug_rollout_data (slime/ray/rollout.py)
    "slime": Layout(
        {"id": "index", "token_ids": "tokens", "response_length": "response_length", "logprobs": "rollout_log_probs", "mask": "loss_mask", "routed_experts": "rollout_routed_experts"},
        aligned=False,
        prompt_from="response_length",
    ),
}


# The keys that tell a layout's records apart (for the hint when a dump is read with the wrong layout).
SIGNATURES: dict[str, set[str]] = {
    "generic": {"prompt_len", "logprobs"},
    "prime-rl": {"inference_logprobs", "loss_mask"},
    "nemo-rl": {"generation_logprobs", "token_loss_mask", "input_lengths"},
    "slime": {"tokens", "response_length", "rollout_log_probs"},
}


class RecordError(ValueError):
    """A record that cannot be scored: `where` is FILE:LINE (JSONL) or FILE:row N (Parquet)."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: {field}: {problem}")


@dataclass
class Record:
    id: str
    token_ids: np.ndarray  # int64 [T]
    prompt_len: int
    scored: np.ndarray  # bool [T]: positions the dump holds a log-prob for
    logprobs: np.ndarray  # float32 [T], NaN where not scored
    top_ids: np.ndarray | None  # int64 [T, k], -1 where not scored
    top_logprobs: np.ndarray | None
    where: str
    messages: Any = None
    images: Any = None
    routing: np.ndarray | None = None  # int16 [T, L, k]: the rollout engine's experts per input position; -1 where not recorded (the last token)


class DumpFile:
    """One dump, read record by record: an index of (id, pointer) in one pass, then records by pointer."""

    def __init__(self, path: str | Path, layout: str = "generic", fields: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout = LAYOUTS[layout]
        self.layout_name = layout
        self.renamed = dict(fields or {})  # what the user's `fields:` renamed (the layout's own names are not theirs)
        self.names = {**self.layout.fields, **self.renamed}
        self.parquet = self.path.suffix == ".parquet"
        self.torch = self.path.suffix in (".pt", ".pth")
        self._loaded: list | None = None  # a .pt file's records: one torch.load, held while the dump is read
        self._group: tuple[int, Any] | None = None  # (row group, its pyarrow Table)
        self.vocab_size: int | None = None  # set by whoever knows the model: ids at or above it are refused, naming the record

    # ---------------------------------------------------------------- reading

    def _raw(self, columns: list[str] | None = None) -> Iterator[tuple[tuple[int, int], str, dict | Exception]]:
        """(pointer, where, object or the reason it does not parse), in file order; a pointer is
        (byte offset, line) in JSONL, (row, row) in Parquet (of which only `columns`, where given, are read)."""
        if self.torch:
            for i, obj in enumerate(self._torch_records()):
                yield (i, i), f"{self.path}:samples[{i}]", obj
            return
        if self.parquet:
            n = 0
            for batch in _parquet_file(self.path).iter_batches(batch_size=256, columns=columns):
                for obj in batch.to_pylist():
                    yield (n, n + 1), f"{self.path}:row {n + 1}", obj
                    n += 1
            return
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if line.strip():
                    yield (start, line_no), f"{self.path}:{line_no}", _parse(line)

    def index(self) -> Iterator[tuple[str, tuple[int, int], str]]:
        """(record id, pointer, where) of every record; a record without a readable id gets `line<N>`. From Parquet,
        only the columns an id is made of are read (the token and log-prob lists of millions of tokens are not)."""
        columns = None
        if self.parquet:
            present = set(_parquet_file(self.path).schema_arrow.names)
            wanted = [self.names["id"]] if "id" in self.names else ["export_step", "step", "rank", "export_sequence_idx"]
            columns = [c for c in wanted if c in present] or None
        for pointer, where, obj in self._raw(columns):
            try:
                rid = self._id(obj, where) if isinstance(obj, dict) else None
            except RecordError:
                rid = None
            yield (rid or f"line{pointer[1]}"), pointer, where

    def read(self, pointer: tuple[int, int]) -> Record:
        """The record at `pointer`, checked (RecordError, naming file:line and field)."""
        where, obj = self._at(pointer)
        if isinstance(obj, Exception):
            raise RecordError(where, "<record>", f"not a JSON object ({obj})")
        return self.record(obj, where)

    def _torch_records(self) -> list:
        """The `samples` of a torch.save'd dump (slime's layout), each a plain dict with lists (arrays and tensors turned into lists)."""
        if self._loaded is None:
            self._loaded = [_plain_record(s) for s in _torch_samples(self.path)]
        return self._loaded

    def _at(self, pointer: tuple[int, int]) -> tuple[str, dict | Exception]:
        at, line_no = pointer
        if self.torch:
            return f"{self.path}:samples[{at}]", self._torch_records()[at]
        if self.parquet:
            f = _parquet_file(self.path)
            start = 0
            for g in range(f.num_row_groups):
                rows = f.metadata.row_group(g).num_rows
                if at < start + rows:
                    if self._group is None or self._group[0] != g:  # one row group held at a time, as Arrow (Python objects per record read)
                        self._group = (g, f.read_row_group(g))
                    return f"{self.path}:row {line_no}", self._group[1].slice(at - start, 1).to_pylist()[0]
                start += rows
            raise IndexError(at)
        with open(self.path, "rb") as f:
            f.seek(at)
            line = f.readline()
        return f"{self.path}:{line_no}", _parse(line)

    # ---------------------------------------------------------------- checking

    def _get(self, obj: dict, field: str, where: str, required: bool = True):
        name = self.names.get(field)
        if name is None or name not in obj or obj[name] is None:
            if required:
                if field in self.renamed:
                    why = f" (renamed from {field!r} by fields:)"
                elif name and name != field:
                    why = f" (the {self.layout_name} layout's name for {field!r})"
                else:
                    why = ""
                raise RecordError(where, name or field, "missing" + why + self._other_layout(obj))
            return None
        return obj[name]

    def _other_layout(self, obj: dict) -> str:
        """A hint where the record's keys are another layout's: `layout: NAME` is the fix, not a rename."""
        for name, keys in SIGNATURES.items():
            if name != self.layout_name and keys <= set(obj) and not SIGNATURES[self.layout_name] <= set(obj):
                return f"; its keys are those of the {name} layout: give the engine layout: {name}"
        return ""

    def _id(self, obj: dict, where: str) -> str:
        if "id" in self.names:
            return str(self._get(obj, "id", where))
        parts = [obj.get("export_step", obj.get("step")), obj.get("rank"), obj.get("export_sequence_idx")]  # prime-rl's identity of a sequence
        if any(p is None for p in parts):
            raise RecordError(where, "export_step/rank/export_sequence_idx", "missing: a prime-rl record names its sequence by these")
        return f"step{parts[0]}-rank{parts[1]}-seq{parts[2]}"

    def record(self, obj: dict, where: str) -> Record:
        obj = self._unbatched(obj, where) if self.layout.batch_of_one else obj
        ids = self._get(obj, "token_ids", where)
        name = self.names["token_ids"]
        if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise RecordError(where, name, "must be a list of at least 2 token ids (ints >= 0)")
        n = len(ids)
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            pos = next(i for i, t in enumerate(ids) if t >= self.vocab_size)
            raise RecordError(where, f"{name}[{pos}]", f"token id {ids[pos]} is outside the vocabulary of the reference's model ({self.vocab_size} ids)")
        values = self._get(obj, "logprobs", where)
        lp_name = self.names["logprobs"]
        mask = self._get(obj, "mask", where, required=False)
        if self.layout.aligned:
            if not isinstance(mask, list) or len(mask) != n:
                raise RecordError(where, self.names.get("mask", "mask"), f"needs one bool per token ({n})")
            true = [i for i, m in enumerate(mask) if m]
            if not true:
                raise RecordError(where, self.names["mask"], "scores no token")
            prompt_len, span = true[0], (true[0], n)
            mask = list(mask[true[0] :])
            values = values[true[0] :] if isinstance(values, list) and len(values) == n else values
        elif self.layout.prompt_from == "response_length":
            size = self._get(obj, "response_length", where)
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size < n:
                raise RecordError(where, self.names["response_length"], f"{size!r} is out of range: 1 .. {n - 1} response tokens for {n} tokens")
            prompt_len, span = n - size, (n - size, n)
        else:
            prompt_len = self._get(obj, "prompt_len", where)
            if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 1 <= prompt_len < n:
                raise RecordError(where, self.names["prompt_len"], f"{prompt_len!r} is out of range: the first scored position is 1 .. {n - 1} for {n} tokens")
            span = (prompt_len, n)
        count = span[1] - span[0]
        if not isinstance(values, list) or len(values) != count:
            got = len(values) if isinstance(values, list) else type(values).__name__
            want = f"one per token ({n})" if self.layout.aligned else f"one per scored token: {n} tokens − prompt_len {prompt_len} = {count}"
            raise RecordError(where, lp_name, f"has {got} values, {want}")
        if mask is not None and (not isinstance(mask, list) or len(mask) != count):
            raise RecordError(where, self.names["mask"], f"needs one bool per scored token ({count})")
        keep = np.ones(count, bool) if mask is None else np.asarray([bool(m) for m in mask])
        lp = np.full(n, np.nan, np.float32)
        scored = np.zeros(n, bool)
        for j, v in enumerate(values):
            if not keep[j]:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RecordError(where, f"{lp_name}[{j}]", f"{v!r} is not a finite log-prob (position {span[0] + j})")
            if v > POSITIVE_TOLERANCE:
                raise RecordError(where, f"{lp_name}[{j}]", f"{v!r} is positive: not a log-prob (position {span[0] + j})")
            lp[span[0] + j] = v
            scored[span[0] + j] = True
        top_ids, top_lp = self._top(obj, where, span, keep, n)
        return Record(
            self._id(obj, where),
            np.asarray(ids, np.int64),
            prompt_len,
            scored,
            lp,
            top_ids,
            top_lp,
            where,
            self._get(obj, "messages", where, required=False),
            self._get(obj, "images", where, required=False),
            self._routing(obj, where, n),
        )

    def _unbatched(self, obj: dict, where: str) -> dict:
        """A record written as a batch of one (NeMo-RL): each [x] as x, and its padded arrays cut at its `length` field."""
        out = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in obj.items()}
        size = out.get(self.layout.length)
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise RecordError(where, self.layout.length or "length", f"{size!r} is not a token count (an int >= 2)")
        for field in ("token_ids", "logprobs", "mask"):
            name = self.names.get(field)
            if isinstance(out.get(name), list):
                if len(out[name]) < size:
                    raise RecordError(where, name, f"has {len(out[name])} values, fewer than {self.layout.length} {size}")
                out[name] = out[name][:size]
        return out

    def _routing(self, obj: dict, where: str, n: int) -> np.ndarray | None:
        """[T, L, k] expert ids per input position, from T or T − 1 rows (slime records none for the last token, which is
        never fed to the model): a missing last row is -1, unknown."""
        rows = self._get(obj, "routed_experts", where, required=False) if "routed_experts" in self.names else None
        if rows is None:
            return None
        name = self.names["routed_experts"]
        try:
            arr = np.asarray(rows, dtype=np.int64)
        except (ValueError, TypeError):
            raise RecordError(where, name, "must be a [tokens][layers][k] array of expert ids") from None
        if arr.ndim != 3 or arr.shape[0] not in (n - 1, n) or arr.shape[1] < 1 or arr.shape[2] < 1:
            raise RecordError(where, name, f"has shape {list(arr.shape)}; needs [{n} or {n - 1} tokens, layers, k]")
        if (arr < -1).any() or arr.max() > np.iinfo(np.int16).max:
            raise RecordError(where, name, "holds expert ids outside -1 .. 32767")
        if arr.shape[0] == n - 1:
            arr = np.concatenate([arr, np.full((1, *arr.shape[1:]), -1, np.int64)])
        return arr.astype(np.int16)

    def _top(self, obj: dict, where: str, span: tuple[int, int], keep: np.ndarray, n: int):
        ids = self._get(obj, "top_ids", where, required=False) if "top_ids" in self.names else None
        lps = self._get(obj, "top_logprobs", where, required=False) if "top_logprobs" in self.names else None
        if ids is None and lps is None:
            return None, None
        count = span[1] - span[0]
        for name, v in (("top_ids", ids), ("top_logprobs", lps)):
            if not isinstance(v, list) or len(v) != count:
                raise RecordError(where, self.names[name], f"needs one list per scored token ({count})")
        k = len(ids[0]) if isinstance(ids[0], list) else 0
        if k == 0 or any(not isinstance(a, list) or not isinstance(b, list) or len(a) != k or len(b) != k for a, b in zip(ids, lps)):
            raise RecordError(where, self.names["top_ids"], "needs the same k (>= 1) ids and log-probs at every scored token")
        for j in np.flatnonzero(keep):  # every value the comparison reads, checked like `logprobs`
            for i, (t, v) in enumerate(zip(ids[j], lps[j])):
                if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (self.vocab_size is not None and t >= self.vocab_size):
                    size = f" (the reference's model has {self.vocab_size} ids)" if self.vocab_size is not None else ""
                    raise RecordError(where, f"{self.names['top_ids']}[{j}][{i}]", f"{t!r} is not a token id{size} (position {span[0] + j})")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise RecordError(where, f"{self.names['top_logprobs']}[{j}][{i}]", f"{v!r} is not a finite log-prob (position {span[0] + j})")
                if v > POSITIVE_TOLERANCE:
                    raise RecordError(where, f"{self.names['top_logprobs']}[{j}][{i}]", f"{v!r} is positive: not a log-prob (position {span[0] + j})")
        out_ids = np.full((n, k), -1, np.int64)
        out_lp = np.full((n, k), np.nan, np.float32)
        rows = np.arange(span[0], span[1])[keep]
        out_ids[rows] = np.asarray(ids, np.int64)[keep]
        out_lp[rows] = np.asarray(lps, np.float32)[keep]
        return out_ids, out_lp


def _parquet_file(path: Path):
    """The dump as Parquet, or one line saying it is not (pyarrow's own error is a page of C++ context)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RecordError(str(path), "<file>", f"not a Parquet file ({str(exc).splitlines()[0][:120]}); a .parquet dump must be Parquet, anything else JSONL") from None


def _torch_samples(path: Path) -> list:
    """`samples` of a torch.save'd dict, loaded with weights_only=True (numeric numpy arrays allowed): nothing is unpickled
    but tensors, arrays and plain containers. Anything else is one line saying why and how to export instead."""
    import torch

    arrays = [np.ndarray, np.dtype, _reconstruct, *{type(np.dtype(t)) for t in (np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)}]
    try:
        with torch.serialization.safe_globals(arrays):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError: the file asks for more than data
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RecordError(
            str(path),
            "<file>",
            f"cannot be read as data only (torch.load(weights_only=True): {first}); crossengine never unpickles arbitrary objects. "
            "Save plain dicts of lists, tensors or numeric arrays (slime: Sample.to_dict()), or export the records as JSONL (the generic layout)",
        ) from None
    samples = obj.get("samples") if isinstance(obj, dict) else None
    if not isinstance(samples, list):
        raise RecordError(str(path), "samples", "missing: a .pt dump is a dict with a `samples` list (slime's --save-debug-rollout-data)")
    return samples


def _plain_record(obj: Any) -> Any:
    """A record with its arrays and tensors as lists (what the checks read)."""
    if not isinstance(obj, dict):
        return TypeError(f"a {type(obj).__name__}")
    return {k: v.tolist() if hasattr(v, "tolist") and not isinstance(v, (int, float)) else v for k, v in obj.items()}


def _parse(line: bytes) -> dict | Exception:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return ValueError(f"{exc.msg} at column {exc.colno}")
    except UnicodeDecodeError as exc:
        return ValueError(f"not UTF-8 at byte {exc.start}")
    return obj if isinstance(obj, dict) else TypeError(f"a JSON {type(obj).__name__}")
