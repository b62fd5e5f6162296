"""What a finished run answers beyond its summary, said on the terminal: its gates (exit 3 when broken) and its numbers
under an RL framework's own keys (metrics.json). `crossengine run` and `crossengine report` print them alike."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from crossengine.compare.gates import check_gates
from crossengine.compare.keys import framework_keys
from crossengine.compare.summary import pooled_rows
from crossengine.identity import display_name
from crossengine.results import write_json


def print_gates(run_dir: Path, gates: list, fail_on_alarm: bool, console, err_console) -> list[str]:
    """The run's `gates:` and --fail-on-alarm, checked on its folder: each broken one on stderr (the caller exits 3)."""
    if not (gates or fail_on_alarm) or not (run_dir / "summary.parquet").exists():
        return []
    broken = check_gates(run_dir, gates, fail_on_alarm)
    for line in broken:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    if not broken:
        console.print(f"gates: {len(gates) + fail_on_alarm} checked, none broken", highlight=False)
    return broken


def write_framework_keys(run_dir: Path, framework: str, console) -> Path:
    """metrics.json: every candidate's pooled numbers under `framework`'s keys (compare/keys.py), and the same as a table."""
    pooled = pooled_rows(pd.read_parquet(run_dir / "summary.parquet"))
    values = {display_name(str(r["cand_engine"]), str(r["variant"])): framework_keys(r, framework) for r in pooled.to_dict("records")}
    path = run_dir / "metrics.json"
    write_json(path, {"keys": framework, "candidates": values})
    table = Table(title=f"{framework}'s keys ({path})", title_justify="left")
    table.add_column("key")
    for name in values:
        table.add_column(name, justify="right")
    for key in next(iter(values.values()), {}):
        table.add_row(key, *("-" if v[key] is None else f"{v[key]:.6g}" for v in values.values()))
    console.print(table)
    return path
