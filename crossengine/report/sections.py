"""The run report's sections for the analyses an experiment may ask for: routing, noise floor, nearest
engines, input parity, localisation, weight sync.

Why apart: each reads its own file of the run folder and is absent from the page when the run
did not ask for it; the core sections (summary, per sample, worst tokens) are in html.py.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from crossengine.compare.inputs import first_differences
from crossengine.compare.refit import refit_line
from crossengine.identity import display_name, display_names
from crossengine.report.page import MAX_SAMPLES, figure, html_table, pooled_summary
from crossengine.run_meta import RunMeta


def routing_section(run_dir: Path, summary: pd.DataFrame, meta: RunMeta, tokens: pd.DataFrame) -> str:
    """Per candidate: its router disagreement per layer, and a layers × positions flip map of its sample with the most flips, |Δlp| above it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from crossengine.compare.routing_summary import read_routing, routing_lines

    table = pd.read_parquet(run_dir / "routing.parquet")
    lines = "".join(f"<li>{html.escape(x)}</li>" for x in routing_lines(table, summary, meta.reference))
    out = (
        "<p class='note'>a flip: the two engines' routers chose different sets of experts for that input position and layer; "
        "the margin is the reference's k-th minus (k+1)-th router logit (docs/guides/moe-routing.md)</p>" + f"<ul>{lines}</ul>" + html_table(table)
    )
    routing = read_routing(run_dir / "routing")
    if routing is None or not routing["flip"].any():
        return out + "<p class='note'>no flips: every candidate routed every position as the reference did</p>"
    for n, (cand, g) in enumerate(routing[routing["flip"]].groupby("candidate", sort=False)):
        if n >= MAX_SAMPLES:
            break
        sid = g["sample_id"].value_counts().idxmax()
        one = routing[(routing["candidate"] == cand) & (routing["sample_id"] == sid)]
        grid = one.pivot_table(index="layer", columns="position", values="flip", aggfunc="max").astype(float)
        fig = make_subplots(
            rows=2,
            cols=1,
            shared_xaxes=True,
            row_heights=[0.35, 0.65],
            vertical_spacing=0.06,
            subplot_titles=(f"|Δ log-prob| of the token each position predicts ({cand}, sample {sid})", "routing flips (layer × input position)"),
        )
        rows = tokens[(tokens["instance"] == cand) & (tokens["sample_id"].astype(str) == sid)].sort_values("position") if not tokens.empty else tokens
        if len(rows):
            fig.add_trace(go.Scatter(x=rows["position"] - 1, y=rows["abs_lp_diff"], mode="lines+markers", name="|Δlp|", marker=dict(size=4)), row=1, col=1)
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=grid.columns.to_numpy(),
                y=grid.index.to_numpy(),
                colorscale=[[0, "#f4f4f4"], [1, "#c0392b"]],
                showscale=False,
                hovertemplate="layer %{y}, position %{x}: flip %{z}<extra></extra>",
            ),
            row=2,
            col=1,
        )
        fig.update_layout(height=420, showlegend=False)
        out += figure(fig, f"routing-{n}")
    return out


def noise_section(summary: pd.DataFrame, floors: pd.DataFrame, meta: RunMeta) -> str:
    """Each pair's share of tokens above both floors, each engine's floor per condition, and the `expect` verdicts."""
    from crossengine.compare.floor import pair_lines

    pooled = pooled_summary(summary)
    pairs = pd.DataFrame({"candidate": display_names(pooled), "tokens above noise": pooled.get("n_above_noise"), "of": pooled["n_tokens"], "frac_above_noise": pooled.get("frac_above_noise")})
    lines = pair_lines(summary, floors, meta.reference) + meta.expectations.get("notes", []) + [f"error: {x}" for x in meta.expectations.get("failed", [])]
    cols = ["engine", "condition", "n_tokens", "n_differ", "bitwise", "distinct_max", "max_abs_diff", "mean_abs_diff", "max_kl", "first_sample", "first_position", "first_token"]
    said = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
    return (
        "<p class='note'>each engine scored its batches again under its noise conditions (docs/guides/noise-floor.md); a token is above noise "
        "where |Δ log-prob| exceeds the larger of the two engines' floors there (× noise.margin)</p>"
        f"<ul>{said}</ul>" + html_table(pairs) + "<h3>Each engine's own floor, per condition</h3>" + html_table(floors[[c for c in cols if c in floors]])
    )


def nearest_section(nearest: pd.DataFrame) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if nearest.empty:
        return "<p class='note'>fewer than two candidates share positions</p>"
    modalities = list(dict.fromkeys(nearest["modality"].astype(str)))
    fig = make_subplots(rows=1, cols=len(modalities), subplot_titles=[f"max |Δlp| at {m} tokens" for m in modalities])
    for col, m in enumerate(modalities, start=1):
        g = nearest[nearest["modality"].astype(str) == m]
        wide = g.pivot_table(index="candidate", columns="other", values="max_abs_diff", aggfunc="first", observed=True)
        z = wide.to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                z=np.log10(np.clip(z, 1e-12, None)),
                customdata=z,
                x=list(wide.columns),
                y=list(wide.index),
                colorscale="Viridis",
                showscale=col == 1,
                colorbar=dict(title="log10"),
                hovertemplate="%{y} vs %{x}: %{customdata:.3g}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_layout(height=360)
    return figure(fig, "nearest") + html_table(nearest)


def inputs_section(inputs: pd.DataFrame) -> str:
    """Candidates with `inputs: own`: every input that differs from the reference's, first difference per sample on top."""

    differ = inputs[inputs["status"] != "equal"]
    if differ.empty:
        return f"<p class='note'>every input of {inputs['cand_engine'].nunique()} candidate(s) with inputs: own equals the reference's</p>"
    lines = []
    for (cand, variant), rows in differ.groupby(["cand_engine", "variant"], sort=True, observed=True):
        lines += [f"{display_name(cand, variant)}: {line}" for line in first_differences(rows.to_dict("records"))]
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    cols = [
        "cand_engine",
        "variant",
        "sample_id",
        "input",
        "status",
        "first_difference",
        "ref_token",
        "cand_token",
        "ref_context",
        "cand_context",
        "max_abs_diff",
        "mean_abs_diff",
        "detail",
        "scored",
        "own_prompt_tokens",
        "own_prompt_abs_lp_diff_mean",
    ]
    rows = f"<details><summary>every differing input, per sample ({len(differ)} rows)</summary>{html_table(differ[cols])}</details>"
    return html_table(inputs_matrix(inputs)) + f"<ul>{items}</ul>" + rows


def inputs_matrix(inputs: pd.DataFrame) -> pd.DataFrame:
    """Candidate x input: equal everywhere, or on how many samples it differs (and the largest |Δ|)."""
    df = inputs.assign(candidate=display_names(inputs))
    cells: dict[str, dict[str, str]] = {}
    for (cand, name), g in df.groupby(["candidate", "input"], sort=False):
        off = g[g["status"] != "equal"]
        if off.empty:
            cell = "equal"
        else:
            cell = f"{'; '.join(sorted(set(off['status'])))} on {off['sample_id'].nunique()}/{g['sample_id'].nunique()}"
            if off["max_abs_diff"].notna().any():
                cell += f", max |Δ| {off['max_abs_diff'].max():.3g}"
        cells.setdefault(cand, {})[name] = cell
    return pd.DataFrame.from_dict(cells, orient="index").fillna("-").rename_axis("candidate").reset_index()


def localisation_section(run_dir: Path, meta: RunMeta) -> str:
    import plotly.graph_objects as go

    from crossengine.compare.localize import first_divergence

    parts = []
    tol = (meta.experiment.get("localize") or {}).get("tolerance", 1e-4)
    if (run_dir / "layers.parquet").exists():
        layers = pd.read_parquet(run_dir / "layers.parquet")
        fig = go.Figure()
        firsts = []
        for (cand, variant), g in layers.groupby(["cand_engine", "variant"], sort=False):
            per = g.groupby(["order", "module"], sort=True)["max_abs_diff"].max().reset_index()
            name = display_name(str(cand), str(variant))
            fig.add_trace(
                go.Scatter(
                    x=per["order"],
                    y=per["max_abs_diff"].clip(lower=1e-12),
                    mode="lines+markers",
                    name=name,
                    text=per["module"],
                    hovertemplate="%{text}: %{y:.3g}<extra>" + html.escape(name) + "</extra>",
                )
            )
            first = first_divergence(g, tol)
            if first is not None:
                firsts.append(
                    {
                        "candidate": name,
                        "module": first["module"],
                        "candidate's module": first.get("cand_module"),
                        "position": first["first_position"],
                        "max |Δ|": first["max_abs_diff"],
                        "origin": first["origin"],
                    }
                )
                fig.add_trace(
                    go.Scatter(
                        x=[first["order"]],
                        y=[max(first["max_abs_diff"], 1e-12)],
                        mode="markers",
                        marker=dict(size=14, symbol="x", color="red"),
                        name=f"{name}: first over {tol:g}",
                        hovertext=str(first["module"]),
                    )
                )
        fig.add_hline(y=tol, line_dash="dot", annotation_text=f"tolerance {tol:g}")
        fig.update_layout(title="max |Δ| of each module's output, in the reference's forward order", yaxis_type="log", height=420)
        parts.append(figure(fig, "layers") + html_table(pd.DataFrame(firsts)))
    if (run_dir / "localize.parquet").exists():
        parts.append(growth_figure(pd.read_parquet(run_dir / "localize.parquet")))
    if (run_dir / "buffers.parquet").exists():
        buffers = pd.read_parquet(run_dir / "buffers.parquet")
        bad = buffers[~buffers["ok"]]
        parts.append(f"<h3>Weight and buffer audit: {len(buffers)} checked, {len(bad)} with problems</h3>" + html_table(bad.drop(columns=["shape"], errors="ignore")))
    return "".join(parts)


def growth_figure(growth: pd.DataFrame) -> str:
    """The error-growth chart: per candidate, the residual stream's relative error after each layer (worst sample), its
    blocks' as dotted lines, the logits as the last point: one gap at one layer, or one that compounds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (cand, variant), g in growth.groupby(["cand_engine", "variant"], sort=False):
        name = display_name(str(cand), str(variant))
        per = g.groupby(["part", "layer"])["rel_error"].max()
        for part, dash in (("residual", "solid"), ("attention", "dot"), ("mlp", "dash"), ("logits", None)):
            if part not in per.index.get_level_values(0):
                continue
            line = per.loc[part]
            label = f"{name}: {'residual stream' if part == 'residual' else part}"
            mode = "markers" if part == "logits" else "lines+markers"
            fig.add_trace(
                go.Scatter(x=list(line.index), y=line.clip(lower=1e-12).values, mode=mode, name=label, line=dict(dash=dash) if dash else None, marker=dict(size=11 if part == "logits" else 6))
            )
    fig.update_layout(title="error growth: relative error ‖cand − ref‖ / ‖ref‖ after each layer (last point: the logits)", xaxis_title="layer", xaxis_dtick=1, yaxis_type="log", height=420)
    return figure(fig, "growth")


def refit_section(run_dir: Path, meta: RunMeta) -> str:
    """Each `refit:` engine, step by step, against a fresh load of the same checkpoint, and what the audits found."""
    lines = [refit_line(name, s) for name, steps in meta.refit.items() for s in steps]
    steps = pd.DataFrame(
        [
            {"engine": name, **{k: v for k, v in s.items() if k not in ("findings", "first")}, "first": "" if s["first"] is None else f"{s['first']['sample_id']} @ {s['first']['position']}"}
            for name, steps in meta.refit.items()
            for s in steps
        ]
    )
    audit = run_dir / "refit_params.parquet"
    found = pd.read_parquet(audit) if audit.exists() else pd.DataFrame()
    said = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
    return (
        "<p class='note'>each engine loaded its own model, scored, took each checkpoint in place and scored again; after the last batch each checkpoint "
        "was loaded fresh in the same worker (docs/guides/weight-sync.md). refit.parquet holds every token of both</p>"
        f"<ul>{said}</ul>" + html_table(steps) + ("<h3>Audit findings</h3>" + html_table(found) if not found.empty else "<p class='note'>the audits found nothing</p>")
    )
