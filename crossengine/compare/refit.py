"""A refit engine's results as tables, a summary per step and one line each (crossengine/adapters/refit.py makes them).

refit_diff is |lp_synced - lp_fresh|: zero wherever the synced engine computes what a fresh load of the same weights
computes. "Bitwise" below is about the `score` rows (teacher-forced, which never read a prefix cache); the `prefix_cache`
rows are the stale-state probe: one such row is `stale` where it differs although the sample's scores agree bitwise, so
only state kept from before the push can explain it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from crossengine.schemas import REFIT_PARAMS_SCHEMA, REFIT_SCHEMA


def refit_tables(engine: str, steps: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    """(refit rows, audit findings) of one engine, in REFIT_SCHEMA and REFIT_PARAMS_SCHEMA."""
    frames, findings = [], []
    for st in steps:
        f = pd.DataFrame(st["tokens"])
        f.insert(0, "to", st["to"])
        f.insert(0, "step", st["step"])
        f.insert(0, "engine", engine)
        f["refit_diff"] = np.abs(f["lp_synced"].to_numpy(np.float32) - f["lp_fresh"].to_numpy(np.float32))
        score = f[f["via"] == "score"]
        same = score.groupby("sample_id")["refit_diff"].max().eq(0) if len(score) else pd.Series(dtype=bool)
        probe = f["via"] == "prefix_cache"
        agree = f["sample_id"].map(same).fillna(False).astype(bool)
        f["stale"] = probe & agree & ~(f["lp_synced"] == f["lp_fresh"])
        frames.append(f)
        for source in ("stream", "parameters"):
            findings += [{"engine": engine, "step": st["step"], "to": st["to"], "source": source, **x} for x in st[source]]
    tokens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REFIT_SCHEMA.names)
    audit = pd.DataFrame(findings, columns=REFIT_PARAMS_SCHEMA.names)
    return (
        pa.Table.from_pandas(tokens[REFIT_SCHEMA.names], schema=REFIT_SCHEMA, preserve_index=False),
        pa.Table.from_pandas(audit, schema=REFIT_PARAMS_SCHEMA, preserve_index=False),
    )


def refit_summary(tokens: pd.DataFrame, audit: pd.DataFrame) -> list[dict[str, Any]]:
    """Per step of one engine: tokens compared, bitwise or not, max |Δlp|, the first differing token (in run order),
    stale probes, and the audit's findings (run.json `refit`, the sweep's index)."""
    out = []
    for step, f in tokens.groupby("step", sort=True):
        score, probe = f[f["via"] == "score"], f[f["via"] == "prefix_cache"]
        diff = score[~(score["lp_synced"] == score["lp_fresh"]) & ~(score["lp_synced"].isna() & score["lp_fresh"].isna())]
        found = audit[audit["step"] == step]
        out.append(
            {
                "step": int(step),
                "to": str(f["to"].iloc[0]),
                "tokens": len(score),
                "bitwise": diff.empty,
                "max_abs_diff": float(score["refit_diff"].max()) if len(score) else 0.0,
                "first": None if diff.empty else {"sample_id": str(diff["sample_id"].iloc[0]), "position": int(diff["position"].iloc[0])},
                "probes": len(probe),
                "stale": int(probe["stale"].sum()),
                "findings": [{k: _plain(r[k]) for k in ("source", "name", "finding", "max_abs_diff")} for _, r in found.iterrows()],
            }
        )
    return out


def _plain(v):
    return None if isinstance(v, float) and np.isnan(v) else v


def refit_line(engine: str, s: dict[str, Any]) -> str:
    """One line per step: "rollout after refit to X: bitwise equal to a fresh load" or what differs, first."""
    head = f"{engine} after refit to {s['to']}: "
    if s["tokens"] == 0:
        return head + "no token was scored by both the synced engine and the fresh load (every sample failed?)"
    said = (
        [f"bitwise equal to a fresh load ({s['tokens']:,} tokens)"]
        if s["bitwise"]
        else [f"differs from a fresh load: max |Δlp| {s['max_abs_diff']:.3g}, first at sample {s['first']['sample_id']} position {s['first']['position']}"]
    )
    if s["stale"]:
        said.append(f"{s['stale']} of {s['probes']} samples read stale state from the prefix cache")
    said += findings_said(s["findings"])
    return head + "; ".join(said)


def findings_said(findings: list[dict[str, Any]]) -> list[str]:
    """The audits' findings, one phrase per (source, kind): a single tensor by name, several by count and largest |Δ|."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in findings:
        groups.setdefault((f["source"], f["finding"]), []).append(f)
    out = []
    for (source, kind), fs in groups.items():
        if kind == "unreadable":
            out.append(f"{fs[0]['name']} unreadable [{source}]")
            continue
        sizes = [f["max_abs_diff"] for f in fs if f["max_abs_diff"] is not None]
        size = f" (max |Δ| {max(sizes):.3g})" if sizes else ""
        who = fs[0]["name"] if len(fs) == 1 else f"{len(fs)} tensors"
        out.append(f"{who}: {kind}{size} [{source}]")
    return out
