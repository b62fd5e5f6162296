"""The noise floor: how far one engine's own scores move under the conditions it really runs in.

A trainer–rollout difference of k3 ≈ 1e-3 is a bug only if it is larger than what either engine
does to itself when the batch around a sample changes. So each engine with a floor scores its
batch again under each of its conditions, in its own worker, right after its base scores:

    alone        each sample in a call of its own (batch size 1)
    shuffled     the batch in a seeded random order, topped up with copies of its samples to at
                 least 1 + `fillers` prompts: each sample at a random place among others
    repeat<N>    the base call again (`repeats` times): run-to-run determinism, a prefix-cache hit
    single, padded, padded-left, packed
                 (engines whose traits say `batching`) the shuffled call, run with that batching and
                 micro-batches of max(micro_batch_size, 1 + fillers): a trainer's padded or packed rows

Contract. `measure(engine, batch, base, plan, top_k, full_vocab)` returns one `NoiseRows` per
sample (the log-prob of every token under base and each condition; KL(base ‖ condition) per
position where the engine gives full logits) and sets `base[i].noise` — max − min over base and
conditions, i.e. the largest |Δlp| between any two of them — and `base[i].noise_kl`, the largest
KL(base ‖ condition). Only O(T) arrays leave the worker; a condition's logits are dropped as
soon as its KL is taken. The token rows then carry both sides' floors (`floor_columns`).

Runs inside engine environments (the vLLM venv has no pandas or pyarrow): numpy and torch only.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from crossengine.adapters.base import Sample, SampleError, TokenLogprobs
from crossengine.adapters.blocks import block_rows, blocks, logit_block

BATCHINGS = {  # condition -> the run-condition fields it sets (micro_batch_size is added per plan)
    "single": {"batching": "single"},
    "padded": {"batching": "padded", "padding_side": "right"},
    "padded-left": {"batching": "padded", "padding_side": "left"},
    "packed": {"batching": "packed"},
}
CALLS = ("alone", "shuffled", "repeat")
CONDITIONS = (*CALLS, *BATCHINGS)
BASE = "base"


@dataclass(frozen=True)
class NoisePlan:
    """One engine's conditions, as the plan resolved them (`repeat` already expanded to repeat1..N)."""

    conditions: tuple[str, ...]
    fillers: int
    seed: int


@dataclass
class NoiseRows:
    """One sample's scores under base and every condition an engine ran it in."""

    sample_id: str
    token_ids: np.ndarray  # int64 [T]: the tokens scored
    conditions: list[str]  # BASE first
    logprobs: np.ndarray  # float32 [len(conditions), T]; nan where a side scores nothing (position 0)
    kl: np.ndarray | None  # float32 [len(conditions) - 1, T]: KL(base ‖ condition); None without full logits
    skipped: list[str] = field(default_factory=list)  # "condition: why" where a condition could not score the sample


def measure(engine, batch: list, base: list, plan: NoisePlan, top_k: int, full_vocab: bool) -> list[NoiseRows]:
    """Score `batch` under each condition of `plan` and set each base score's floor; see the module docstring."""
    valid = [i for i, (s, b) in enumerate(zip(batch, base)) if not isinstance(s, SampleError) and not isinstance(b, SampleError)]
    if not valid:
        return []
    lps = {i: [base[i].token_logprobs.astype(np.float32)] for i in valid}
    kls: dict[int, list[np.ndarray]] = {i: [] for i in valid}
    names: dict[int, list[str]] = {i: [BASE] for i in valid}
    skipped: dict[int, list[str]] = {i: [] for i in valid}
    for cond in plan.conditions:
        for i, out in run_condition(engine, batch, valid, cond, plan, top_k, full_vocab).items():
            if isinstance(out, SampleError):
                skipped[i].append(f"{cond}: {out.message}")
                continue
            names[i].append(cond)
            lps[i].append(out.token_logprobs.astype(np.float32))
            if base[i].full_vocab and out.full_vocab:
                kls[i].append(kl_rows(base[i], out))
    rows = []
    for i in valid:
        m = np.stack(lps[i])
        with np.errstate(invalid="ignore"):
            spread = np.nanmax(m, 0) - np.nanmin(m, 0) if len(m) > 1 else np.where(np.isnan(m[0]), np.nan, np.float32(0))
        base[i].noise = spread.astype(np.float32)
        kl = np.stack(kls[i]) if kls[i] and len(kls[i]) == len(m) - 1 else None
        base[i].noise_kl = kl.max(0) if kl is not None else None
        ids = base[i].scored_ids if base[i].scored_ids is not None else batch[i].input_ids
        rows.append(NoiseRows(batch[i].sample_id, ids, names[i], m, kl, skipped[i]))
    return rows


def run_condition(engine, batch: list, valid: list[int], cond: str, plan: NoisePlan, top_k: int, full_vocab: bool) -> dict[int, TokenLogprobs | SampleError]:
    """The engine's scores of the samples `valid` (indices into `batch`) under one condition."""
    if cond == "alone":
        return {i: engine.score([batch[i]], top_k, full_vocab)[0] for i in valid}
    if cond.startswith("repeat"):
        out = engine.score(batch, top_k, full_vocab)
        return {i: out[i] for i in valid}
    call, where = shuffled(batch, valid, plan.fillers, plan.seed, cond)
    with run_conditions(engine, cond, plan.fillers):
        out = engine.score(call, top_k, full_vocab)
    return {i: out[k] for i, k in where.items()}


def shuffled(batch: list, valid: list[int], fillers: int, seed: int, cond: str) -> tuple[list[Sample], dict[int, int]]:
    """The valid samples topped up with copies (cycling) to at least 1 + fillers prompts, in a random order
    seeded by the run's seed, the condition and the samples' ids (the same on a resumed run); and where each went."""
    items = list(valid) + [valid[j % len(valid)] for j in range(max(0, 1 + fillers - len(valid)))]
    key = hashlib.sha256("\0".join([str(seed), cond, *(batch[i].sample_id for i in valid)]).encode()).digest()
    order = np.random.default_rng(np.frombuffer(key[:8], np.uint64)).permutation(len(items))
    where: dict[int, int] = {}
    for k, j in enumerate(order.tolist()):
        if j < len(valid):  # an original, not a filler copy
            where[valid[j]] = k
    return [batch[items[j]] for j in order.tolist()], where


@contextmanager
def run_conditions(engine, cond: str, fillers: int):
    """The engine with a batching condition's fields for one call (its spec is restored after)."""
    if cond not in BATCHINGS:
        yield
        return
    spec = engine.spec
    size = 1 if cond == "single" else max(getattr(spec, "micro_batch_size", 1), 1 + fillers)
    engine.spec = spec.model_copy(update={**BATCHINGS[cond], "micro_batch_size": size})
    try:
        yield
    finally:
        engine.spec = spec


def kl_rows(p: TokenLogprobs, q: TokenLogprobs) -> np.ndarray:
    """KL(p ‖ q) at every position, from both sides' full-vocabulary scores (nan where either has none), a block
    of positions at a time (a long sample's logits are never whole: adapters.base.LogitRows)."""
    import torch

    parts = []
    for lo, hi in blocks(p.logits.shape[0], block_rows(1 << 22, p.logits, q.logits)):  # float64 blocks of 32 MiB
        a, b = _log_probs(p, lo, hi), _log_probs(q, lo, hi)
        with torch.no_grad():
            parts.append((a.exp() * (a - b)).nan_to_num(nan=0.0).sum(-1).cpu().numpy())
    kl = np.concatenate(parts).astype(np.float32)
    kl[np.isnan(p.token_logprobs) | np.isnan(q.token_logprobs)] = np.nan
    return kl


def _log_probs(t: TokenLogprobs, lo: int, hi: int):
    import torch

    x = torch.as_tensor(logit_block(t.logits, lo, hi)).double()
    return x if t.logits_are_logprobs else torch.log_softmax(x, -1)


def floor_columns(ref: TokenLogprobs, cand: TokenLogprobs, lp_diff: np.ndarray, margin: float, rounding_floor: np.ndarray | float = 0.0) -> dict[str, np.ndarray]:
    """Token columns of both sides' floors, at every position (row 0 included; token_rows slices):
    noise_ref, noise_cand (max |Δlp| between an engine's own conditions), noise_kl_ref, noise_kl_cand,
    and above_noise (1.0/0.0, nan = unknown): |lp_diff| > margin × the larger floor, over the sides
    that have one, and |lp_diff| > `rounding_floor` (a few ulps of the log-probs in the coarser dtype:
    two engines each bitwise stable under their own conditions still round differently from each
    other); unknown where neither has a floor or lp_diff is not finite."""
    n = len(lp_diff)
    col = lambda a: np.full(n, np.nan, np.float32) if a is None else np.asarray(a, np.float32)  # noqa: E731
    out = {"noise_ref": col(ref.noise), "noise_cand": col(cand.noise), "noise_kl_ref": col(ref.noise_kl), "noise_kl_cand": col(cand.noise_kl)}
    floors = np.stack([out["noise_ref"], out["noise_cand"]])
    with np.errstate(invalid="ignore"):
        floor = np.where(np.isnan(floors).all(0), np.nan, np.nanmax(np.where(np.isnan(floors), -np.inf, floors), 0))
        above = ((np.abs(lp_diff) > margin * floor) & (np.abs(lp_diff) > rounding_floor)).astype(np.float32)
    above[np.isnan(floor) | ~np.isfinite(lp_diff)] = np.nan
    out["above_noise"] = above
    return out


EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}  # machine epsilon: the spacing of floats in [1, 2)


def coarser_eps(ref, cand, default_dtype: str) -> float:
    """The machine epsilon of the coarser of two engines' compute dtypes (their spec's `dtype`, else the
    experiment's); a dump engine's numbers count as float32."""
    return max(EPS.get(getattr(inst.spec, "dtype", None) or default_dtype, EPS["float32"]) for inst in (ref, cand))
