"""One reference log-prob per token, a verdict that knows rounding, and vLLM's full vocabulary at a real
width: one run on tiny-text-32k (a 32,000-id vocabulary), HF fp32 as the reference, beside it HF fp32
again (the same engine), HF bf16 and a planted 1e-4 change (full vocabulary), vLLM fp32 with its full
vocabulary and with top-k only, every engine's noise floor measured.

vLLM starts twice in this module (one run); its full vocabulary comes as prompt_logprobs=-1, T × V Python
pairs, so the prompts are short (the width is what loads and compares, not the length)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crossengine.identity import display_names

from .conftest import REPO, run_text

VLLM_PYTHON = REPO / ".venvs" / "vllm" / "bin" / "python"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")]
VLLM = f"env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 128}}"


def _experiment() -> str:
    rng = np.random.default_rng(0)
    samples = "".join(f"  - {{id: p{i}, token_ids: {[1, *rng.integers(3, 32000, 47).tolist()]}}}\n" for i in range(3))
    return f"""\
model: tiny-text-32k
reference: hf
engines:
  hf: {{type: hf, dtype: float32}}
  hf-same: {{type: hf, dtype: float32}}
  hf-bf16: {{type: hf, dtype: bfloat16}}
  planted: {{type: hf, dtype: float32, patches: ["tests.noise_patches:logit_nudge"]}}
  vllm-full: {{type: vllm, dtype: float32, full_vocab: true, {VLLM}}}
  vllm-topk: {{type: vllm, dtype: float32, {VLLM}}}
noise: {{conditions: [alone, repeat]}}
samples:
{samples}batch_size: 3
"""


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    _, run_dir, runner = run_text(tmp_path_factory, "one-reference", _experiment())
    assert not runner.errors, runner.errors
    tokens = pd.read_parquet(run_dir / "tokens")
    tokens["instance"] = display_names(tokens)
    tokens["sample_id"] = tokens["sample_id"].astype(str)
    return run_dir, tokens.sort_values(["instance", "sample_id", "position"]).reset_index(drop=True)


def test_vllm_loads_and_compares_its_full_vocabulary_at_32k(run):
    """It failed to load with a deadlock on torch._dynamo's import lock (the metric kernel compiled on a thread
    beside vLLM's load); the full-vocabulary columns now exist for it."""
    _, tokens = run
    full = tokens[tokens["instance"] == "vllm-full"]
    assert len(full) == 3 * 47 and full["kl_ref_cand"].notna().all() and full["rank_in_cand"].notna().all()
    assert tokens[tokens["instance"] == "vllm-topk"]["kl_ref_cand"].isna().all(), "top-k only: no exact KL"


def test_the_reference_log_prob_is_one_number_per_token(run):
    """lp_ref is bitwise the same in every candidate's rows, full-vocabulary and top-k paths alike."""
    _, tokens = run
    wide = tokens.pivot_table(index=["sample_id", "position"], columns="instance", values="lp_ref", aggfunc="first")
    assert len(wide.columns) == 5 and not wide.isna().any().any()
    for column in wide.columns:
        np.testing.assert_array_equal(wide[column].to_numpy(), wide["hf-same"].to_numpy(), err_msg=column)


def test_an_engine_compared_with_itself_is_exactly_zero(run):
    _, tokens = run
    same = tokens[tokens["instance"] == "hf-same"]
    for column in ("lp_diff", "abs_lp_diff", "prob_diff", "gen_kl", "policy_kl", "js", "kl_ref_cand", "kl_cand_ref", "topk_kl"):
        assert (same[column] == 0).all(), column
    assert same["top1_match"].all() and (same["rank_in_cand"] == 1).all() and (same["cos_sim"] > 0.99999).all()
    assert not same["above_noise"].astype(bool).any()


def test_nearest_agrees_with_the_summary(run):
    """nearest.parquet and the summary read the same numbers: vLLM fp32 vs the reference, both ways."""
    run_dir, tokens = run
    nearest = pd.read_parquet(run_dir / "nearest.parquet")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    assert len(nearest) and len(summary)
    for inst in ("vllm-full", "hf-same"):
        rows = tokens[tokens["instance"] == inst]
        assert float(rows["abs_lp_diff"].max()) == pytest.approx(float(np.abs(rows["lp_cand"] - rows["lp_ref"]).max()), abs=0)


def test_above_noise_knows_rounding(run):
    """fp32 HF vs fp32 vLLM differ by float rounding alone (both bitwise stable under their conditions): about 0 %
    above noise; the planted 1e-4 change is above it at every token. The verdict's formula, recomputed here:
    |lp_diff| > margin × the larger floor and > 8 × eps × max(|lp_ref|, |lp_cand|, 1), eps of the coarser dtype."""
    _, tokens = run
    vllm = tokens[tokens["instance"] == "vllm-full"]
    planted = tokens[tokens["instance"] == "planted"]
    assert not vllm["above_noise"].astype(bool).any(), vllm["abs_lp_diff"].describe()
    assert planted["above_noise"].astype(bool).all() and planted["abs_lp_diff"].min() > 1e-6
    for inst, rows in tokens.groupby("instance"):
        diff = np.abs(rows["lp_diff"].to_numpy(np.float32))
        floor = np.maximum(rows["noise_ref"].to_numpy(np.float32), rows["noise_cand"].to_numpy(np.float32))
        eps = 2.0**-7 if inst == "hf-bf16" else 2.0**-23
        scale = np.maximum(np.maximum(np.abs(rows["lp_ref"]), np.abs(rows["lp_cand"])), 1.0).to_numpy()
        expected = (diff > floor) & (diff > 8 * eps * scale)
        np.testing.assert_array_equal(rows["above_noise"].to_numpy(bool), expected, err_msg=inst)
