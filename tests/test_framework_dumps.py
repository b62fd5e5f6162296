"""experiments/rollout-frameworks.yaml from the CLI: a slime debug rollout (.pt, routed experts) and NeMo-RL training data
(JSONL) of the same tiny-moe rollout, read with only `layout:` named: their numbers, their loss masks, their planted
tokens, the slime dump's routing against HF's and replayed (R3), a gate that fails CI (exit 3), NeMo-RL's own keys.

The files are made by scripts/make_framework_dumps.py (in the writers' formats: slime/ray/rollout.py,
nemo_rl/utils/logger.py); each value is checked here against the file itself.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.cli import app

from .conftest import EXPERIMENTS, REPO

_spec = importlib.util.spec_from_file_location("make_framework_dumps", REPO / "scripts" / "make_framework_dumps.py")
dumps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dumps)
SLIME = EXPERIMENTS / "data" / "slime_rollout_0.pt"
NEMO = EXPERIMENTS / "data" / "nemo_rl_train_data_step1.jsonl"


@pytest.fixture(scope="module")
def frameworks(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("frameworks")
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    shutil.copy(EXPERIMENTS / "rollout-frameworks.yaml", d / "rollout-frameworks.yaml")
    result = CliRunner().invoke(app, ["run", str(d / "rollout-frameworks.yaml"), "--output-dir", str(d / "out"), "--run-id", "f", "--keys", "nemo-rl"])
    run_dir = d / "out" / "f"
    return run_dir, result, pd.read_parquet(run_dir / "tokens")


def _rows(tokens: pd.DataFrame, engine: str, column: str) -> dict[tuple[str, int], float]:
    mine = tokens[tokens["cand_engine"] == engine]
    return {(str(s), int(p)): v for s, p, v in zip(mine["sample_id"], mine["position"], mine[column])}


def test_each_dump_is_read_as_written_only_its_loss_mask_tokens(frameworks):
    _, _, tokens = frameworks
    slime = torch.load(SLIME, weights_only=False)["samples"]  # our own file: read here without the reader's restrictions
    want_slime = {}
    for s in slime:
        start = len(s["tokens"]) - s["response_length"]
        want_slime.update({(str(s["index"]), start + j): v for j, (v, m) in enumerate(zip(s["rollout_log_probs"], s["loss_mask"])) if m})
    got = _rows(tokens, "trainer", "lp_ref")  # the slime dump is the reference
    assert set(got) == set(want_slime) and all(np.float32(got[k]) == np.float32(want_slime[k]) for k in want_slime)
    want_nemo = {}
    for line in NEMO.read_text().splitlines():
        r = json.loads(line)
        n = r["input_lengths"][0]
        want_nemo.update({(str(r["idx"]), p): r["generation_logprobs"][0][p] for p in range(n) if r["token_loss_mask"][0][p]})
    got = _rows(tokens, "nemo-rl", "lp_cand")
    assert set(got) == set(want_nemo) and all(np.float32(got[k]) == np.float32(want_nemo[k]) for k in want_nemo)
    sid, skipped = dumps.TOOL_OUTPUT
    start = len(slime[int(sid)]["tokens"]) - dumps.RESPONSE
    assert not {(sid, start + j) for j in skipped} & set(got), "the tool output's tokens have no rows"


def test_the_planted_tokens_are_exactly_where_the_two_dumps_differ(frameworks):
    _, _, tokens = frameworks
    nemo = tokens[tokens["cand_engine"] == "nemo-rl"]
    differ = {(str(s), int(p)) for s, p in zip(nemo["sample_id"], nemo["position"])} - {(str(s), int(p)) for s, p, d in zip(nemo["sample_id"], nemo["position"], nemo["abs_lp_diff"]) if d == 0}
    lengths = {str(i): len(ids) for i, (ids, _, _) in enumerate(dumps.rollouts("bfloat16", routing=False))}
    planted = {(sid, lengths[sid] - dumps.RESPONSE + j) for sid, j in (dumps.SLIME_PLANTED, dumps.NEMO_PLANTED)}
    assert differ == planted, "one rollout, two writers: they differ exactly at the two planted tokens"


def test_the_slime_routing_shows_flips_and_replaying_it_removes_them(frameworks):
    run_dir, result, tokens = frameworks
    plain = tokens[tokens["cand_engine"] == "trainer"].set_index(["sample_id", "position"])
    r3 = tokens[tokens["cand_engine"] == "trainer-r3"].set_index(["sample_id", "position"])
    assert plain["routing_flips"].sum() > 0, "fp32 HF routes some tokens otherwise than the bf16 rollout recorded"
    assert (r3["routing_flips"] == 0).all(), "replaying the dump's routing: no flip left"
    flipped = plain.index[plain["routing_flips"] > 0]
    assert r3.loc[flipped, "abs_lp_diff"].mean() < plain.loc[flipped, "abs_lp_diff"].mean(), "where routing flipped, replay closes the gap"
    layers = pd.read_parquet(run_dir / "routing.parquet").set_index("candidate")
    assert (layers.loc["trainer-r3", "router_disagreement"] == 0).all() and layers.loc["trainer", "router_disagreement"].max() > 0
    assert tokens[tokens["cand_engine"] == "nemo-rl"]["routing_flips"].isna().all()
    assert "skipped: routing for engine 'nemo-rl': its dump records no routed experts" in result.stderr


def test_its_gate_fails_ci_and_its_keys_are_nemo_rls(frameworks):
    run_dir, result, tokens = frameworks
    assert result.exit_code == 3, result.output
    worst = tokens[tokens["cand_engine"] == "nemo-rl"]["abs_lp_diff"].max()
    assert f"gate broken: rollout_train_logprobs_abs_diff_max <= 0.5: nemo-rl has {worst:.4g}" in result.stderr
    keys = json.loads((run_dir / "metrics.json").read_text())
    assert keys["keys"] == "nemo-rl" and set(keys["candidates"]) == {"nemo-rl", "trainer", "trainer-r3"}


def test_the_sampling_check_reads_a_reference_dump_with_each_candidates_logits(frameworks):
    """The slime dump is the reference (the R3 set-up): each full-logit candidate reads it; its raw bf16 numbers fit raw."""
    run_dir, result, _ = frameworks
    checks = json.loads((run_dir / "run.json").read_text())["sampling_checks"]
    assert set(checks) == {"slime (read with trainer's logits)", "slime (read with trainer-r3's logits)"}, "the dump candidate has no full-logit reference"
    for line in checks.values():
        assert "no reading fits its log-probs far better than `sampling`'s, raw (temperature 1, unfiltered)" in line, line
        assert line in result.output


def test_a_dump_that_needs_arbitrary_unpickling_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Planted:  # its unpickling would create the marker file
        def __reduce__(self):
            return (type(marker).touch, (marker,))

    ids, lps, experts = dumps.rollouts("bfloat16", dumps.TEXTS[:1])[0]
    torch.save({"rollout_id": 0, "samples": [dumps.slime_sample(0, ids, lps, experts, 6, metadata={"x": Planted()})]}, tmp_path / "rollout.pt")
    (tmp_path / "exp.yaml").write_text("model: tiny-moe\nreference: d\nengines:\n  d: {type: logprobs, path: rollout.pt, layout: slime}\n  h: {type: hf}\nsamples: [{dump: d}]\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "exp.yaml")])
    assert result.exit_code == 2 and not marker.exists(), result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "rollout.pt" in line and "weights_only" in line and "never unpickles arbitrary objects" in line, line
