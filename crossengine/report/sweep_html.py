"""A sweep's report page: each metric against each axis, one line per candidate and other axes' values.

Reads `index.parquet` only (the members' pooled summary rows), so it is rewritten in a second
from a finished or partly finished sweep; members that failed are listed with their one line.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from crossengine.compare.summary import SPLITS
from crossengine.identity import display_names
from crossengine.report.page import figure, html_table, page

METRICS = ("gen_kl_error", "abs_mean", "kl_mean", "top1_agreement", "token_mult_prob_error", "mismatch_kl")
NOT_AXES = {"member", "status", "message", "run_dir"}


def axes_of(index: pd.DataFrame) -> list[str]:
    """The axis columns: those between `member` and `status` (write_index puts them there)."""
    cols = list(index.columns)
    return cols[cols.index("member") + 1 : cols.index("status")]


def sweep_report(root: Path, out: Path | None = None) -> Path:
    import plotly.graph_objects as go

    from crossengine.results import write_text

    root = Path(root)
    index = pd.read_parquet(root / "index.parquet")
    axes = axes_of(index)
    members = index.drop_duplicates("member")[["member", *axes, "status", "message"]]
    sections = [("Members", html_table(members))]
    pooled = index[index["n_tokens"].notna()] if "n_tokens" in index else index.iloc[0:0]
    if len(pooled):
        pooled = pooled[(pooled[list(SPLITS)] == "all").all(axis=1)].copy()
        pooled["candidate"] = display_names(pooled)
    charts = []
    for metric in METRICS:
        if metric not in pooled or not len(pooled):
            continue
        for axis in axes:
            order = list(dict.fromkeys(index.drop_duplicates("member")[axis]))  # the sweep's own order of labels
            fig = go.Figure()
            others = [a for a in axes if a != axis]
            for key, group in pooled.groupby(["candidate", *others], sort=True):
                key = key if isinstance(key, tuple) else (key,)
                g = group.set_index(axis).reindex(order)
                label = " ".join([str(key[0]), *(f"{n}={v}" for n, v in zip(others, key[1:]))])
                fig.add_trace(go.Scatter(x=order, y=g[metric], mode="lines+markers", name=label))
            fig.update_layout(title=f"{metric} by {axis}", xaxis_title=axis, yaxis_title=metric, height=340)
            charts.append(figure(fig, f"{metric}-by-{axis}".replace("/", "-")))
    note = f"<p class='note'>pooled rows (every split at all) of {len(pooled)} member × candidate pairs; one line per candidate and the other axes' values.</p>"
    sections.append(("Metrics by axis", note + "".join(charts) if charts else "<p class='note'>no member finished: nothing to plot.</p>"))
    out = Path(out) if out else root / "report.html"
    write_text(out, page(f"crossengine sweep: {html.escape(root.name)}", sections))
    return out
