"""crossengine end to end vs bare HF scoring of the same samples, start-up excluded.

    python bench/overhead.py [--samples 32] [--length 256]

Bare HF: both models loaded in this process, one forward each per sample, log_softmax,
top-k: the least a script comparing two engines has to do. crossengine: the same two
engines through Ray, metrics (full vocabulary, float64), Parquet, summary; measured from
run.json's scoring + summary timings (Ray and model start-up excluded). Goal: ≤ 1.10×.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import build_bench_model, random_samples, run_cli, tmpdir, write_experiment


def bare_hf(model_dir, samples, threads: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    models = [AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=a).eval() for a in ("sdpa", "eager")]
    t = time.perf_counter()
    with torch.inference_mode():
        for ids in samples:
            x = torch.tensor([ids])
            for m in models:
                lp = m(input_ids=x).logits[0, :-1].float().log_softmax(-1)
                lp.gather(-1, x[0, 1:, None]), lp.topk(20, dim=-1)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    d = tmpdir()
    model = build_bench_model(d / "model")
    samples = random_samples(args.samples, args.length, 32000)
    bare = bare_hf(model, samples, threads=os.cpu_count())  # a plain script uses every core
    engines = "  ref: {type: hf, attn_implementation: sdpa}\n  cand: {type: hf, attn_implementation: eager}"
    print(f"samples={args.samples} length={args.length} vocab=32000")
    print(f"bare HF scoring (sequential, all {os.cpu_count()} cores): {bare:.2f}s")
    for full in (True, False):
        meta = run_cli(write_experiment(d, str(model), engines, samples, f"batch_size: 8\nfull_vocab: {str(full).lower()}\n"), d / f"results-{full}")
        tm = meta["timings"]
        ce = tm["scoring_s"] + tm["summary_s"]
        forward = tm.get("ref.forward_s", 0) + tm.get("cand.forward_s", 0)
        label = "full_vocab: true (KL, cos over 32k logits)" if full else "full_vocab: false (top-k metrics only)"
        print(f"crossengine, {label}: {ce:.2f}s = {ce / bare:.2f}x bare  (engines' own forward time {forward:.2f}s, in parallel; goal <= 1.10x)")


if __name__ == "__main__":
    main()
