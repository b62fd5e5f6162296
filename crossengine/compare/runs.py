"""Two runs of the same samples side by side (`crossengine compare`): every summary metric, before, after and the change.

A table only; the terminal (report/terminal.py) and the HTML page (report/html.py) show it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from crossengine.compare.summary import SPLITS
from crossengine.errors import CrossengineError
from crossengine.identity import display_names
from crossengine.run_meta import RunMeta

COMPARED = ["top1_agreement", "abs_max", "abs_mean", "kl_mean", "cos_sim", "gen_kl_error", "token_mult_prob_error"]


def compare_runs(a: Path, b: Path) -> pd.DataFrame:
    """Both runs' summary metrics per candidate/variant and split, with the change; refuses other samples."""
    meta = [RunMeta.read(Path(d)) for d in (a, b)]
    prints = [m.samples_fingerprint for m in meta]
    if prints[0] is None or prints[0] != prints[1]:
        n = [m.n_samples for m in meta]
        why = f"{n[0]} vs {n[1]} samples" if n[0] != n[1] else "the same number of samples, but their ids or contents differ"
        raise CrossengineError(f"cannot compare {a} and {b}: their samples differ ({why}); compare two runs of the same samples")
    keys = ["cand_engine", "variant", *SPLITS]
    sa, sb = (pd.read_parquet(Path(d) / "summary.parquet") for d in (a, b))
    for s in (sa, sb):
        for k in keys:
            s[k] = s[k].astype(str)
    merged = sa[keys + COMPARED].merge(sb[keys + COMPARED], on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    merged["status"] = merged["_merge"].map({"both": "both", "left_only": "removed", "right_only": "new"}).astype(str)
    for m in COMPARED:
        merged[f"{m}_change"] = merged[f"{m}_b"] - merged[f"{m}_a"]
    merged.insert(0, "candidate", display_names(merged))
    merged.insert(1, "split", [", ".join(f"{k}={r[k]}" for k in SPLITS if r[k] != "all") or "all" for _, r in merged.iterrows()])
    cols = ["candidate", "split", "status"] + [f"{m}_{s}" for m in COMPARED for s in ("a", "b", "change")]
    return merged[cols].sort_values(["status", "candidate", "split"]).reset_index(drop=True)
