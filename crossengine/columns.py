"""The names of the public tables' columns and the vocabularies of their coded columns.

Why a module of its own, at the bottom of the import graph: the engines (which code each
position's modality and attention), the comparison (which fills the metric columns), the run
(which writes the parts) and the report (which reads them) all speak these names, so none of
them may own them. Plain Python: engine environments import it and need not have pyarrow.
The Arrow schemas built from these names are in crossengine/schemas.py.
"""

from __future__ import annotations

# Modality and attention codes; stored as dictionary-encoded strings in Parquet.
MODALITIES = ("text", "image", "special")
ATTENTIONS = ("causal", "bidirectional")
SEGMENTS = ("prompt", "completion")
NONFINITE = ("ref", "cand", "both")  # which side's numbers were NaN/inf at a position; null: neither

# Column -> Arrow type; the token schema's metric part (compare/metrics.py fills it).
METRIC_COLUMNS: dict[str, str] = {
    "lp_ref": "float32",
    "lp_cand": "float32",
    "lp_diff": "float32",
    "abs_lp_diff": "float32",
    "prob_diff": "float32",
    "mult_prob_error": "float32",
    "gen_kl": "float32",
    "policy_kl": "float32",
    "js": "float32",
    "kl_ref_cand": "float32",
    "kl_cand_ref": "float32",
    "cos_sim": "float32",
    "topk_kl": "float32",
    "topk_overlap": "float32",
    "top1_ref": "int32",
    "top1_cand": "int32",
    "top1_match": "bool",
    "top1_tie": "bool",
    "rank_in_cand": "int32",
}
# The token table's floor columns (compare/noise.py), after the metric ones; null where a side has no floor.
NOISE_COLUMNS: dict[str, str] = {"noise_ref": "float32", "noise_cand": "float32", "noise_kl_ref": "float32", "noise_kl_cand": "float32", "above_noise": "bool"}
# The token table's routing column (compare/routing.py); null without routing.
ROUTING_COLUMNS: dict[str, str] = {"routing_flips": "int32"}
