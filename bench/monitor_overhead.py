"""KLMonitor's cost per step at 32 × 4096 tokens vs a CPU scoring pass of the same tokens.

    python bench/monitor_overhead.py

The scoring pass is tiny-text (2 layers, hidden 128) over the same 131k tokens, the
cheapest model there is, so the ratio is an upper bound for real models.
Goal: a few milliseconds, < 5 % of the scoring pass.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from crossengine.experiment.fixtures import ensure_fixture
from crossengine.monitor import KLMonitor

B, T = 32, 4096


def main() -> None:
    rng = np.random.default_rng(0)
    t = torch.from_numpy(np.log(rng.uniform(0.01, 1, (B, T))).astype(np.float32))
    g = t + 0.01 * torch.randn(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    ids = torch.randint(0, 512, (B, T))
    with KLMonitor(tempfile.mkdtemp()) as mon:
        mon.step(0, g, t, mask, token_ids=ids)  # warm-up
        times = []
        for step in range(1, 11):
            start = time.perf_counter()
            mon.step(step, g, t, mask, token_ids=ids)
            times.append(time.perf_counter() - start)
    per_step = float(np.median(times))

    from transformers import AutoConfig, AutoModelForCausalLM

    path = ensure_fixture("tiny-text")
    config = AutoConfig.from_pretrained(path, max_position_embeddings=T)
    model = AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for row in ids:
            model(input_ids=row[None]).logits.float().log_softmax(-1)
    scoring = time.perf_counter() - start
    print(f"{B} x {T} tokens: monitor step {1000 * per_step:.1f} ms (median of 10); tiny-text scoring pass {scoring:.2f}s; monitor = {100 * per_step / scoring:.2f}% of scoring  (goal < 5%)")


if __name__ == "__main__":
    main()
