"""Fixtures of real shape: random weights at published configurations, built offline like the tiny ones.

What breaks or slows at a real model's size (a 152k-wide log-softmax per position, 28 layers of hooks, vLLM's start-up
on a 0.6B model) does not show on 2-layer models with 512 tokens of vocabulary. These are built through transformers'
own classes at the shapes users run, saved in bfloat16 as those checkpoints ship (an fp32 engine upcasts them exactly:
HF and vLLM hold the same numbers). The tokenizer is the tiny fixtures' byte-level BPE (508 ids) in a vocabulary padded
to the real size: the text uses the first ids, every other id is reachable by `token_ids`, and what a real vocabulary
costs (the output layer, the log-softmax, the logits) is paid in full.

    shape-qwen3-0.6b      Qwen3-0.6B: 28 layers, hidden 1,024, head_dim 128, GQA 16/8, vocabulary 151,936, tied (0.6B)
    shape-qwen3-0.6b-2l   the same with 2 layers: real width and vocabulary, small enough for the test suite (0.19B)
    shape-moe-64x8        a Qwen3-MoE of real width: hidden 1,024, 64 experts top-8 (768 wide), 2 layers (0.46B)

`crossengine fixtures build` leaves them out unless named (1.2 GB, 0.4 GB and 0.9 GB on disk).
"""

from __future__ import annotations

from pathlib import Path

from crossengine.experiment.fixture_builders import fast_tokenizer, save_tokenizer, seed_all

QWEN3_0_6B = dict(
    vocab_size=151_936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40_960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
MOE_64X8 = dict(QWEN3_0_6B, num_hidden_layers=2, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, norm_topk_prob=True)


def _build(out: Path, seed: int, config_cls, model_cls, sizes: dict) -> None:
    import torch

    tokenizer = fast_tokenizer(["<pad>", "<bos>", "<eos>"], vocab_size=508)
    config = config_cls(**sizes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")
    seed_all(seed)
    with torch.device("cpu"):
        model = model_cls(config).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)


def build_qwen3_0_6b(out: Path, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _build(out, seed, Qwen3Config, Qwen3ForCausalLM, QWEN3_0_6B)


def build_qwen3_0_6b_2l(out: Path, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _build(out, seed, Qwen3Config, Qwen3ForCausalLM, dict(QWEN3_0_6B, num_hidden_layers=2))


def build_moe_64x8(out: Path, seed: int) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    _build(out, seed, Qwen3MoeConfig, Qwen3MoeForCausalLM, MOE_64X8)


SHAPES = {"shape-qwen3-0.6b": build_qwen3_0_6b, "shape-qwen3-0.6b-2l": build_qwen3_0_6b_2l, "shape-moe-64x8": build_moe_64x8}
