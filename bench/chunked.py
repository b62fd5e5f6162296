"""Long samples at a large vocabulary under placement.logits_budget_gb: peak worker memory vs the budget.

    python bench/chunked.py [--lengths 8192 32768] [--vocab 152064] [--budget-gb 2]

A one-layer Llama with a 64-wide hidden state and a 152k vocabulary: its logits are nearly all of
its memory (a 32k-token sample is 19.9 GB of float32 logits per engine; whole, the reference and the
candidate would each hold several copies, more than this 24 GB machine has). Two hf engines score
one sample per length through the CLI; run.json gives each worker's private memory (RssAnon, sampled
every 10 ms) above what it held after loading, and its resident peak including the Ray object-store
pages it wrote or mapped. Goal: the private peak stays under the budget.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import run_cli, tmpdir, write_experiment

from crossengine.experiment.fixture_builders import build_logits_heavy


def build_model(out, vocab: int, max_len: int):
    return build_logits_heavy(out, vocab, max_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--budget-gb", type=float, default=2.0)
    args = ap.parse_args()
    d = tmpdir()
    model = build_model(d / "model", args.vocab, max(args.lengths))
    engines = "  ref: {type: hf, attn_implementation: sdpa}\n  cand: {type: hf, attn_implementation: sdpa}"
    print(f"vocab={args.vocab} budget={args.budget_gb:g} GiB per worker")
    for n in args.lengths:
        sample = [[1] + np.random.default_rng(n).integers(3, 500, n - 1).tolist()]
        path = write_experiment(d, str(model), engines, sample, f"batch_size: 1\nplacement: {{logits_budget_gb: {args.budget_gb}}}\n")
        t = time.perf_counter()
        meta = run_cli(path, d / f"results-{n}")
        wall = time.perf_counter() - t
        tm = meta["timings"]
        whole = n * args.vocab * 4 / 2**30
        print(
            f"T={n}: one engine's whole logits {whole:.1f} GiB; "
            + "; ".join(f"{e}: private peak +{tm[f'{e}.peak_above_load_gb']:.2f} GiB (resident peak {tm[f'{e}.peak_rss_gb']:.2f} GiB with mapped store pages)" for e in ("ref", "cand"))
            + f"; scoring {tm['scoring_s']:.0f} s (metrics {tm.get('cand.metrics_s', 0):.0f} s), run {wall:.0f} s"
        )


if __name__ == "__main__":
    main()
