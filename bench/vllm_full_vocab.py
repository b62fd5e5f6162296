"""vLLM full-vocabulary scoring: logits from its worker vs its own prompt_logprobs=-1 pairs vs its top-k scoring.

    python bench/vllm_full_vocab.py [--samples 4] [--length 1024]

Needs .venvs/vllm (scripts/setup-vllm-env.sh). tiny-text-32k (V = 32,000), fp32, CPU. Three runs back to back in this
one invocation, each an HF reference and one vLLM engine scoring the same random prompts: `full_vocab: false` (top-k,
k = 20), `full_vocab: true` (logits from the worker, the default path) and `full_vocab: true, full_vocab_path:
prompt_logprobs` (vLLM's own T × V pairs, the path before; one prompt per batch, or it runs out of memory). Each figure is vLLM's own score() time as its worker
measured it (run.json timings), so the HF reference's work and start-up are outside it.
Goal: worker path ≤ 2× top-k.
"""

from __future__ import annotations

import argparse

from common import REPO, random_samples, run_cli, tmpdir, write_experiment

PATHS = {  # label: (engine fields, prompts per batch)
    "top-k (k = 20)": ("full_vocab: false", 4),
    "full vocabulary, logits from the worker": ("full_vocab: true", 4),
    # 4 prompts per batch of T x V Python pairs took 16.6 GB and Ray's memory monitor killed the worker (24 GB machine)
    "full vocabulary, prompt_logprobs=-1 pairs (1 prompt per batch)": ("full_vocab: true, full_vocab_path: prompt_logprobs", 1),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args()
    python = REPO / ".venvs" / "vllm" / "bin" / "python"
    samples = random_samples(args.samples, args.length, 32000)
    seconds = {}
    for label, (fields, batch) in PATHS.items():
        d = tmpdir()
        engines = f"  ref: {{type: hf, dtype: float32}}\n  vllm: {{type: vllm, dtype: float32, {fields}, env: {{python: {python}}}, options: {{max_model_len: {args.length + 8}}}}}"
        meta = run_cli(write_experiment(d, "tiny-text-32k", engines, samples, f"top_k: 20\nbatch_size: {batch}\nfull_vocab: true\n"), d / "results")
        seconds[label] = meta["timings"]["vllm.score_s"]
        print(f"{label}: vLLM score() {seconds[label]:.2f}s", flush=True)
    base = seconds["top-k (k = 20)"]
    print(f"samples={args.samples} length={args.length} V=32000 (tiny-text-32k, fp32, CPU)")
    for label, s in seconds.items():
        print(f"  {label}: {s:.2f}s = {s / base:.2f}x top-k")
    print("goal: worker path <= 2.00x top-k")


if __name__ == "__main__":
    main()
