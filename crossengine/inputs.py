"""Input parity: a candidate's own prompt inputs against the reference's, before any log-prob.

For an engine with `inputs: own` its worker prepares every sample itself (its chat template,
its tokenizer, its processor) and compares, per sample, with what the reference prepared:

- `input_ids`: equal, or the first differing position with both tokens' text and ±20
  characters of both rendered strings there;
- every tensor input by name, as it reaches each model (the candidate's after its own
  `drop_inputs` and device-side preprocessing): shape, dtype, max and mean |difference|;
  an input present on one side only is a row of its own.

Then the candidate scores its own sample where the token ids agree (so pixel or mask
differences reach the log-probs), and the reference's where they do not (positions must
line up to be compared); `scored` says which. Runs in the candidate's worker (numpy only).
"""

from __future__ import annotations

import numpy as np

from .adapters.base import Sample, SampleError

CONTEXT_CHARS = 20


def compare_inputs(ref_batch: list, own_batch: list, engine) -> tuple[list[dict], list]:
    """(rows, samples to score): one row per (sample, input); the candidate's samples where ids agree."""
    rows: list[dict] = []
    to_score = []
    for ref, own in zip(ref_batch, own_batch):
        if isinstance(ref, SampleError):
            to_score.append(ref)
            continue
        if isinstance(own, SampleError):
            rows.append(_row(ref.sample_id, "input_ids", "candidate failed", detail=own.message, scored="reference"))
            to_score.append(ref)
            continue
        ids_row = _ids_row(ref, own, engine)
        same_ids = ids_row["status"] == "equal"
        ids_row["scored"] = "own" if same_ids else "reference"
        rows.append(ids_row)
        rows.extend(_tensor_rows(ref, own, engine, "own" if same_ids else "reference"))
        to_score.append(own if same_ids else ref)
    return rows, to_score


def _row(sample_id: str, name: str, status: str, **fields) -> dict:
    row = {"sample_id": sample_id, "input": name, "status": status, "first_difference": None, "ref_token": None, "cand_token": None,
           "ref_context": None, "cand_context": None, "ref_shape": None, "cand_shape": None, "ref_dtype": None, "cand_dtype": None,
           "max_abs_diff": None, "mean_abs_diff": None, "detail": None, "scored": None}
    row.update(fields)
    return row


def _ids_row(ref: Sample, own: Sample, engine) -> dict:
    a, b = ref.input_ids, own.input_ids
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    pos = int(diff[0]) if len(diff) else (None if len(a) == len(b) else n)
    shapes = {"ref_shape": [len(a)], "cand_shape": [len(b)], "ref_dtype": str(a.dtype), "cand_dtype": str(b.dtype)}
    if pos is None:
        return _row(ref.sample_id, "input_ids", "equal", **shapes)
    decode = engine.tokenizer.decode
    tok = lambda ids: decode([int(ids[pos])]) if pos < len(ids) else "<end>"  # noqa: E731
    return _row(
        ref.sample_id, "input_ids", "differs", first_difference=pos, ref_token=tok(a), cand_token=tok(b),
        ref_context=_context(ref.text, decode(a[:pos].tolist())), cand_context=_context(own.text, decode(b[:pos].tolist())),
        detail=f"{len(a)} vs {len(b)} tokens", **shapes,
    )


def _context(text: str | None, prefix: str) -> str | None:
    """±CONTEXT_CHARS characters of the rendered prompt around where the decoded prefix ends."""
    if text is None:
        return None
    at = min(len(prefix), len(text))
    return text[max(0, at - CONTEXT_CHARS) : at] + "⟦" + text[at : at + CONTEXT_CHARS]


def _tensor_rows(ref: Sample, own: Sample, engine, scored: str) -> list[dict]:
    """Each model input by name: the reference's as it prepared them, the candidate's as they reach its model."""
    theirs = {k: np.asarray(v) for k, v in ref.model_inputs.items()}
    mine = _as_reaching_model(own, engine)
    rows = []
    for name in sorted(set(theirs) | set(mine)):
        if name not in mine:
            rows.append(_row(ref.sample_id, name, "reference only", ref_shape=list(theirs[name].shape), ref_dtype=str(theirs[name].dtype), scored=scored))
            continue
        if name not in theirs:
            rows.append(_row(ref.sample_id, name, "candidate only", cand_shape=list(mine[name].shape), cand_dtype=str(mine[name].dtype), scored=scored))
            continue
        a, b = theirs[name], mine[name]
        fields = {"ref_shape": list(a.shape), "cand_shape": list(b.shape), "ref_dtype": str(a.dtype), "cand_dtype": str(b.dtype), "scored": scored}
        if a.shape != b.shape:
            rows.append(_row(ref.sample_id, name, "differs", detail="shapes differ", **fields))
            continue
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        status = "equal" if not d.size or d.max() == 0 else "differs"
        rows.append(_row(ref.sample_id, name, status, max_abs_diff=float(d.max()) if d.size else 0.0, mean_abs_diff=float(d.mean()) if d.size else 0.0, **fields))
    return rows


def _as_reaching_model(sample: Sample, engine) -> dict[str, np.ndarray]:
    """The candidate's tensor inputs after its own drop_inputs and device-side preprocessing, as numpy."""
    inputs = getattr(engine, "_inputs", None)
    if inputs is None:  # an engine that does not expose them (vLLM): what it prepared
        return {k: np.asarray(v) for k, v in sample.model_inputs.items()}
    out = inputs(sample)
    out.pop("input_ids", None)
    return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy() for k, v in out.items()}


def first_differences(rows: list[dict]) -> list[str]:
    """One line per sample whose inputs differ: its first differing input (ids first)."""
    lines, seen = [], set()
    for r in rows:
        if r["status"] == "equal" or r["sample_id"] in seen:
            continue
        seen.add(r["sample_id"])
        if r["input"] == "input_ids" and r["first_difference"] is not None:
            ctx = lambda c: (c or "").replace("\n", "\\n")  # noqa: E731 - one line in the terminal
            lines.append(f"sample {r['sample_id']}: token ids differ at position {r['first_difference']}: reference {r['ref_token']!r} vs "
                         f"{r['cand_token']!r} (reference …{ctx(r['ref_context'])}… / candidate …{ctx(r['cand_context'])}…); scored on the reference's ids")
        elif r["max_abs_diff"] is not None:
            lines.append(f"sample {r['sample_id']}: {r['input']} differs: max |Δ| {r['max_abs_diff']:.3g}, mean {r['mean_abs_diff']:.3g}")
        else:
            lines.append(f"sample {r['sample_id']}: {r['input']}: {r['status']}{' (' + r['detail'] + ')' if r['detail'] else ''}")
    return lines
