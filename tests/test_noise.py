"""The noise floor (docs/guides/noise-floor.md): each engine's own spread under its conditions, its token
columns and tables recomputed from the per-condition scores in noise/, a planted batch effect that
only the floor finds, `expect: bitwise` with its negative control, and bad noise fields as one line.

One CLI run, shared: experiments/noise-floor.yaml as shipped plus `planted`, an fp32 engine with a
batch-size-dependent module (tests/noise_patches.py) that claims bitwise results.
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
from crossengine.compare.noise import shuffled
from crossengine.identity import display_names

from .conftest import EXPERIMENTS
from .test_report import needs_browser, open_in_browser

PLANTED = {"type": "hf", "dtype": "float32", "patches": ["tests.noise_patches:batch_dependent"], "expect": "bitwise"}


@pytest.fixture(scope="module")
def noise_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    exp = yaml.safe_load((EXPERIMENTS / "noise-floor.yaml").read_text())
    exp["engines"]["planted"] = PLANTED
    exp["noise"]["engines"]["planted"] = ["alone", "shuffled", "padded"]
    (d / "noise.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(d / "noise.yaml"), "--output-dir", str(d / "results"), "--run-id", "t"])
    run_dir = d / "results" / "t"
    return run_dir, result, exp


def conditions_of(run_dir) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "noise")
    for c in ("engine", "sample_id", "condition"):
        df[c] = df[c].astype(str)
    return df


def recomputed_floor(noise: pd.DataFrame) -> pd.DataFrame:
    """Per (engine, sample, position): max − min of the log-prob over base and every condition, and the largest KL, in float32."""
    g = noise.groupby(["engine", "sample_id", "position"])
    hi = np.maximum(g["lp"].max().to_numpy(np.float32), g["lp_base"].max().to_numpy(np.float32))
    lo = np.minimum(g["lp"].min().to_numpy(np.float32), g["lp_base"].min().to_numpy(np.float32))
    out = g["kl"].max().rename("kl").to_frame()
    out["noise"] = (hi - lo).astype(np.float32)
    return out


def test_the_run_says_the_floors_before_loading_and_per_pair_after(noise_run):
    run_dir, result, _ = noise_run
    out = result.output
    assert "noise floor: trainer-bf16: alone, shuffled, repeat1, padded, padded-left" in out
    assert "noise floor: rollout-bf16: alone, shuffled, padded, packed" in out and "noise floor: hf-fp32.control: alone, shuffled, repeat1" in out
    assert out.index("noise floor: planted") < out.index("report:"), "said before anything runs"
    tokens = pd.read_parquet(run_dir / "tokens")
    tokens["instance"] = display_names(tokens)
    for cand in ("rollout-bf16", "hf-fp32", "hf-fp32.control", "planted"):
        rows = tokens[tokens["instance"] == cand]
        frac = rows["above_noise"].astype(bool).mean()
        assert f"{cand} vs trainer-bf16: {100 * frac:.1f} % of tokens above both engines' noise ({int(rows['above_noise'].sum())} of {len(rows)})" in out


def test_noise_columns_equal_a_recomputation_from_the_conditions(noise_run):
    run_dir, _, exp = noise_run
    floor = recomputed_floor(conditions_of(run_dir))
    tokens = pd.read_parquet(run_dir / "tokens")
    tokens["sample_id"] = tokens["sample_id"].astype(str)
    tokens["instance"] = display_names(tokens)
    ref = exp["reference"]
    checked = 0
    for cand, rows in tokens.groupby("instance"):
        mine = floor.loc[cand].reindex(pd.MultiIndex.from_frame(rows[["sample_id", "position"]]))
        theirs = floor.loc[ref].reindex(pd.MultiIndex.from_frame(rows[["sample_id", "position"]]))
        np.testing.assert_array_equal(rows["noise_cand"].to_numpy(np.float32), mine["noise"].to_numpy(np.float32), err_msg=cand)
        np.testing.assert_array_equal(rows["noise_ref"].to_numpy(np.float32), theirs["noise"].to_numpy(np.float32), err_msg=cand)
        np.testing.assert_array_equal(rows["noise_kl_cand"].to_numpy(np.float32), mine["kl"].to_numpy(np.float32), err_msg=cand)
        diff = np.abs(rows["lp_diff"].to_numpy(np.float32))
        above_floor = diff > exp["noise"].get("margin", 1.0) * np.maximum(mine["noise"], theirs["noise"]).to_numpy(np.float32)
        # the rounding floor: 8 (the default) × eps × max(|lp|, 1) in the coarser dtype; the reference here is bf16 (eps 2^-7)
        scale = np.maximum(np.maximum(np.abs(rows["lp_ref"].to_numpy(np.float64)), np.abs(rows["lp_cand"].to_numpy(np.float64))), 1.0)
        assert exp["engines"][ref]["dtype"] == "bfloat16"
        above = above_floor & (diff > 8 * 2.0**-7 * scale)
        assert (rows["above_noise"].to_numpy(bool) == above).all(), cand
        checked += 1
    assert checked == 4, "rollout-bf16, hf-fp32, its control, planted: and each has a floor"
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary["modality"] == "all") & (summary["segment"] == "all") & (summary["position_bucket"] == "all")]
    for _, r in pooled.iterrows():
        rows = tokens[(tokens["cand_engine"] == r["cand_engine"]) & (tokens["variant"] == r["variant"])]
        assert r["frac_above_noise"] == pytest.approx(rows["above_noise"].mean(), abs=1e-12) and r["n_above_noise"] == rows["above_noise"].sum()


def test_noise_table_equals_a_recomputation_from_the_conditions(noise_run):
    run_dir, _, _ = noise_run
    noise = conditions_of(run_dir)
    table = pd.read_parquet(run_dir / "noise.parquet").set_index(["engine", "condition"])
    for (engine, cond), g in noise.groupby(["engine", "condition"]):
        r = table.loc[(engine, cond)]
        differ = g[g["lp"] != g["lp_base"]]
        assert r["n_differ"] == len(differ) and bool(r["bitwise"]) == differ.empty and r["max_abs_diff"] == pytest.approx(np.abs(g["lp"] - g["lp_base"]).max())
    for engine, g in noise.groupby("engine"):
        r = table.loc[(engine, "all")]
        distinct = max(
            len({s[s["condition"] == s["condition"].iloc[0]]["lp_base"].to_numpy().tobytes(), *(c["lp"].to_numpy().tobytes() for _, c in s.groupby("condition"))}) for _, s in g.groupby("sample_id")
        )
        assert r["distinct_max"] == distinct, engine
        assert r["n_tokens"] == len(g.drop_duplicates(["sample_id", "position"]))


def test_fp32_alone_is_bitwise_invariant_and_bf16_batchings_are_not(noise_run):
    run_dir, _, _ = noise_run
    table = pd.read_parquet(run_dir / "noise.parquet").set_index(["engine", "condition"])
    fp32 = table.loc[("hf-fp32", "all")]
    assert fp32["bitwise"] and fp32["distinct_max"] == 1 and fp32["n_differ"] == 0 and fp32["n_tokens"] > 100
    rollout = table.loc["rollout-bf16"]
    assert rollout.loc["alone", "bitwise"] and rollout.loc["shuffled", "bitwise"], "one sample per forward: its neighbours cannot matter"
    for batching in ("padded", "packed"):
        assert not rollout.loc[batching, "bitwise"] and rollout.loc[batching, "max_abs_diff"] > 1e-3, f"bf16 {batching} moves the scores"
    noise = conditions_of(run_dir)
    padded = noise[(noise["engine"] == "rollout-bf16") & (noise["condition"] == "padded")]
    per_sample = padded.groupby("sample_id")["abs_diff"].max()
    longest = padded.groupby("sample_id")["position"].max().idxmax()
    assert (per_sample.drop(longest) > 0).any(), per_sample  # padded rows move (here the longest, unpadded one stayed bitwise: hardware's choice)
    trainer = table.loc["trainer-bf16"]
    assert not trainer.loc["alone", "bitwise"], "packed micro-batches of 4 vs one sample per row"
    assert table.loc[("trainer-bf16", "all"), "distinct_max"] > 2


def test_a_planted_batch_effect_is_found_by_the_floor_and_not_by_one_condition(noise_run):
    run_dir, result, _ = noise_run
    tokens = pd.read_parquet(run_dir / "tokens")
    planted = tokens[tokens["cand_engine"] == "planted"].reset_index(drop=True)
    fp32 = tokens[(tokens["cand_engine"] == "hf-fp32") & (tokens["variant"] == "base")].reset_index(drop=True)
    assert len(planted) == len(fp32) > 0
    np.testing.assert_array_equal(planted["lp_cand"].to_numpy(), fp32["lp_cand"].to_numpy(), "alone, the planted module is invisible")
    table = pd.read_parquet(run_dir / "noise.parquet").set_index(["engine", "condition"])
    assert table.loc[("planted", "alone"), "bitwise"] and table.loc[("planted", "shuffled"), "bitwise"]
    assert not table.loc[("planted", "padded"), "bitwise"] and table.loc[("planted", "padded"), "max_abs_diff"] > 1e-3
    assert table.loc[("hf-fp32", "all"), "bitwise"], "the same engine without the planted module: invariant"
    first = table.loc[("planted", "all")]
    line = (
        f"engine 'planted' expected bitwise results across its conditions (alone, shuffled, padded), but sample {first['first_sample']} "
        f"position {int(first['first_position'])} (token {first['first_token']!r}) differs: base {first['first_lp_base']:.6f} vs padded {first['first_lp']:.6f}"
    )
    assert result.exit_code == 1 and line in " ".join(result.output.split()), result.output[-3000:]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["expectations"]["failed"] == [line]
    noise = conditions_of(run_dir)
    mine = noise[noise["engine"] == "planted"]
    differ = mine[mine["lp"] != mine["lp_base"]]
    first_sample = next(s for s in dict.fromkeys(mine["sample_id"]) if s in set(differ["sample_id"]))  # run order
    assert first["first_sample"] == first_sample and first["first_position"] == differ[differ["sample_id"] == first_sample]["position"].min()


def test_expect_holds_and_its_negative_control_can_fail(noise_run):
    run_dir, result, _ = noise_run
    out = " ".join(result.output.split())
    assert "expect: bitwise held for 'hf-fp32'" in out
    table = pd.read_parquet(run_dir / "noise.parquet").set_index(["engine", "condition"])
    control = table.loc[("hf-fp32.control", "all")]
    assert not control["bitwise"], "padded micro-batches of 8 in fp32 move the scores"
    assert f"negative control 'hf-fp32.control' differs (max |Δlp| {control['max_abs_diff']:.3g}): the check on 'hf-fp32' can fail" in out
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["candidates"]["hf-fp32.control"] == {"cand_engine": "hf-fp32", "variant": "hf-fp32.control"}


@needs_browser
def test_the_report_draws_each_floor_beside_the_divergence(noise_run, tmp_path):
    run_dir, _, _ = noise_run
    dom = open_in_browser(run_dir / "report.html", tmp_path)
    assert 'id="noise-floor"' in dom and "Each engine's own floor, per condition" in dom
    assert "rollout-bf16: noise floor" in dom, "the dashed floor trace is in the chart's legend"
    assert "negative control 'hf-fp32.control' differs" in dom and "expected bitwise results" in dom
    assert dom.index('id="along-the-sequence"') < dom.index('id="noise-floor"')


def test_shuffled_places_every_sample_once_among_fillers():
    class S:
        def __init__(self, i):
            self.sample_id = f"s{i}"

    batch = [S(i) for i in range(3)]
    call, where = shuffled(batch, [0, 2], fillers=5, seed=0, cond="shuffled")
    assert len(call) == 6 and sorted(where) == [0, 2] and all(call[k] is batch[i] for i, k in where.items())
    assert {c.sample_id for c in call} == {"s0", "s2"}, "fillers are copies of the batch's valid samples"
    again, where2 = shuffled(batch, [0, 2], fillers=5, seed=0, cond="shuffled")
    assert where2 == where and [c.sample_id for c in again] == [c.sample_id for c in call], "the same places on a resumed run"
    assert any(shuffled(batch, [0, 2], fillers=5, seed=s, cond="shuffled")[1] != where for s in range(1, 6)), "the seed moves them"


BAD = {
    "noise: {conditions: [alone, sideways]}": ("noise.conditions", "unknown condition 'sideways'"),
    "noise: {engines: {nobody: [alone]}}": ("noise.engines.nobody", "'nobody' is not one of the engines"),
    "engines.b.expect: bitwise": ("engines.b.expect", "give the experiment a `noise:` block"),
    "engines.b.negative_control: true": ("engines.b", "negative_control goes with expect"),
    "engines.b.micro_batch_size: 4": ("engines.b", "micro_batch_size needs batching: padded or packed"),
    "engines.b.padding_side: left": ("engines.b", "padding_side goes with batching: padded"),
}


@pytest.mark.parametrize("change", sorted(BAD))
def test_bad_noise_fields_are_one_line(tmp_path, change):
    lines = ["model: tiny-text", "reference: a", "engines:", "  a: {type: hf}", "  b: {type: hf, dtype: bfloat16}", "samples: [{text: hello there}]"]
    if change.startswith("engines.b."):
        key, value = change.removeprefix("engines.b.").split(": ")
        lines[4] = "  b: {type: hf, dtype: bfloat16, " + f"{key}: {value}" + "}"
    else:
        lines.append(change)
    path = tmp_path / "e.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    field, words = BAD[change]
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert field in result.output and words in result.output, result.output


def test_negative_control_true_needs_env_vars(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf, expect: bitwise, negative_control: true}\nnoise: true\nsamples: [{text: hello there}]\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "engines.b" in result.output and "sets none" in result.output, result.output


def test_negative_control_true_drops_the_env_vars_that_claim_the_setting():
    from crossengine.adapters.vllm import VLLMSpec

    spec = VLLMSpec(type="vllm", expect="bitwise", negative_control=True, env={"env_vars": {"VLLM_BATCH_INVARIANT": "1"}}, max_num_seqs=8)
    fields = spec.control_fields()
    assert fields["env"]["env_vars"] == {} and fields["max_num_seqs"] == 8 and "expect" not in fields and "negative_control" not in fields
    assert VLLMSpec.model_validate(fields).expect is None


def test_native_engines_run_the_same_micro_batches_as_hf():
    """batching on a native engine (the training code's own model: here a factory around the HF model) gives
    bitwise HF's padded and packed scores, and its single scores are not those of a padded micro-batch."""
    from crossengine.adapters.base import Sample
    from crossengine.adapters.hf import HFEngine, HFSpec
    from crossengine.adapters.native import NativeEngine, NativeSpec
    from crossengine.experiment.fixtures import ensure_fixture

    path = str(ensure_fixture("tiny-text", seed=0))
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i}", np.r_[1, rng.integers(3, 500, n - 1)].astype(np.int64), np.zeros(n, np.int8)) for i, n in enumerate((9, 17, 13))]
    scores = {}
    for batching in ("single", "padded", "packed"):
        size = 1 if batching == "single" else 3
        for kind, cls, spec in (("hf", HFEngine, HFSpec), ("native", NativeEngine, NativeSpec)):
            extra = {"factory": "tests.native_factories:hf_as_native"} if kind == "native" else {}
            engine = cls(spec(type=kind, dtype="bfloat16", device="cpu", batching=batching, micro_batch_size=size, **extra), path, kind)
            scores[kind, batching] = [o.token_logprobs for o in engine.score(samples, 5, False)]
    for batching in ("single", "padded", "packed"):
        for a, b in zip(scores["hf", batching], scores["native", batching]):
            np.testing.assert_array_equal(a, b, err_msg=batching)
    assert any(np.nanmax(np.abs(a - b)) > 0 for a, b in zip(scores["native", "single"], scores["native", "padded"])), "bf16 padding moves a score"
