"""The terminal view of a run: the summary table, one row per candidate/variant and split."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from crossengine.compare.inputs import differing_inputs, read_inputs
from crossengine.compare.summary import pooled_rows
from crossengine.identity import display_name, display_names
from crossengine.run_meta import RunMeta

COLUMNS = [
    ("n_tokens", "n", "{:d}"),
    ("top1_agreement", "top1", "{:.4f}"),
    ("abs_max", "abs_max", "{:.3g}"),
    ("abs_mean", "abs_mean", "{:.3g}"),
    ("cos_sim", "cos_sim", "{:.6f}"),
    ("kl_mean", "kl_mean", "{:.3g}"),
    ("gen_kl_error", "gen_kl", "{:.3g}"),
    ("token_mult_prob_error", "mult_prob", "{:.6f}"),
    ("first_divergent_position", "1st_div", "{:d}"),
]


def fmt_cell(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if pattern.endswith("d}"):
        return "-" if int(value) < 0 else pattern.format(int(value))
    return pattern.format(float(value))


def summary_table(summary: pd.DataFrame, title: str, splits: bool = True):
    """A rich Table of the summary; without `splits`, only the pooled rows."""
    from rich.table import Table

    df = summary.copy()
    for col in ("attention", "segment", "position_bucket"):
        df[col] = df[col].astype(str)
    rows = df[(df["attention"] == "all") & (df["segment"] == "all") & (df["position_bucket"] == "all")] if not splits else df
    table = Table(title=title, title_justify="left", pad_edge=False, padding=(0, 1))
    for header in ("candidate", "split"):
        table.add_column(header, no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for _, r in rows.iterrows():
        split = ", ".join(f"{k}={r[k]}" for k in ("modality", "attention", "segment", "position_bucket") if str(r[k]) != "all") or "all"
        variant = str(r["variant"])
        name = display_name(r["cand_engine"], variant)
        table.add_row(name, split, *[fmt_cell(r[c], p) for c, _, p in COLUMNS])
    return table


def print_summary(run_dir: Path, console, err_console=None) -> None:
    """The run's tables and lines on `console`; a failed `expect:` claim on `err_console` (stderr; default: the same)."""
    err_console = err_console or console
    summary = pd.read_parquet(run_dir / "summary.parquet")
    console.print(summary_table(summary, f"crossengine summary: {run_dir}"))

    meta = RunMeta.read(run_dir)
    reference = meta.reference
    if "n_nonfinite" in summary:
        pooled = summary[(summary["modality"] == "all") & (summary["n_nonfinite"] > 0)]
        for _, r in pooled.iterrows():
            name = display_name(r["cand_engine"], r["variant"])
            console.print(
                f"[red]non-finite[/red] log-probs at {int(r['n_nonfinite'])} token(s) of {str(name)!r} vs {reference!r}: "
                "see the `nonfinite` column (ref/cand/both); their metrics are null and left out of the summary",
                highlight=False,
            )

    inputs = read_inputs(run_dir)
    differing = differing_inputs(inputs)
    names = display_names(inputs) if inputs is not None else []
    for name, what in differing.items():  # a comparison that found nothing says what it compared
        if what == "none":
            n = inputs[[x == name for x in names]]
            console.print(f"inputs of {name!r} equal the reference's on all {n['sample_id'].nunique()} samples ({', '.join(sorted(set(n['input'])))})", highlight=False)
    if meta.variants:
        console.print(ablation_table(summary, reference, differing))
    if (run_dir / "nearest.parquet").exists():
        from crossengine.compare.nearest import nearest_lines

        for line in nearest_lines(pd.read_parquet(run_dir / "nearest.parquet"), reference):
            console.print(line, highlight=False)
    if (run_dir / "noise.parquet").exists():
        from crossengine.compare.floor import pair_lines

        for line in pair_lines(summary, pd.read_parquet(run_dir / "noise.parquet"), reference):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    if (run_dir / "routing.parquet").exists():
        from crossengine.compare.routing_summary import routing_lines

        for line in routing_lines(pd.read_parquet(run_dir / "routing.parquet"), summary, reference):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    for line in meta.expectations.get("notes", []):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for line in meta.expectations.get("failed", []):
        err_console.print(f"error: {line}", style="bold red", highlight=False, markup=False, soft_wrap=True)
    if (run_dir / "alarms.parquet").exists():
        from crossengine.compare.alarms import lines

        alarms = pd.read_parquet(run_dir / "alarms.parquet")
        for line in lines(alarms):
            console.print(line, style="bold red", highlight=False, markup=False, soft_wrap=True)
        if alarms.empty:
            from crossengine.compare.alarms import RULES

            console.print(f"alarms: none tripped ({len(RULES)} checked; docs/guides/rl-monitor.md#alarms)", highlight=False)
    if meta.stages.get("total"):
        console.print(time_line(meta.stages), highlight=False)
    if (run_dir / "greedy").exists():
        greedy = pd.read_parquet(run_dir / "greedy")
        for _, r in greedy[greedy["first_divergence"] >= 0].iterrows():
            console.print(
                f"greedy: {r['cand_engine']}/{r['variant']} leaves {r['ref_engine']} on sample {r['sample_id']} at completion token "
                f"{r['first_divergence']}: {r['ref_token_text']!r} ({r['ref_lp']:.4f}) vs {r['cand_token_text']!r} ({r['cand_lp']:.4f})",
                highlight=False,
            )


def time_line(stages: dict[str, float]) -> str:
    """'time: 24.4 s: load engines 63 %, start Ray 31 %, ...': where the wall time went, largest first (run.json `stages`)."""
    total = stages["total"]
    parts = sorted(((k, v) for k, v in stages.items() if k != "total" and v > 0), key=lambda kv: -kv[1])
    return f"time: {total:.1f} s: " + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in parts)


ABLATION = [("top1_agreement", "top1", "{:.4f}"), ("abs_max", "abs_max", "{:.3g}"), ("abs_mean", "abs_mean", "{:.3g}"), ("cos_sim", "cos_sim", "{:.6f}"), ("kl_mean", "kl_mean", "{:.3g}")]


def ablation_table(summary: pd.DataFrame, reference: str, differing: dict[str, str] | None = None):
    """One row per engine/variant vs the reference, largest KL first: which difference matters.
    `differing` (inputs.differing_inputs) adds which of its own inputs differ, per candidate."""
    from rich.table import Table

    df = summary.copy()
    for col in ("modality", "attention", "segment", "position_bucket", "variant", "cand_engine"):
        df[col] = df[col].astype(str)
    pooled = pooled_rows(df).sort_values("kl_mean", ascending=False)
    table = Table(title=f"ablation vs {reference} (largest KL first)", title_justify="left")
    table.add_column("variant", no_wrap=True)
    for _, header, _ in ABLATION:
        table.add_column(header, justify="right")
    if differing:
        table.add_column("inputs differ")
    for _, r in pooled.iterrows():
        name = display_name(r["cand_engine"], r["variant"])
        table.add_row(name, *[fmt_cell(r[c], p) for c, _, p in ABLATION], *([differing.get(str(name), "-")] if differing else []))
    return table


def compare_view(table: pd.DataFrame, run_a: Path, run_b: Path):
    """Terminal view of `crossengine compare`: the pooled rows, A -> B and the change."""
    from rich.table import Table

    t = Table(title=f"compare: A {run_a}  ->  B {run_b}", title_justify="left")
    for col in ("candidate", "split", "status", "top1 A", "top1 B", "KL A", "KL B", "KL change", "abs_max A", "abs_max B"):
        t.add_column(col, justify="left" if col in ("candidate", "split", "status") else "right")
    changed = 0
    for _, r in table.iterrows():
        diff = r["kl_mean_change"]
        changed += int(r["status"] != "both" or (pd.notna(diff) and diff != 0))
        t.add_row(
            r["candidate"],
            r["split"],
            r["status"],
            fmt_cell(r["top1_agreement_a"], "{:.4f}"),
            fmt_cell(r["top1_agreement_b"], "{:.4f}"),
            fmt_cell(r["kl_mean_a"], "{:.3g}"),
            fmt_cell(r["kl_mean_b"], "{:.3g}"),
            fmt_cell(diff, "{:+.3g}"),
            fmt_cell(r["abs_max_a"], "{:.3g}"),
            fmt_cell(r["abs_max_b"], "{:.3g}"),
        )
    t.caption = f"{changed} of {len(table)} rows changed" if changed else "no changes"
    return t
