"""Sampling semantics: which quantity a dump's log-probs are, and a check of that claim against the reference's logits.

A rollout engine's log-probs are either raw (log_softmax of its logits, what vLLM's default `logprobs_mode` returns) or
processed (after the sampler's temperature and top-k/top-p, renormalised over the kept tokens: vLLM's
`processed_logprobs`). A trainer that forgets the rollout's temperature, or compares processed numbers with raw ones,
sees a mismatch that is no bug. A dump engine states its reading (`sampling:`); torch scoring engines then compute the
same quantity (`processed`), and the check here reads the dump's numbers under other readings, from the reference's full
logits, and says when one fits far better than the declared one ("look temperature-scaled by ~0.7").

torch only; runs in the candidate's worker beside the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crossengine.adapters.sampling import Reading, processed

GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)  # temperatures the check tries (unfiltered; 1.0 is raw)
TOP_P = (0.8, 0.9, 0.95)  # and top-p values (at temperature 1)
CHECK_ROWS = 256  # positions of each sample the check reads (its cost: one log-softmax over these rows per reading)
FAR_BETTER = 10.0  # another reading fits this many times better than the declared one: said
NOISE = 1e-3  # and the declared one is off by more than this mean |Δlp|


@dataclass
class Fit:
    """Sum of |Δlp| between a dump's numbers and each reading of the reference's logits, over `n` positions."""

    n: int = 0
    errors: dict[str, float] = field(default_factory=dict)  # "declared" or "T=0.7" -> sum |Δlp|

    def add(self, other: Fit) -> None:
        self.n += other.n
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0.0) + v


def fit(ref_logits, token_ids: np.ndarray, dump_lp: np.ndarray, scored: np.ndarray, declared: Reading) -> Fit:
    """The readings' errors at up to CHECK_ROWS of the positions the dump scored (rows of `ref_logits` predict each token)."""
    import torch

    rows = np.flatnonzero(scored)[:CHECK_ROWS]
    if len(rows) == 0:
        return Fit()
    a, b = int(rows[0]), int(rows[-1]) + 1
    block = ref_logits.rows(a, b) if hasattr(ref_logits, "rows") else ref_logits[a:b]  # LogitRows of a long sample, or whole logits
    block = block if hasattr(block, "float") else torch.as_tensor(np.asarray(block))
    logits = block[torch.as_tensor(rows - a, device=block.device)].float()
    ids = torch.as_tensor(token_ids[rows], device=logits.device)[:, None]
    want = torch.as_tensor(dump_lp[rows], dtype=torch.float64, device=logits.device)
    out = Fit(len(rows))
    readings = {"declared": declared, **{f"T={t:g}": Reading(t) for t in GRID}, **{f"p={p:g}": Reading(top_p=p) for p in TOP_P}}
    for name, reading in readings.items():
        lp = torch.log_softmax(processed(logits, reading), -1).gather(-1, ids)[:, 0].double()
        out.errors[name] = float(torch.nan_to_num((lp - want).abs(), posinf=1e3).sum())
    return out


def check_line(candidate: str, f: Fit, declared: Reading) -> str:
    """One line: another reading of the reference's logits fits the dump far better than the declared one (which), or none does."""
    if f.n == 0:
        return f"sampling check: {candidate}: no position to check"
    mean = {k: v / f.n for k, v in f.errors.items()}
    best = min((k for k in mean if k != "declared"), key=lambda k: mean[k])
    kind, value = best.split("=")
    reading = Reading(float(value)) if kind == "T" else Reading(top_p=float(value))
    if mean["declared"] > NOISE and mean["declared"] > FAR_BETTER * mean[best]:
        return (
            f"sampling check: {candidate}: its log-probs look {reading.says()} (mean |Δlp| {mean[best]:.3g} read that way), "
            f"but `sampling` says {declared.says()} (mean |Δlp| {mean['declared']:.3g}; {f.n} tokens)"
        )
    return f"sampling check: {candidate}: no reading fits its log-probs far better than `sampling`'s, {declared.says()} (mean |Δlp| {mean['declared']:.3g} over {f.n} tokens)"
