"""Per-token metrics, candidate vs reference, vectorised over a whole batch (definitions: README, "Token columns").

All formulas live here once; summaries (summary.py) and the RL monitor (monitor.py) reduce
the columns this module produces. Full-vocabulary work runs in torch, in row chunks, so
memory stays bounded at T×V of any size; sums accumulate in float64 and the numbers match
a float64 numpy reference to 1e-6 (tests/test_metrics.py).

Conventions: `lr`, `lc` are the reference's and the candidate's log-prob of the scored token.
Outside generation mode the reference plays the trainer `t` and the candidate the generator
`g`, so gen_kl = k3(lt − lg) reads as "how far the candidate's samples would be off".
"""

from __future__ import annotations

import numpy as np

from .adapters.base import TokenLogprobs

# Column -> Arrow type; the public token schema's metric part (results.py adds the keys).
METRIC_COLUMNS: dict[str, str] = {
    "lp_ref": "float32",
    "lp_cand": "float32",
    "lp_diff": "float32",
    "abs_lp_diff": "float32",
    "prob_diff": "float32",
    "mult_prob_error": "float32",
    "gen_kl": "float32",
    "policy_kl": "float32",
    "js": "float32",
    "kl_ref_cand": "float32",
    "kl_cand_ref": "float32",
    "cos_sim": "float32",
    "topk_kl": "float32",
    "topk_overlap": "float32",
    "top1_ref": "int32",
    "top1_cand": "int32",
    "top1_match": "bool",
    "top1_tie": "bool",
    "rank_in_cand": "int32",
}

_CHUNK_ELEMENTS = 1 << 22  # rows × vocab per chunk: 16 MiB of float32 per array


def k3(x: np.ndarray) -> np.ndarray:
    """Schulman's k3 estimator exp(x) − x − 1 (≥ 0, exact 0 at x = 0)."""
    return np.expm1(x) - x


def sampled_token_metrics(lt: np.ndarray, lg: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of the sampled token alone, from trainer (t) and generator (g) log-probs.

    Shared with the RL monitor, which has only these two numbers per token.
    """
    lt = lt.astype(np.float64)
    lg = lg.astype(np.float64)
    with np.errstate(invalid="ignore"):  # NaN in (positions a side did not score) gives NaN out
        log_mix = np.logaddexp(lt, lg) - np.log(2.0)  # log(½ e^t + ½ e^g)
    return {
        "lp_diff": lg - lt,
        "abs_lp_diff": np.abs(lg - lt),
        "prob_diff": np.exp(lg) - np.exp(lt),
        "mult_prob_error": np.exp(np.abs(lg - lt)),
        "gen_kl": k3(lt - lg),
        "policy_kl": k3(lg - lt),
        "js": 0.5 * k3(lt - log_mix) + 0.5 * k3(lg - log_mix),
    }


def token_metrics(ref: TokenLogprobs, cand: TokenLogprobs, token_ids: np.ndarray, tie_eps: float) -> dict[str, np.ndarray]:
    """Every metric column for positions 1..T-1 of one sample (row 0 scores nothing)."""
    rows = slice(1, None)
    ids = token_ids[rows]
    full = ref.full_vocab and cand.full_vocab
    if full:
        shifted = ref.logits_are_logprobs != cand.logits_are_logprobs  # raw logits vs log-probs: rows differ by log Z
        fv = _full_vocab_metrics(ref.logits[rows], cand.logits[rows], ids, centre=shifted)
        lr, lc = fv.pop("lp_ref"), fv.pop("lp_cand")
        if ref.logits_are_logprobs or cand.logits_are_logprobs:  # KL and rank are shift-invariant; a cosine is not
            fv["cos_sim"] = np.full(len(ids), np.nan)
    else:
        lr = ref.token_logprobs[rows].astype(np.float64)
        lc = cand.token_logprobs[rows].astype(np.float64)
        fv = _topk_rank_and_top1(ref, cand, rows)
        nan = np.full(len(ids), np.nan)
        fv.update(kl_ref_cand=nan, kl_cand_ref=nan, cos_sim=nan)
    out = {"lp_ref": lr, "lp_cand": lc, **sampled_token_metrics(lr, lc), **fv}
    out["top1_match"] = out["top1_ref"] == out["top1_cand"]
    gap = ref.topk_logprobs[rows, 0] - ref.topk_logprobs[rows, 1] if ref.topk_logprobs.shape[1] > 1 else np.full(len(ids), np.inf)
    out["top1_tie"] = ~out["top1_match"] & (gap < tie_eps)
    out["topk_kl"] = topk_kl(ref.topk_ids[rows], ref.topk_logprobs[rows], cand.topk_ids[rows], cand.topk_logprobs[rows])
    out["topk_overlap"] = topk_overlap(ref.topk_ids[rows], cand.topk_ids[rows])
    out["nonfinite"] = _mask_nonfinite(out, lr, lc)
    return out


def _mask_nonfinite(out: dict[str, np.ndarray], lr: np.ndarray, lc: np.ndarray) -> np.ndarray:
    """Code per position: 0 finite, 1 the reference, 2 the candidate, 3 both gave NaN/inf.

    A NaN or +inf anywhere in a row of logits makes that side's log-sum-exp, and so the
    scored token's log-prob, non-finite; a -inf log-prob of the scored token counts too.
    Every metric at a flagged position becomes null (False for the booleans): a broken
    number must never reach a mean as if it were a measurement.
    """
    code = (~np.isfinite(lr)).astype(np.int8) + 2 * (~np.isfinite(lc)).astype(np.int8)
    bad = code > 0
    if bad.any():
        for name, typ in METRIC_COLUMNS.items():
            col = np.array(out[name], dtype=np.float64 if typ == "float32" else out[name].dtype, copy=True)
            col[bad] = np.nan if typ == "float32" else (-1 if typ == "int32" else False)
            out[name] = col
    return code


def _full_vocab_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, ids: np.ndarray, centre: bool = False) -> dict[str, np.ndarray]:
    """KL both ways, cosine of logits, argmaxes and exact rank, from raw logits.

    The work is float32 (it is memory-bound at T×V). KL is written in δ = r − c, which float32
    subtracts exactly when logits are close, as a sum of non-negative terms plus a
    second-order correction, so nothing cancels:
        KL(r‖c) = Σ pr·k3(−δ) + (log1p(S) − S),   S = Σ pr·expm1(−δ),   k3(x) = eˣ − x − 1
    Identical logits give exactly 0; tiny KLs keep float32's relative precision instead of
    drowning in the rounding of two log-sum-exps. With `centre` (one side gives log-probs, the
    other raw logits) δ carries each row's log Z; it is removed in float64 (δ − (lse_r − lse_c))
    so that k3 sees the small differences, not the offset.
    """
    import torch

    n, vocab = ref_logits.shape
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    f64 = torch.float64
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("lp_ref", "lp_cand", "kl_ref_cand", "kl_cand_ref", "cos_sim", "top1_ref", "top1_cand", "rank_in_cand")}
    for start in range(0, n, step):
        r = torch.from_numpy(np.array(ref_logits[start : start + step], dtype=np.float32))
        c = torch.from_numpy(np.array(cand_logits[start : start + step], dtype=np.float32))
        tok = torch.from_numpy(np.array(ids[start : start + step], dtype=np.int64))[:, None]
        pr, lse_r, top1_ref = _softmax_lse(r)
        pc, lse_c, top1_cand = _softmax_lse(c)
        delta = r - c
        if centre:
            delta = delta.double() - (lse_r - lse_c)[:, None]
        cand_at_ref_top1 = c.gather(-1, top1_ref[:, None])
        chunk = {
            "lp_ref": r.gather(-1, tok)[:, 0].to(f64) - lse_r,
            "lp_cand": c.gather(-1, tok)[:, 0].to(f64) - lse_c,
            "kl_ref_cand": _kl_from_delta(pr, -delta),
            "kl_cand_ref": _kl_from_delta(pc, delta),
            "cos_sim": (r * c).sum(-1).to(f64) / ((r * r).sum(-1).to(f64) * (c * c).sum(-1).to(f64)).sqrt(),
            "top1_ref": top1_ref,
            "top1_cand": top1_cand,
            "rank_in_cand": 1 + (c > cand_at_ref_top1).sum(-1),
        }
        for k, v in chunk.items():
            cols[k].append(v.numpy())
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}


def _softmax_lse(x):
    """Probabilities (float32), log-sum-exp (float64) and argmax of each row."""
    import torch

    m, argmax = x.max(-1, keepdim=True)
    e = torch.exp(x - m)
    z = e.sum(-1, keepdim=True)
    return e.div_(z), m[:, 0].double() + torch.log(z[:, 0].double()), argmax[:, 0]


def _kl_from_delta(p, x):
    """KL(p‖q) where log q = log p + x + const per row: Σ p·k3(x) + log1p(S) − S, S = Σ p·expm1(x)."""
    import torch

    e = torch.expm1(x)
    s = (p * e).sum(-1).double()
    return (p * (e - x)).sum(-1).double() + torch.log1p(s) - s


def _topk_rank_and_top1(ref: TokenLogprobs, cand: TokenLogprobs, rows: slice) -> dict[str, np.ndarray]:
    top1_ref = ref.topk_ids[rows, 0]
    hit = cand.topk_ids[rows] == top1_ref[:, None]
    rank = np.where(hit.any(-1), hit.argmax(-1) + 1, -1)  # -1 -> null: beyond the candidate's k
    return {"top1_ref": top1_ref, "top1_cand": cand.topk_ids[rows, 0], "rank_in_cand": rank}


def topk_overlap(ref_ids: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
    """|top-k(r) ∩ top-k(c)| / k, row by row."""
    k = ref_ids.shape[1]
    return (ref_ids[:, :, None] == cand_ids[:, None, :]).any(-1).sum(-1) / k


def topk_kl(ref_ids: np.ndarray, ref_lp: np.ndarray, cand_ids: np.ndarray, cand_lp: np.ndarray) -> np.ndarray:
    """KL(ref ‖ cand) over the union U of both top-k sets plus one tail bucket.

    Each side knows its own top-k probabilities. An id of U outside a side's top-k gets
    min(that side's k-th probability, its remaining mass / (number unknown + 1)), an upper
    bound that keeps the distribution proper; the tail takes whatever mass is left. With
    identical top-k sets this is the KL of the coarse-grained distributions, a lower bound
    of the full KL (data-processing inequality).
    """
    ref_lp = ref_lp.astype(np.float64)
    cand_lp = cand_lp.astype(np.float64)
    union = np.concatenate([ref_ids, cand_ids], axis=1)  # [T, 2k]
    k = ref_ids.shape[1]
    dup = np.zeros(union.shape, dtype=bool)
    dup[:, k:] = (cand_ids[:, :, None] == ref_ids[:, None, :]).any(-1)  # cand ids already in ref's list
    p_ref = _side_probs(union, ref_ids, ref_lp, dup)
    p_cand = _side_probs(union, cand_ids, cand_lp, dup)
    eps = 1e-300
    return (p_ref * (np.log(p_ref + eps) - np.log(p_cand + eps))).sum(-1)


def _side_probs(union: np.ndarray, ids: np.ndarray, lp: np.ndarray, dup: np.ndarray) -> np.ndarray:
    """One side's probabilities over [U..., tail]; duplicates in U get zero."""
    probs = np.exp(lp)
    match = union[:, :, None] == ids[:, None, :]  # [T, 2k, k]
    known = match.any(-1) & ~dup
    p = np.where(known, (match * probs[:, None, :]).sum(-1), 0.0)
    unknown = ~known & ~dup
    rest = np.clip(1.0 - p.sum(-1), 0.0, None)
    n_unknown = unknown.sum(-1)
    share = np.minimum(probs[:, -1], rest / (n_unknown + 1))
    p = np.where(unknown, share[:, None], p)
    tail = np.clip(rest - share * n_unknown, 0.0, None)
    return np.concatenate([p, tail[:, None]], axis=1)
