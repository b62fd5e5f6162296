"""HTML reports: a run, two runs side by side, an RL monitor — each one self-contained file.

plotly's JavaScript is inlined once per page, so the file opens offline and can be attached
to an issue. Everything is read from the run folder's Parquet and run.json, never from a
live run: `crossengine report RUN --html` regenerates a report at any time.

Large runs stay usable: per-token charts are drawn for at most `MAX_SAMPLES` samples (those
with the largest divergence, each chart binned to at most `MAX_POINTS` positions by max),
and the page says so; tables and breakdowns always cover every token.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from crossengine.compare.inputs import differing_inputs, read_inputs
from crossengine.compare.summary import SPLITS, read_tokens
from crossengine.identity import display_names
from crossengine.report.page import (
    MAX_SAMPLES,
    figure,
    html_table,
    page,
    pooled_summary,
)
from crossengine.report.sections import (
    inputs_section,
    localisation_section,
    nearest_section,
    noise_section,
    refit_section,
    routing_section,
)
from crossengine.report.worst import alarms_section, worst_section
from crossengine.run_meta import RunMeta

MAX_POINTS = 2048
SUMMARY_COLUMNS = [
    "n_tokens",
    "top1_agreement",
    "abs_max",
    "abs_mean",
    "kl_mean",
    "kl_max",
    "cos_sim",
    "token_mult_prob_error",
    "gen_kl_error",
    "policy_kl_error",
    "js_divergence_error",
    "rollout_probs_diff_max",
    "rollout_corr/k3_kl",
    "train_rollout_logprob_abs_diff",
    "mismatch_kl",
    "vllm_kl",
    "first_divergent_position",
    "n_nonfinite",
]


# --------------------------------------------------------------------------- page parts


# --------------------------------------------------------------------------- one run


def run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write (and return) the HTML report of a finished run (of a `crossengine localize` run: its localisation alone)."""
    from crossengine.results import write_text

    run_dir = Path(run_dir)
    meta = RunMeta.read(run_dir)
    if not (run_dir / "summary.parquet").exists():
        out = Path(out) if out else run_dir / "report.html"
        write_text(out, page(f"crossengine: {meta.run_id}", [("Run", _run_section(meta)), ("Localisation", localisation_section(run_dir, meta))]))
        return out
    summary = pd.read_parquet(run_dir / "summary.parquet")
    sections = [("Run", _run_section(meta))]
    inputs = read_inputs(run_dir)
    if inputs is not None:  # input differences come first: they explain what follows
        sections.append(("Inputs", inputs_section(inputs)))
    sections.append(("Summary", _summary_section(summary)))
    tokens_dir = run_dir / "tokens"
    tokens = _read_tokens(tokens_dir) if tokens_dir.exists() else pd.DataFrame()
    if not tokens.empty:
        sections.append(("Along the sequence", _per_sample_section(tokens)))
    if (run_dir / "noise.parquet").exists():
        sections.append(("Noise floor", noise_section(summary, pd.read_parquet(run_dir / "noise.parquet"), meta)))
    if (run_dir / "routing.parquet").exists():
        sections.append(("MoE routing", routing_section(run_dir, summary, meta, tokens)))
    if (run_dir / "alarms.parquet").exists():
        sections.append(("Alarms", alarms_section(pd.read_parquet(run_dir / "alarms.parquet"), tokens)))
    sections.append(("Breakdown", _breakdown_section(summary)))
    if meta.variants:
        sections.append(("Ablation", _ablation_section(summary, meta.reference, differing_inputs(inputs))))
    if (run_dir / "nearest.parquet").exists():
        sections.append(("Nearest engine", nearest_section(pd.read_parquet(run_dir / "nearest.parquet"))))
    if (run_dir / "layers.parquet").exists() or (run_dir / "buffers.parquet").exists():
        sections.append(("Localisation", localisation_section(run_dir, meta)))
    if meta.refit:
        sections.append(("Weight sync", refit_section(run_dir, meta)))
    if meta.stages.get("total"):
        sections.append(("Where the time went", html_table(pd.DataFrame([{"stage": k, "seconds": v, "share": v / meta.stages["total"]} for k, v in meta.stages.items() if k != "total"]))))
    if (run_dir / "greedy").exists():
        sections.append(("Greedy decoding", html_table(pd.read_parquet(run_dir / "greedy"))))
    if not tokens.empty:
        sections.append(("Worst tokens", worst_section(tokens, meta, run_dir / "worst")))
    out = Path(out) if out else run_dir / "report.html"
    write_text(out, page(f"crossengine: {meta.run_id}", sections))
    return out


def _read_tokens(tokens_dir: Path) -> pd.DataFrame:

    cols = [
        "sample_id",
        "position",
        "token_text",
        "modality",
        "attention",
        "segment",
        "cand_engine",
        "variant",
        "lp_ref",
        "lp_cand",
        "abs_lp_diff",
        "gen_kl",
        "kl_ref_cand",
        "topk_kl",
        "top1_ref",
        "top1_cand",
        "top1_match",
        "top1_tie",
        "nonfinite",
    ]
    import pyarrow.dataset as ds

    present = set(ds.dataset(tokens_dir, format="parquet").schema.names)
    cols += [c for c in ("noise_ref", "noise_cand", "above_noise") if c in present]  # runs of schema version 3 on
    df = read_tokens(tokens_dir, cols)
    df["kl"] = df["kl_ref_cand"].fillna(df["topk_kl"])
    # what tokens and samples are ranked by: KL where a side gave a distribution, else |Δlp| (two dumps of sampled log-probs)
    df["rank_by"] = df["kl"].fillna(df["abs_lp_diff"]) if df["kl"].notna().any() else df["abs_lp_diff"]
    if "noise_ref" in df:  # the larger of the two engines' own floors at each token (above_noise compares with it)
        df["floor"] = df[["noise_ref", "noise_cand"]].max(axis=1, skipna=True)
    df["instance"] = display_names(df)
    return df


def _run_section(meta: RunMeta) -> str:
    exp = meta.experiment
    rows = []
    for name, info in meta.engines.items():
        spec = {**exp.get("engines", {}), **exp.get("variants", {})}.get(name, {})
        env = spec.get("env") or {}
        rows.append(
            {
                "engine": name,
                "role": "reference" if name == meta.reference else "candidate",
                "type": info.get("engine"),
                "versions": ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()),
                "device": info.get("device"),
                "dtype": info.get("dtype"),
                "environment": ", ".join(env.get("pip") or []) or env.get("python") or "this one",
                "gpus": ",".join(info.get("gpu_ids") or info.get("extra", {}).get("gpu_ids", [])) or "-",  # extra: runs before typed EngineInfo
            }
        )
    head = (
        f"<p>model <b>{html.escape(str(exp.get('model')))}</b>, reference <b>{html.escape(meta.reference)}</b>, "
        f"{meta.n_samples} samples, mode {html.escape(str(exp.get('mode', 'score')))}, status {html.escape(meta.status)}, "
        f"crossengine {html.escape(meta.crossengine_version)} ({html.escape((meta.git_sha or '')[:10])})</p>"
    )
    errors = pd.DataFrame(meta.errors)
    err = f"<h3>Errors and skipped samples ({len(errors)})</h3>" + html_table(errors) if len(errors) else "<p class='note'>no errors, no skipped samples</p>"
    return head + html_table(pd.DataFrame(rows)) + err


def _summary_section(summary: pd.DataFrame) -> str:
    df = summary.copy()
    df.insert(0, "candidate", display_names(df))
    df.insert(1, "split", [", ".join(f"{k}={r[k]}" for k in SPLITS if str(r[k]) != "all") or "all" for _, r in df.iterrows()])
    cols = ["candidate", "split"] + [c for c in SUMMARY_COLUMNS if c in df.columns]
    return "<p class='note'>click a column to sort; RL metrics under their frameworks' names (docs/reference/metrics.md)</p>" + html_table(df[cols], "summary")


def _bin_max(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions beyond n points binned, keeping each bin's max: spikes survive."""
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n + 1).astype(int)
    return x[edges[:-1]], np.maximum.reduceat(np.nan_to_num(y, nan=-np.inf), edges[:-1])


def _spans(mask: np.ndarray, positions: np.ndarray) -> list[tuple[float, float]]:
    out, start = [], None
    for p, m in zip(positions, mask):
        if m and start is None:
            start = p
        if not m and start is not None:
            out.append((start - 0.5, p - 0.5))
            start = None
    if start is not None:
        out.append((start - 0.5, positions[-1] + 0.5))
    return out


def _per_sample_section(tokens: pd.DataFrame) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    has_kl = bool(tokens["kl"].notna().any())
    worst = tokens.groupby("sample_id", observed=True)["rank_by"].max().sort_values(ascending=False)
    chosen = list(worst.index[:MAX_SAMPLES])
    order = [s for s in tokens["sample_id"].cat.categories if s in chosen] if hasattr(tokens["sample_id"], "cat") else chosen
    panels = ((1, "abs_lp_diff"), (2, "kl")) if has_kl else ((1, "abs_lp_diff"),)  # no KL anywhere: no empty chart for it
    titles = ("|Δ log-prob| of the scored token", "per-token KL(ref‖cand)")[: len(panels)]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles)
    per_sample_traces: list[list[int]] = []
    shapes_of: list[list[dict]] = []
    binned = False
    for si, sid in enumerate(order):
        rows = tokens[tokens["sample_id"] == sid]
        idx = []
        for inst, g in rows.groupby("instance", sort=True):
            g = g.sort_values("position")
            x = g["position"].to_numpy()
            for r, col in panels:
                xs, ys = _bin_max(x, g[col].to_numpy(dtype=float), MAX_POINTS)
                binned |= len(xs) < len(x)
                text = g["token_text"].astype(str).to_numpy()[: len(xs)] if len(xs) == len(x) else None
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines+markers",
                        name=inst,
                        legendgroup=inst,
                        showlegend=r == 1,
                        visible=si == 0,
                        text=text,
                        hovertemplate="pos %{x}: %{text}<br>%{y:.3g}<extra>" + html.escape(inst) + "</extra>",
                        marker=dict(size=4),
                    ),
                    row=r,
                    col=1,
                )
                idx.append(len(fig.data) - 1)
            if "floor" in g and g["floor"].notna().any():  # the noise floor beside the divergence, same colour group, dashed
                xs, ys = _bin_max(x, g["floor"].to_numpy(dtype=float), MAX_POINTS)
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines",
                        name=f"{inst}: noise floor",
                        legendgroup=inst,
                        visible=si == 0,
                        line=dict(dash="dash", width=1),
                        hovertemplate="pos %{x}: floor %{y:.3g}<extra>" + html.escape(inst) + "</extra>",
                    ),
                    row=1,
                    col=1,
                )
                idx.append(len(fig.data) - 1)
        per_sample_traces.append(idx)
        first = rows.drop_duplicates("position").sort_values("position")
        shapes = [
            dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0, y1=1, fillcolor="rgba(255,165,0,0.18)", line_width=0, layer="below")
            for a, b in _spans((first["modality"].astype(str) == "image").to_numpy(), first["position"].to_numpy())
        ]
        shapes += [
            dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0.97, y1=1.0, fillcolor="rgba(128,0,128,0.5)", line_width=0)
            for a, b in _spans((first["attention"].astype(str) == "bidirectional").to_numpy(), first["position"].to_numpy())
        ]
        mism = rows[~(rows["top1_match"].fillna(True).astype(bool) | rows["top1_tie"].fillna(False).astype(bool))]  # null: no top-1 on a side
        if len(mism):
            p = int(mism["position"].min())
            shapes.append(dict(type="line", xref="x", yref="paper", x0=p, x1=p, y0=0, y1=1, line=dict(color="red", dash="dot")))
        shapes_of.append(shapes)
    buttons = []
    for si, sid in enumerate(order):
        visible = [False] * len(fig.data)
        for i in per_sample_traces[si]:
            visible[i] = True
        buttons.append(dict(label=str(sid), method="update", args=[{"visible": visible}, {"shapes": shapes_of[si]}]))
    fig.update_layout(
        height=280 * len(panels),
        shapes=shapes_of[0] if shapes_of else [],
        legend=dict(orientation="h"),
        updatemenus=[dict(buttons=buttons, direction="down", x=0, xanchor="left", y=1.15, yanchor="top")],
    )
    for r, _ in panels:
        fig.update_yaxes(type="log", row=r, col=1)
    n = tokens["sample_id"].nunique()
    note = (
        "<p class='note'>sample selector (top left); orange: image tokens; purple band: bidirectional attention (reference's mask); "
        "red dotted: first top-1 mismatch that is not a tie; hover for the token. "
    )
    if "floor" in tokens and tokens["floor"].notna().any():
        note += "Dashed: the larger of the two engines' own noise floors at that token (a |Δ| above it is above noise). "
    if not has_kl:
        note += "No KL chart: neither engine gave a distribution (full logits or top-k) for these tokens, so |Δ log-prob| is what there is. "
    if n > len(order):
        note += f"Showing the {len(order)} of {n} samples with the largest {'KL' if has_kl else '|Δ log-prob|'}; every table on this page covers all of them. "
    if binned:
        note += f"Long samples are binned to {MAX_POINTS} points (max per bin). "
    return note + "</p>" + figure(fig, "per-sample")


def _breakdown_section(summary: pd.DataFrame) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = summary.copy()
    for c in ("cand_engine", "variant", *SPLITS):
        df[c] = df[c].astype(str)
    df["candidate"] = display_names(df)
    present = [k for k in SPLITS if (df[k] != "all").any()]
    if not present:
        return "<p class='note'>no splits</p>"
    metric, label = ("kl_mean", "KL mean") if df["kl_mean"].notna().any() else ("abs_mean", "mean |Δ log-prob|")  # no KL anywhere: what exists
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[f"{label} by {k}" for k in present])
    for col, key in enumerate(present, start=1):
        others = [k for k in SPLITS if k != key]
        part = df[(df[key] != "all") & np.logical_and.reduce([df[k] == "all" for k in others])]
        for cand, g in part.groupby("candidate", sort=True):
            fig.add_trace(go.Bar(x=g[key], y=g[metric], name=cand, legendgroup=cand, showlegend=col == 1), row=1, col=col)
    fig.update_layout(height=360, barmode="group")
    fig.update_yaxes(type="log")  # fp32 noise (1e-12) and bf16 (1e-3) on one chart
    note = "" if metric == "kl_mean" else "<p class='note'>no KL: neither engine gave a distribution; the bars are the mean |Δ log-prob|.</p>"
    return note + figure(fig, "breakdown")


def _ablation_section(summary: pd.DataFrame, reference: str, differing: dict[str, str]) -> str:
    import plotly.graph_objects as go

    pooled = pooled_summary(summary).sort_values("kl_mean")
    names = display_names(pooled)
    text = [f"top-1 {a:.3f}" + (f"; inputs differ: {differing[n]}" if differing.get(n) else "") for a, n in zip(pooled["top1_agreement"], names)]
    fig = go.Figure(go.Bar(x=pooled["kl_mean"], y=names, orientation="h", text=text))
    fig.update_layout(title=f"KL mean vs {reference}: which difference matters", height=120 + 30 * len(names), xaxis_type="log")
    return figure(fig, "ablation")


# --------------------------------------------------------------------------- two runs


# --------------------------------------------------------------------------- RL monitor
