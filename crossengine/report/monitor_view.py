"""`crossengine monitor DIR`: the steps a KLMonitor wrote, as a table with sparklines."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from crossengine.errors import CrossengineError
from crossengine.monitor import read_alarm_limits, read_thresholds

SHOWN = ["gen_kl_error", "policy_kl_error", "js_divergence_error", "token_mult_prob_error", "rollout_probs_diff_max", "first/gen_kl_error"]
_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    scale = (hi - lo) or 1.0
    return "".join(" " if v is None or not math.isfinite(v) else _BARS[min(7, int((v - lo) / scale * 7.999))] for v in values)


def read_steps(out_dir: Path) -> pd.DataFrame:
    """Every step a KLMonitor wrote (steps/part-*.parquet, other files ignored); a part that is not
    its Parquet is one line naming the file (CrossengineError)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    steps = Path(out_dir) / "steps"
    files = sorted(steps.glob("part-*.parquet")) if steps.is_dir() else []
    if not files:
        return pd.DataFrame()
    try:
        df = ds.dataset([str(f) for f in files], format="parquet").to_table().to_pandas()
    except (pa.ArrowException, OSError) as exc:
        for f in files:  # name the file that is not a step
            try:
                pq.read_schema(f)
            except (pa.ArrowException, OSError) as bad:
                raise CrossengineError(f"{f}: not a KLMonitor step file ({str(bad).splitlines()[0]})") from None
        raise CrossengineError(f"{steps}: the step files do not read together ({str(exc).splitlines()[0]})") from None
    if "step" not in df:
        raise CrossengineError(f"{steps}: the part files have no `step` column: not a KLMonitor output")
    return df.sort_values("step").reset_index(drop=True)


def steps_view(out_dir: Path, last: int = 30):
    from rich.console import Group
    from rich.table import Table

    df = read_steps(out_dir)
    thresholds = read_thresholds(out_dir)
    cols = [c for c in SHOWN if c in df.columns]
    table = Table(title=f"crossengine monitor: {out_dir} ({len(df)} steps)", title_justify="left")
    table.add_column("step", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    table.add_column("tokens", justify="right")
    for _, r in df.tail(last).iterrows():
        cells = []
        for c in cols:
            over = c in thresholds and r[c] > thresholds[c]
            cells.append(f"[bold red]{r[c]:.4g} ![/]" if over else f"{r[c]:.4g}")
        table.add_row(str(int(r["step"])), *cells, str(int(r["n_tokens"])))
    trend = Table(show_header=True, title="trend (all steps)", title_justify="left", box=None)
    trend.add_column("metric")
    trend.add_column("sparkline")
    trend.add_column("last", justify="right")
    trend.add_column("threshold", justify="right")
    for c in cols:
        trend.add_row(c, sparkline(df[c].tolist()), f"{df[c].iloc[-1]:.4g}", f"{thresholds[c]:.4g}" if c in thresholds else "-")
    return Group(table, trend)


def worst_view(out_dir: Path, step: int):
    from rich.table import Table

    path = Path(out_dir) / "worst" / f"part-{step:08d}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir}: no worst tokens for step {step}")
    df = pd.read_parquet(path)
    table = Table(title=f"step {step}: worst tokens by gen_kl", title_justify="left")
    for c in ("rank", "sample_id", "position", "token_text", "modality", "lp_gen", "lp_train", "gen_kl"):
        table.add_column(c, justify="right" if c not in ("token_text", "modality", "sample_id") else "left")
    for _, r in df.iterrows():
        table.add_row(
            str(r["rank"]),
            str(r["sample_id"]),
            str(r["position"]),
            repr(r["token_text"]) if r["token_text"] is not None else str(r["token_id"]),
            r["modality"],
            f"{r['lp_gen']:.4f}",
            f"{r['lp_train']:.4f}",
            f"{r['gen_kl']:.4g}",
        )
    return table


def follow(out_dir: Path, console, interval: float, max_updates: int | None = None) -> None:
    """Redraw as steps arrive; Ctrl-C stops (max_updates bounds it for tests)."""
    from rich.live import Live

    seen, updates = -1, 0
    with Live(console=console, refresh_per_second=4) as live:
        while max_updates is None or updates < max_updates:
            n = len(list((Path(out_dir) / "steps").glob("part-*.parquet")))
            if n != seen:
                live.update(steps_view(out_dir))
                seen = n
            updates += 1
            time.sleep(interval)


def parse_alarm_options(options: list[str]) -> dict:
    """`--alarm NAME=VALUE` (a number, LOW,HIGH for a band, or off) as alarm limits; a bad one is a ValueError (one line)."""
    out: dict = {}
    for opt in options:
        name, sep, value = opt.partition("=")
        if not sep or not name:
            raise ValueError(f"--alarm {opt!r}: write NAME=VALUE (a number, LOW,HIGH, or off)")
        try:
            out[name] = None if value == "off" else ([float(x) for x in value.split(",")] if "," in value else float(value))
        except ValueError:
            raise ValueError(f"--alarm {opt!r}: {value!r} is not a number, LOW,HIGH or off") from None
    return out


def alarm_lines(out_dir: Path, step: int | None = None, overrides: dict | None = None) -> list[str]:
    """`alarm:` lines for one step (default: the last), its pooled numbers checked against the monitor's
    limits with `overrides` on top; the samples named are those the trainer-time check found that
    still trip the limit (a lowered limit cannot add samples the trainer did not keep)."""
    from crossengine.compare.alarms import Tripped, rules

    df = read_steps(out_dir)
    if df.empty:
        return []
    row = df.iloc[-1] if step is None else df[df["step"] == step].iloc[0] if (df["step"] == step).any() else None
    if row is None:
        raise FileNotFoundError(f"{out_dir}: no step {step}")
    active = rules({**read_alarm_limits(out_dir), **(overrides or {})})
    part = Path(out_dir) / "alarms" / f"part-{int(row['step']):08d}.parquet"
    stored = pd.read_parquet(part) if part.exists() else pd.DataFrame(columns=["alarm", "samples", "sample_values"])
    out = []
    for rule in active.values():
        kept = stored[stored["alarm"] == rule.name]
        samples = [(s, v) for s, v in zip(*(list(kept.iloc[0][c]) for c in ("samples", "sample_values"))) if rule.trips(v)] if len(kept) else []
        value = float(row[rule.metric]) if rule.pooled and rule.metric in row else None
        if (rule.pooled and rule.trips(value)) or (not rule.pooled and samples):
            out.append(f"step {int(row['step'])}: " + Tripped(rule, "", "", value, samples).line("generator vs trainer"))
    return out
