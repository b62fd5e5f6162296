#!/usr/bin/env python
"""Make the dumps of experiments/rollout-frameworks.yaml: one rollout of tiny-moe, as slime and NeMo-RL write it.

A bf16 copy of the fixture is the "rollout engine": it scores each prompt + response with HF, recording its own
log-prob of every token and each MoE layer's expert choice. The same four sequences are then written

- as slime's `--save-debug-rollout-data` file (slime/ray/rollout.py `_save_debug_rollout_data`: torch.save of
  {"rollout_id", "samples": [Sample.to_dict()]}, the fields of slime/utils/types.py), routed experts included;
- as NeMo-RL's `train_data_step{N}.jsonl` (nemo_rl/algorithms/grpo.py's log_data, written one sample per line by
  nemo_rl/utils/logger.py: each value a batch of one, arrays padded to the longest sequence), with the trainer's
  fp32 log-probs as `prev_logprobs`.

One token is planted in each (its log-prob moved by PLANT): the run must find it.

    python scripts/make_framework_dumps.py [OUT_FOLDER]

Deterministic; the fixture is built offline. The shipped files were made by this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from crossengine.adapters.base import Sample
from crossengine.adapters.hf import HFEngine, HFSpec
from crossengine.experiment.fixtures import ensure_fixture

TEXTS = [
    "Question: what is two plus three? Answer: two plus three is five, so the answer is five.",
    "Question: name a colour of the sky. Answer: on a clear day the sky is blue, at dusk it turns orange.",
    "Question: how many legs has a spider? Answer: a spider has eight legs and most have eight eyes.",
    "Question: what do engines compare? Answer: they compare their log-probabilities, token by token.",
]
RESPONSE = 12  # the last tokens of each sequence are its response
PLANT = -1.5
SLIME_PLANTED = ("2", 4)  # (sample, response token) whose slime log-prob is moved
NEMO_PLANTED = ("1", 7)
TOOL_OUTPUT = ("0", [5, 6])  # response tokens of sample 0 outside the loss mask (a tool's output inside the response)


def rollouts(dtype: str, texts: list[str] = TEXTS, routing: bool = True) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per text, (token ids, log-prob of each token (nan at 0), experts [T, L, k] or None) from tiny-moe in `dtype`."""
    engine = HFEngine(HFSpec(type="hf", dtype=dtype), str(ensure_fixture("tiny-moe", seed=0)), "rollout", 0)
    if routing:
        engine.report_routing()
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(engine.tokenizer(text).input_ids, np.int64)
        scored = engine.score([Sample(str(i), ids, np.zeros(len(ids), np.int8))], top_k=1, full_vocab=False)[0]
        out.append((ids, scored.token_logprobs.astype(np.float32), scored.routing))
    engine.close()
    return out


def slime_sample(i: int, ids: np.ndarray, lps: np.ndarray, experts: np.ndarray | None, response: int, mask: list[int] | None = None, metadata: dict | None = None) -> dict:
    """One slime Sample.to_dict(): response log-probs and loss mask over the last `response` tokens, experts for all but the last token."""
    return {
        "group_index": 0,
        "index": i,
        "prompt": "",
        "tokens": ids.tolist(),
        "response": "",
        "response_length": response,
        "reward": 1.0,
        "loss_mask": mask or [1] * response,
        "rollout_log_probs": lps[-response:].tolist(),
        "rollout_routed_experts": None if experts is None else experts[:-1].astype(np.int32),
        "status": "completed",
        "metadata": metadata or {},
    }


def loss_mask(i: int, response: int) -> list[int]:
    """1 per response token the loss uses: all but sample 0's tool output."""
    return [0 if str(i) == TOOL_OUTPUT[0] and j in TOOL_OUTPUT[1] else 1 for j in range(response)]


def nemo_rl_lines(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], response: int) -> list[str]:
    """NeMo-RL's train_data lines: (ids, generation log-probs, trainer log-probs) per sample, padded to the longest."""
    width = max(len(ids) for ids, _, _ in rows)
    pad = lambda x, fill: [*x, *[fill] * (width - len(x))]  # noqa: E731
    lines = []
    for i, (ids, gen, prev) in enumerate(rows):
        n = len(ids)
        mask = [0] * (n - response) + loss_mask(i, response)
        zero = lambda a: [0.0, *np.nan_to_num(a[1:]).tolist()]  # noqa: E731 - NeMo-RL's position 0 holds 0
        fields = {"content": [""], "rewards": [1.0], "input_lengths": [n], "token_ids": [pad(ids.tolist(), 0)], "token_loss_mask": [pad(mask, 0)]}
        fields |= {"sample_loss_mask": [1.0], "advantages": [pad([0.0] * n, 0.0)], "generation_logprobs": [pad(zero(gen), 0.0)], "prev_logprobs": [pad(zero(prev), 0.0)]}
        lines.append(json.dumps({**fields, "idx": i}))
    return lines


def main(out: Path) -> None:
    import torch

    rollout, trainer = rollouts("bfloat16"), rollouts("float32", routing=False)
    samples = []
    for i, (ids, lps, experts) in enumerate(rollout):
        lps = lps.copy()
        if str(i) == SLIME_PLANTED[0]:
            lps[len(ids) - RESPONSE + SLIME_PLANTED[1]] += PLANT
        samples.append(slime_sample(i, ids, lps, experts, RESPONSE, loss_mask(i, RESPONSE)))
    torch.save({"rollout_id": 0, "samples": samples}, out / "slime_rollout_0.pt")
    rows = []
    for i, ((ids, lps, _), (_, prev, _)) in enumerate(zip(rollout, trainer)):
        lps = lps.copy()
        if str(i) == NEMO_PLANTED[0]:
            lps[len(ids) - RESPONSE + NEMO_PLANTED[1]] += PLANT
        rows.append((ids, lps, prev))
    (out / "nemo_rl_train_data_step1.jsonl").write_text("\n".join(nemo_rl_lines(rows, RESPONSE)) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "experiments" / "data")
