"""Which engine does each candidate agree with most, token kind by token kind?

With a reference and two candidates (HF bidirectional, HF causal, vLLM), the question a
user asks is "does vLLM do what HF-causal does at image tokens?". This compares every pair
of instances on the positions both scored, per modality, by max and mean |Δ log-prob|.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from crossengine.compare.summary import read_tokens
from crossengine.identity import SAMPLED, display_names


def nearest_table(tokens_dir: Path, reference: str) -> pd.DataFrame:
    cols = ["sample_id", "position", "modality", "cand_engine", "variant", "lp_ref", "lp_cand", "segment"]
    df = read_tokens(tokens_dir, cols)
    if df.empty:
        return pd.DataFrame()
    df = df[df["variant"].astype(str) != SAMPLED].copy()
    df["instance"] = display_names(df)
    key = ["sample_id", "position", "modality"]
    wide = df.pivot_table(index=key, columns="instance", values="lp_cand", aggfunc="first", observed=True)
    wide[reference] = df.drop_duplicates(key).set_index(key)["lp_ref"]
    rows = []
    names = list(wide.columns)
    for modality, block in wide.groupby(level="modality", observed=True):
        for cand in names:
            if cand == reference:
                continue
            diffs = {other: (block[cand] - block[other]).abs() for other in names if other != cand}
            best = min(diffs, key=lambda o: (diffs[o].max(), diffs[o].mean()))
            for other, d in diffs.items():
                rows.append({"candidate": cand, "modality": str(modality), "other": other, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "nearest": other == best})
    return pd.DataFrame(rows)


def nearest_lines(table: pd.DataFrame, reference: str) -> list[str]:
    """One sentence per candidate and modality, for the terminal."""
    lines = []
    if table.empty or table["other"].nunique() < 2:
        return lines
    for (cand, modality), g in table.groupby(["candidate", "modality"], sort=False):
        best = g[g["nearest"]].iloc[0]
        ref = g[g["other"] == reference].iloc[0]
        lines.append(
            f"{cand} at {modality} tokens is nearest to {best['other']} (max |Δlp| {best['max_abs_diff']:.2g})"
            + ("" if best["other"] == reference else f"; vs reference {reference}: {ref['max_abs_diff']:.2g}")
        )
    return lines
