"""End to end with the HF engine on real tiny models, through Ray, as `crossengine run` does it."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.schemas import TOKEN_SCHEMA

from .conftest import run_experiment, run_text

IDENTICAL = """\
model: tiny-text
reference: a
engines:
  a: {type: hf, attn_implementation: sdpa}
  b: {type: hf, attn_implementation: sdpa}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - text: "Numbers are computed, never typed in."
  - token_ids: [1, 60, 61, 62, 63, 64, 65]
batch_size: 2
"""


@pytest.fixture(scope="module")
def identical_run(ray_cluster, tmp_path_factory):
    _, run_dir, runner = run_text(tmp_path_factory, "identical", IDENTICAL)
    return run_dir, runner


def test_identical_engines_give_exactly_zero(identical_run):
    run_dir, _ = identical_run
    tokens = pd.read_parquet(run_dir / "tokens")
    assert len(tokens) > 0
    for col in ("lp_diff", "prob_diff", "gen_kl", "policy_kl", "js", "kl_ref_cand", "kl_cand_ref", "topk_kl"):
        assert (tokens[col] == 0).all(), col
    assert (tokens["mult_prob_error"] == 1).all() and tokens["top1_match"].all()
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[summary["modality"] == "all"].iloc[0]
    assert pooled["abs_max"] == 0 and pooled["gen_kl_error"] == 0 and pooled["token_mult_prob_error"] == 1
    assert pooled["top1_agreement"] == 1 and pooled["first_divergent_position"] == -1


def test_token_rows_follow_the_public_schema(identical_run):
    run_dir, _ = identical_run
    parts = sorted((run_dir / "tokens").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-b-00000.parquet", "part-b-00001.parquet"]
    for part in parts:
        schema = pq.read_schema(part)
        assert schema.remove_metadata().equals(TOKEN_SCHEMA.remove_metadata())
    tokens = pd.read_parquet(run_dir / "tokens")
    raw = tokens[tokens["sample_id"] == "s2"]
    assert raw["position"].tolist() == list(range(1, 7))
    assert raw["token_id"].tolist() == [60, 61, 62, 63, 64, 65]
    assert set(tokens["segment"].astype(str)) == {"prompt"}
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["reference"] == "a"
    assert meta["engines"]["b"]["versions"]["transformers"]
    assert meta["engines"]["a"]["device"] == "cpu" and meta["engines"]["a"]["dtype"] == "float32"
    assert {"ray_init_s", "scoring_s", "summary_s", "total_s"} <= set(meta["timings"])


def test_resume_skips_finished_batches(identical_run, tmp_path):
    import shutil

    run_dir, _ = identical_run
    copy = tmp_path / "results" / "t"
    shutil.copytree(run_dir, copy)
    (copy / "tokens" / "part-b-00001.parquet").unlink()  # as if the run died before batch 1
    (copy / "summary.parquet").unlink()
    meta = json.loads((copy / "run.json").read_text())
    meta["status"] = "running"
    (copy / "run.json").write_text(json.dumps(meta))
    kept = copy / "tokens" / "part-b-00000.parquet"
    before = os.stat(kept).st_mtime_ns
    path = tmp_path / "identical.yaml"
    path.write_text(IDENTICAL)
    run_experiment(path, tmp_path / "results")
    assert os.stat(kept).st_mtime_ns == before, "finished batch was not rewritten"
    again = pd.read_parquet(copy / "tokens").sort_values(["sample_id", "position"]).reset_index(drop=True)
    first = pd.read_parquet(run_dir / "tokens").sort_values(["sample_id", "position"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, first)
    assert json.loads((copy / "run.json").read_text())["status"] == "complete"


def test_a_complete_run_is_not_overwritten(identical_run):
    run_dir, _ = identical_run
    result = CliRunner().invoke(app, ["run", str(run_dir.parent.parent / "identical.yaml"), "--output-dir", str(run_dir.parent), "--run-id", "t"])
    assert result.exit_code == 2 and "is complete" in result.output


def test_token_id_beyond_vocab_is_a_one_line_error(ray_cluster, write_experiment, tmp_path):
    path = write_experiment(IDENTICAL.replace("[1, 60, 61, 62, 63, 64, 65]", "[1, 60, 600, 62]"))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{path}:9: samples[2].token_ids[2]: token id 600 >= vocab size 512" in result.stderr
    assert not out.exists()


def test_quickstart_from_the_cli(quickstart_cli):
    """The README's main job, as a new user runs it."""
    run_dir, result = quickstart_cli
    assert result.exit_code == 0, result.output
    assert "hf-eager" in result.output and "hf-bf16" in result.output
    assert "alarms: none tripped" in result.output or "alarm: " in result.output, "the alarms are always said, tripped or not"
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[summary["modality"] == "all"].set_index("cand_engine")
    assert pooled.loc["hf-eager", "abs_max"] < 1e-4, "fp32 eager vs sdpa agree to float rounding"
    assert pooled.loc["hf-bf16", "abs_max"] > 100 * pooled.loc["hf-eager", "abs_max"], "bf16 is visibly different"
    tokens = pd.read_parquet(run_dir / "tokens")
    assert set(tokens["sample_id"].astype(str)) == {"s0", "s1", "s2", "raw-ids", "river", "rl"}


def test_vision_bidirectional_vs_causal(vision_bidirectional):
    run_dir = vision_bidirectional
    tokens = pd.read_parquet(run_dir / "tokens")
    for col in ("modality", "attention", "attention_cand", "sample_id"):
        tokens[col] = tokens[col].astype(str)
    image = tokens[tokens["modality"] == "image"]
    assert len(image) == 12, "3 images × 4 image tokens"
    assert (image["attention"] == "bidirectional").all() and (image["attention_cand"] == "causal").all()
    for sid, rows in tokens[tokens["sample_id"] != "text-only"].groupby("sample_id"):
        first_image = rows.loc[rows["modality"] == "image", "position"].min()
        before = rows[rows["position"] <= first_image]  # predicted from tokens before any image token
        assert (before["lp_diff"] == 0).all() and (before["kl_ref_cand"] == 0).all(), sid
        at_image = rows[(rows["modality"] == "image") & (rows["position"] > first_image)]
        assert (at_image["kl_ref_cand"] > 0).all(), sid
    assert (tokens.loc[tokens["sample_id"] == "text-only", "lp_diff"] == 0).all()
    summary = pd.read_parquet(run_dir / "summary.parquet")
    by_modality = summary[summary["attention"] == "all"].set_index("modality")
    assert by_modality.loc["image", "kl_mean"] > by_modality.loc["text", "kl_mean"] > 0
    assert np.isfinite(by_modality.loc["image", "cos_sim"])


GENERATE_IDENTICAL = """\
model: tiny-text
reference: trainer
engines:
  trainer: {type: hf}
  same: {type: hf}
  bf16: {type: hf, dtype: bfloat16}
mode: MODE
sampling: {temperature: 1.0, max_tokens: 10, seed: 5}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - text: "Numbers are computed, never typed in."
"""


def test_generate_mode_identical_engines_give_exact_zero_gen_kl(ray_cluster, tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(GENERATE_IDENTICAL.replace("MODE", "generate"))
    run_dir, runner = run_experiment(path, tmp_path / "results")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary["modality"] == "all") & (summary["segment"] == "all") & (summary["position_bucket"] == "all")].set_index("cand_engine")
    same = pooled[pooled["variant"] == "base"].loc["same"]
    assert same["gen_kl_error"] == 0 and same["policy_kl_error"] == 0 and same["js_divergence_error"] == 0
    assert same["token_mult_prob_error"] == 1 and same["prob_diff_max"] == 0
    assert pooled[pooled["variant"] == "base"].loc["bf16", "gen_kl_error"] > 0
    tokens = pd.read_parquet(run_dir / "tokens")
    sampled = tokens[tokens["variant"] == "sampled"]
    assert len(sampled) == 20 and (sampled["segment"] == "completion").all(), "2 samples × 10 generated tokens"
    # the generator's own sampling-time log-probs vs its teacher-forced rescoring: same model, KV cache vs prefill
    assert sampled["abs_lp_diff"].max() < 1e-4


def test_greedy_mode_reports_first_divergence(ray_cluster, tmp_path):
    """A planted difference: 'forced' always prefers one token, so its own decode leaves the
    reference's at completion index 0 of every sample; 'same' never leaves it."""
    from .native_factories import PREFERRED

    path = tmp_path / "greedy.yaml"
    text = GENERATE_IDENTICAL.replace("MODE", "greedy").replace("max_tokens: 10", "max_tokens: 12")
    path.write_text(text.replace("  bf16: {type: hf, dtype: bfloat16}", "  forced: {type: hf, patches: ['tests.native_factories:prefer_token']}"))
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "results"), "--run-id", "g"])
    assert result.exit_code == 0, result.output
    greedy = pd.read_parquet(tmp_path / "results" / "g" / "greedy").set_index(["cand_engine", "sample_id"])
    assert len(greedy) == 4 and greedy["ref_len"].min() > 0
    assert (greedy.loc["same", "first_divergence"] == -1).all(), "identical engines decode identically"
    forced = greedy.loc["forced"]
    assert (forced["ref_token"] != PREFERRED).all(), "the reference never picks the planted token"
    assert (forced["first_divergence"] == 0).all() and (forced["cand_token"] == PREFERRED).all()
    assert "leaves trainer" in result.output


def test_the_wall_time_is_accounted_for_by_stages(quickstart_cli):
    """run.json `stages`: each stage's seconds from the run's own timings, and together they hold the run's wall time
    (what no stage holds, `other`, stays under 5 %); the terminal says it in one `time:` line."""
    from crossengine.run.meta import STAGES

    run_dir, result = quickstart_cli
    meta = json.loads((run_dir / "run.json").read_text())
    stages, timings = meta["stages"], meta["timings"]
    assert stages["total"] == timings["total_s"]
    for name, match in STAGES:
        want = sum(v for k, v in timings.items() if match(k))
        assert stages.get(name, 0.0) == pytest.approx(want), name
    named = sum(v for k, v in stages.items() if k not in ("other", "total"))
    assert named <= stages["total"] and stages["other"] < 0.05 * stages["total"], stages
    assert "time: " in result.output and "load engines" in result.output
