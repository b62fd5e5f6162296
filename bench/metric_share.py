"""What the comparison costs next to the forwards it compares, at a real shape, on whatever device this machine has.

    python bench/metric_share.py [--prompts 8] [--length 1024] [--fixture shape-qwen3-0.6b]

One process, no Ray: HF fp32 and HF bf16 forwards of each prompt (one unpadded forward per sample, as the hf engine
runs them), the bare scripts' own work after a forward (log-softmax in fp32, each token's log-prob, the top-20), and
crossengine's full-vocabulary metric kernel (`compare.metrics._full_vocab_metrics`: both log-probs, KL both ways,
cosine, argmaxes, exact rank) on the two engines' logits, where they are (the GPU if there is one). Each timed after a
warm-up (the kernel compiles once), synchronised, best of 2. Prints the kernel's time as a share of the two forwards:
the part of a full-vocabulary run that is crossengine's own arithmetic.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from crossengine.compare.metrics import _full_vocab_metrics
from crossengine.experiment.fixtures import ensure_fixture


def timed(fn, device) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--fixture", default="shape-qwen3-0.6b")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = ensure_fixture(args.fixture)
    rng = np.random.default_rng(0)
    prompts = [torch.as_tensor(rng.integers(3, 151_000, args.length), device=device)[None] for _ in range(args.prompts)]
    logits, seconds = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        with torch.no_grad():
            model(prompts[0])  # warm-up
            # row t of a scored sample's logits predicts token t (row 0 predicts nothing), as engines hand them over
            seconds[str(dtype)], logits[dtype] = timed(lambda m=model: [torch.nn.functional.pad(m(x).logits[0, :-1].float(), (0, 0, 1, 0), value=float("nan")) for x in prompts], device)
        del model
    ids = [x[0].cpu().numpy() for x in prompts]

    def bare():
        for lg, x in zip(logits[torch.float32], prompts):
            lp = lg[1:].log_softmax(-1)
            lp.gather(-1, x[0, 1:, None]), torch.topk(lp, 20, dim=-1)

    def kernel():
        return [_full_vocab_metrics(r, c, i) for r, c, i in zip(logits[torch.float32], logits[torch.bfloat16], ids)]

    kernel()  # compiles
    bare_s, _ = timed(bare, device)
    kernel_s, cols = timed(kernel, device)
    forwards = seconds["torch.float32"] + seconds["torch.bfloat16"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.prompts} prompts x {args.length} tokens, {args.fixture}, {name}")
    print(f"forwards: fp32 {seconds['torch.float32']:.3f}s, bf16 {seconds['torch.bfloat16']:.3f}s; bare scripts' log-softmax + top-20 (fp32 side): {bare_s:.3f}s")
    print(f"full-vocabulary metrics (fp32 vs bf16 logits): {kernel_s:.3f}s = {100 * kernel_s / forwards:.1f}% of the two forwards")
    kl = np.concatenate([c["kl_ref_cand"] for c in cols])
    print(f"  (bf16 vs fp32 on random weights: mean KL {np.nanmean(kl):.3g}, max {np.nanmax(kl):.3g})")


if __name__ == "__main__":
    main()
