#!/usr/bin/env python
"""Make experiments/data/rollout-dump.jsonl: a saved "rollout" of the tiny-text fixture, in the generic layout.

A bf16 copy of the fixture (the "rollout engine") samples a short response to each prompt
and records its own log-prob of every sampled token, as an RL framework's rollout would.
The prompts are rendered with the trainer's chat template (TRAINER below), which is what the
records' token_ids hold. For the samples whose id starts with `tpl-`, the rollout engine
rendered the same messages with another template (ROLLOUT): their log-probs belong to a
different prompt than the token_ids show, the chat-template mismatch that RL users meet
when trainer and rollout engine format turns differently.

    python scripts/make-rollout-dump.py [OUT]

Deterministic (seeded); the fixture is built offline. The shipped file was made by this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossengine.experiment.fixtures import ensure_fixture

TRAINER = "<|user|>\n{user}\n<|assistant|>\n"
ROLLOUT = "### Instruction: {user}. Answer briefly, then stop.\n### Response:"
PROMPTS = [
    "Name a colour",
    "Count to three",
    "Say hello",
    "Give a fruit",
    "Name a planet",
    "Spell cat",
    "Pick a number",
    "Name an animal",
    "Say goodbye",
    "Name a city",
    "Give a verb",
    "Name a tool",
]
TEMPLATE_MISMATCH = {3, 8}  # these records' log-probs were computed under ROLLOUT's prompt
NEW_TOKENS = 12


def main(out: Path) -> None:
    path = ensure_fixture("tiny-text")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    with out.open("w") as f:
        for k, user in enumerate(PROMPTS):
            sid = f"{'tpl' if k in TEMPLATE_MISMATCH else 'rollout'}-{k:02d}"
            trainer_ids = tok(TRAINER.format(user=user)).input_ids
            rollout_ids = tok(ROLLOUT.format(user=user)).input_ids if k in TEMPLATE_MISMATCH else trainer_ids
            with torch.no_grad():
                gen = model.generate(torch.tensor([rollout_ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, pad_token_id=tok.eos_token_id or 0)
                response = gen[0, len(rollout_ids) :].tolist()
                full = rollout_ids + response
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            lps = [float(logp[len(rollout_ids) + j - 1, t]) for j, t in enumerate(response)]
            record = {"id": sid, "token_ids": trainer_ids + response, "prompt_len": len(trainer_ids), "logprobs": lps, "messages": [{"role": "user", "content": user}]}
            f.write(json.dumps(record) + "\n")
    print(f"wrote {out}: {len(PROMPTS)} records, {len(TEMPLATE_MISMATCH)} with the rollout's own template")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "experiments" / "data" / "rollout-dump.jsonl")
