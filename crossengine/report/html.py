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
from typing import Any

import numpy as np
import pandas as pd

from crossengine.compare.inputs import differing_inputs, first_differences, read_inputs
from crossengine.compare.summary import SPLITS, pooled_rows, read_tokens
from crossengine.identity import SAMPLED, display_name, display_names
from crossengine.run_meta import RunMeta

MAX_SAMPLES = 20
MAX_POINTS = 2048
CONTEXT = 8
SUMMARY_COLUMNS = [
    "n_tokens", "top1_agreement", "abs_max", "abs_mean", "kl_mean", "kl_max", "cos_sim",
    "token_mult_prob_error", "gen_kl_error", "policy_kl_error", "js_divergence_error",
    "rollout_probs_diff_max", "rollout_corr/k3_kl", "train_rollout_logprob_abs_diff", "mismatch_kl", "vllm_kl",
    "first_divergent_position", "n_nonfinite",
]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4;cursor:pointer}td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:13px}.bad{color:#b00}.ctx{font-family:monospace;text-align:left;white-space:pre}
"""
# Errors are counted on the page itself, so a headless browser (and a test) can read them.
_ERRORS = "<script>document.documentElement.dataset.jsErrors='0';window.addEventListener('error',function(){var d=document.documentElement.dataset;d.jsErrors=String(+d.jsErrors+1)});</script>"
_SORT = """<script>
function sortTable(th){var t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0],asc=th.dataset.asc!=='1';
var rows=[...b.rows].sort(function(x,y){var p=x.cells[i].dataset.v??x.cells[i].innerText,q=y.cells[i].dataset.v??y.cells[i].innerText,a=parseFloat(p),c=parseFloat(q);
var r=(isNaN(a)||isNaN(c))?p.localeCompare(q):a-c;return asc?r:-r});rows.forEach(function(r){b.appendChild(r)});th.dataset.asc=asc?'1':'0'}
</script>"""


# --------------------------------------------------------------------------- page parts


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    import plotly.offline

    body = "".join(f'<section id="{_slug(h)}"><h2>{html.escape(h)}</h2>{content}</section>' for h, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_ERRORS}<style>{_STYLE}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script>{_SORT}</head><body><h1>{html.escape(title)}</h1>{body}"
        "<script>document.documentElement.dataset.rendered='1'</script></body></html>"
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _fig(fig, div_id: str) -> str:
    fig.update_layout(margin=dict(l=50, r=20, t=40, b=40), template="plotly_white")
    return f'<div class="chart" id="{div_id}">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{div_id}-plot") + "</div>"


def _fmt(v: Any) -> tuple[str, str]:
    """(shown text, sort value) of one cell."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-", ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)), str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v)), str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}", repr(float(v))
    return html.escape(str(v)), html.escape(str(v))


def _table(df: pd.DataFrame, cls: str = "", row_class=None) -> str:
    if df.empty:
        return "<p class='note'>none</p>"
    head = "".join(f"<th onclick='sortTable(this)'>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            shown, key = _fmt(r[c])
            cells.append(f"<td data-v='{key}'>{shown}</td>" if key != shown else f"<td>{shown}</td>")
        klass = f" class='{row_class(r)}'" if row_class and row_class(r) else ""
        rows.append(f"<tr{klass}>{''.join(cells)}</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _pooled(summary: pd.DataFrame) -> pd.DataFrame:
    df = summary.copy()
    for c in ("cand_engine", "variant", *SPLITS):
        df[c] = df[c].astype(str)
    return pooled_rows(df)


# --------------------------------------------------------------------------- one run


def run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write (and return) the HTML report of a finished run."""
    from crossengine.results import write_text

    run_dir = Path(run_dir)
    meta = RunMeta.read(run_dir)
    summary = pd.read_parquet(run_dir / "summary.parquet")
    sections = [("Run", _run_section(meta))]
    inputs = read_inputs(run_dir)
    if inputs is not None:  # input differences come first: they explain what follows
        sections.append(("Inputs", _inputs_section(inputs)))
    sections.append(("Summary", _summary_section(summary)))
    tokens_dir = run_dir / "tokens"
    tokens = _read_tokens(tokens_dir) if tokens_dir.exists() else pd.DataFrame()
    if not tokens.empty:
        sections.append(("Along the sequence", _per_sample_section(tokens)))
    if (run_dir / "noise.parquet").exists():
        sections.append(("Noise floor", _noise_section(summary, pd.read_parquet(run_dir / "noise.parquet"), meta)))
    if (run_dir / "routing.parquet").exists():
        sections.append(("MoE routing", _routing_section(run_dir, summary, meta, tokens)))
    if (run_dir / "alarms.parquet").exists():
        sections.append(("Alarms", _alarms_section(pd.read_parquet(run_dir / "alarms.parquet"), tokens)))
    sections.append(("Breakdown", _breakdown_section(summary)))
    if meta.variants:
        sections.append(("Ablation", _ablation_section(summary, meta.reference, differing_inputs(inputs))))
    if (run_dir / "nearest.parquet").exists():
        sections.append(("Nearest engine", _nearest_section(pd.read_parquet(run_dir / "nearest.parquet"))))
    if (run_dir / "layers.parquet").exists() or (run_dir / "buffers.parquet").exists():
        sections.append(("Localisation", _localisation_section(run_dir, meta)))
    if (run_dir / "greedy").exists():
        sections.append(("Greedy decoding", _table(pd.read_parquet(run_dir / "greedy"))))
    if not tokens.empty:
        sections.append(("Worst tokens", _worst_section(tokens, meta, run_dir / "worst")))
    out = Path(out) if out else run_dir / "report.html"
    write_text(out, _page(f"crossengine: {meta.run_id}", sections))
    return out


def _read_tokens(tokens_dir: Path) -> pd.DataFrame:

    cols = ["sample_id", "position", "token_text", "modality", "attention", "segment", "cand_engine", "variant",
            "lp_ref", "lp_cand", "abs_lp_diff", "gen_kl", "kl_ref_cand", "topk_kl", "top1_ref", "top1_cand", "top1_match", "top1_tie", "nonfinite"]
    import pyarrow.dataset as ds

    present = set(ds.dataset(tokens_dir, format="parquet").schema.names)
    cols += [c for c in ("noise_ref", "noise_cand", "above_noise") if c in present]  # runs of schema version 3 on
    df = read_tokens(tokens_dir, cols)
    df["kl"] = df["kl_ref_cand"].fillna(df["topk_kl"])
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
        rows.append({
            "engine": name, "role": "reference" if name == meta.reference else "candidate", "type": info.get("engine"),
            "versions": ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()), "device": info.get("device"),
            "dtype": info.get("dtype"), "environment": ", ".join(env.get("pip") or []) or env.get("python") or "this one",
            "gpus": ",".join(info.get("gpu_ids") or info.get("extra", {}).get("gpu_ids", [])) or "-",  # extra: runs before typed EngineInfo
        })
    head = (f"<p>model <b>{html.escape(str(exp.get('model')))}</b>, reference <b>{html.escape(meta.reference)}</b>, "
            f"{meta.n_samples} samples, mode {html.escape(str(exp.get('mode', 'score')))}, status {html.escape(meta.status)}, "
            f"crossengine {html.escape(meta.crossengine_version)} ({html.escape((meta.git_sha or '')[:10])})</p>")
    errors = pd.DataFrame(meta.errors)
    err = f"<h3>Errors and skipped samples ({len(errors)})</h3>" + _table(errors) if len(errors) else "<p class='note'>no errors, no skipped samples</p>"
    return head + _table(pd.DataFrame(rows)) + err


def _summary_section(summary: pd.DataFrame) -> str:
    df = summary.copy()
    df.insert(0, "candidate", display_names(df))
    df.insert(1, "split", [", ".join(f"{k}={r[k]}" for k in SPLITS if str(r[k]) != "all") or "all" for _, r in df.iterrows()])
    cols = ["candidate", "split"] + [c for c in SUMMARY_COLUMNS if c in df.columns]
    return "<p class='note'>click a column to sort; RL metrics under their frameworks' names (README)</p>" + _table(df[cols], "summary")


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

    worst = tokens.groupby("sample_id", observed=True)["kl"].max().sort_values(ascending=False)
    chosen = list(worst.index[:MAX_SAMPLES])
    order = [s for s in tokens["sample_id"].cat.categories if s in chosen] if hasattr(tokens["sample_id"], "cat") else chosen
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=("|Δ log-prob| of the scored token", "per-token KL(ref‖cand)"))
    per_sample_traces: list[list[int]] = []
    shapes_of: list[list[dict]] = []
    binned = False
    for si, sid in enumerate(order):
        rows = tokens[tokens["sample_id"] == sid]
        idx = []
        for inst, g in rows.groupby("instance", sort=True):
            g = g.sort_values("position")
            x = g["position"].to_numpy()
            for r, col in ((1, "abs_lp_diff"), (2, "kl")):
                xs, ys = _bin_max(x, g[col].to_numpy(dtype=float), MAX_POINTS)
                binned |= len(xs) < len(x)
                text = g["token_text"].astype(str).to_numpy()[: len(xs)] if len(xs) == len(x) else None
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=inst, legendgroup=inst, showlegend=r == 1, visible=si == 0,
                                         text=text, hovertemplate="pos %{x}: %{text}<br>%{y:.3g}<extra>" + html.escape(inst) + "</extra>", marker=dict(size=4)), row=r, col=1)
                idx.append(len(fig.data) - 1)
            if "floor" in g and g["floor"].notna().any():  # the noise floor beside the divergence, same colour group, dashed
                xs, ys = _bin_max(x, g["floor"].to_numpy(dtype=float), MAX_POINTS)
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{inst}: noise floor", legendgroup=inst, visible=si == 0, line=dict(dash="dash", width=1),
                                         hovertemplate="pos %{x}: floor %{y:.3g}<extra>" + html.escape(inst) + "</extra>"), row=1, col=1)
                idx.append(len(fig.data) - 1)
        per_sample_traces.append(idx)
        first = rows.drop_duplicates("position").sort_values("position")
        shapes = [dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0, y1=1, fillcolor="rgba(255,165,0,0.18)", line_width=0, layer="below")
                  for a, b in _spans((first["modality"].astype(str) == "image").to_numpy(), first["position"].to_numpy())]
        shapes += [dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0.97, y1=1.0, fillcolor="rgba(128,0,128,0.5)", line_width=0)
                   for a, b in _spans((first["attention"].astype(str) == "bidirectional").to_numpy(), first["position"].to_numpy())]
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
    fig.update_layout(height=560, shapes=shapes_of[0] if shapes_of else [], legend=dict(orientation="h"),
                      updatemenus=[dict(buttons=buttons, direction="down", x=0, xanchor="left", y=1.15, yanchor="top")])
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    n = tokens["sample_id"].nunique()
    note = ("<p class='note'>sample selector (top left); orange: image tokens; purple band: bidirectional attention (reference's mask); "
            "red dotted: first top-1 mismatch that is not a tie; hover for the token. ")
    if "floor" in tokens and tokens["floor"].notna().any():
        note += "Dashed: the larger of the two engines' own noise floors at that token (a |Δ| above it is above noise). "
    if n > len(order):
        note += f"Showing the {len(order)} of {n} samples with the largest KL; every table on this page covers all of them. "
    if binned:
        note += f"Long samples are binned to {MAX_POINTS} points (max per bin). "
    return note + "</p>" + _fig(fig, "per-sample")


def _routing_section(run_dir: Path, summary: pd.DataFrame, meta: RunMeta, tokens: pd.DataFrame) -> str:
    """Per candidate: its router disagreement per layer, and a layers × positions flip map of its sample with the most flips, |Δlp| above it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from crossengine.compare.routing_summary import read_routing, routing_lines

    table = pd.read_parquet(run_dir / "routing.parquet")
    lines = "".join(f"<li>{html.escape(x)}</li>" for x in routing_lines(table, summary, meta.reference))
    out = ("<p class='note'>a flip: the two engines' routers chose different sets of experts for that input position and layer; "
           "the margin is the reference's k-th minus (k+1)-th router logit (README, 'MoE routing')</p>" + f"<ul>{lines}</ul>" + _table(table))
    routing = read_routing(run_dir / "routing")
    if routing is None or not routing["flip"].any():
        return out + "<p class='note'>no flips: every candidate routed every position as the reference did</p>"
    for n, (cand, g) in enumerate(routing[routing["flip"]].groupby("candidate", sort=False)):
        if n >= MAX_SAMPLES:
            break
        sid = g["sample_id"].value_counts().idxmax()
        one = routing[(routing["candidate"] == cand) & (routing["sample_id"] == sid)]
        grid = one.pivot_table(index="layer", columns="position", values="flip", aggfunc="max").astype(float)
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.06,
                            subplot_titles=(f"|Δ log-prob| of the token each position predicts ({cand}, sample {sid})", "routing flips (layer × input position)"))
        rows = tokens[(tokens["instance"] == cand) & (tokens["sample_id"].astype(str) == sid)].sort_values("position") if not tokens.empty else tokens
        if len(rows):
            fig.add_trace(go.Scatter(x=rows["position"] - 1, y=rows["abs_lp_diff"], mode="lines+markers", name="|Δlp|", marker=dict(size=4)), row=1, col=1)
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=grid.columns.to_numpy(), y=grid.index.to_numpy(), colorscale=[[0, "#f4f4f4"], [1, "#c0392b"]],
                                 showscale=False, hovertemplate="layer %{y}, position %{x}: flip %{z}<extra></extra>"), row=2, col=1)
        fig.update_layout(height=420, showlegend=False)
        out += _fig(fig, f"routing-{n}")
    return out


def _noise_section(summary: pd.DataFrame, floors: pd.DataFrame, meta: RunMeta) -> str:
    """Each pair's share of tokens above both floors, each engine's floor per condition, and the `expect` verdicts."""
    from crossengine.compare.floor import pair_lines

    pooled = _pooled(summary)
    pairs = pd.DataFrame({"candidate": display_names(pooled), "tokens above noise": pooled.get("n_above_noise"), "of": pooled["n_tokens"],
                          "frac_above_noise": pooled.get("frac_above_noise")})
    lines = pair_lines(summary, floors, meta.reference) + meta.expectations.get("notes", []) + [f"error: {x}" for x in meta.expectations.get("failed", [])]
    cols = ["engine", "condition", "n_tokens", "n_differ", "bitwise", "distinct_max", "max_abs_diff", "mean_abs_diff", "max_kl", "first_sample", "first_position", "first_token"]
    said = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
    return ("<p class='note'>each engine scored its batches again under its noise conditions (README, 'Noise floor'); a token is above noise "
            "where |Δ log-prob| exceeds the larger of the two engines' floors there (× noise.margin)</p>"
            f"<ul>{said}</ul>" + _table(pairs) + "<h3>Each engine's own floor, per condition</h3>" + _table(floors[[c for c in cols if c in floors]]))


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
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[f"KL mean by {k}" for k in present])
    for col, key in enumerate(present, start=1):
        others = [k for k in SPLITS if k != key]
        part = df[(df[key] != "all") & np.logical_and.reduce([df[k] == "all" for k in others])]
        for cand, g in part.groupby("candidate", sort=True):
            fig.add_trace(go.Bar(x=g[key], y=g["kl_mean"], name=cand, legendgroup=cand, showlegend=col == 1), row=1, col=col)
    fig.update_layout(height=360, barmode="group")
    fig.update_yaxes(type="log")  # fp32 noise (1e-12) and bf16 (1e-3) on one chart
    return _fig(fig, "breakdown")


def _ablation_section(summary: pd.DataFrame, reference: str, differing: dict[str, str]) -> str:
    import plotly.graph_objects as go

    pooled = _pooled(summary).sort_values("kl_mean")
    names = display_names(pooled)
    text = [f"top-1 {a:.3f}" + (f"; inputs differ: {differing[n]}" if differing.get(n) else "") for a, n in zip(pooled["top1_agreement"], names)]
    fig = go.Figure(go.Bar(x=pooled["kl_mean"], y=names, orientation="h", text=text))
    fig.update_layout(title=f"KL mean vs {reference}: which difference matters", height=120 + 30 * len(names), xaxis_type="log")
    return _fig(fig, "ablation")


def _nearest_section(nearest: pd.DataFrame) -> str:
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
        fig.add_trace(go.Heatmap(z=np.log10(np.clip(z, 1e-12, None)), customdata=z, x=list(wide.columns), y=list(wide.index), colorscale="Viridis",
                                 showscale=col == 1, colorbar=dict(title="log10"), hovertemplate="%{y} vs %{x}: %{customdata:.3g}<extra></extra>"), row=1, col=col)
    fig.update_layout(height=360)
    return _fig(fig, "nearest") + _table(nearest)


def _inputs_section(inputs: pd.DataFrame) -> str:
    """Candidates with `inputs: own`: every input that differs from the reference's, first difference per sample on top."""

    differ = inputs[inputs["status"] != "equal"]
    if differ.empty:
        return f"<p class='note'>every input of {inputs['cand_engine'].nunique()} candidate(s) with inputs: own equals the reference's</p>"
    lines = []
    for (cand, variant), rows in differ.groupby(["cand_engine", "variant"], sort=True, observed=True):
        lines += [f"{display_name(cand, variant)}: {line}" for line in first_differences(rows.to_dict("records"))]
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    cols = ["cand_engine", "variant", "sample_id", "input", "status", "first_difference", "ref_token", "cand_token", "ref_context",
            "cand_context", "max_abs_diff", "mean_abs_diff", "detail", "scored", "own_prompt_tokens", "own_prompt_abs_lp_diff_mean"]
    rows = f"<details><summary>every differing input, per sample ({len(differ)} rows)</summary>{_table(differ[cols])}</details>"
    return _table(_inputs_matrix(inputs)) + f"<ul>{items}</ul>" + rows


def _inputs_matrix(inputs: pd.DataFrame) -> pd.DataFrame:
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


def _localisation_section(run_dir: Path, meta: RunMeta) -> str:
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
            fig.add_trace(go.Scatter(x=per["order"], y=per["max_abs_diff"].clip(lower=1e-12), mode="lines+markers", name=name, text=per["module"],
                                     hovertemplate="%{text}: %{y:.3g}<extra>" + html.escape(name) + "</extra>"))
            first = first_divergence(g, tol)
            if first is not None:
                firsts.append({"candidate": name, "module": first["module"], "candidate's module": first.get("cand_module"), "position": first["first_position"],
                               "max |Δ|": first["max_abs_diff"], "origin": first["origin"]})
                fig.add_trace(go.Scatter(x=[first["order"]], y=[max(first["max_abs_diff"], 1e-12)], mode="markers", marker=dict(size=14, symbol="x", color="red"),
                                         name=f"{name}: first over {tol:g}", hovertext=str(first["module"])))
        fig.add_hline(y=tol, line_dash="dot", annotation_text=f"tolerance {tol:g}")
        fig.update_layout(title="max |Δ| of each module's output, in the reference's forward order", yaxis_type="log", height=420)
        parts.append(_fig(fig, "layers") + _table(pd.DataFrame(firsts)))
    if (run_dir / "buffers.parquet").exists():
        buffers = pd.read_parquet(run_dir / "buffers.parquet")
        bad = buffers[~buffers["ok"]]
        parts.append(f"<h3>Buffer audit: {len(buffers)} checked, {len(bad)} with problems</h3>" + _table(bad.drop(columns=["shape"], errors="ignore")))
    return "".join(parts)


def _vocab(meta: RunMeta):
    """The reference's tokenizer, to show top-1 ids as text; None where it does not load here."""
    try:
        from transformers import AutoTokenizer

        path = meta.model_paths.get(meta.reference)
        return AutoTokenizer.from_pretrained(path) if path else None
    except Exception:  # noqa: BLE001 - a report without token texts for top-1 ids is still a report
        return None


ALARM_SAMPLES, ALARM_TOKENS = 3, 5  # per alarm: the samples shown, and their tokens by per-token k3


def _alarms_section(alarms: pd.DataFrame, tokens: pd.DataFrame) -> str:
    """Each alarm with its source, then the tokens behind it: in the samples that trip it alone, the
    ones with the largest per-token k3 (gen_kl), with context."""
    if alarms.empty:
        from crossengine.compare.alarms import RULES

        return f"<p class='note'>no alarm tripped ({len(RULES)} checked: {html.escape(', '.join(RULES))}; README.md, 'Alarms').</p>"
    table = alarms.assign(candidate=display_names(alarms), samples=[", ".join(x[:5]) + (f" and {len(x) - 5} more" if len(x) > 5 else "") for x in alarms["samples"]])
    parts = [_table(table[["alarm", "candidate", "metric", "value", "limit", "samples", "source"]])]
    tripped: dict[tuple[str, str], list[str]] = {}  # (candidate, sample) -> the alarms it trips alone, once per sample
    for r, who in zip(alarms.itertuples(index=False), table["candidate"]):
        for sid in list(r.samples)[:ALARM_SAMPLES]:
            tripped.setdefault((who, sid), []).append(r.alarm)
    rows = []
    for (who, sid), names in tripped.items():
        sel = tokens[(tokens["sample_id"].astype(str) == sid) & (tokens["instance"] == who)]
        seq = sel.set_index("position")["token_text"].astype(str)
        for _, t in sel.nlargest(ALARM_TOKENS, "gen_kl").iterrows():
            before = "".join(seq.get(p, "") for p in range(t["position"] - CONTEXT, t["position"]))
            rows.append({"candidate": who, "sample": sid, "alarms": ", ".join(names), "position": t["position"], "segment": t["segment"],
                         "context": f"{before}⟦{t['token_text']}⟧", "lp_ref": t["lp_ref"], "lp_cand": t["lp_cand"], "k3": t["gen_kl"]})
    note = (f"<p class='note'>the tokens behind the alarms: in up to {ALARM_SAMPLES} samples per alarm that trip it alone, the {ALARM_TOKENS} with the "
            "largest per-token k3 = gen_kl (the reference as trainer, the candidate as rollout), ⟦the scored token⟧ after its context.</p>")
    tokens_table = f"<details><summary>the tokens behind the alarms ({len(rows)})</summary>{note}{_table(pd.DataFrame(rows), row_class=lambda r: 'ctx')}</details>"
    return "".join(parts) + (tokens_table if rows else "")


def _worst_section(tokens: pd.DataFrame, meta: RunMeta, worst_dir: Path, n: int = 20) -> str:
    tok = _vocab(meta)
    text = (lambda i: tok.decode([int(i)]) if tok is not None and pd.notna(i) and int(i) >= 0 else str(i))  # noqa: E731
    top5 = (lambda ids, lps: ", ".join(f"{text(i)!r} {lp:.2f}" for i, lp in zip(ids, lps) if i >= 0))  # noqa: E731
    scored = tokens[tokens["variant"].astype(str) != SAMPLED]
    extra = {}
    if worst_dir.exists() and any(worst_dir.glob("*.parquet")):

        w = read_tokens(worst_dir)
        w = w[w["variant"].astype(str) != SAMPLED]
        extra = {(str(r.sample_id), int(r.position), display_name(str(r.cand_engine), str(r.variant))): r for r in w.itertuples(index=False)}
    worst = scored.nlargest(n, "kl")
    rows = []
    for _, r in worst.iterrows():
        seq = tokens[(tokens["sample_id"] == r["sample_id"]) & (tokens["instance"] == r["instance"])].set_index("position")["token_text"].astype(str)
        before = "".join(seq.get(p, "") for p in range(r["position"] - CONTEXT, r["position"]))
        after = "".join(seq.get(p, "") for p in range(r["position"] + 1, r["position"] + CONTEXT + 1))
        row = {"candidate": r["instance"], "sample": r["sample_id"], "position": r["position"], "kl": r["kl"],
               "context": f"{before}⟦{r['token_text']}⟧{after}", "lp_ref": r["lp_ref"], "lp_cand": r["lp_cand"]}
        w = extra.get((str(r["sample_id"]), int(r["position"]), r["instance"]))
        if w is not None:
            row.update({"reference's top-5": top5(w.top5_ref_ids, w.top5_ref_lp), "candidate's top-5": top5(w.top5_cand_ids, w.top5_cand_lp)})
        else:  # a run written before worst/ parts existed: the argmaxes are all there is
            row.update({"reference's top-1": text(r["top1_ref"]), "candidate's top-1": text(r["top1_cand"])})
        rows.append(row)
    note = (f"<p class='note'>the {len(rows)} tokens with the largest KL (full-vocabulary where both engines gave logits, else top-k), "
            f"±{CONTEXT} tokens of context, ⟦the scored token⟧, and each side's five most likely tokens with their log-probs.</p>")
    return note + _table(pd.DataFrame(rows), row_class=lambda r: "ctx")


# --------------------------------------------------------------------------- two runs


def compare_report(a: Path, b: Path, table: pd.DataFrame, out: Path) -> Path:
    import plotly.graph_objects as go

    from crossengine.results import write_text

    pooled = table[table["split"] == "all"]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=pooled["candidate"], y=pooled["kl_mean_a"], name=f"A: {Path(a).name}"))
    fig.add_trace(go.Bar(x=pooled["candidate"], y=pooled["kl_mean_b"], name=f"B: {Path(b).name}"))
    fig.update_layout(barmode="group", yaxis_type="log", title="KL mean per candidate, before (A) and after (B)", height=380)
    sections = [("Before and after", f"<p>A: {html.escape(str(a))}<br>B: {html.escape(str(b))}</p>" + _fig(fig, "compare")),
                ("Every split", _table(table, row_class=lambda r: "bad" if r["status"] != "both" else ""))]
    write_text(out, _page(f"crossengine compare: {Path(a).name} vs {Path(b).name}", sections))
    return out


# --------------------------------------------------------------------------- RL monitor


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
    sections = [("Steps", _fig(fig, "monitor")), ("Every step", _table(steps[["step", *cols, "n_tokens"]] if "n_tokens" in steps else steps[["step", *cols]],
                                                                          row_class=lambda r: "bad" if int(r["step"]) in over_steps else ""))]
    worst_dir = Path(out_dir) / "worst"
    if worst_dir.exists() and any(worst_dir.glob("*.parquet")):
        worst = read_tokens(worst_dir)
        shown = sorted(over_steps)[-10:] or [int(steps["step"].max())]
        for s in shown:
            sections.append((f"Worst tokens of step {s}", _table(worst[worst["step"] == s].drop(columns=["step"]))))
    out = Path(out) if out else Path(out_dir) / "monitor.html"
    write_text(out, _page(f"crossengine monitor: {out_dir}", sections))
    return out
