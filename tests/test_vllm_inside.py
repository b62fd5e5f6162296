"""Inside vLLM: module capture in its worker aligned with transformers', error growth by layer, the weight audit, and
full logits from the worker. Real vLLM on the CPU (.venvs/vllm); three runs, each engine started once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from crossengine.adapters.vllm_inside import stream_output
from crossengine.cli import app
from crossengine.compare.fused import fuse_parts
from crossengine.compare.localize import compare
from crossengine.experiment.fixtures import NUDGED_PARAMETER, ensure_fixture

from .conftest import EXPERIMENTS
from .test_vllm import VLLM_PYTHON

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")

FUSED = "model.layers.1.mlp.gate_up_proj"  # vLLM's name of the nudged weight's module
PARTS = "model.layers.1.mlp.gate_proj+up_proj"  # HF's gate_proj and up_proj, concatenated


@pytest.fixture(scope="module")
def inside_run(ray_cluster, tmp_path_factory):
    """experiments/inside-vllm.yaml as `crossengine run` (scores and localises), with one more engine: vLLM's own
    prompt_logprobs=-1 path, to check the worker's logits against."""
    d = tmp_path_factory.mktemp("inside")
    text = (EXPERIMENTS / "inside-vllm.yaml").read_text().replace("../.venvs/vllm/bin/python", str(VLLM_PYTHON))
    text = text.replace(
        "samples:\n", f"  pairs: {{type: vllm, dtype: float32, full_vocab: true, full_vocab_path: prompt_logprobs, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 256}}}}\nsamples:\n", 1
    )
    return _cli("run", d, text)


def _cli(command: str, d, experiment: str):
    """`crossengine COMMAND` on this experiment text as a user runs it: (run folder, what it printed)."""
    (d / "x.yaml").write_text(experiment)
    result = CliRunner().invoke(app, [command, str(d / "x.yaml"), "--output-dir", str(d / "out"), "--run-id", "a"])
    assert result.exit_code == 0, result.output
    return d / "out" / "a", result.output


def test_every_aligned_vllm_module_agrees_with_hf_in_fp32(inside_run):
    run_dir, output = inside_run
    layers = pd.read_parquet(run_dir / "layers.parquet")
    same = layers[layers["cand_engine"] == "vllm"]
    assert len(same) >= 20 and (same["rel_error"] <= 1e-4).all(), same.sort_values("rel_error").tail(3)
    pairs = set(zip(same["module"], same["cand_module"]))
    assert ("model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.self_attn.qkv_proj") in pairs, "fused q/k/v aligned with HF's three"
    assert ("model.layers.1", "model.layers.1") in pairs and ("lm_head", "logits_processor") in pairs
    assert "vllm: no module differs by more than 0.0001 from the reference" in output
    assert "modules have no counterpart in hf and are not compared: model.layers.0.self_attn.rotary_emb, model.layers.0.self_attn.attn" in output


def test_the_first_divergent_module_is_named_in_vllms_words_and_hfs(inside_run):
    run_dir, output = inside_run
    layers = pd.read_parquet(run_dir / "layers.parquet")
    nudged = layers[layers["cand_engine"] == "vllm-nudged"]
    over = nudged[nudged["max_abs_diff"] > 1e-4].sort_values("order")
    first = over.iloc[0]
    assert (first["module"], first["cand_module"]) == (PARTS, FUSED)
    assert (nudged.loc[nudged["order"] < first["order"], "max_abs_diff"] <= 1e-4).all(), "nothing before it diverges"
    assert f"vllm-nudged: first divergence at module {PARTS} (vllm-nudged's {FUSED})" in " ".join(output.split())


def test_the_weight_audit_names_exactly_the_nudged_parameter(inside_run):
    run_dir, output = inside_run
    audit = pd.read_parquet(run_dir / "buffers.parquet")
    vllm = audit[audit["engine"].isin(["vllm", "vllm-nudged"])]
    assert set(vllm.loc[~vllm["ok"], "buffer"]) == {f"{FUSED}.weight"} and set(vllm.loc[~vllm["ok"], "engine"]) == {"vllm-nudged"}
    moved = load_file(ensure_fixture("tiny-text-nudged") / "model.safetensors")[NUDGED_PARAMETER] - load_file(ensure_fixture("tiny-text") / "model.safetensors")[NUDGED_PARAMETER]
    found = vllm.loc[~vllm["ok"], "max_abs_diff_vs_fresh"].iloc[0]
    assert found == pytest.approx(float(moved.abs().max()), abs=1e-7)
    parameters = vllm[(vllm["engine"] == "vllm") & (vllm["kind"] == "parameter")]
    assert len(parameters) == 1 + 2 * 6 + 2, "embeddings, 6 per layer (qkv, o, gate_up, down, two norms), final norm, lm_head: all read back"
    rotary = vllm[vllm["buffer"].str.endswith("cos_sin_cache")]
    assert len(rotary) == 2 and rotary["ok"].all() and (rotary["max_abs_diff_vs_fresh"] <= 1e-6).all(), "compared with transformers' rotary"
    assert f"vllm-nudged: {FUSED}.weight" in " ".join(output.split())


def test_error_growth_by_layer_is_written_and_drawn(inside_run):
    run_dir, output = inside_run
    growth = pd.read_parquet(run_dir / "localize.parquet")
    nudged = growth[(growth["cand_engine"] == "vllm-nudged") & (growth["part"] == "residual")].groupby("layer")["rel_error"].max()
    assert list(nudged.index) == [0, 1] and nudged[0] < 1e-5 < 1e-4 < nudged[1], "clean after layer 0, off after the nudged layer 1"
    logits = growth[(growth["part"] == "logits") & (growth["cand_engine"] == "vllm")]
    assert len(logits) == 2 and (logits["layer"] == 2).all()
    layers = pd.read_parquet(run_dir / "layers.parquet")
    joined = growth.merge(layers, on=["cand_engine", "variant", "sample_id", "module", "cand_module"], suffixes=("", "_layers"))
    assert len(joined) == len(growth) and np.array_equal(joined["rel_error"], joined["rel_error_layers"])
    assert "vllm-nudged: relative error of the residual stream" in output
    CliRunner().invoke(app, ["report", str(run_dir), "--html"])
    html = (run_dir / "report.html").read_text()
    assert "error growth" in html and "vllm-nudged: residual stream" in html


def test_full_logits_from_the_worker_equal_vllms_own_pairs(inside_run):
    run_dir, _ = inside_run
    tokens = pd.read_parquet(run_dir / "tokens")
    worker = tokens[tokens["cand_engine"] == "vllm"].set_index(["sample_id", "position"]).sort_index()
    pairs = tokens[tokens["cand_engine"] == "pairs"].set_index(["sample_id", "position"]).sort_index()
    assert len(worker) == len(pairs) > 20
    assert np.abs(worker["kl_ref_cand"] - pairs["kl_ref_cand"]).max() <= 1e-6 and np.abs(worker["kl_cand_ref"] - pairs["kl_cand_ref"]).max() <= 1e-6
    assert (worker["lp_cand"] == pairs["lp_cand"]).all() and (worker["rank_in_cand"] == pairs["rank_in_cand"]).all()
    assert worker["cos_sim"].notna().all() and (worker["cos_sim"] > 0.9999).all(), "raw logits: a cosine"
    assert pairs["cos_sim"].isna().all(), "vLLM's pairs are log-probs: no cosine"


MOE_NUDGED = "model.layers.3.self_attn.q_proj.weight"
LONG = " ".join(["the engines compare their numbers"] * 60)  # over the vLLM engine's max_model_len of 256  # the last of tiny-moe's four layers: three MoE layers before it


@pytest.fixture(scope="module")
def vllm_reference(ray_cluster, tmp_path_factory):
    """`crossengine localize` with vLLM (tiny-moe) as the reference and HF as the candidate, loading a copy of it with
    one attention weight of its last layer nudged: the MoE layers before it must align and agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("vref")
    model = AutoModelForCausalLM.from_pretrained(ensure_fixture("tiny-moe"), dtype=torch.float32)
    with torch.no_grad():
        dict(model.named_parameters())[MOE_NUDGED][:, 0].add_(1e-2)  # every q feature moves with the input's first: well over 1e-4
    model.save_pretrained(d / "nudged")
    AutoTokenizer.from_pretrained(ensure_fixture("tiny-moe")).save_pretrained(d / "nudged")
    return _cli(
        "localize",
        d,
        f"model: tiny-moe\nreference: vllm\nengines:\n  vllm: {{type: vllm, dtype: float32, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 256}}}}\n"
        f"  hf-nudged: {{type: hf, dtype: float32, model: {d / 'nudged'}}}\n"
        "samples:\n  - text: 'The quick brown fox jumps over the lazy dog.'\n"
        f"  - {{id: too-long, text: '{LONG}'}}\nlocalize: {{samples: 2}}\n",
    )


def test_vllm_as_the_reference_finds_the_nudged_module_in_a_moe_model(vllm_reference):
    run_dir, output = vllm_reference
    layers = pd.read_parquet(run_dir / "layers.parquet")
    first = layers[layers["max_abs_diff"] > 1e-4].sort_values("order").iloc[0]
    assert (first["module"], first["cand_module"]) == ("model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.q_proj+k_proj+v_proj")
    assert "first divergence at module model.layers.3.self_attn.qkv_proj (hf-nudged's model.layers.3.self_attn.q_proj+k_proj+v_proj)" in " ".join(output.split())
    before = layers[layers["order"] < first["order"]]
    assert (before["rel_error"] <= 1e-4).all(), before.sort_values("rel_error").tail(3)
    assert sorted(before.loc[before["part"] == "mlp", "layer"]) == [0, 1, 2], "the three MoE blocks before it align and agree"
    assert sorted(before.loc[before["part"] == "residual", "layer"]) == [0, 1, 2]
    assert "localize.parquet" in output.split("results:")[-1], "the results line names the error-growth table"
    assert "hf-nudged: sample too-long not localised: vllm cannot run it (" in output and "exceed max_model_len 256" in output
    assert set(layers["sample_id"]) == {"s0"}, "the other sample is localised all the same"
    page = CliRunner().invoke(app, ["report", str(run_dir), "--html"])
    assert page.exit_code == 0 and "a localisation (crossengine localize)" in page.output, page.output
    assert "error growth" in (run_dir / "report.html").read_text(), "a localize-only run has a report: its localisation"


def test_the_residual_stream_is_the_sum_of_vllms_deferred_add():
    """A decoder layer that returns (hidden_states, residual) is compared as their sum: a bug in the residual half is
    seen (negative control: the first element alone would hide it)."""
    torch.manual_seed(0)
    hidden, residual = torch.randn(6, 8), torch.randn(6, 8)
    stream = (hidden + residual).numpy()
    bug = residual.clone()
    bug[3] += 0.5
    ref = [{"name": "model.layers.0", "key": "layers.0", "leaf": False, "output": stream, "input": None}]
    summed = [{**ref[0], "output": stream_output("model.layers.0", (hidden, bug)).numpy()}]
    first_only = [{**ref[0], "output": hidden.numpy() + residual.numpy()}]  # what taking output[0] plus the true residual would be
    assert compare(ref, summed, 1e-6).iloc[0]["first_position"] == 3
    assert compare(ref, first_only, 1e-6).iloc[0]["max_abs_diff"] < 1e-6
    assert stream_output("model.layers.0.mlp", (hidden, bug)) is hidden, "only a decoder layer's pair is summed"


def test_fused_projections_align_with_their_parts_and_nothing_else():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((5, 8)), rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    rec = lambda name, out: {"name": f"model.layers.0.self_attn.{name}", "key": f"layers.0.self_attn.{name}", "leaf": True, "output": out, "input": None}  # noqa: E731
    hf = [rec("q_proj", q), rec("k_proj", k), rec("v_proj", v), rec("o_proj", q)]
    vllm = [rec("qkv_proj", np.concatenate([q, k, v], 1)), rec("o_proj", q)]
    fused = fuse_parts(hf, vllm)
    assert [r["name"].rpartition(".")[2] for r in fused] == ["q_proj+k_proj+v_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    table = compare(fused, vllm, 1e-9)
    assert set(zip(table["module"], table["cand_module"])) == {("model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.self_attn.qkv_proj"), ("model.layers.0.self_attn.o_proj",) * 2}
    assert (table["max_abs_diff"] == 0).all()
    assert fuse_parts(hf[:2], vllm) == hf[:2], "v_proj missing: no partial concatenation"
