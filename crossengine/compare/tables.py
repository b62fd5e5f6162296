"""The comparison's rows as Arrow tables of the public schemas (crossengine/columns.py).

Why here and not beside the writer: these functions know the rows' dataclasses (`TokenRows`,
`noise.NoiseRows`, `routing.RoutingRows`), which are the comparison's; the run only writes
what they return. Strings are dictionary-encoded, never per-row objects.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from crossengine.columns import (
    ATTENTIONS,
    METRIC_COLUMNS,
    MODALITIES,
    NOISE_COLUMNS,
    NONFINITE,
    ROUTING_COLUMNS,
    SEGMENTS,
)
from crossengine.compare.tokens import TokenRows
from crossengine.schemas import NOISE_SCHEMA, ROUTING_SCHEMA, TOKEN_SCHEMA


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
    return pa.table(
        {
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
        },
        schema=NOISE_SCHEMA,
    )


def routing_part_table(rows: list, cand_engine: str, variant: str) -> pa.Table:
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

    def lists(parts):
        return (
            pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(parts).reshape(-1).astype(np.int16)), parts[0].shape[1]).cast(pa.list_(pa.int16()))
            if parts
            else pa.array([], pa.list_(pa.int16()))
        )  # noqa: E731

    return pa.table(
        {
            "cand_engine": _constant(cand_engine, n),
            "variant": _constant(variant, n),
            "sample_id": pa.DictionaryArray.from_arrays(pa.array(cat(sids, np.int32)), pa.array([r.sample_id for r in rows], pa.string())),
            "position": pa.array(cat(pos, np.int32)),
            "token_id": pa.array(cat(tok, np.int32)),
            "layer": pa.array(cat(layer, np.int16)),
            "ref_experts": lists(ref),
            "cand_experts": lists(cand),
            "flip": pa.array(cat(flip, bool)),
            "margin_ref": pa.array(cat(mref, np.float32)),
            "margin_cand": pa.array(cat(mcand, np.float32)),
        },
        schema=ROUTING_SCHEMA,
    )
