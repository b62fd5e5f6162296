"""Helpers shared by the bench scripts: a mid-size random model and an experiment runner."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_bench_model(out: Path, vocab: int = 32000, hidden: int = 512, layers: int = 4) -> Path:
    """A Llama-shaped model big enough that forward passes, not bookkeeping, dominate."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from crossengine.experiment.fixture_builders import fast_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast_tokenizer(["<pad>", "<bos>", "<eos>"], vocab_size=508).save_pretrained(out)
    return out


def random_samples(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, min(vocab, 500), length - 1).tolist() for _ in range(n)]


def bench_workload(samples: int, vocab: int = 32000):
    """What the scoring benches share: `--samples` (default `samples`) and `--length` (256) from the command line, a
    fresh folder, the bench model in it and that many random samples. (args, folder, model folder, samples)"""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    d = tmpdir()
    return args, d, build_bench_model(d / "model", vocab=vocab), random_samples(args.samples, args.length, vocab)


def write_experiment(d: Path, model: str, engines: str, samples: list[list[int]], extra: str = "") -> Path:
    (d / "samples.jsonl").write_text("".join(json.dumps({"token_ids": s}) + "\n" for s in samples))
    path = d / "bench.yaml"
    path.write_text(f"model: {model}\nreference: ref\nengines:\n{engines}\nsamples:\n  - file: samples.jsonl\n{extra}")
    return path


def run_cli(path: Path, out: Path) -> dict:
    """Run `crossengine run` in a fresh process; return run.json."""
    subprocess.run([sys.executable, "-m", "crossengine.cli", "run", str(path), "--output-dir", str(out), "--run-id", "b"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "b" / "run.json").read_text())


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="crossengine-bench-"))
