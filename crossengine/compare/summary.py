"""summary.parquet: one row per (candidate, variant, split), reduced from the token rows.

Summaries are computed from the token Parquet on disk, never from logits held in memory, so
a resumed run summarises its old and new batches alike. A split pools tokens by one key
(modality, attention, segment, or position in the completion) with the others at "all".
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from crossengine.compare.frameworks import framework_metrics

SPLITS = ("modality", "attention", "segment", "position_bucket")
KEYS = ["cand_engine", "variant", *SPLITS]
_NEEDED = [
    "sample_id",
    "position",
    "modality",
    "attention",
    "segment",
    "cand_engine",
    "variant",
    "lp_ref",
    "lp_cand",
    "lp_diff",
    "prob_diff",
    "kl_ref_cand",
    "cos_sim",
    "topk_kl",
    "topk_overlap",
    "top1_match",
    "top1_tie",
    "top1_ref",
    "top1_cand",
    "nonfinite",
]


_OPTIONAL = ["above_noise", "routing_flips"]  # columns a run of an older schema version lacks


def pooled_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's pooled rows: every split key at "all" (one per candidate), categorical or str keys alike."""
    return summary[np.logical_and.reduce([summary[k].astype(str) == "all" for k in SPLITS])]


def read_tokens(tokens_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return ds.dataset(tokens_dir, format="parquet").to_table(columns=columns).to_pandas()


def _position_bucket(df: pd.DataFrame) -> pd.Categorical:
    """first: the first completion token of each sample; rest: later ones; prompt: the prompt."""
    codes = np.zeros(len(df), dtype=np.int8)  # 0 prompt
    comp = (df["segment"] == "completion").to_numpy()
    if comp.any():
        first_pos = df[comp].groupby("sample_id", observed=True)["position"].transform("min").to_numpy()
        codes[comp] = np.where(df["position"].to_numpy()[comp] == first_pos, 1, 2)
    return pd.Categorical.from_codes(codes, categories=["prompt", "first", "rest"])


def summarize_group(g: pd.DataFrame) -> dict[str, float]:
    """The summary metrics of one group of token rows; non-finite positions are counted, not pooled."""
    finite = g["nonfinite"].isna() if "nonfinite" in g else pd.Series(True, index=g.index)
    n_nonfinite = int((~finite).sum())
    n_all, samples_all = len(g), g["sample_id"].nunique()
    g = g[finite]
    known = g["top1_cand"].notna() & g["top1_ref"].notna()  # a dump without top-k has no top-1: left out, not a mismatch
    agree = g["top1_match"].fillna(False).astype(bool) | g["top1_tie"].fillna(False).astype(bool)
    mism = ~agree & known
    first = g[mism].groupby("sample_id", observed=True)["position"].min()
    full = g["kl_ref_cand"].notna().all()
    kl = g["kl_ref_cand"] if full else g["topk_kl"]
    abs_prob = g["prob_diff"].abs()
    row = {
        "n_tokens": n_all,
        "n_samples": samples_all,
        "n_nonfinite": n_nonfinite,
        "top1_agreement": float(agree[known].mean()) if known.any() else np.nan,
        "top1_mismatches": int(mism.sum()),
        "top1_ties": int(g["top1_tie"].fillna(False).astype(bool).sum()),
        "abs_max": float(g["lp_diff"].abs().max()) if len(g) else np.nan,
        "abs_mean": float(g["lp_diff"].abs().mean()),
        "cos_sim": float(g["cos_sim"].mean()) if full else np.nan,
        "kl_source": "full" if full else "topk",
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "topk_kl_mean": float(g["topk_kl"].mean()),
        "topk_overlap_mean": float(g["topk_overlap"].mean()),
        "prob_diff_max": float(abs_prob.max()),
        "prob_diff_mean": float(abs_prob.mean()),
        "prob_diff_std": float(abs_prob.std(ddof=1)) if len(g) > 1 else np.nan,
        "first_divergent_position": int(first.min()) if len(first) else -1,
        "n_samples_diverged": int(len(first)),
    }
    if "routing_flips" in g and g["routing_flips"].notna().any():  # `routing: true`: the gap where routing flipped and where it did not
        routed = g[g["routing_flips"].notna()]
        flipped = routed["routing_flips"].to_numpy() > 0
        klr = routed["kl_ref_cand"] if full else routed["topk_kl"]
        row["frac_tokens_flipped"] = float(flipped.mean())
        for name, sel in (("flipped", flipped), ("unflipped", ~flipped)):
            row[f"abs_mean_{name}"] = float(routed["lp_diff"].abs()[sel].mean()) if sel.any() else np.nan
            row[f"kl_mean_{name}"] = float(klr[sel].mean()) if sel.any() else np.nan
    if "above_noise" in g:  # a run with a noise floor (older runs have no such column)
        known = g["above_noise"].dropna().astype(bool)
        row["n_above_noise"] = int(known.sum())
        row["frac_above_noise"] = float(known.mean()) if len(known) else np.nan
    seq = g["sample_id"].cat.codes.to_numpy() if hasattr(g["sample_id"], "cat") else g["sample_id"].to_numpy()
    row.update(framework_metrics(g=g["lp_cand"].to_numpy(), t=g["lp_ref"].to_numpy(), seq=seq))
    return row


OPTIONAL_METRICS = ("frac_tokens_flipped", "abs_mean_flipped", "abs_mean_unflipped", "kl_mean_flipped", "kl_mean_unflipped", "n_above_noise", "frac_above_noise")


@cache
def summary_metrics() -> list[str]:
    """The numeric columns a summary row can have (gates name them): every group's, plus routing's and the noise floor's."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [k for k, v in summarize_group(_empty_group()).items() if not isinstance(v, str)]
    return sorted({*names, *OPTIONAL_METRICS})


def _empty_group() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="bool" if c in ("top1_match", "top1_tie") else ("object" if c in ("sample_id", "nonfinite") else "float64")) for c in _NEEDED})


def summarize(tokens_dir: Path, expected: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Reads one candidate's rows at a time, keeping strings as categoricals. Every (cand_engine,
    variant) in `expected` gets its row, with n_tokens 0 and null metrics where every sample of it
    failed: a run whose samples all fail still says so in its summary."""
    files = sorted(Path(tokens_dir).glob("*.parquet")) if Path(tokens_dir).is_dir() else []
    dataset = ds.dataset([str(f) for f in files], format="parquet") if files else None
    pairs = dataset.to_table(columns=["cand_engine", "variant"]).to_pandas().drop_duplicates() if dataset is not None else pd.DataFrame(columns=["cand_engine", "variant"])
    rows = []
    seen = {(str(c), str(v)) for c, v in pairs.itertuples(index=False)}
    keys = lambda cand, variant: {"cand_engine": str(cand), "variant": str(variant), **{k: "all" for k in SPLITS}}  # noqa: E731 - a pooled row's keys
    for cand, variant in expected or []:
        if (cand, variant) not in seen:
            rows.append({**keys(cand, variant), **summarize_group(_empty_group()), "kl_source": "none"})
    for cand, variant in pairs.itertuples(index=False):
        flt = (ds.field("cand_engine") == str(cand)) & (ds.field("variant") == str(variant))
        g = dataset.to_table(columns=_NEEDED + [c for c in _OPTIONAL if c in dataset.schema.names], filter=flt).to_pandas()
        g["position_bucket"] = _position_bucket(g)
        keys_all = keys(cand, variant)
        rows.append({**keys_all, **summarize_group(g)})
        for split in SPLITS:
            present = g[split].astype("category").cat.remove_unused_categories()
            if len(present.cat.categories) < 2 and split != "modality":
                continue  # one value: identical to "all"
            for value, sub in g.groupby(present, observed=True, sort=True):
                rows.append({**keys_all, split: str(value), **summarize_group(sub)})
    out = pd.DataFrame(rows, columns=KEYS) if not rows else pd.DataFrame(rows)
    for k in KEYS + (["kl_source"] if rows else []):
        out[k] = out[k].astype("category")
    return out
