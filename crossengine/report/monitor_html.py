"""An RL monitor's output folder (KLMonitor's steps and alarms) as a page."""

from __future__ import annotations

from pathlib import Path

from crossengine.compare.summary import read_tokens
from crossengine.report.page import figure, html_table, page


def monitor_report(out_dir: Path, out: Path | None = None) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from crossengine.monitor import read_thresholds
    from crossengine.report.monitor_view import SHOWN, read_steps
    from crossengine.results import write_text

    steps = read_steps(out_dir)
    thresholds = read_thresholds(out_dir)
    cols = [c for c in SHOWN if c in steps.columns]
    fig = make_subplots(rows=len(cols), cols=1, shared_xaxes=True, subplot_titles=cols, vertical_spacing=0.04)
    over_steps: set[int] = set()
    for i, c in enumerate(cols, start=1):
        fig.add_trace(go.Scatter(x=steps["step"], y=steps[c], mode="lines+markers", name=c, showlegend=False), row=i, col=1)
        if c in thresholds:
            over = steps[steps[c] > thresholds[c]]
            over_steps |= set(int(s) for s in over["step"])
            fig.add_hline(y=thresholds[c], line_dash="dot", line_color="red", row=i, col=1)
            fig.add_trace(go.Scatter(x=over["step"], y=over[c], mode="markers", marker=dict(color="red", size=10, symbol="x"), name=f"{c} over {thresholds[c]:g}", showlegend=False), row=i, col=1)
    fig.update_layout(height=200 * max(1, len(cols)), title="per step; red: over the threshold (dotted)")
    sections = [
        ("Steps", figure(fig, "monitor")),
        ("Every step", html_table(steps[["step", *cols, "n_tokens"]] if "n_tokens" in steps else steps[["step", *cols]], row_class=lambda r: "bad" if int(r["step"]) in over_steps else "")),
    ]
    worst_dir = Path(out_dir) / "worst"
    if worst_dir.exists() and any(worst_dir.glob("*.parquet")):
        worst = read_tokens(worst_dir)
        shown = sorted(over_steps)[-10:] or [int(steps["step"].max())]
        for s in shown:
            sections.append((f"Worst tokens of step {s}", html_table(worst[worst["step"] == s].drop(columns=["step"]))))
    out = Path(out) if out else Path(out_dir) / "monitor.html"
    write_text(out, page(f"crossengine monitor: {out_dir}", sections))
    return out
