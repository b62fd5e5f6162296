"""MoE routing parity (docs/guides/moe-routing.md): both engines' expert choices, flips where a router is
planted to differ and nowhere before it, replay (bitwise on its own routing; it removes a router-only
difference), HF vs vLLM on the tiny MoE, and every rate recomputed from routing/.

One CLI run, shared: experiments/moe-routing.yaml as shipped (vLLM where its environment is built)
plus a nudged router, the same with replay, and an fp32 engine replaying the reference's own routing.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.identity import display_names

from .conftest import EXPERIMENTS, REPO
from .moe_patches import LAYER

VLLM_PYTHON = REPO / ".venvs" / "vllm" / "bin" / "python"
NUDGE = ["tests.moe_patches:nudge_gate"]


@pytest.fixture(scope="module")
def routing_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("routing")
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    exp = yaml.safe_load((EXPERIMENTS / "moe-routing.yaml").read_text())
    if VLLM_PYTHON.exists():
        exp["engines"]["vllm"]["env"]["python"] = str(VLLM_PYTHON)
    else:
        del exp["engines"]["vllm"]
    exp["engines"]["nudged"] = {"type": "hf", "patches": NUDGE}
    exp["engines"]["nudged-r3"] = {"type": "hf", "patches": NUDGE, "routing": "replay"}
    exp["engines"]["self-r3"] = {"type": "hf", "routing": "replay"}
    (d / "moe.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(d / "moe.yaml"), "--output-dir", str(d / "results"), "--run-id", "t"])
    assert result.exit_code == 0, result.output[-3000:]
    run_dir = d / "results" / "t"
    tokens = pd.read_parquet(run_dir / "tokens")
    tokens["instance"] = display_names(tokens)
    tokens["sample_id"] = tokens["sample_id"].astype(str)
    routing = pd.read_parquet(run_dir / "routing")
    routing["instance"] = display_names(routing)
    routing["sample_id"] = routing["sample_id"].astype(str)
    return run_dir, result, tokens, routing


def test_a_nudged_router_flips_from_its_layer_on_and_where_margins_are_small(routing_run):
    _, _, tokens, routing = routing_run
    r = routing[routing["instance"] == "nudged"]
    assert not r[r["layer"] < LAYER]["flip"].any(), "nothing before the nudged layer can differ"
    assert r[r["layer"] == LAYER]["flip"].any(), "the nudge flips some decisions in its own layer"
    at = r[r["layer"] == LAYER]
    assert at.loc[at["flip"], "margin_ref"].mean() < at.loc[~at["flip"], "margin_ref"].mean() / 3, "near-ties flip first"
    assert (r[r["flip"]]["ref_experts"].map(sorted).map(tuple) != r[r["flip"]]["cand_experts"].map(sorted).map(tuple)).all()
    assert (r[~r["flip"]]["ref_experts"].map(sorted).map(tuple) == r[~r["flip"]]["cand_experts"].map(sorted).map(tuple)).all()


def test_replaying_its_own_routing_changes_nothing_bitwise(routing_run):
    _, _, tokens, routing = routing_run
    own = tokens[tokens["instance"] == "self-r3"]
    assert len(own) > 0 and (own["lp_cand"] == own["lp_ref"]).all() and (own["lp_diff"] == 0).all()
    assert not routing[routing["instance"] == "self-r3"]["flip"].any()


def test_replay_removes_a_difference_planted_only_in_the_router(routing_run):
    _, _, tokens, routing = routing_run
    nudged = tokens[tokens["instance"] == "nudged"].set_index(["sample_id", "position"])
    replayed = tokens[tokens["instance"] == "nudged-r3"].set_index(["sample_id", "position"])["abs_lp_diff"].reindex(nudged.index)
    flipped = nudged["routing_flips"] > 0
    assert flipped.any() and nudged["abs_lp_diff"].max() > 1e-2, "the nudge flips routing and moves some log-prob"
    # what is left under replay is the nudged logits' softmax weights on the same experts, at every token alike
    assert replayed.max() < nudged["abs_lp_diff"].max() / 2, (replayed.max(), nudged["abs_lp_diff"].max())
    assert replayed[flipped].mean() < nudged.loc[flipped, "abs_lp_diff"].mean() / 3, "where routing flipped, replay removes most of the gap"
    assert replayed[flipped].mean() < 2 * nudged.loc[~flipped, "abs_lp_diff"].mean(), "what is left there is what unflipped tokens carry anyway"
    assert not routing[routing["instance"] == "nudged-r3"]["flip"].any(), "it routed as the reference"
    bf16 = tokens[tokens["instance"] == "hf-bf16"]
    r3 = tokens[tokens["instance"] == "hf-bf16-r3"]
    assert r3["abs_lp_diff"].mean() < bf16["abs_lp_diff"].mean(), "bf16 with the reference's routing is closer than bf16 routing by itself"


def test_routing_flips_and_the_rates_equal_a_recomputation_from_routing_parts(routing_run):
    run_dir, result, tokens, routing = routing_run
    per_position = routing.groupby(["instance", "sample_id", "position"])["flip"].sum()
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary["modality"] == "all") & (summary["segment"] == "all") & (summary["position_bucket"] == "all")]
    pooled = pooled.assign(instance=display_names(pooled)).set_index("instance")
    table = pd.read_parquet(run_dir / "routing.parquet").set_index(["candidate", "layer"])
    for name, rows in tokens.groupby("instance"):
        want = per_position.loc[name].reindex(pd.MultiIndex.from_arrays([rows["sample_id"], rows["position"] - 1])).to_numpy()
        np.testing.assert_array_equal(rows["routing_flips"].to_numpy(), want, err_msg=name)  # row t: the flips of position t - 1
        flipped = rows["routing_flips"].to_numpy() > 0
        s = pooled.loc[name]
        assert s["frac_tokens_flipped"] == pytest.approx(flipped.mean(), abs=1e-12)
        if flipped.any():
            assert s["abs_mean_flipped"] == pytest.approx(rows["lp_diff"].abs()[flipped].mean(), rel=1e-6)
        r = routing[routing["instance"] == name]
        t = table.loc[(name, -1)]
        assert t["router_disagreement"] == pytest.approx(r["flip"].mean(), abs=1e-12)
        assert t["first_flip_layer"] == (int(r.loc[r["flip"], "layer"].min()) if r["flip"].any() else -1)
        assert t["frac_positions_flipped"] == pytest.approx(r.groupby(["sample_id", "position"])["flip"].any().mean(), abs=1e-12)
    line = next(x for x in result.output.splitlines() if x.startswith("routing: nudged vs hf-fp32"))
    assert f"{100 * table.loc[('nudged', -1), 'router_disagreement']:.2f} % of router decisions differ" in line
    assert f"first flip in layer {LAYER}" in line
    report = (run_dir / "report.html").read_text()
    assert "MoE routing" in report and 'id="routing-0"' in report


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")
def test_hf_and_vllm_route_alike_on_the_tiny_moe(routing_run):
    _, _, tokens, routing = routing_run
    r = routing[routing["instance"] == "vllm"]
    assert len(r) > 0 and set(r["layer"]) == {0, 1, 2, 3}
    flipped = r[r["flip"]]
    assert (flipped["margin_ref"] < 1e-4).all(), f"only near-ties may flip: {flipped[['sample_id', 'position', 'layer', 'margin_ref']]}"
    v = tokens[tokens["instance"] == "vllm"]["abs_lp_diff"]
    assert v.max() < 1e-4, "fp32 HF and vLLM on the tiny MoE: the same order as on the dense fixture (1e-6)"


def test_routing_that_cannot_be_recorded_is_one_line_before_loading(tmp_path):
    def validate(text: str) -> str:
        path = tmp_path / "e.yaml"
        path.write_text(text + "samples: [{text: hello there}]\n")
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    out = validate("model: tiny-text\nreference: a\nrouting: true\nengines:\n  a: {type: hf}\n  b: {type: hf, dtype: bfloat16}\n")
    assert "routing" in out and "a dense model" in out
    out = validate("model: tiny-moe\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf, routing: replay}\n")
    assert "engines.b.routing" in out and "needs the experiment's `routing: true`" in out
    dump = tmp_path / "d.jsonl"  # a dump without routed experts: said, and its routing columns stay null (not an error)
    dump.write_text(json.dumps({"id": "x", "token_ids": [1, 40, 41], "prompt_len": 1, "logprobs": [-1.0, -1.0]}) + "\n")
    (tmp_path / "e.yaml").write_text(f"model: tiny-moe\nreference: a\nrouting: true\nengines:\n  a: {{type: hf}}\n  d: {{type: logprobs, path: {dump}}}\nsamples: [{{text: hi}}]\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "e.yaml")])
    assert result.exit_code == 0 and "skipped: routing for engine 'd': its dump records no routed experts" in result.stderr, result.output


def test_mixtral_routers_are_found_and_replay_their_own_choice_bitwise():
    from crossengine.adapters.base import Sample
    from crossengine.adapters.hf import HFEngine, HFSpec
    from crossengine.experiment.fixtures import ensure_fixture

    path = str(ensure_fixture("tiny-mixtral"))
    sample = Sample("s", np.array([1, 40, 41, 42, 43, 44, 45, 46], dtype=np.int64), np.zeros(8, np.int8))
    own = HFEngine(HFSpec(type="hf", dtype="float32", device="cpu"), path, "own")
    own.report_routing()
    replay = HFEngine(HFSpec(type="hf", dtype="float32", device="cpu", routing="replay"), path, "replay")
    replay.report_routing()
    a = own.score([sample], 5, False)[0]
    assert len(own.routers) == 4 and a.routing.shape == (8, 4, 2) and (a.router_margin >= 0).all()
    replay.replay_routing({"s": a.routing})
    b = replay.score([sample], 5, False)[0]
    np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
    flipped = a.routing.copy()
    flipped[:, 1] = (flipped[:, 1] + 1) % 8  # another expert pair in layer 1 at every position
    replay.replay_routing({"s": flipped})
    c = replay.score([sample], 5, False)[0]
    assert np.nanmax(np.abs(c.token_logprobs - a.token_logprobs)) > 1e-3 and (c.routing == flipped).all(), "replay routes as told"
