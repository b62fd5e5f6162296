"""Input parity: a candidate's own prompt inputs against the reference's, before any log-prob.

For an engine with `inputs: own` its worker prepares every sample itself (its chat template,
its tokenizer, its processor) and compares, per sample, with what the reference prepared:

- `input_ids`: equal, or the first differing position with both tokens' text and ±20
  characters of both rendered strings there;
- `image_tokens`: how many positions each side tags as image tokens, and the first position
  where the two disagree (where there are any);
- every tensor input by name, as it reaches each model (after each side's `drop_inputs`,
  device-side normalisation and a native model's own `input_view`): shape, dtype, max and
  mean |difference|; an input present on one side only is a row of its own.

Then the candidate scores (`scored`): its own sample where the token ids agree ("own": pixel
or mask differences reach the log-probs); where they do not, its own processing of the
reference's rendered prompt ("reference_text": the reference's ids with the candidate's
pixels and extra inputs), and only where even that gives other ids, the reference's sample
as is ("reference"). Positions must line up to be compared. Runs in the candidate's worker.
"""

from __future__ import annotations

from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from crossengine.adapters.base import RawSample, Sample, SampleError
from crossengine.columns import MODALITIES
from crossengine.identity import display_name

CONTEXT_CHARS = 20
IMAGE = MODALITIES.index("image")


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
        scored, sample = ("own", own) if ids_row["status"] == "equal" else _on_reference_ids(ref, engine)
        ids_row["scored"] = scored
        rows.append(ids_row)
        image_row = _image_row(ref, own, scored)
        rows.extend([image_row] if image_row else [])
        rows.extend(_tensor_rows(ref, own, engine, scored))
        to_score.append(sample)
    return rows, to_score


def _on_reference_ids(ref: Sample, engine) -> tuple[str, Sample]:
    """The candidate's own processing of the reference's rendered prompt, when it gives the
    reference's ids; else the reference's sample."""
    raw = RawSample(ref.sample_id, text=ref.text, images=list(ref.images), max_length=len(ref), rendered=ref.rendered)
    if ref.text is not None:
        again = engine.prepare([raw])[0]
        if isinstance(again, Sample) and np.array_equal(again.input_ids, ref.input_ids):
            return "reference_text", again
    return "reference", ref


def _image_row(ref: Sample, own: Sample, scored: str) -> dict | None:
    a, b = np.flatnonzero(ref.modality == IMAGE), np.flatnonzero(own.modality == IMAGE)
    if not len(a) and not len(b):
        return None
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    at = int(min(a[diff[0]], b[diff[0]])) if len(diff) else (None if len(a) == len(b) else int(a[n] if len(a) > n else b[n]))
    fields = {
        "ref_shape": [len(a)],
        "cand_shape": [len(b)],
        "scored": scored,
        "first_difference": at,
        "detail": f"{len(a)} vs {len(b)} image tokens" + ("" if at is None else f"; first differing image position {at}"),
    }
    return _row(ref.sample_id, "image_tokens", "equal" if at is None else "differs", **fields)


def own_prompt_effect(rows: list[dict], scored: list, scores: list, own: list, engine) -> None:
    """Where a candidate's ids differ (its template, its tokenizer), how much its *own* prompt moves
    the tokens both prompts share: it scores its own sample too, aligns the two id sequences
    (difflib's matching blocks) and compares its log-probs of each shared token after the first
    difference, own prompt minus the reference's prompt; same engine, same pixels, only the prompt
    differs. Filled into the sample's input_ids row (own_prompt_*)."""

    by_id = {r["sample_id"]: r for r in rows if r["input"] == "input_ids" and r["status"] == "differs"}
    for sample, score, mine in zip(scored, scores, own):
        row = by_id.get(getattr(sample, "sample_id", None))
        if row is None or not isinstance(mine, Sample) or isinstance(score, SampleError) or row["first_difference"] is None:
            continue
        theirs = engine.score([mine], 1, False)[0]
        if isinstance(theirs, SampleError):
            row["detail"] = f"{row['detail']}; its own prompt did not score: {theirs.message}"
            continue
        a, b = sample.input_ids.tolist(), mine.input_ids.tolist()
        pairs = np.asarray(
            [(i + k, j + k) for i, j, n in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() for k in range(n) if i + k > row["first_difference"] and j + k > 0], dtype=np.int64
        ).reshape(-1, 2)
        d = theirs.token_logprobs[pairs[:, 1]].astype(np.float64) - score.token_logprobs[pairs[:, 0]].astype(np.float64)
        d = d[np.isfinite(d)]
        row["own_prompt_tokens"] = int(len(d))
        if len(d):
            row.update(own_prompt_abs_lp_diff_mean=float(np.abs(d).mean()), own_prompt_abs_lp_diff_max=float(np.abs(d).max()), own_prompt_lp_sum_diff=float(d.sum()))


def _row(sample_id: str, name: str, status: str, **fields) -> dict:
    row = {
        "sample_id": sample_id,
        "input": name,
        "status": status,
        "first_difference": None,
        "ref_token": None,
        "cand_token": None,
        "ref_context": None,
        "cand_context": None,
        "ref_shape": None,
        "cand_shape": None,
        "ref_dtype": None,
        "cand_dtype": None,
        "max_abs_diff": None,
        "mean_abs_diff": None,
        "detail": None,
        "scored": None,
        "own_prompt_tokens": None,
        "own_prompt_abs_lp_diff_mean": None,
        "own_prompt_abs_lp_diff_max": None,
        "own_prompt_lp_sum_diff": None,
    }
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
        ref.sample_id,
        "input_ids",
        "differs",
        first_difference=pos,
        ref_token=tok(a),
        cand_token=tok(b),
        ref_context=_context(ref.text, decode(a[:pos].tolist())),
        cand_context=_context(own.text, decode(b[:pos].tolist())),
        detail=f"{len(a)} vs {len(b)} tokens",
        **shapes,
    )


def _context(text: str | None, prefix: str) -> str | None:
    """±CONTEXT_CHARS characters of the rendered prompt around where the decoded prefix ends."""
    if text is None:
        return None
    at = min(len(prefix), len(text))
    return text[max(0, at - CONTEXT_CHARS) : at] + "⟦" + text[at : at + CONTEXT_CHARS]


def _tensor_rows(ref: Sample, own: Sample, engine, scored: str) -> list[dict]:
    """Each model input by name, on both sides as it reaches the model."""
    theirs, mine = _as_reaching_model(ref), _as_reaching_model(own, engine)
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


def _as_reaching_model(sample: Sample, engine=None) -> dict[str, np.ndarray]:
    """A sample's tensor inputs as the model of the engine that prepared it sees them: the view it
    attached when preparing (TorchEngine.input_view), else the candidate `engine`'s view where it
    has one, else what was prepared (vLLM, or the reference's untransformed inputs)."""
    if sample.input_view is not None:
        return sample.input_view
    view = getattr(engine, "input_view", None)
    return view(sample) if view is not None else {k: np.asarray(v) for k, v in sample.model_inputs.items()}


def first_differences(rows: list[dict]) -> list[str]:
    """One line per sample whose inputs differ: its first differing input (ids first)."""
    lines, seen = [], set()
    for r in rows:
        if r["status"] == "equal" or r["sample_id"] in seen:
            continue
        seen.add(r["sample_id"])
        if r["input"] == "input_ids" and r["first_difference"] is not None and r["first_difference"] == r["first_difference"]:  # not NaN
            ctx = lambda c: (c or "").replace("\n", "\\n")  # noqa: E731 - one line in the terminal
            effect = r.get("own_prompt_abs_lp_diff_mean")
            effect = (
                (f"; its own prompt moves the {int(r['own_prompt_tokens'])} tokens both share by mean |Δlp| {effect:.3g} (max {r['own_prompt_abs_lp_diff_max']:.3g})")
                if effect is not None and effect == effect
                else ""
            )
            lines.append(
                f"sample {r['sample_id']}: token ids differ at position {int(r['first_difference'])}: reference {r['ref_token']!r} vs "
                f"{r['cand_token']!r} (reference …{ctx(r['ref_context'])}… / candidate …{ctx(r['cand_context'])}…); scored on the reference's ids{effect}"
            )
        elif r["max_abs_diff"] is not None and r["max_abs_diff"] == r["max_abs_diff"]:
            lines.append(f"sample {r['sample_id']}: {r['input']} differs: max |Δ| {r['max_abs_diff']:.3g}, mean {r['mean_abs_diff']:.3g}")
        else:
            lines.append(f"sample {r['sample_id']}: {r['input']}: {r['status']}{' (' + r['detail'] + ')' if r['detail'] else ''}")
    return lines


def read_inputs(run_dir: Path):
    """The run's inputs/ table (pandas), or None where no candidate had `inputs: own`."""
    import pandas as pd

    return pd.read_parquet(run_dir / "inputs") if (run_dir / "inputs").exists() else None


def differing_inputs(inputs) -> dict[str, str]:
    """Per candidate (display name): the inputs that differ from the reference's on any sample,
    comma-separated, or "none" (input_ids with its own prompt's effect on the tokens both prompts
    share, mean |Δlp| weighted by tokens); empty where no candidate prepared its own inputs."""

    if inputs is None:
        return {}
    out = {}
    for (cand, variant), rows in inputs.groupby(["cand_engine", "variant"], sort=True, observed=True):
        names = sorted(set(rows.loc[rows["status"] != "equal", "input"].astype(str)))
        effect = rows.dropna(subset=["own_prompt_abs_lp_diff_mean"]) if "own_prompt_abs_lp_diff_mean" in rows else rows.iloc[:0]
        if len(effect) and effect["own_prompt_tokens"].sum() > 0:  # token-weighted over samples
            mean = float((effect["own_prompt_abs_lp_diff_mean"] * effect["own_prompt_tokens"]).sum() / effect["own_prompt_tokens"].sum())
            names = [f"input_ids (own prompt: |Δlp| {mean:.3g} on shared tokens)" if n == "input_ids" else n for n in names]
        out[display_name(cand, variant)] = ", ".join(names) or "none"
    return out
