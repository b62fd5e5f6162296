"""Two runs side by side (`crossengine compare A B`) as a page."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from crossengine.report.page import figure, html_table, page


def compare_report(a: Path, b: Path, table: pd.DataFrame, out: Path) -> Path:
    import plotly.graph_objects as go

    from crossengine.results import write_text

    pooled = table[table["split"] == "all"]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=pooled["candidate"], y=pooled["kl_mean_a"], name=f"A: {Path(a).name}"))
    fig.add_trace(go.Bar(x=pooled["candidate"], y=pooled["kl_mean_b"], name=f"B: {Path(b).name}"))
    fig.update_layout(barmode="group", yaxis_type="log", title="KL mean per candidate, before (A) and after (B)", height=380)
    sections = [
        ("Before and after", f"<p>A: {html.escape(str(a))}<br>B: {html.escape(str(b))}</p>" + figure(fig, "compare")),
        ("Every split", html_table(table, row_class=lambda r: "bad" if r["status"] != "both" else "")),
    ]
    write_text(out, page(f"crossengine compare: {Path(a).name} vs {Path(b).name}", sections))
    return out
