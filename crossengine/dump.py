"""`RolloutWriter`: a few lines in a training loop that save the rollout engine's log-probs as a crossengine dump.

Why: verl keeps only text in its `rollout_data_dir`, TRL and OpenRLHF keep rollout log-probs in memory; without a file
there is nothing to score later. The writer takes the batched tensors a trainer already holds and writes the generic
layout (docs/guides/rollout-dumps.md), one JSON line per sequence, streamed to a temporary file that becomes the named
file only when the writer closes cleanly (a crash leaves no half-written dump under that name).

    from crossengine.dump import RolloutWriter

    with RolloutWriter(f"rollouts/step_{step}.jsonl", id_prefix=f"step{step}-") as w:
        w.write(input_ids, logprobs, response_mask, attention_mask)

`input_ids` [B, T] is each whole sequence (prompt and response, padded either side); `attention_mask` [B, T] marks its
real tokens (default: all). `logprobs` and `response_mask` are either [B, T], aligned with `input_ids` (position t holds
log p(token t)), or [B, R] for the last R columns of `input_ids` (verl's `responses`, TRL's completions, OpenRLHF's
actions): `response_mask` marks the tokens the loss uses. torch tensors, numpy arrays or nested lists.
Numbers are written as they are: a float32 log-prob reads back bitwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _array(x: Any, name: str, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().float().cpu().numpy() if dtype is np.float32 else x.detach().cpu().numpy()
    out = np.asarray(x, dtype=dtype)
    if out.ndim != 2:
        raise ValueError(f"RolloutWriter: {name} must be [batch, tokens], got shape {list(out.shape)}")
    return out


class RolloutWriter:
    """Streams records of the generic layout to `path` (JSONL); see the module docstring."""

    def __init__(self, path: str | Path, id_prefix: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.file = open(self.tmp, "w")  # noqa: SIM115 - closed by close()
        self.id_prefix = id_prefix
        self.count = 0

    def write(self, input_ids, logprobs, response_mask, attention_mask=None, ids: list[str] | None = None) -> list[str]:
        """One record per row; returns their ids (`ids`, or id_prefix + a running number)."""
        tokens = _array(input_ids, "input_ids", np.int64)
        b, t = tokens.shape
        valid = np.ones_like(tokens, bool) if attention_mask is None else _array(attention_mask, "attention_mask", np.int64).astype(bool)
        lps = self._aligned(_array(logprobs, "logprobs", np.float32), t, "logprobs")
        mask = self._aligned(_array(response_mask, "response_mask", np.int64), t, "response_mask").astype(bool)
        if valid.shape != (b, t) or lps.shape[0] != b or mask.shape[0] != b or (ids is not None and len(ids) != b):
            raise ValueError(f"RolloutWriter: every argument needs {b} rows and attention_mask {t} columns")
        written = []
        for row in range(b):
            keep = valid[row]
            seq, lp, scored = tokens[row][keep], lps[row][keep], mask[row][keep] & keep[keep]
            first = int(np.argmax(scored)) if scored.any() else 0
            if first < 1:
                raise ValueError(f"RolloutWriter: row {row} scores {'no token' if not scored.any() else 'its first token, which nothing predicts'}")
            rid = ids[row] if ids is not None else f"{self.id_prefix}{self.count}"
            record = {"id": str(rid), "token_ids": seq.tolist(), "prompt_len": first, "logprobs": [float(v) for v in lp[first:]]}
            if not scored[first:].all():
                record["mask"] = scored[first:].tolist()
                record["logprobs"] = [float(v) if s else 0.0 for v, s in zip(lp[first:], scored[first:])]  # unscored: any number, never read
            self.file.write(json.dumps(record) + "\n")
            written.append(record["id"])
            self.count += 1
        return written

    @staticmethod
    def _aligned(x: np.ndarray, t: int, name: str) -> np.ndarray:
        """[B, T] as is; [B, R < T] placed in the last R columns (a response block)."""
        if x.shape[1] == t:
            return x
        if x.shape[1] > t:
            raise ValueError(f"RolloutWriter: {name} has {x.shape[1]} columns, more than input_ids' {t}")
        out = np.zeros((x.shape[0], t), x.dtype)
        out[:, t - x.shape[1] :] = x
        return out

    def close(self) -> Path:
        """Finish the file and give it its name (atomically)."""
        if not self.file.closed:
            self.file.close()
            os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # nothing half-written under the dump's name
            self.file.close()
            self.tmp.unlink(missing_ok=True)
