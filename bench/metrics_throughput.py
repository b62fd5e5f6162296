"""Full-vocabulary metric throughput: the fused kernel vs the previous kernel vs a per-token loop.

    python bench/metrics_throughput.py [--T 2048] [--V 32000 152064 262144] [--loop-tokens 256]

All three compute the full-vocabulary columns (both log-probs, KL both ways, cosine, argmaxes,
exact rank) of one T×V pair of float32 logits, in this process, best of 3:
- fused: crossengine.compare.metrics._full_vocab_metrics (torch.compile'd `_fused_rows`), after one
  warm-up call that compiles it;
- previous: the kernel crossengine shipped before (ad6ed58), eager torch, one op per pass,
  kept here verbatim as the baseline;
- loop: the natural first implementation, numpy over the vocabulary, Python over positions,
  timed on the first `--loop-tokens` positions (it is linear in T) and reported per token.
Ratios are measured in one run; absolute rates on a shared 2-core VM vary by ±30 % between runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from crossengine.compare.metrics import _full_vocab_metrics


def previous_kernel(ref_logits: np.ndarray, cand_logits: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """crossengine's full-vocabulary kernel before the fused one (ad6ed58), unchanged."""
    n, vocab = ref_logits.shape
    step = max(1, (1 << 22) // max(vocab, 1))
    f64 = torch.float64
    cols: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, step):
        r = torch.from_numpy(np.array(ref_logits[start : start + step], dtype=np.float32))
        c = torch.from_numpy(np.array(cand_logits[start : start + step], dtype=np.float32))
        tok = torch.from_numpy(np.array(ids[start : start + step], dtype=np.int64))[:, None]
        pr, lse_r, top1_ref = _softmax_lse(r)
        pc, lse_c, top1_cand = _softmax_lse(c)
        delta = r - c
        chunk = {
            "lp_ref": r.gather(-1, tok)[:, 0].to(f64) - lse_r,
            "lp_cand": c.gather(-1, tok)[:, 0].to(f64) - lse_c,
            "kl_ref_cand": _kl_from_delta(pr, -delta),
            "kl_cand_ref": _kl_from_delta(pc, delta),
            "cos_sim": (r * c).sum(-1).to(f64) / ((r * r).sum(-1).to(f64) * (c * c).sum(-1).to(f64)).sqrt(),
            "top1_ref": top1_ref,
            "top1_cand": top1_cand,
            "rank_in_cand": 1 + (c > c.gather(-1, top1_ref[:, None])).sum(-1),
        }
        for k, v in chunk.items():
            cols.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def _softmax_lse(x):
    m, argmax = x.max(-1, keepdim=True)
    e = torch.exp(x - m)
    z = e.sum(-1, keepdim=True)
    return e.div_(z), m[:, 0].double() + torch.log(z[:, 0].double()), argmax[:, 0]


def _kl_from_delta(p, x):
    e = torch.expm1(x)
    s = (p * e).sum(-1).double()
    return (p * (e - x)).sum(-1).double() + torch.log1p(s) - s


def loop(ref: np.ndarray, cand: np.ndarray, ids: np.ndarray) -> list[dict]:
    """The same columns, one position at a time (numpy over the vocabulary, Python over tokens)."""
    rows = []
    for t in range(len(ids)):
        r, c = ref[t].astype(np.float64), cand[t].astype(np.float64)
        lr, lc = r - np.logaddexp.reduce(r), c - np.logaddexp.reduce(c)
        pr, pc = np.exp(lr), np.exp(lc)
        top_r = int(np.argmax(lr))
        rows.append(
            {
                "lp_ref": lr[ids[t]],
                "lp_cand": lc[ids[t]],
                "kl_ref_cand": float((pr * (lr - lc)).sum()),
                "kl_cand_ref": float((pc * (lc - lr)).sum()),
                "cos_sim": float(r @ c / np.linalg.norm(r) / np.linalg.norm(c)),
                "top1_ref": top_r,
                "top1_cand": int(np.argmax(lc)),
                "rank_in_cand": 1 + int((c > c[top_r]).sum()),
            }
        )
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
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 152064, 262144])
    ap.add_argument("--loop-tokens", type=int, default=256)
    args = ap.parse_args()
    print(f"T={args.T}, torch threads={torch.get_num_threads()}, best of 3 (loop: 1 run over {args.loop_tokens} positions)")
    print(f"{'V':>7} {'fused tok/s':>12} {'previous tok/s':>15} {'loop tok/s':>11} {'fused/previous':>15} {'fused/loop':>11}  max |Δ| fused vs previous")
    for V in args.V:
        rng = np.random.default_rng(0)
        ref = rng.normal(0, 3, (args.T, V)).astype(np.float32)
        cand = ref + rng.normal(0, 0.1, ref.shape).astype(np.float32)
        ids = rng.integers(0, V, args.T)
        t = time.perf_counter()
        fused_out = _full_vocab_metrics(ref, cand, ids)  # compiles (or loads inductor's cache)
        first = time.perf_counter() - t
        fused = best_of(lambda: _full_vocab_metrics(ref, cand, ids), 3)  # noqa: B023 (called at once)
        prev_out = previous_kernel(ref, cand, ids)
        previous = best_of(lambda: previous_kernel(ref, cand, ids), 3)  # noqa: B023 (called at once)
        n = min(args.loop_tokens, args.T)
        slow = best_of(lambda: loop(ref[:n], cand[:n], ids[:n]), 1) * args.T / n  # noqa: B023 (called at once)
        diff = max(float(np.max(np.abs(fused_out[k].astype(np.float64) - prev_out[k].astype(np.float64)))) for k in ("lp_ref", "kl_ref_cand", "kl_cand_ref", "cos_sim"))
        print(
            f"{V:>7} {args.T / fused:>12,.0f} {args.T / previous:>15,.0f} {args.T / slow:>11,.0f} {previous / fused:>14.1f}x {slow / fused:>10.0f}x  {diff:.1e}"
            f"   (first fused call, incl. compile: {first:.1f}s)"
        )


if __name__ == "__main__":
    main()
