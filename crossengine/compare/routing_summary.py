"""routing.parquet: per candidate, how often and where its routers chose other experts than the reference's.

Read from the routing/ parts on disk (one row per input position and MoE layer). One row per
(candidate, layer) and the candidate's pooled row (`layer` −1):

    n_positions                 input positions routed on both sides
    router_disagreement         share of (position, layer) decisions whose expert sets differ
    frac_positions_flipped      pooled row: positions with a flip in at least one layer
    first_flip_layer            pooled row: the lowest layer with any flip (−1: none)
    margin_flipped_mean, margin_unflipped_mean
                                the reference's router margin (k-th minus (k+1)-th router logit) where
                                decisions flipped and where they did not: near-ties flip first
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from crossengine.identity import display_names


def read_routing(routing_dir: Path) -> pd.DataFrame | None:
    """The routing/ parts' decisions, with each row's candidate by its display name."""
    from crossengine.results import read_parts

    df = read_parts(routing_dir, ["cand_engine", "variant", "sample_id", "position", "layer", "flip", "margin_ref"], strings=("sample_id",))
    if df is not None:
        df["candidate"] = display_names(df)
    return df


def routing_table(routing_dir: Path) -> pd.DataFrame:
    df = read_routing(routing_dir)
    if df is None or df.empty:
        return pd.DataFrame(columns=["candidate", "layer"])
    rows = []
    for cand, g in df.groupby("candidate", sort=False):
        flipped_layers = g.loc[g["flip"], "layer"]
        per_position = g.groupby(["sample_id", "position"])["flip"].any()
        rows.append({"candidate": cand, "layer": -1, **_stats(g), "frac_positions_flipped": float(per_position.mean()), "first_flip_layer": int(flipped_layers.min()) if len(flipped_layers) else -1})
        for layer, lg in g.groupby("layer", sort=True):
            rows.append({"candidate": cand, "layer": int(layer), **_stats(lg)})
    return pd.DataFrame(rows)


def _stats(g: pd.DataFrame) -> dict:
    flip = g["flip"].to_numpy(bool)
    margin = g["margin_ref"].to_numpy(np.float64)
    return {
        "n_positions": int(len(g.drop_duplicates(["sample_id", "position"]))),
        "router_disagreement": float(flip.mean()) if len(flip) else np.nan,
        "margin_flipped_mean": float(margin[flip].mean()) if flip.any() else np.nan,
        "margin_unflipped_mean": float(margin[~flip].mean()) if (~flip).any() else np.nan,
    }


def routing_lines(table: pd.DataFrame, summary: pd.DataFrame, reference: str) -> list[str]:
    """One line per candidate: its router disagreement and how much of the gap sits where routing flipped."""
    if table.empty:
        return []
    from crossengine.compare.summary import pooled_rows

    pooled = pooled_rows(summary)
    by_name = dict(zip(display_names(pooled), pooled.to_dict("records")))
    out = []
    for _, r in table[table["layer"] == -1].iterrows():
        s = by_name.get(r["candidate"], {})
        first = f"first flip in layer {int(r['first_flip_layer'])}" if r["first_flip_layer"] >= 0 else "no flip"
        gap = (
            f"; mean |Δlp| {s['abs_mean_flipped']:.3g} where routing flipped vs {s['abs_mean_unflipped']:.3g} where it did not"
            if s and pd.notna(s.get("abs_mean_flipped")) and pd.notna(s.get("abs_mean_unflipped"))
            else ""
        )
        out.append(
            f"routing: {r['candidate']} vs {reference}: {100 * r['router_disagreement']:.2f} % of router decisions differ, "
            f"{100 * r['frac_positions_flipped']:.1f} % of positions in at least one layer ({first}){gap}"
        )
    return out
