"""crossengine end to end vs bare HF scoring of the same samples, start-up excluded.

    python bench/overhead.py [--samples 32] [--length 256]

Bare HF: both models loaded in this process, one forward each per sample, then the least a
script comparing two engines has to do for the same numbers: with the full vocabulary,
log_softmax of both and KL both ways over the vocabulary (the fair baseline for
`full_vocab: true`); top-k only, the scored token's log-prob and top-k of both.
crossengine: the same two engines through Ray, every metric column, Parquet, summary;
measured from run.json's scoring + summary timings (Ray and model start-up excluded).
Goals: full vocabulary ≤ 1.10× its bare script, top-k ≤ 1.05×. Both ratios come from one run.
"""

from __future__ import annotations

import os
import time

import torch
from common import bench_workload, run_cli, write_experiment


def bare_hf(model_dir, samples, threads: int, full: bool) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    models = [AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=a).eval() for a in ("sdpa", "eager")]
    t = time.perf_counter()
    with torch.inference_mode():
        for ids in samples:
            x = torch.tensor([ids])
            lr, lc = (m(input_ids=x).logits[0, :-1].float().log_softmax(-1) for m in models)
            lr.gather(-1, x[0, 1:, None]), lc.gather(-1, x[0, 1:, None]), lr.topk(20, dim=-1), lc.topk(20, dim=-1)
            if full:
                d = lr - lc
                (lr.exp() * d).sum(-1), (lc.exp() * -d).sum(-1)
    return time.perf_counter() - t


def main() -> None:
    args, d, model, samples = bench_workload(32)
    engines = "  ref: {type: hf, attn_implementation: sdpa}\n  cand: {type: hf, attn_implementation: eager}"
    print(f"samples={args.samples} length={args.length} vocab=32000")
    bare = {}
    for full in (True, False):
        # each ratio's two sides run back to back: this VM's speed drifts by 10-20 % over minutes
        bare[full] = bare_hf(model, samples, threads=os.cpu_count(), full=full)  # a plain script uses every core
        meta = run_cli(write_experiment(d, str(model), engines, samples, f"batch_size: 8\nfull_vocab: {str(full).lower()}\n"), d / f"results-{full}")
        tm = meta["timings"]
        ce = tm["scoring_s"] + tm["summary_s"]
        forward = tm.get("ref.forward_s", 0) + tm.get("cand.forward_s", 0)
        label = "full_vocab: true (KL both ways, cos, rank over 32k)" if full else "full_vocab: false (top-k metrics only)"
        goal = 1.10 if full else 1.05
        print(
            f"crossengine, {label}: {ce:.2f}s vs bare script {bare[full]:.2f}s = {ce / bare[full]:.2f}x  (goal <= {goal:.2f}x; "
            f"engines' own forward time {forward:.2f}s, in parallel; candidate's metric time {tm.get('cand.metrics_s', 0):.2f}s)"
        )


if __name__ == "__main__":
    main()
