"""Per-token metrics, candidate vs reference, vectorised over a whole batch (definitions: docs/reference/schemas.md, "Token columns").

All formulas live here once; summaries (summary.py) and the RL monitor (monitor.py) reduce
the columns this module produces. Full-vocabulary work is one fused torch kernel over row
blocks (`_fused_rows`, compiled by inductor), run in the candidate's worker next to its
logits; sums accumulate in float64 and the numbers match a float64 numpy reference to 1e-6
(tests/test_metrics.py).

Conventions: `lr`, `lc` are the reference's and the candidate's log-prob of the scored token.
Outside generation mode the reference plays the trainer `t` and the candidate the generator
`g`, so gen_kl = k3(lt − lg) reads as "how far the candidate's samples would be off".
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from crossengine.adapters.base import TokenLogprobs
from crossengine.adapters.blocks import block_rows, blocks, logit_block
from crossengine.columns import METRIC_COLUMNS

_CHUNK_ELEMENTS = 1 << 24  # rows × vocab per block: 64 MiB of float32 per side (fused: no T×V temporaries)
EAGER_TEMPORARIES = 8  # the uncompiled kernel holds about this many block-sized temporaries at once


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
    # One number per token and engine: lp_ref and lp_cand are each engine's own reported log-prob of the
    # scored token, whichever path the rest takes, so the reference's column is bitwise the same in every
    # candidate's rows (docs/reference/metrics.md, "One reference per token").
    lr = ref.token_logprobs[rows].astype(np.float64)
    lc = cand.token_logprobs[rows].astype(np.float64)
    if full:
        shifted = ref.logits_are_logprobs != cand.logits_are_logprobs  # raw logits vs log-probs: rows differ by log Z
        fv = _full_vocab_metrics(ref.logits, cand.logits, token_ids, centre=shifted)
        del fv["lp_ref"], fv["lp_cand"]  # the kernel's own recomputation (float64 sums) can differ by an ulp
        if ref.logits_are_logprobs or cand.logits_are_logprobs:  # KL and rank are shift-invariant; a cosine is not
            fv["cos_sim"] = np.full(len(ids), np.nan)
    else:
        fv = _topk_rank_and_top1(ref, cand, rows)
        nan = np.full(len(ids), np.nan)
        fv.update(kl_ref_cand=nan, kl_cand_ref=nan, cos_sim=nan)
    out = {"lp_ref": lr, "lp_cand": lc, **sampled_token_metrics(lr, lc), **fv}
    out["top1_match"] = out["top1_ref"] == out["top1_cand"]
    gap = ref.topk_logprobs[rows, 0] - ref.topk_logprobs[rows, 1] if ref.topk_logprobs.shape[1] > 1 else np.full(len(ids), np.inf)
    out["top1_tie"] = ~out["top1_match"] & (gap < tie_eps)
    out["topk_kl"] = topk_kl(ref.topk_ids[rows], ref.topk_logprobs[rows], cand.topk_ids[rows], cand.topk_logprobs[rows])
    out["topk_overlap"] = topk_overlap(ref.topk_ids[rows], cand.topk_ids[rows])
    unknown = (ref.topk_ids[rows, 0] < 0) | (cand.topk_ids[rows, 0] < 0)  # a side without top-k (a dump of sampled log-probs only)
    if unknown.any():
        out["topk_overlap"] = np.where(unknown, np.nan, out["topk_overlap"])
        out["top1_match"] = out["top1_match"] & ~unknown  # null in the token table (results.token_table), not a mismatch
        out["top1_tie"] = out["top1_tie"] & ~unknown
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


def _full_vocab_metrics(ref_logits, cand_logits, token_ids: np.ndarray, centre: bool = False) -> dict[str, np.ndarray]:
    """KL both ways, cosine of logits, argmaxes and exact rank at positions 1..T-1, from raw logits, in row blocks.

    Runs where it is called: in a candidate's Ray worker (crossengine/run/worker.py), on that
    worker's GPU when it has one. Each side is an array, a tensor, or a LogitRows (a long sample
    whose logits are computed or fetched a block at a time: never whole). With `centre` (one
    side gives log-probs, the other raw logits) the rows differ by log Z, which is removed first
    (see `_fused_rows`).
    """
    import torch

    n, vocab = ref_logits.shape
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    step = block_rows(_CHUNK_ELEMENTS, ref_logits, cand_logits)
    if fused_kernel(step * vocab) is _fused_rows:
        step = max(1, step // EAGER_TEMPORARIES)  # the eager form makes block-sized temporaries: smaller blocks, the same memory
    cols: dict[str, list[np.ndarray]] = {}
    for a, b in blocks(n, step, start=1):
        r = torch.as_tensor(logit_block(ref_logits, a, b), dtype=torch.float32, device=device)  # host numpy or a tensor (Ray Direct Transport)
        c = torch.as_tensor(logit_block(cand_logits, a, b), dtype=torch.float32, device=device)
        tok = torch.as_tensor(np.asarray(token_ids[a:b], dtype=np.int64), device=device)[:, None]
        shift = torch.logsumexp(r.double(), -1) - torch.logsumexp(c.double(), -1) if centre else None
        for k, v in fused_kernel(r.numel())(r, c, tok, shift).items():
            cols.setdefault(k, []).append(v.cpu().numpy())
        del r, c
    return {k: np.concatenate(v) for k, v in cols.items()} if cols else {k: np.empty(0) for k in _FUSED_COLUMNS}


_FUSED_COLUMNS = ("lp_ref", "lp_cand", "kl_ref_cand", "kl_cand_ref", "cos_sim", "top1_ref", "top1_cand", "rank_in_cand")
_COMPILE_FROM_ELEMENTS = 1 << 20  # below ~4 MiB per side, compiling costs more than it saves
_compiled = None  # the torch.compile'd _fused_rows, once per process and vocabulary size; False where compiling failed


def fused_kernel(elements: int, compiled: bool | None = None):
    """`_fused_rows`, compiled by torch.compile (inductor: C++/OpenMP on CPU, Triton on CUDA) for
    blocks of at least `_COMPILE_FROM_ELEMENTS`, else run eagerly; both compute the same numbers.

    Compiling takes seconds the first time on a machine (inductor caches the result on disk).
    Where it fails (no C++ compiler, an unsupported torch) the eager function is used instead.
    """
    global _compiled
    if compiled is None:  # once compiled (a worker warmed up for its vocabulary), every block size takes it: rows are dynamic
        compiled = elements >= _COMPILE_FROM_ELEMENTS or bool(_compiled)
    if not compiled or _compiled is False:
        return _fused_rows
    if _compiled is None:
        import torch

        # the vocabulary is static (one compile per model: 30 % faster code on CPU than all-dynamic), rows are
        # dynamic (every block size, one compile)
        _compiled = torch.compile(_fused_rows, dynamic=None)
    return _run_or_fall_back


WARM_UP_FROM_VOCAB = 8192  # real vocabularies; the tiny test fixtures (V = 512) stay eager


def warm_up(vocab: int) -> float:
    """Compile the kernel on a small block of this vocabulary (seconds, once per worker); its time."""

    import torch

    t = time.perf_counter()
    r, c = torch.zeros(8, vocab), torch.ones(8, vocab)  # two tensors: the same one twice would compile for aliasing
    fused_kernel(r.numel(), compiled=True)(r, c, torch.zeros(8, 1, dtype=torch.int64), None)
    return time.perf_counter() - t


def _run_or_fall_back(*args):
    global _compiled
    import torch

    for a in args:
        if a is not None:
            torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return _compiled(*args)
    except Exception as exc:  # noqa: BLE001 - a compiler problem must not lose the run: same numbers, eagerly
        warnings.warn(f"crossengine: torch.compile of the metric kernel failed ({type(exc).__name__}: {exc}); metrics run eagerly", stacklevel=2)
        _compiled = False
        return _fused_rows(*args)


def _fused_rows(r, c, tok, shift):
    """Every full-vocabulary column of a block of rows, in one pass over the vocabulary after the maxes.

    The sums accumulate in float64. KL is written in x = c − r (+ shift = lse_r − lse_c where
    one side gives log-probs), which float32 subtracts exactly when logits are close, as a sum of non-negative terms plus a second-order correction, so nothing
    cancels:
        KL(r‖c) = Σ pr·k3(x) + (log1p(S) − S),     S  = Σ pr·expm1(x),   k3(x) = eˣ − x − 1
        KL(c‖r) = Σ pc·k3(−x) + (log1p(S') − S'),  S' = Σ pc·expm1(−x)
    Identical logits give exactly 0, and tiny KLs keep float32's relative precision: k3 is a
    Taylor polynomial for |x| < 1/4 (eˣ − 1 − x would cancel there; inductor's vectorised
    expm1 is exp − 1, which cancels too). Three exponentials per element: both softmaxes, eˣ.
    A −inf logit on both sides adds nothing; on one side only, the KL toward the side without
    mass there is +inf (it is), never NaN.
    """
    import torch

    f64 = torch.float64
    mr, top1_ref = r.max(-1, keepdim=True)
    mc, top1_cand = c.max(-1, keepdim=True)
    er, ec = torch.exp(r - mr), torch.exp(c - mc)
    x = c - r if shift is None else (c.to(f64) - r.to(f64) + shift[:, None]).to(r.dtype)  # float64: the offset is large
    x = torch.where(torch.isnan(x), 0.0, x)  # −inf on both sides: no mass, no term
    ex = torch.exp(x)
    small = x.abs() < 0.25
    t_pos, t_neg = _k3_taylor(x)
    k3_pos = torch.where(small, t_pos, ex - 1 - x)  # no cancellation where |x| ≥ 1/4
    k3_neg = torch.where(small, t_neg, 1 / ex - 1 + x)
    em_pos = torch.where(small, t_pos + x, ex - 1)  # expm1(x)
    em_neg = torch.where(small, t_neg - x, 1 / ex - 1)  # expm1(−x)
    zr, zc = er.sum(-1, dtype=f64), ec.sum(-1, dtype=f64)
    mass_r, mass_c = er > 0, ec > 0  # 0·∞ where one side is −inf: no mass, no term
    s_pos = torch.where(mass_r, er * em_pos, 0.0).sum(-1, dtype=f64) / zr
    s_neg = torch.where(mass_c, ec * em_neg, 0.0).sum(-1, dtype=f64) / zc
    kl_pos = torch.where(mass_r, er * k3_pos, 0.0).sum(-1, dtype=f64) / zr
    kl_neg = torch.where(mass_c, ec * k3_neg, 0.0).sum(-1, dtype=f64) / zc
    lse_r, lse_c = mr[:, 0].to(f64) + zr.log(), mc[:, 0].to(f64) + zc.log()
    return {
        "lp_ref": r.gather(-1, tok)[:, 0].to(f64) - lse_r,
        "lp_cand": c.gather(-1, tok)[:, 0].to(f64) - lse_c,
        "kl_ref_cand": kl_pos + torch.log1p(s_pos) - s_pos,
        "kl_cand_ref": kl_neg + torch.log1p(s_neg) - s_neg,
        "cos_sim": (r * c).sum(-1, dtype=f64) / ((r * r).sum(-1, dtype=f64) * (c * c).sum(-1, dtype=f64)).sqrt(),
        "top1_ref": top1_ref[:, 0],
        "top1_cand": top1_cand[:, 0],
        "rank_in_cand": 1 + (c > c.gather(-1, top1_ref)).sum(-1),
    }


def _k3_taylor(x):
    """(eˣ − 1 − x, e⁻ˣ − 1 + x) for |x| < 1/4 to float32 precision (next term < 1e-9 relative).

    Even and odd parts are shared by both signs; constants are multiplied, never divided
    (inductor would emit a division per element).
    """
    x2 = x * x
    even = 0.5 + x2 * (1 / 24 + x2 * (1 / 720 + x2 * (1 / 40320)))
    odd = x * (1 / 6 + x2 * (1 / 120 + x2 * (1 / 5040)))
    return x2 * (even + odd), x2 * (even - odd)


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
