"""Vectorised per-token metrics vs a per-token Python loop, on one T×V pair of logits.

    python bench/metrics_throughput.py [--T 2048] [--V 32000]

The loop is the natural first implementation: for each position, numpy over the vocabulary
for the same columns (log-softmax, KL both ways, cosine, argmax, rank, top-k overlap).
Goal: vectorised ≥ 20× faster.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from crossengine.adapters.base import TokenLogprobs
from crossengine.metrics import token_metrics


def scores(logits: np.ndarray, ids: np.ndarray, k: int) -> TokenLogprobs:
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    top = np.argpartition(-lp, k, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(lp, top, 1), 1), 1)
    tok = lp[np.arange(len(ids)), ids]
    return TokenLogprobs(tok.astype(np.float32), order, np.take_along_axis(lp, order, 1).astype(np.float32), np.zeros(len(ids), np.int8), logits)


def loop(ref: np.ndarray, cand: np.ndarray, ids: np.ndarray, k: int, tie_eps: float = 1e-3) -> list[dict]:
    """The same columns, one position at a time (numpy over the vocabulary, Python over tokens)."""
    rows = []
    for t in range(1, len(ids)):
        r, c = ref[t].astype(np.float64), cand[t].astype(np.float64)
        lr, lc = r - np.logaddexp.reduce(r), c - np.logaddexp.reduce(c)
        pr, pc = np.exp(lr), np.exp(lc)
        a, b = lr[ids[t]], lc[ids[t]]
        m = np.logaddexp(a, b) - np.log(2)
        top_r, top_c = np.argsort(-lr)[:k], np.argsort(-lc)[:k]
        rows.append({
            "lp_ref": a, "lp_cand": b, "lp_diff": b - a, "abs_lp_diff": abs(b - a), "prob_diff": np.exp(b) - np.exp(a),
            "mult_prob_error": np.exp(abs(b - a)), "gen_kl": np.expm1(a - b) - (a - b), "policy_kl": np.expm1(b - a) - (b - a),
            "js": 0.5 * (np.expm1(a - m) - (a - m)) + 0.5 * (np.expm1(b - m) - (b - m)),
            "kl_ref_cand": float((pr * (lr - lc)).sum()), "kl_cand_ref": float((pc * (lc - lr)).sum()),
            "cos_sim": float(r @ c / np.linalg.norm(r) / np.linalg.norm(c)),
            "top1_ref": int(top_r[0]), "top1_cand": int(top_c[0]), "top1_match": top_r[0] == top_c[0],
            "top1_tie": top_r[0] != top_c[0] and lr[top_r[0]] - lr[top_r[1]] < tie_eps,
            "rank_in_cand": 1 + int((c > c[top_r[0]]).sum()),
            "topk_overlap": len(set(top_r) & set(top_c)) / k,
        })
    return rows


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (args.T, args.V)).astype(np.float32)
    cand = (ref + rng.normal(0, 0.1, ref.shape)).astype(np.float32)
    ids = rng.integers(0, args.V, args.T)
    r, c = scores(ref, ids, args.k), scores(cand, ids, args.k)
    token_metrics(r, c, ids, 1e-3)  # warm-up: thread pool, first-touch allocations
    vec = best_of(lambda: token_metrics(r, c, ids, 1e-3), 3)
    slow = best_of(lambda: loop(ref, cand, ids, args.k), 1)
    print(f"T={args.T} V={args.V} k={args.k}, best of runs, torch threads={__import__('torch').get_num_threads()}")
    print(f"vectorised, every column (incl. topk_kl): {vec:.2f}s  ({args.T / vec:,.0f} tokens/s)")
    print(f"per-token loop, same columns but topk_kl:  {slow:.2f}s  ({args.T / slow:,.0f} tokens/s)")
    print(f"speed-up: {slow / vec:.1f}x  (goal >= 20x)")


if __name__ == "__main__":
    main()
