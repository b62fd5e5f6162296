"""The public Parquet schemas (Arrow), built from the column names in crossengine/columns.py.

Why apart from the names: pyarrow is imported by the run and the report, never by an engine's
own environment. Documented column by column in docs/reference/schemas.md.
"""

from __future__ import annotations

import pyarrow as pa

from crossengine.columns import METRIC_COLUMNS, NOISE_COLUMNS, ROUTING_COLUMNS

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
WORST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("cand_engine", pa.string()),
        ("variant", pa.string()),
        ("kl", pa.float32()),
        ("top5_ref_ids", pa.list_(pa.int32())),
        ("top5_ref_lp", pa.list_(pa.float32())),
        ("top5_cand_ids", pa.list_(pa.int32())),
        ("top5_cand_lp", pa.list_(pa.float32())),
    ]
)
# inputs/: one row per (candidate with `inputs: own`, sample, input); see crossengine/compare/inputs.py
INPUTS_SCHEMA = pa.schema(
    [
        ("cand_engine", pa.string()),
        ("variant", pa.string()),
        ("sample_id", pa.string()),
        ("input", pa.string()),
        ("status", pa.string()),
        ("first_difference", pa.int32()),
        ("ref_token", pa.string()),
        ("cand_token", pa.string()),
        ("ref_context", pa.string()),
        ("cand_context", pa.string()),
        ("ref_shape", pa.list_(pa.int64())),
        ("cand_shape", pa.list_(pa.int64())),
        ("ref_dtype", pa.string()),
        ("cand_dtype", pa.string()),
        ("max_abs_diff", pa.float64()),
        ("mean_abs_diff", pa.float64()),
        ("detail", pa.string()),
        ("scored", pa.string()),
        ("own_prompt_tokens", pa.int32()),
        ("own_prompt_abs_lp_diff_mean", pa.float64()),
        ("own_prompt_abs_lp_diff_max", pa.float64()),
        ("own_prompt_lp_sum_diff", pa.float64()),
    ]
)
# noise/: one row per (engine, sample, condition, position): an engine's own floor (crossengine/compare/noise.py)
NOISE_SCHEMA = pa.schema(
    [
        ("engine", _DICT),
        ("sample_id", _DICT),
        ("condition", _DICT),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", _DICT),
        ("lp_base", pa.float32()),
        ("lp", pa.float32()),
        ("abs_diff", pa.float32()),
        ("kl", pa.float32()),
    ]
)
# routing/: one row per (candidate, sample, input position, MoE layer) where both sides report routing (compare/routing.py)
ROUTING_SCHEMA = pa.schema(
    [
        ("cand_engine", _DICT),
        ("variant", _DICT),
        ("sample_id", _DICT),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("layer", pa.int16()),
        ("ref_experts", pa.list_(pa.int16())),
        ("cand_experts", pa.list_(pa.int16())),
        ("flip", pa.bool_()),
        ("margin_ref", pa.float32()),
        ("margin_cand", pa.float32()),
    ]
)
# refit.parquet: one row per (refit engine, step, sample, position): the synced engine's log-prob and a fresh load's
# (crossengine/adapters/refit.py). via: score (teacher-forced, no cache read) or prefix_cache (the greedy next token read
# through the prefix cache, vLLM); stale: a prefix_cache row that differs while the sample's scores agree bitwise.
REFIT_SCHEMA = pa.schema(
    [
        ("engine", _DICT),
        ("step", pa.int16()),
        ("to", _DICT),
        ("sample_id", _DICT),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("via", _DICT),
        ("lp_synced", pa.float32()),
        ("lp_fresh", pa.float32()),
        ("refit_diff", pa.float32()),
        ("stale", pa.bool_()),
    ]
)
# refit_params.parquet: one row per finding of refit's audits. source: stream (what the sync code passed, against the
# checkpoint) or parameters (the synced engine's parameters against a fresh load's, last step).
REFIT_PARAMS_SCHEMA = pa.schema(
    [
        ("engine", _DICT),
        ("step", pa.int16()),
        ("to", _DICT),
        ("source", _DICT),
        ("name", pa.string()),
        ("finding", _DICT),
        ("max_abs_diff", pa.float64()),
        ("detail", pa.string()),
    ]
)
