"""One batch's scores turned into token rows, where the logits are: in the candidate's worker.

Contract. `compare_batch(batch, ref_out, cand_out, options)` takes the reference's prepared
samples and both sides' `TokenLogprobs` (full [T, V] logits where they have them) and
returns a `Part`: per sample the token columns (`TokenRows`, O(T), whatever the vocabulary),
the part's worst positions with both sides' top-5, and the samples it could not compare.
Logits go in and never come out, so the driver receives kilobytes per sample instead of
T×V floats, and the full-vocabulary kernel (metrics.py) runs on the candidate's device.

The reference's logits reach a candidate's worker as a Ray ObjectRef, worker to worker
through the object store; the driver only ever sees `ReferenceCheck` (a digest and the
samples the reference failed). Imports numpy and torch only: it runs inside engine
environments (the vLLM venv has no pyarrow).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from crossengine.adapters.base import Sample, SampleError, TokenLogprobs
from crossengine.adapters.sampling import Reading
from crossengine.compare.align import check_scores
from crossengine.compare.metrics import token_metrics
from crossengine.compare.noise import floor_columns
from crossengine.compare.routing import flips, routing_column, routing_rows
from crossengine.compare.sampling import Fit, fit

WORST_PER_PART = 20


@dataclass
class TokenRows:
    """Rows of one sample for one candidate, before they become Arrow columns (results.token_table)."""

    sample_id: str
    positions: np.ndarray
    token_ids: np.ndarray
    modality: np.ndarray
    attention: np.ndarray
    attention_cand: np.ndarray
    segment: np.ndarray
    metrics: dict[str, np.ndarray]
    nonfinite: np.ndarray  # int8: 0 finite, 1 ref, 2 cand, 3 both


@dataclass(frozen=True)
class CompareOptions:
    """Who is compared with whom, and how; the same for every batch of a candidate."""

    reference: str
    candidate: str  # instance name, as errors name it
    cand_engine: str
    variant: str
    tie_eps: float
    completion_only: bool = False  # generation mode: only the generated tokens are rows
    noise_margin: float = 1.0  # above_noise: |lp_diff| > noise_margin × the larger floor (experiment `noise.margin`)
    rounding: float = 0.0  # above_noise: and |lp_diff| > rounding × max(|lp_ref|, |lp_cand|, 1) (noise.rounding_ulps × eps of the coarser dtype)
    check_reading: Reading | None = None  # a dump's declared reading (its `sampling:`), checked against the other side's logits (compare/sampling.py)
    check_side: str = "cand"  # which side is the dump: the candidate (the reference gives the logits), or "ref" (this candidate does)


@dataclass
class Part:
    """What a candidate's worker sends back for one batch."""

    rows: list[TokenRows] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)  # WORST_SCHEMA rows
    errors: list[SampleError] = field(default_factory=list)  # samples this candidate could not compare
    inputs: list[dict] | None = None  # `inputs: own`: its inputs vs the reference's (crossengine/compare/inputs.py)
    metrics_s: float = 0.0
    noise: list = field(default_factory=list)  # this candidate's noise.NoiseRows (its floor), when it has one
    noise_s: float = 0.0
    routing: list = field(default_factory=list)  # routing.RoutingRows per sample, where both sides report routing
    sampling: Fit | None = None  # the sampling check's errors over this batch (a dump candidate, a reference with full logits)


@dataclass
class ReferenceCheck:
    """What the driver needs of the reference's scores: a digest (bitwise equal across waves) and its failures."""

    digest: str
    errors: list[SampleError]
    noise: list = field(default_factory=list)  # the reference's noise.NoiseRows, when it has a floor
    noise_s: float = 0.0


def reference_check(outputs: list[TokenLogprobs | SampleError]) -> ReferenceCheck:
    """Digest of the reference's per-token scores, and the samples it could not prepare or score."""
    h = hashlib.sha256()
    errors = []
    for r in outputs:
        if isinstance(r, SampleError):
            h.update(r.message.encode())
            errors.append(r)
            continue
        for a in (r.token_logprobs, r.topk_ids, r.topk_logprobs):
            h.update(np.ascontiguousarray(a).tobytes())
    return ReferenceCheck(h.hexdigest(), errors)


def compare_batch(batch: list[Sample | SampleError], ref_out: list, cand_out: list, options: CompareOptions) -> Part:
    """Token rows of every sample both sides scored; this candidate's failures are reported here,
    the reference's by its own check (`reference_check`)."""
    t = time.perf_counter()
    part = Part()
    scored: list[tuple[TokenLogprobs, TokenLogprobs]] = []
    for sample, r, c in zip(batch, ref_out, cand_out):
        if isinstance(sample, SampleError):  # not prepared: the reference's check reports it
            continue
        if isinstance(c, SampleError):
            part.errors.append(c)
        if isinstance(r, SampleError) or isinstance(c, SampleError):
            continue
        misaligned = check_scores(sample, options.candidate, r, c)
        if misaligned is not None:
            part.errors.append(misaligned)
            continue
        f = flips(r, c)  # MoE routing, where both sides report it
        part.rows.append(token_rows(sample, r, c, options.tie_eps, options.completion_only, options.noise_margin, f, options.rounding))
        if f is not None:
            part.routing.append(routing_rows(sample.sample_id, c.scored_ids if c.scored_ids is not None else sample.input_ids, r, c, f))
        scored.append((r, c))
        dump, logits = (c, r) if options.check_side == "cand" else (r, c)
        if options.check_reading is not None and logits.logits is not None and not logits.logits_are_logprobs:
            part.sampling = part.sampling or Fit()
            both = (dump.scored if dump.scored is not None else np.ones(len(sample), bool)) & np.isfinite(dump.token_logprobs)
            part.sampling.add(fit(logits.logits, sample.input_ids, dump.token_logprobs, both, options.check_reading))
    part.worst = worst_rows(part.rows, scored, options.cand_engine, options.variant)
    part.metrics_s = time.perf_counter() - t
    return part


def token_rows(
    sample: Sample, ref: TokenLogprobs, cand: TokenLogprobs, tie_eps: float, completion_only: bool = False, noise_margin: float = 1.0, routing_flips: np.ndarray | None = None, rounding: float = 0.0
) -> TokenRows:
    """Rows at the positions both sides scored: every position from 1, or a dump's scored
    response tokens (`TokenLogprobs.scored`), where its response is the completion segment.
    `routing_flips`: routing.flips(ref, cand), where both sides report MoE routing."""
    positions = np.arange(1, len(sample), dtype=np.int32)
    segment = np.zeros(len(positions), dtype=np.int8)
    both = np.ones(len(sample), bool)
    for side in (ref, cand):
        if side.scored is not None:
            both &= side.scored
    prompt_len = sample.prompt_len
    if prompt_len is None and both[1:].any() and not both[1:].all():
        prompt_len = 1 + int(np.argmax(both[1:]))  # a dump's first scored position starts its response
    if prompt_len is not None:
        segment[positions >= prompt_len] = 1
    keep = (segment == 1) & both[1:] if completion_only else both[1:]
    metrics = token_metrics(ref, cand, sample.input_ids, tie_eps)
    nonfinite = metrics.pop("nonfinite")
    scale = np.maximum(np.maximum(np.abs(metrics["lp_ref"]), np.abs(metrics["lp_cand"])), 1.0)
    floors = floor_columns(ref, cand, np.concatenate([[np.nan], metrics["lp_diff"]]), noise_margin, rounding * np.concatenate([[np.nan], scale]))
    metrics.update({k: v[1:] for k, v in floors.items()})
    metrics["routing_flips"] = routing_column(routing_flips, len(sample))[1:]
    return TokenRows(
        sample_id=sample.sample_id,
        positions=positions[keep],
        token_ids=sample.input_ids[1:][keep],
        modality=sample.modality[1:][keep],
        attention=ref.attention[1:][keep],
        attention_cand=cand.attention[1:][keep],
        segment=segment[keep],
        metrics={k: v[keep] for k, v in metrics.items()},
        nonfinite=nonfinite[keep],
    )


def worst_rows(rows: list[TokenRows], scored: list[tuple[TokenLogprobs, TokenLogprobs]], cand_engine: str, variant: str) -> list[dict]:
    """The part's WORST_PER_PART positions by KL (full where known, else top-k), with both sides' top-5.

    The token table keeps top-1 only (top-k for every row would multiply its size); the
    report's worst-token table needs more, and only for a few rows, so each part keeps those.
    """
    if not rows:
        return []
    kl = np.concatenate([np.where(np.isnan(tr.metrics["kl_ref_cand"]), tr.metrics["topk_kl"], tr.metrics["kl_ref_cand"]) for tr in rows])
    which = np.repeat(np.arange(len(rows)), [len(tr.positions) for tr in rows])
    positions = np.concatenate([tr.positions for tr in rows])
    finite = np.flatnonzero(np.isfinite(kl))
    top = finite[np.argsort(-kl[finite], kind="stable")[:WORST_PER_PART]]
    out = []
    for value, i, pos in zip(kl[top].tolist(), which[top].tolist(), positions[top].tolist()):
        r, c = scored[i]
        out.append(
            {
                "sample_id": rows[i].sample_id,
                "position": pos,
                "cand_engine": cand_engine,
                "variant": variant,
                "kl": value,
                "top5_ref_ids": r.topk_ids[pos, :5].tolist(),
                "top5_ref_lp": r.topk_logprobs[pos, :5].tolist(),
                "top5_cand_ids": c.topk_ids[pos, :5].tolist(),
                "top5_cand_lp": c.topk_logprobs[pos, :5].tolist(),
            }
        )
    return out


def payload_bytes(obj) -> int:
    """Bytes of numpy data in a (nested) result: what a worker shipped to the driver (recorded in run.json)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(payload_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0
