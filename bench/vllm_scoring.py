"""vLLM scoring: the share of time spent turning its output into arrays, and HF vs vLLM wall time.

    python bench/vllm_scoring.py [--samples 64] [--length 256]

Needs .venvs/vllm (scripts/setup-vllm-env.sh). tiny-text, fp32, top_k=20, prompt_logprobs.
Timings come from the engines themselves (run.json): vLLM's score() total and its unpacking
of FlatLogprobs into numpy; HF's forward passes plus log-softmax/top-k.
Goal: unpacking < 10 % of vLLM scoring time.
"""

from __future__ import annotations

import argparse

from common import REPO, random_samples, run_cli, tmpdir, write_experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    d = tmpdir()
    python = REPO / ".venvs" / "vllm" / "bin" / "python"
    engines = f"  ref: {{type: hf}}\n  vllm: {{type: vllm, env: {{python: {python}}}, options: {{max_model_len: 1024}}}}"
    meta = run_cli(write_experiment(d, "tiny-text", engines, random_samples(args.samples, args.length, 512), "top_k: 20\nbatch_size: 16\n"), d / "results")
    t = meta["timings"]
    print(f"samples={args.samples} length={args.length} top_k=20 (tiny-text, fp32, CPU)")
    print(f"vLLM score(): {t['vllm.score_s']:.2f}s, of which unpacking to arrays {t['vllm.unpack_s']:.3f}s = {100 * t['vllm.unpack_s'] / t['vllm.score_s']:.1f}%  (goal < 10%)")
    print(f"HF forward passes: {t['ref.forward_s']:.2f}s   vLLM/HF wall: {t['vllm.score_s'] / t['ref.forward_s']:.2f}x")


if __name__ == "__main__":
    main()
