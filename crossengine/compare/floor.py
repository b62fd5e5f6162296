"""noise.parquet and what the run says of the floors: per engine, how far its own conditions moved it.

Read from the noise/ parts on disk (like the summary from the token parts), so a resumed run
reduces old and new batches alike. One row per (engine, condition), plus the engine's pooled row
(condition "all"):

    n_samples, n_tokens         what was measured
    n_differ                    tokens whose log-prob under the condition is not bitwise the base one
    bitwise                     n_differ == 0
    distinct_max                "all" rows: the most distinct results one sample gave over base and
                                its conditions (1: invariant); condition rows: 1 or 2
    max_abs_diff, mean_abs_diff |lp − lp_base| over the tokens
    max_kl                      KL(base ‖ condition), where the engine gives full logits
    first_*                     the first token that differs (sample in run order, position,
                                condition): sample, position, token text, condition, both log-probs
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from crossengine.identity import display_name

ALL = "all"


def floor_table(noise_dir: Path) -> pd.DataFrame:
    """noise.parquet: see the module docstring; empty when no engine had a floor."""
    from crossengine.results import read_parts

    df = read_parts(noise_dir, strings=("engine", "sample_id", "condition", "token_text"))  # batch order: the first difference is the run's first
    if df is None or df.empty:
        return pd.DataFrame(columns=["engine", "condition"])
    rows = []
    for engine, g in df.groupby("engine", sort=False):
        rows.append({"engine": engine, "condition": ALL, **_stats(g, distinct=_distinct_max(g))})
        for cond, c in g.groupby("condition", sort=False):
            rows.append({"engine": engine, "condition": cond, **_stats(c, distinct=1 + int((c["lp"] != c["lp_base"]).any()))})
    return pd.DataFrame(rows)


def _stats(g: pd.DataFrame, distinct: int) -> dict:
    differ = g[g["lp"].to_numpy() != g["lp_base"].to_numpy()]
    rank = {sid: k for k, sid in enumerate(dict.fromkeys(g["sample_id"]))}  # run order
    differ = differ.assign(_rank=differ["sample_id"].map(rank)).sort_values(["_rank", "position"], kind="stable")
    first = differ.iloc[0] if len(differ) else None
    kl = g["kl"].dropna()
    return {
        "conditions": ", ".join(dict.fromkeys(g["condition"])),
        "n_samples": int(g["sample_id"].nunique()),
        "n_tokens": int(len(g.drop_duplicates(["sample_id", "position"]))),
        "n_differ": int(len(differ.drop_duplicates(["sample_id", "position"]))),
        "bitwise": first is None,
        "distinct_max": distinct,
        "max_abs_diff": float(g["abs_diff"].max()) if len(g) else np.nan,
        "mean_abs_diff": float(g["abs_diff"].mean()) if len(g) else np.nan,
        "max_kl": float(kl.max()) if len(kl) else np.nan,
        "worst_condition": str(g.loc[g["abs_diff"].idxmax(), "condition"]) if len(g) and g["abs_diff"].max() > 0 else None,
        "first_sample": None if first is None else str(first["sample_id"]),
        "first_position": -1 if first is None else int(first["position"]),
        "first_token": None if first is None else str(first["token_text"]),
        "first_condition": None if first is None else str(first["condition"]),
        "first_lp_base": np.nan if first is None else float(first["lp_base"]),
        "first_lp": np.nan if first is None else float(first["lp"]),
    }


def _distinct_max(g: pd.DataFrame) -> int:
    """The most distinct results (whole log-prob vectors, bitwise) one sample gave over base and its conditions."""
    best = 0
    for _, s in g.groupby("sample_id", sort=False):
        base = s[s["condition"] == s["condition"].iloc[0]].sort_values("position")["lp_base"].to_numpy()
        results = {base.tobytes()}
        for _, c in s.groupby("condition", sort=False):
            results.add(c.sort_values("position")["lp"].to_numpy().tobytes())
        best = max(best, len(results))
    return best


def engine_line(name: str, row: pd.Series) -> str:
    """How one engine's floor (its pooled row of noise.parquet) reads in a sentence."""
    n = len(row["conditions"].split(", "))
    if row["bitwise"]:
        return f"{name} is bitwise invariant over its {n} condition(s) ({row['conditions']}: 1 distinct result)"
    return f"{name} is not batch-invariant (max |Δlp| {row['max_abs_diff']:.3g} between base and {row['worst_condition']}; up to {int(row['distinct_max'])} distinct results per sample)"


def pair_lines(summary: pd.DataFrame, floors: pd.DataFrame, reference: str) -> list[str]:
    """One line per candidate with a floor on either side: the share of its tokens above both engines' noise, and each side's floor."""
    from crossengine.compare.summary import pooled_rows

    if "frac_above_noise" not in summary or floors.empty:
        return []
    pooled = floors[floors["condition"] == ALL].set_index("engine")
    out = []
    for _, r in pooled_rows(summary).iterrows():
        shown = display_name(r["cand_engine"], r["variant"])  # an engine's or variant's instance name
        frac = r["frac_above_noise"]
        if pd.isna(frac):
            continue
        sides = [shown, reference]
        said = "; ".join(engine_line(s, pooled.loc[s]) for s in sides if s in pooled.index)
        missing = [s for s in sides if s not in pooled.index]
        note = f"; {' and '.join(missing)} has no floor" if missing else ""
        out.append(f"{shown} vs {reference}: {100 * frac:.1f} % of tokens above both engines' noise ({int(r['n_above_noise'])} of {int(r['n_tokens'])}); {said}{note}")
    return out


def expectations(floors: pd.DataFrame, claims: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(failures, notes) of `expect: bitwise` claims. `claims`: engine -> its negative control's name, or None.
    A failure names the first token that differs; a note says whether the negative control differed (so the check can fail)."""
    pooled = floors[floors["condition"] == ALL].set_index("engine") if not floors.empty else pd.DataFrame()
    failures, notes = [], []
    for engine, control in claims.items():
        if engine not in pooled.index:
            failures.append(f"engine {engine!r} expects bitwise results, but no noise condition scored any of its tokens")
            continue
        r = pooled.loc[engine]
        if not r["bitwise"]:
            failures.append(
                f"engine {engine!r} expected bitwise results across its conditions ({r['conditions']}), but sample {r['first_sample']} "
                f"position {int(r['first_position'])} (token {r['first_token']!r}) differs: base {r['first_lp_base']:.6f} vs "
                f"{r['first_condition']} {r['first_lp']:.6f}"
            )
        else:
            notes.append(f"expect: bitwise held for {engine!r} over {int(r['n_tokens'])} tokens ({r['conditions']})")
        if control is None:
            continue
        if control not in pooled.index:
            notes.append(f"negative control {control!r} has no floor: nothing says the check on {engine!r} could fail")
        elif pooled.loc[control, "bitwise"]:
            notes.append(
                f"negative control {control!r} gave bitwise results too: the check on {engine!r} cannot fail under these conditions (too few or too alike, or the claimed setting changes nothing here)"
            )
        else:
            notes.append(f"negative control {control!r} differs (max |Δlp| {pooled.loc[control, 'max_abs_diff']:.3g}): the check on {engine!r} can fail")
    return failures, notes
