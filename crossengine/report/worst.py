"""The run report's token-level sections: the alarms with their worst samples, and the worst tokens
with both engines' top-5.

Why apart: both read token rows and the model's vocabulary, which the summary sections do not.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from crossengine.compare.summary import read_tokens
from crossengine.identity import SAMPLED, display_name, display_names
from crossengine.report.page import (
    html_table,
)
from crossengine.run_meta import RunMeta

CONTEXT = 8  # tokens of context shown before a worst token
ALARM_SAMPLES, ALARM_TOKENS = 3, 5  # per alarm: the samples shown, and their tokens by per-token k3


def vocab_of(meta: RunMeta):
    """The reference's tokenizer, to show top-1 ids as text; None where it does not load here."""
    try:
        from transformers import AutoTokenizer

        path = meta.model_paths.get(meta.reference)
        return AutoTokenizer.from_pretrained(path) if path else None
    except Exception:  # noqa: BLE001 - a report without token texts for top-1 ids is still a report
        return None


def alarms_section(alarms: pd.DataFrame, tokens: pd.DataFrame) -> str:
    """Each alarm with its source, then the tokens behind it: in the samples that trip it alone, the
    ones with the largest per-token k3 (gen_kl), with context."""
    if alarms.empty:
        from crossengine.compare.alarms import RULES

        return f"<p class='note'>no alarm tripped ({len(RULES)} checked: {html.escape(', '.join(RULES))}; docs/guides/rl-monitor.md#alarms).</p>"
    table = alarms.assign(candidate=display_names(alarms), samples=[", ".join(x[:5]) + (f" and {len(x) - 5} more" if len(x) > 5 else "") for x in alarms["samples"]])
    parts = [html_table(table[["alarm", "candidate", "metric", "value", "limit", "samples", "source"]])]
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
            rows.append(
                {
                    "candidate": who,
                    "sample": sid,
                    "alarms": ", ".join(names),
                    "position": t["position"],
                    "segment": t["segment"],
                    "context": f"{before}⟦{t['token_text']}⟧",
                    "lp_ref": t["lp_ref"],
                    "lp_cand": t["lp_cand"],
                    "k3": t["gen_kl"],
                }
            )
    note = (
        f"<p class='note'>the tokens behind the alarms: in up to {ALARM_SAMPLES} samples per alarm that trip it alone, the {ALARM_TOKENS} with the "
        "largest per-token k3 = gen_kl (the reference as trainer, the candidate as rollout), ⟦the scored token⟧ after its context.</p>"
    )
    tokens_table = f"<details><summary>the tokens behind the alarms ({len(rows)})</summary>{note}{html_table(pd.DataFrame(rows), row_class=lambda r: 'ctx')}</details>"
    return "".join(parts) + (tokens_table if rows else "")


def worst_section(tokens: pd.DataFrame, meta: RunMeta, worst_dir: Path, n: int = 20) -> str:
    tok = vocab_of(meta)
    text = lambda i: "-" if pd.isna(i) or int(i) < 0 else (tok.decode([int(i)]) if tok is not None else str(int(i)))  # noqa: E731
    top5 = lambda ids, lps: ", ".join(f"{text(i)!r} {lp:.2f}" for i, lp in zip(ids, lps) if i >= 0)  # noqa: E731
    scored = tokens[tokens["variant"].astype(str) != SAMPLED]
    extra = {}
    if worst_dir.exists() and any(worst_dir.glob("*.parquet")):
        w = read_tokens(worst_dir)
        w = w[w["variant"].astype(str) != SAMPLED]
        extra = {(str(r.sample_id), int(r.position), display_name(str(r.cand_engine), str(r.variant))): r for r in w.itertuples(index=False)}
    has_kl = bool(scored["kl"].notna().any())
    worst = scored.nlargest(n, "rank_by")
    rows = []
    for _, r in worst.iterrows():
        seq = tokens[(tokens["sample_id"] == r["sample_id"]) & (tokens["instance"] == r["instance"])].set_index("position")["token_text"].astype(str)
        before = "".join(seq.get(p, "") for p in range(r["position"] - CONTEXT, r["position"]))
        after = "".join(seq.get(p, "") for p in range(r["position"] + 1, r["position"] + CONTEXT + 1))
        row = {
            "candidate": r["instance"],
            "sample": r["sample_id"],
            "position": r["position"],
            "kl": r["kl"],
            "|Δlp|": r["abs_lp_diff"],
            "context": f"{before}⟦{r['token_text']}⟧{after}",
            "lp_ref": r["lp_ref"],
            "lp_cand": r["lp_cand"],
        }
        w = extra.get((str(r["sample_id"]), int(r["position"]), r["instance"]))
        if w is not None:
            row.update({"reference's top-5": top5(w.top5_ref_ids, w.top5_ref_lp), "candidate's top-5": top5(w.top5_cand_ids, w.top5_cand_lp)})
        else:  # a run written before worst/ parts existed: the argmaxes are all there is
            row.update({"reference's top-1": text(r["top1_ref"]), "candidate's top-1": text(r["top1_cand"])})
        rows.append(row)
    ranked = "the largest KL (full-vocabulary where both engines gave logits, else top-k)" if has_kl else "the largest |Δ log-prob| (neither engine gave a distribution, so there is no KL)"
    note = f"<p class='note'>the {len(rows)} tokens with {ranked}, ±{CONTEXT} tokens of context, ⟦the scored token⟧, and each side's five most likely tokens with their log-probs.</p>"
    return note + html_table(pd.DataFrame(rows), row_class=lambda r: "ctx")
