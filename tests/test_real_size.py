"""Real sizes, small enough for the suite: a model of real width and vocabulary (Qwen3-0.6B's, two layers) in HF and
vLLM fp32, and the report of a run of 200,000 scored tokens from two dumps."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture
from crossengine.experiment.shapes import QWEN3_0_6B

from .test_vllm import VLLM_PYTHON

REPORT_MB = 20  # the report of millions of tokens stays a page a browser opens (docs/benchmarks.md)


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")
def test_a_model_of_real_width_and_vocabulary_scores_alike_in_hf_and_vllm(ray_cluster, tmp_path):
    path = ensure_fixture("shape-qwen3-0.6b-2l")
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")} == {
        k: QWEN3_0_6B[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    }
    (tmp_path / "x.yaml").write_text(
        "model: shape-qwen3-0.6b-2l\nreference: hf\nengines:\n  hf: {type: hf, dtype: float32}\n"
        f"  vllm: {{type: vllm, dtype: float32, full_vocab: true, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 256}}}}\n"
        "samples:\n  - text: 'The quick brown fox jumps over the lazy dog while the engines compare their numbers.'\n"
        "  - {id: high-ids, token_ids: [1, 151000, 150001, 100000, 77777, 151935, 5, 6, 7, 120000]}\ntop_k: 5\nfull_vocab: true\n"
        "placement: {logits_budget_gb: 0.001}\n"  # 1 MiB: every sample's 151,936-wide logits come a block of rows at a time, vLLM's from its worker
    )
    result = CliRunner().invoke(app, ["run", str(tmp_path / "x.yaml"), "--output-dir", str(tmp_path / "out"), "--run-id", "r"])
    assert result.exit_code == 0, result.output
    assert "logits budget 0.001 GiB per worker: hf, vllm score samples beyond 1 tokens" in " ".join(result.output.split())
    tokens = pd.read_parquet(tmp_path / "out" / "r" / "tokens")
    assert set(tokens["sample_id"].astype(str)) == {"s0", "high-ids"}, "ids past the tokenizer's 508 reach the real vocabulary"
    assert tokens["abs_lp_diff"].max() <= 1e-4 and tokens["kl_ref_cand"].max() <= 1e-6, tokens[["abs_lp_diff", "kl_ref_cand"]].max()
    assert tokens["cos_sim"].notna().all() and tokens["rank_in_cand"].notna().all(), "151,936-wide logits from vLLM's worker"


def _dump(path, lps: np.ndarray, ids: np.ndarray, prompt: int) -> None:
    n, scored = lps.shape
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i}" for i in range(n)],
                "token_ids": pa.FixedSizeListArray.from_arrays(ids.reshape(-1), ids.shape[1]).cast(pa.list_(pa.int32())),
                "prompt_len": np.full(n, prompt, np.int32),
                "logprobs": pa.FixedSizeListArray.from_arrays(lps.reshape(-1), scored).cast(pa.list_(pa.float32())),
            }
        ),
        path,
    )


def test_the_report_of_200k_tokens_stays_small_and_renders(ray_cluster, tmp_path):
    """Two dumps of 200,000 scored tokens (no model runs): every token in tokens/, a report under its size bound that
    headless Chromium loads, whose per-token charts show the samples that diverge most and say so."""
    rng = np.random.default_rng(0)
    n, length, prompt = 196, 1040, 16
    ids = rng.integers(3, 500, (n, length), dtype=np.int32)
    ref = -rng.exponential(1.0, (n, length - prompt)).astype(np.float32)
    _dump(tmp_path / "ref.parquet", ref, ids, prompt)
    _dump(tmp_path / "cand.parquet", np.minimum(ref + rng.normal(0, 0.01, ref.shape), 0).astype(np.float32), ids, prompt)
    (tmp_path / "x.yaml").write_text(
        f"model: tiny-text\nreference: ref\nengines:\n  ref: {{type: logprobs, path: {tmp_path / 'ref.parquet'}}}\n"
        f"  cand: {{type: logprobs, path: {tmp_path / 'cand.parquet'}}}\nsamples:\n  - dump: ref\n"
    )
    run = tmp_path / "out" / "m"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "x.yaml"), "--output-dir", str(tmp_path / "out"), "--run-id", "m"])
    assert result.exit_code == 0, result.output
    assert pq.ParquetDataset(run / "tokens").read(columns=["position"]).num_rows == n * (length - prompt) == 200_704
    page = run / "report.html"
    assert page.stat().st_size <= REPORT_MB * 2**20, f"{page.stat().st_size / 2**20:.1f} MB"
    html = page.read_text()
    assert "of 196 samples with the largest" in html, "the report says its per-token charts show a few samples"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium to render the report")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "plotly" in dom and "Worst tokens" in dom, "rendered (its load time is a bench figure, not a test: bench/millions.py)"
