"""A finished run against its `gates:` (crossengine/experiment/gates.py) and `--fail-on-alarm`: the gates it breaks, one line each.

Read from the run folder after the summary is written (summary.parquet, alarms.parquet), so `crossengine run`, a sweep
member and a rerun on an old folder judge alike. A broken metric gate names the value and the worst samples of that
metric where a sample has its own value (the alarm metrics, per sample as alarms.py computes them; one candidate's
token rows read at a time, four columns); the verdict goes into run.json (`gates`) and the exit code is 3.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from crossengine.compare.alarms import SAMPLES_NAMED, per_sample
from crossengine.compare.summary import SPLITS
from crossengine.identity import display_name, display_names
from crossengine.results import write_json
from crossengine.run_meta import RunMeta

GATE_EXIT = 3  # a broken gate: distinct from errors (1) and bad input (2)


def check_gates(run_dir: Path, gates: list, fail_on_alarm: bool = False) -> list[str]:
    """One line per broken gate (and per tripped alarm with `fail_on_alarm`), recorded in run.json."""
    run_dir = Path(run_dir)
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary[list(SPLITS)].astype(str) == "all").all(axis=1)]
    alarms = pd.read_parquet(run_dir / "alarms.parquet") if (run_dir / "alarms.parquet").exists() else pd.DataFrame(columns=["alarm", "cand_engine", "variant"])
    broken: list[str] = []
    for gate in gates:
        if gate.alarm is not None:
            hit = alarms[alarms["alarm"] == gate.alarm]
            broken += [f"gate broken: {gate.says()}: it tripped on {who}" for who in display_names(hit) if _applies(gate, who)]
            continue
        for row in pooled.to_dict("records"):
            who = display_name(str(row["cand_engine"]), str(row["variant"]))
            value = row.get(gate.metric)
            if not _applies(gate, who) or value is None or pd.isna(value):
                continue
            if (gate.max is not None and value > gate.max) or (gate.min is not None and value < gate.min):
                broken.append(f"gate broken: {gate.says()}: {who} has {value:.4g}{_worst(run_dir, row, gate)}")
    if fail_on_alarm:
        broken += [f"gate broken: --fail-on-alarm: alarm {a} tripped on {who}" for a, who in zip(alarms["alarm"], display_names(alarms))]
    meta = RunMeta.read(run_dir)
    meta.gates = {"checked": [g.says() for g in gates] + (["--fail-on-alarm"] if fail_on_alarm else []), "broken": broken}
    write_json(run_dir / "run.json", meta.model_dump(mode="json"))
    return broken


def _applies(gate, who: str) -> bool:
    return gate.candidates is None or who in gate.candidates


def _worst(run_dir: Path, row: dict, gate) -> str:
    """'; worst samples: s3 (0.012), ...' where the metric has a per-sample value, else ''."""
    files = sorted((run_dir / "tokens").glob("*.parquet"))
    if not files:
        return ""
    flt = (ds.field("cand_engine") == str(row["cand_engine"])) & (ds.field("variant") == str(row["variant"]))
    tokens = ds.dataset([str(f) for f in files], format="parquet").to_table(columns=["sample_id", "segment", "lp_ref", "lp_cand"], filter=flt).to_pandas()
    samples = per_sample(tokens)
    if gate.metric not in samples:
        return ""
    col = samples[gate.metric].dropna()
    worst = col.sort_values(ascending=gate.max is None).head(SAMPLES_NAMED)
    return "; worst samples: " + ", ".join(f"{s} ({v:.3g})" for s, v in worst.items())
