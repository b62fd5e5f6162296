"""`refit:`: an engine that takes new weights in place, as an RL rollout engine does every step, checked against fresh loads.

Contract. The worker wraps an engine whose spec has `refit` in a `Refitter` (everything else is forwarded to the engine).
Each batch: the engine is given back its own `model`'s weights if a push changed them, scores the batch (so a prefix cache
holds the old weights' state, as after a rollout), then each checkpoint of `to` is pushed in through `update` (the user's
sync code, or every tensor as is) and the batch is scored again; the scores after the last push are the candidate's.
`refit_finish` (once, after the last batch) closes the synced engine and loads each checkpoint fresh in the same worker,
scores the kept batches with it, and returns per token the synced and fresh log-probs, plus two audits:

- stream: what `update` passed to `target.load_weights` against the checkpoint's tensors (never written, dtype, values,
  a bfloat16/float16 round trip), recorded at each step's first push (sync code is assumed deterministic);
- parameters: every parameter the synced engine holds after the last push against the fresh load's, by name.

Why in one worker and at the end: a fresh load next to the synced one would need a second copy of the model on the device
for the whole run; here at most one model is loaded at a time (plus the synced parameters on the host for the audit).
Checkpoints are read as safetensors (from disk at each push, not held).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import import_ref
from .base import EngineDead, SampleError

ROUND_TRIPS = ("bfloat16", "float16")  # a float32 tensor that went through one of these and back: named as such


class RefitError(EngineDead):
    """A push that failed: the message names the step and what its sync code or the engine said. The engine's weights are
    then in no known state, so it stops like a dead engine (once, named) and the other engines go on."""


def checkpoint_tensors(model: str, revision: str | None = None) -> dict[str, Any]:
    """name -> host torch tensor of every tensor in a checkpoint folder (or a hub id's cached snapshot), read as safetensors."""
    from safetensors.torch import load_file

    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, revision=revision, allow_patterns=["*.safetensors"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RefitError(f"{model} has no *.safetensors files: refit pushes safetensors checkpoints (save with safe_serialization=True)")
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def builtin_update(target: RefitTarget, weights: dict[str, Any]) -> None:
    """Every tensor of the checkpoint, as is, by its checkpoint name: the sync path when no `update` is given."""
    target.load_weights(weights.items())


class RefitTarget:
    """What a sync function pushes into. `load_weights(pairs)` takes (checkpoint name, torch tensor) pairs, in one call or
    several, and writes them into the live engine (vLLM: its in-place reload inside its worker; hf: a copy by name).
    `engine` is the crossengine adapter, for sync code that needs more (`engine.llm`, `engine.model`)."""

    def __init__(self, engine, checkpoint: dict[str, Any], audit: bool):
        self.engine = engine
        self._checkpoint = checkpoint
        self._audit = audit
        self.findings: list[dict[str, Any]] = []
        self.passed: set[str] = set()

    def load_weights(self, weights) -> None:
        pairs = list(weights)
        if self._audit:
            for name, tensor in pairs:
                self._check(name, tensor)
        self.passed.update(name for name, _ in pairs)
        self.engine.load_weights(pairs)

    def _check(self, name: str, tensor) -> None:
        ref = self._checkpoint.get(name)
        if ref is None:
            self.findings.append(finding(name, "not in checkpoint", None, "a name the checkpoint lacks (renamed by the sync code?)"))
        elif tuple(ref.shape) != tuple(tensor.shape):
            self.findings.append(finding(name, "shape", None, f"{tuple(tensor.shape)} for {tuple(ref.shape)}"))
        else:
            if tensor.dtype != ref.dtype:
                self.findings.append(finding(name, "dtype", None, f"{dtype_name(tensor)} for {dtype_name(ref)}"))
            self._values(name, tensor, ref)

    def _values(self, name: str, tensor, ref) -> None:
        got = compare_values(tensor, ref)
        if got is not None:
            self.findings.append(finding(name, *got))

    def never_written(self) -> list[dict[str, Any]]:
        return [finding(n, "never written", None, "in the checkpoint, never passed to load_weights") for n in sorted(set(self._checkpoint) - self.passed)]


def dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def finding(name: str, kind: str, max_abs_diff: float | None, detail: str) -> dict[str, Any]:
    return {"name": name, "finding": kind, "max_abs_diff": np.nan if max_abs_diff is None else float(max_abs_diff), "detail": detail}


def compare_values(got, ref) -> tuple[str, float, str] | None:
    """(finding, max |Δ|, detail) where `got` does not hold `ref`'s values; None where it holds them exactly (after a cast
    to `got`'s dtype, which a fresh load does too)."""
    import torch

    expected = ref.to(got.dtype)
    if torch.equal(got, expected):
        return None
    diff = float((got.double() - ref.double()).abs().max())
    if ref.dtype == torch.float32 and got.dtype == torch.float32:
        for rt in ROUND_TRIPS:
            if torch.equal(got, ref.to(getattr(torch, rt)).float()):
                return f"{rt} round trip", diff, f"holds the checkpoint's values cast to {rt} and back"
    return "differs", diff, f"max |Δ| {diff:.3g}"


def audit_parameters(synced: dict[str, Any], fresh) -> list[dict[str, Any]]:
    """The synced engine's parameters against a fresh load's, by name (both in the engine's own names)."""
    out, unreadable = [], 0
    for name, ref in fresh:
        got = synced.get(name)
        if got is None:
            out.append(finding(name, "missing", None, "the fresh load has it, the synced engine does not"))
        elif got.numel() == 0 and ref.numel() == 0:
            unreadable += 1
        elif tuple(got.shape) != tuple(ref.shape):
            out.append(finding(name, "shape", None, f"{tuple(got.shape)} for {tuple(ref.shape)}"))
        elif got.dtype != ref.dtype:
            out.append(finding(name, "dtype", None, f"{dtype_name(got)} for {dtype_name(ref)}"))
        else:
            diff = compare_values(got, ref)
            if diff is not None:
                out.append(finding(name, *diff))
    if unreadable:
        out.append(finding(f"{unreadable} parameters", "unreadable", None, "the engine keeps them repacked for its kernels (vLLM's CPU backend): not compared"))
    return out


@dataclass
class _Kept:
    """One batch as the synced engine scored it: the samples, and per step (token log-probs per sample, cache probe)."""

    samples: list
    steps: list[tuple[list, list | None]]


class Refitter:
    """An engine with `refit:`; the worker holds this in the engine's place (see the module docstring)."""

    def __init__(self, engine, make_fresh, refit, model_path: str):
        self.engine = engine
        self.make_fresh = make_fresh  # checkpoint path -> the same engine (class, spec, seed) loaded fresh from it
        self.refit = refit
        self.update = import_ref(refit.update) if refit.update else builtin_update
        self.model_path = model_path
        self.at = 0  # the weights the engine holds: 0 its own model's, i the i-th push
        self.kept: list[_Kept] = []
        self.stream: dict[int, list[dict[str, Any]]] = {}
        self.args: tuple[int, bool] | None = None

    def __getattr__(self, name: str):  # everything but scoring is the engine's
        return getattr(self.__dict__["engine"], name)

    @property
    def logits_as_tensors(self) -> bool:
        return self.engine.logits_as_tensors

    @logits_as_tensors.setter
    def logits_as_tensors(self, value: bool) -> None:
        self.engine.logits_as_tensors = value

    def score(self, samples: list, top_k: int, full_vocab: bool) -> list:
        self.args = (top_k, full_vocab)
        if self.at != 0:  # the previous batch left the last push in: back to the weights a rollout starts from
            self.engine.load_weights(list(checkpoint_tensors(self.model_path, self.engine.spec.revision).items()))
            self.engine.reset_prefix_cache()
            self.at = 0
        out = self.engine.score(samples, top_k, full_vocab)  # the old weights' state, in whatever cache the engine keeps
        steps = []
        for i in range(len(self.refit.to)):
            self._push(i)
            out = self.engine.score(samples, top_k, full_vocab)
            steps.append(([r.token_logprobs if hasattr(r, "token_logprobs") else None for r in out], self.engine.probe_cached(samples)))
        self.kept.append(_Kept(samples, steps))
        return out

    def _push(self, i: int) -> None:
        label = self.refit.label(i)
        try:
            weights = checkpoint_tensors(self.refit.to[i], self.engine.spec.revision)
            target = RefitTarget(self.engine, weights, audit=i not in self.stream)
            self.update(target, weights)
        except Exception as exc:  # noqa: BLE001 - the user's sync code or the engine's load: one line naming the step
            who = self.refit.update or "the built-in sync"
            text = str(exc).strip().splitlines()
            raise RefitError(f"refit step {i + 1} ({label}): {who} raised {type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")) from exc
        if i not in self.stream:
            self.stream[i] = target.findings + target.never_written()
        if self.refit.reset_prefix_cache:
            self.engine.reset_prefix_cache()
        self.at = i + 1

    def refit_finish(self) -> list[dict[str, Any]]:
        """Per step: the per-token columns (synced and fresh), the stream findings and (last step) the parameter audit."""
        n = len(self.refit.to)
        if not self.kept:  # every batch was already done (a resumed run): nothing to compare
            return []
        synced = dict(self.engine.parameters()) if self.at == n else {}
        self.close()
        out = []
        for i, path in enumerate(self.refit.to):
            fresh = self.make_fresh(path)
            try:
                tokens = self._fresh_tokens(fresh, i)
                params = audit_parameters(synced, fresh.parameters()) if synced and i == n - 1 else []
            finally:
                fresh.close()
            out.append({"step": i + 1, "to": self.refit.label(i), "tokens": tokens, "stream": self.stream.get(i, []), "parameters": params})
        return out

    def _fresh_tokens(self, fresh, i: int) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {k: [] for k in ("sample_id", "position", "token_id", "lp_synced", "lp_fresh", "via")}

        def add(sid, pos, tok, a, b, via):
            cols["sample_id"] += [sid] * len(pos)
            cols["via"] += [via] * len(pos)
            for k, v in (("position", pos), ("token_id", tok), ("lp_synced", a), ("lp_fresh", b)):
                cols[k].append(np.asarray(v))

        for kept in self.kept:
            theirs = fresh.score(kept.samples, *self.args)
            probes = fresh.probe_cached(kept.samples)
            lps, my_probes = kept.steps[i]
            for j, (s, mine, ref) in enumerate(zip(kept.samples, lps, theirs)):
                if isinstance(s, SampleError) or mine is None or isinstance(ref, SampleError):
                    continue
                add(s.sample_id, np.arange(1, len(s)), s.input_ids[1:], mine[1:], ref.token_logprobs[1:], "score")
                if probes and my_probes and probes[j] and my_probes[j]:  # the next token through the prefix cache
                    (tok, lp_fresh), (my_tok, lp_mine) = probes[j], my_probes[j]
                    add(s.sample_id, [len(s)], [tok], [lp_mine if my_tok == tok else np.nan], [lp_fresh], "prefix_cache")
        empty = {"position": np.int64, "token_id": np.int64, "lp_synced": np.float32, "lp_fresh": np.float32}
        return {
            "sample_id": np.asarray(cols["sample_id"], dtype=object),
            "via": np.asarray(cols["via"], dtype=object),
            **{k: np.concatenate(cols[k]).astype(t) if cols[k] else np.zeros(0, t) for k, t in empty.items()},
        }

    def close(self) -> None:
        if not self.__dict__.get("closed"):
            self.closed = True
            self.engine.close()
