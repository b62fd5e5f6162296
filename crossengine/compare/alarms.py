"""Alarms: the RL frameworks' own published limits, checked on a run's summary and on each sample.

A number alone does not say "bug or noise"; each framework publishes the value at which its
users should stop and look. An alarm is such a limit on one metric of `frameworks.py`,
with its source. It is checked twice: on the candidate's pooled numbers (the summary row
with every split at "all") and on each sample's own numbers, so that the line that reports
it names the samples that trip it alone. A limit can be changed or switched off by name
(the experiment's `alarms:`, `KLMonitor(alarms=...)`, `crossengine monitor --alarm`).

Per-sample numbers are computed here with pandas group-bys over token rows (a 100k-sample
run must not call `framework_metrics` 100k times); tests check them against
`framework_metrics` of each sample alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from crossengine.compare.frameworks import SAFETY_BOUND, TIS_THRESHOLD
from crossengine.identity import display_name

SAMPLES_NAMED = 5  # an alarm line names this many samples, worst first; alarms.parquet keeps them all


@dataclass(frozen=True)
class Rule:
    """One published limit: `metric` trips it when above `limit`, below it, or outside [lo, hi]."""

    name: str
    metric: str
    test: str  # "above" | "below" | "outside" | "abs_above"
    limit: Any  # float, or (lo, hi) for "outside"
    source: str
    pooled: bool = True  # checked on the candidate's pooled numbers; False: per sample (turn) only
    dense_only: bool = False

    def trips(self, value: float) -> bool:
        if value is None or not np.isfinite(value):
            return False
        if self.test == "above":
            return value > self.limit
        if self.test == "abs_above":
            return abs(value) > self.limit
        if self.test == "below":
            return value < self.limit
        lo, hi = self.limit
        return value < lo or value > hi

    def says(self) -> str:
        """The limit in words: '> 1.05', 'outside [0.5, 2]'."""
        if self.test == "outside":
            return f"outside [{self.limit[0]:g}, {self.limit[1]:g}]"
        return {"above": "> ", "abs_above": "|·| > ", "below": "< "}[self.test] + f"{self.limit:g}"


TURN_K3 = "turn_k3_median"  # a sample's median per-token k3 over its completion (its turn)
RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("token_mult_prob_error", "token_mult_prob_error", "above", 1.05, "NeMo-RL docs (model-support checklist): 1.0 is perfect, above 1.05 investigate"),
        Rule("gen_kl_error", "gen_kl_error", "above", 1e-3, "NeMo-RL CI gates: mean gen_kl_error < 1e-3"),
        Rule("rollout_is_mean", "rollout_corr/rollout_is_mean", "outside", (0.5, 2.0), "verl rollout_corr docs: IS mean outside [0.5, 2]"),
        # verl computes its ESS on weights clamped to [0.5, 2], which keeps it above 0.64: the published
        # limit is checked on the same ESS without the clamp, or it could never trip (docs/guides/rl-monitor.md#alarms)
        Rule("rollout_is_eff_sample_size", "is_eff_sample_size_untruncated", "below", 0.3, "verl rollout_corr docs: ESS < 0.3 (on unclamped weights: verl's clamped ESS never goes below 0.64)"),
        Rule("kl", "rollout_corr/kl", "abs_above", 0.1, "verl rollout_corr docs: |kl| > 0.1"),
        Rule("chi2_token", "rollout_corr/chi2_token", "above", 1.0, "verl rollout_corr docs: chi2_token > 1"),
        Rule("abs_lp_diff_dense", "rollout_train_logprobs_abs_diff_mean", "above", 0.03, "miles' rule of thumb: trainer vs engine within 0.03 mean |Δlp| at step 0 on a dense model", dense_only=True),
        Rule("template_mismatch", TURN_K3, "above", 0.4, "miles' rule of thumb: per-token k3 near 0.8 over a whole turn is a chat-template mismatch (here: the turn's median above 0.4)", pooled=False),
    )
}


def rules(overrides: dict[str, Any] | None = None) -> dict[str, Rule]:
    """The rules with the user's limits: a number (or [lo, hi]) replaces one, null switches it off.
    An unknown name or a limit of the wrong shape is a ValueError naming it (one line)."""
    out = dict(RULES)
    for name, limit in (overrides or {}).items():
        if name not in RULES:
            raise ValueError(f"unknown alarm {name!r}; alarms are {', '.join(RULES)}")
        if limit is None:
            out.pop(name)
            continue
        rule = RULES[name]
        pair = isinstance(limit, (list, tuple))
        if pair != (rule.test == "outside") or (pair and len(limit) != 2):
            raise ValueError(f"alarm {name!r} takes {'[low, high]' if rule.test == 'outside' else 'one number'} (or null to switch it off)")
        out[name] = replace(rule, limit=tuple(float(x) for x in limit) if pair else float(limit))
    return out


def per_sample(tokens: pd.DataFrame) -> pd.DataFrame:
    """Each sample's numbers for the alarm metrics, from token rows (lp_ref = t, lp_cand = g),
    finite rows only; index: sample_id."""
    df = tokens[tokens["lp_ref"].notna() & tokens["lp_cand"].notna()]
    t = df["lp_ref"].to_numpy(np.float64)
    g = df["lp_cand"].to_numpy(np.float64)
    w = np.exp(np.clip(t - g, -SAFETY_BOUND, SAFETY_BOUND))
    c = np.clip(w, 1 / TIS_THRESHOLD, TIS_THRESHOLD)
    k3 = np.expm1(t - g) - (t - g)
    parts = pd.DataFrame(
        {
            "sample_id": df["sample_id"].astype(str).to_numpy(),
            "token_mult_prob_error": np.exp(np.abs(g - t)),
            "gen_kl_error": k3,
            "rollout_corr/rollout_is_mean": w,
            "c": c,
            "c2": c * c,
            "rollout_corr/kl": g - t,
            "w2": w * w,
            "rollout_train_logprobs_abs_diff_mean": np.abs(g - t),
        }
    )
    means = parts.groupby("sample_id", sort=False).mean()
    means["rollout_corr/rollout_is_eff_sample_size"] = 1 / (means["c2"] / (means["c"] + 1e-8) ** 2)
    means["is_eff_sample_size_untruncated"] = means["rollout_corr/rollout_is_mean"] ** 2 / means["w2"]
    means["rollout_corr/chi2_token"] = means["w2"] - 1
    turn = (df["segment"] == "completion").to_numpy() if "segment" in df else np.zeros(len(df), bool)
    has_turn = pd.Series(turn).groupby(parts["sample_id"].to_numpy(), sort=False).transform("any").to_numpy()
    in_turn = turn | ~has_turn  # a sample without a completion: its scored tokens are its turn
    means[TURN_K3] = pd.Series(k3[in_turn]).groupby(parts["sample_id"].to_numpy()[in_turn], sort=False).median()
    return means.drop(columns=["c", "c2", "w2"])


@dataclass
class Tripped:
    """One alarm on one candidate: its pooled value (None for per-sample rules) and the samples that trip it alone."""

    rule: Rule
    cand_engine: str
    variant: str
    value: float | None
    samples: list[tuple[str, float]]

    def line(self, who: str) -> str:
        return alarm_line(self.rule.name, self.rule.metric, who, self.value, self.rule.says(), self.rule.source, self.samples)


def alarm_line(name: str, metric: str, who: str, value: float | None, says: str, source: str, samples: list[tuple[str, float]]) -> str:
    """One `alarm:` line: the alarm, who, its value against its limit, the samples that trip it alone, its source."""
    named = ", ".join(f"{s} ({v:.3g})" for s, v in samples[:SAMPLES_NAMED])
    more = f" and {len(samples) - SAMPLES_NAMED} more" if len(samples) > SAMPLES_NAMED else ""
    if value is not None:
        head = f"alarm: {name}: {who} {metric} = {value:.4g}, {says}"
        tail = f"; samples that trip it alone: {named}{more}" if samples else "; no sample trips it alone"
    else:
        head = f"alarm: {name}: {who} {len(samples)} sample(s) with {metric} {says}"
        tail = f": {named}{more}"
    return f"{head}{tail} [{source}]"


def check(pooled: dict[str, float], samples: pd.DataFrame | None, active: Iterable[Rule], dense: bool | None, cand_engine: str = "", variant: str = "") -> list[Tripped]:
    """The alarms one candidate trips: pooled on its summary numbers, each with the samples that trip it alone."""
    out = []
    for rule in active:
        if rule.dense_only and dense is False:
            continue
        value = pooled.get(rule.metric) if rule.pooled else None
        hits: list[tuple[str, float]] = []
        if samples is not None and rule.metric in samples:
            col = samples[rule.metric]
            bad = col[[rule.trips(v) for v in col.to_numpy()]]
            order = bad.abs().sort_values(ascending=rule.test == "below") if rule.test != "outside" else (bad - 1).abs().sort_values(ascending=False)
            hits = [(str(s), float(bad[s])) for s in order.index]
        if (rule.pooled and rule.trips(value)) or (not rule.pooled and hits):
            out.append(Tripped(rule, cand_engine, variant, value, hits))
    return out


ALARM_COLUMNS = ["alarm", "metric", "cand_engine", "variant", "value", "limit", "source", "samples", "sample_values"]


def to_frame(tripped: list[Tripped]) -> pd.DataFrame:
    """alarms.parquet: one row per (alarm, candidate)."""
    rows = [
        {
            "alarm": a.rule.name,
            "metric": a.rule.metric,
            "cand_engine": a.cand_engine,
            "variant": a.variant,
            "value": a.value,
            "limit": a.rule.says(),
            "source": a.rule.source,
            "samples": [s for s, _ in a.samples],
            "sample_values": [v for _, v in a.samples],
        }
        for a in tripped
    ]
    return pd.DataFrame(rows, columns=ALARM_COLUMNS)


def lines(frame: pd.DataFrame) -> list[str]:
    """The terminal's `alarm:` lines from alarms.parquet."""

    out = []
    for r in frame.itertuples(index=False):
        value = None if r.value is None or np.isnan(r.value) else float(r.value)
        who = str(display_name(r.cand_engine, r.variant))
        out.append(alarm_line(r.alarm, r.metric, who, value, r.limit, r.source, list(zip(list(r.samples), list(r.sample_values)))))
    return out


def run_alarms(tokens_dir, summary: pd.DataFrame, limits: dict[str, Any] | None, dense: bool | None) -> pd.DataFrame:
    """Every candidate's alarms (alarms.parquet), one candidate's token rows read at a time."""
    import pyarrow.dataset as ds

    from crossengine.compare.summary import SPLITS

    active = list(rules(limits).values())
    tripped: list[Tripped] = []
    pooled = summary[(summary[list(SPLITS)] == "all").all(axis=1) & (summary["n_tokens"] > 0)] if len(summary) else summary
    files = sorted(tokens_dir.glob("*.parquet")) if tokens_dir.is_dir() else []
    dataset = ds.dataset([str(f) for f in files], format="parquet") if files else None
    for row in pooled.to_dict("records"):
        flt = (ds.field("cand_engine") == str(row["cand_engine"])) & (ds.field("variant") == str(row["variant"]))
        tokens = dataset.to_table(columns=["sample_id", "segment", "lp_ref", "lp_cand"], filter=flt).to_pandas()
        tripped += check(row, per_sample(tokens), active, dense, str(row["cand_engine"]), str(row["variant"]))
    return to_frame(tripped)
