"""A tiny RL-like loop: one model samples, a drifting copy scores, KLMonitor watches.

    python experiments/rl_monitor_example.py --out results/rl-monitor --steps 8
    crossengine monitor results/rl-monitor              # gen_kl rising, steps over threshold marked
    crossengine monitor results/rl-monitor --step 7     # the tokens behind it

The "rollout engine" samples completions with its own log-probs (raw logits, as vLLM
reports them). The "trainer" holds a copy whose weights drift a little more each step, as
a stale or badly refitted copy would, and scores the same tokens teacher-forced.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossengine.experiment.fixtures import ensure_fixture
from crossengine.monitor import KLMonitor

PROMPTS = ["The quick brown fox", "When two engines disagree", "In the morning the river", "Numbers are computed"]


def rollout(model, tok, max_new_tokens: int, seed: int):
    """Sample completions; return ids [B, P+G], generator log-probs [B, P+G] and the completion mask."""
    torch.manual_seed(seed)
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, do_sample=True, max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    p = batch.input_ids.shape[1]
    comp = out.sequences[:, p:]
    lp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, comp[..., None])[..., 0]
    gen_lp = torch.zeros(out.sequences.shape)
    gen_lp[:, p:] = lp
    mask = torch.zeros(out.sequences.shape, dtype=torch.bool)
    mask[:, p:] = True
    attention = torch.cat([batch.attention_mask, torch.ones_like(comp)], 1)
    return out.sequences, attention, gen_lp, mask


def score(model, ids, attention):
    """Teacher-forced log-prob of every token (position 0 gets 0 and is never in the mask)."""
    with torch.inference_mode():
        lp = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
    out = torch.zeros(ids.shape)
    out[:, 1:] = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/rl-monitor")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--drift", type=float, default=0.004, help="weight noise added to the trainer per step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_fixture("tiny-text")
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    trainer = copy.deepcopy(policy)
    noise = torch.Generator().manual_seed(0)
    with KLMonitor(args.out, tokenizer=tok, worst_k=10) as monitor:
        for step in range(args.steps):
            ids, attention, gen_lp, mask = rollout(policy, tok, max_new_tokens=16, seed=step)
            train_lp = score(trainer, ids, attention)
            m = monitor.step(step, gen_lp, train_lp, mask, token_ids=ids)
            print(f"step {step}: gen_kl_error {m['gen_kl_error']:.3g}  token_mult_prob_error {m['token_mult_prob_error']:.4f}")
            with torch.no_grad():  # the trainer drifts away from the rollout engine
                for p in trainer.model.layers[-1].parameters():
                    p.add_(torch.randn(p.shape, generator=noise) * args.drift)
    print(f"now: crossengine monitor {args.out}   and   crossengine monitor {args.out} --step {args.steps - 1}")


if __name__ == "__main__":
    main()
