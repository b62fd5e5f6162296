"""A model of real shape: crossengine's run against each engine's bare script, on the Qwen3-0.6B shape.

    python bench/real_shape.py [--prompts 2] [--length 1024]

shape-qwen3-0.6b (crossengine/experiment/shapes.py: 28 layers, hidden 1,024, vocabulary 151,936, random bf16 weights).
Engines: HF fp32 (the reference), HF bf16, vLLM fp32 (.venvs/vllm). Each bare script is what a user would write
instead: load the model, forward each prompt, log-softmax in fp32, each token's log-prob and the top-20; vLLM's asks
`prompt_logprobs=20`. It runs in a fresh process and times itself from its first import to its last array. Then two
crossengine runs of the same prompts: top-k (k = 20) and full vocabulary (HF's full logits, vLLM's from its worker),
timed as a fresh CLI process end to end (Ray's start included) with the driver's peak resident memory, and each
worker's peak above its loaded model (run.json). All in this one invocation, back to back.
Goals: crossengine ≤ 1.15× the sum of the bare scripts (top-k), ≤ 1.3× (full vocabulary); driver ≤ 1 GB.
The default is 2 prompts, not 8: on this 2-core CPU one bf16 forward of 1,024 tokens at this size takes about a
minute, and eight prompts would take a run past 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import REPO, random_samples, tmpdir, write_experiment

from crossengine.experiment.fixtures import ensure_fixture

HF_BARE = """
import json, sys, time
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
path, dtype, prompts = sys.argv[1], getattr(torch, sys.argv[2]), json.load(open(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
with torch.no_grad():
    for ids in prompts:
        x = torch.tensor(ids)[None]
        lp = model(x).logits[0, :-1].float().log_softmax(-1)
        token = lp.gather(-1, x[0, 1:, None])[:, 0].numpy()
        top = torch.topk(lp, 20, dim=-1)
        top.values.numpy(), top.indices.numpy()
print("BARE_SECONDS", time.perf_counter() - t)
"""

VLLM_BARE = """
import json, os, sys, time
t = time.perf_counter()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    path, prompts = sys.argv[1], json.load(open(sys.argv[3]))
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=len(prompts[0]) + 8, max_logprobs=-1, gpu_memory_utilization=0.1)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=20, flat_logprobs=True, detokenize=False)
    for out in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False):
        flat = out.prompt_logprobs
        np.asarray(flat.logprobs), np.asarray(flat.token_ids)
    print("BARE_SECONDS", time.perf_counter() - t)
"""


def bare(python: Path, code: str, model: Path, dtype: str, prompts: Path) -> float:
    out = subprocess.run([str(python), "-c", code, str(model), dtype, str(prompts)], capture_output=True, text=True, cwd=tmpdir())
    if out.returncode:
        sys.exit(f"bare script failed:\n{out.stderr[-3000:]}")
    return float(next(line for line in out.stdout.splitlines() if line.startswith("BARE_SECONDS")).split()[1])


def crossengine(d: Path, samples: list[list[int]], full_vocab: bool, length: int) -> dict:
    vllm = REPO / ".venvs" / "vllm" / "bin" / "python"
    engines = (
        "  ref: {type: hf, dtype: float32}\n  hf-bf16: {type: hf, dtype: bfloat16}\n"
        f"  vllm: {{type: vllm, dtype: float32, full_vocab: {str(full_vocab).lower()}, env: {{python: {vllm}}}, options: {{max_model_len: {length + 8}}}}}"
    )
    exp = write_experiment(d, "shape-qwen3-0.6b", engines, samples, f"top_k: 20\nbatch_size: {len(samples)}\nfull_vocab: {str(full_vocab).lower()}\n")
    code = (
        "import resource, sys, time\nt = time.perf_counter()\nfrom typer.main import get_command; from crossengine.cli import app\n"
        f"get_command(app).main(['run', {str(exp)!r}, '--output-dir', {str(d / 'results')!r}, '--run-id', 'r'], standalone_mode=False)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"crossengine run failed:\n{out.stderr[-3000:]}")
    wall, peak = (float(x) for x in out.stderr.strip().splitlines()[-1].split())
    meta = json.loads((d / "results" / "r" / "run.json").read_text())
    if meta["errors"]:
        sys.exit(f"crossengine run had errors: {meta['errors'][:2]}")
    return {"wall": wall, "driver_mb": peak, "stages": meta["stages"], "timings": meta["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args()
    model = ensure_fixture("shape-qwen3-0.6b")
    d = tmpdir()
    samples = random_samples(args.prompts, args.length, 151_936)
    prompts = d / "prompts.json"
    prompts.write_text(json.dumps(samples))
    vllm = REPO / ".venvs" / "vllm" / "bin" / "python"
    scripts = {
        "hf fp32": bare(Path(sys.executable), HF_BARE, model, "float32", prompts),
        "hf bf16": bare(Path(sys.executable), HF_BARE, model, "bfloat16", prompts),
        "vllm fp32": bare(vllm, VLLM_BARE, model, "float32", prompts),
    }
    total = sum(scripts.values())
    print(f"{args.prompts} prompts x {args.length} tokens, shape-qwen3-0.6b (2 CPU cores)")
    print("bare scripts: " + ", ".join(f"{k} {v:.1f}s" for k, v in scripts.items()) + f"; sum {total:.1f}s")
    for full, goal in ((False, 1.15), (True, 1.3)):
        r = crossengine(tmpdir(), samples, full, args.length)
        t = r["timings"]
        peaks = ", ".join(f"{e} +{t[f'{e}.peak_above_load_gb']:.2f} GB" for e in ("ref", "hf-bf16", "vllm") if f"{e}.peak_above_load_gb" in t)
        print(f"crossengine, {'full vocabulary' if full else 'top-k'}: {r['wall']:.1f}s = {r['wall'] / total:.2f}x the bare scripts' sum (goal <= {goal:.2f}x)")
        print("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items()))
        print(f"  driver peak RSS {r['driver_mb']:.0f} MB (goal <= 1024 MB); workers' peak above their loaded model: {peaks}")


if __name__ == "__main__":
    main()
