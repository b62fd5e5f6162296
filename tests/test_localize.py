"""Localisation (first divergent module), the buffer audit, and engines in their own environments."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.adapters.base import RawSample
from crossengine.adapters.inspect import audit_buffers
from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import EXPERIMENTS, run_experiment

NUDGED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def nudged_model(tmp_path_factory):
    """tiny-text with one layer's weight nudged by 1e-3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ensure_fixture("tiny-text")
    out = tmp_path_factory.mktemp("nudged")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        dict(model.named_parameters())[NUDGED].add_(1e-3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_a_nudged_layer_is_localised_to_exactly_that_layer(ray_cluster, nudged_model, tmp_path):
    path = tmp_path / "loc.yaml"
    path.write_text(
        f"model: tiny-text\nreference: orig\nengines:\n  orig: {{type: hf}}\n  same: {{type: hf}}\n"
        f"  nudged: {{type: hf, model: {nudged_model}}}\nsamples:\n  - text: 'The quick brown fox jumps over the lazy dog.'\n"
        "localize: {tolerance: 1.0e-6}\n"
    )
    result = CliRunner().invoke(app, ["localize", str(path), "--output-dir", str(tmp_path / "out"), "--run-id", "l"])
    assert result.exit_code == 0, result.output
    layers = pd.read_parquet(tmp_path / "out" / "l" / "layers.parquet")
    nudged = layers[layers["cand_engine"] == "nudged"].sort_values("order")
    over = nudged[nudged["max_abs_diff"] > 1e-6]
    assert over.iloc[0]["module"] == NUDGED.removesuffix(".weight"), over[["module", "max_abs_diff"]]  # the leaf whose weight moved
    before = nudged[nudged["order"] < over.iloc[0]["order"]]
    assert len(before) >= 4 and (before["max_abs_diff"] == 0).all(), "embeddings, layer 0 and layer 1's attention are untouched"
    same = layers[layers["cand_engine"] == "same"]
    assert len(same) == len(nudged) and (same["max_abs_diff"] == 0).all() and (same["first_position"] == -1).all()
    assert f"first divergence at module {NUDGED.removesuffix('.weight')}" in result.output
    assert not (tmp_path / "out" / "l" / "tokens").exists(), "localize alone scores nothing"
    # error growth: localize.parquet's residual stream against a recomputation with hooks of this test's own
    growth = pd.read_parquet(tmp_path / "out" / "l" / "localize.parquet")
    stream = growth[(growth["cand_engine"] == "nudged") & (growth["part"] == "residual")].set_index("layer")["rel_error"]
    mine = _residual_rel_error(ensure_fixture("tiny-text"), nudged_model, "The quick brown fox jumps over the lazy dog.")
    assert list(stream.index) == list(range(len(mine))) and np.allclose(stream.to_numpy(), mine, rtol=1e-6, atol=1e-12), (stream, mine)
    assert stream[0] == 0 < stream[1], "layer 0 untouched, layer 1's MLP nudged"
    assert (growth.loc[growth["cand_engine"] == "same", "rel_error"] == 0).all()
    assert "nudged: relative error of the residual stream 0 after layer 0" in result.output


def _residual_rel_error(ref_path, cand_path, text: str) -> list[float]:
    """‖cand − ref‖ / ‖ref‖ of each decoder layer's output, from forward hooks on two HF models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ref_path)(text, return_tensors="pt").input_ids
    outs = []
    for path in (ref_path, cand_path):
        model, got = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), []
        for layer in model.model.layers:
            layer.register_forward_hook(lambda _m, _a, out, got=got: got.append((out[0] if isinstance(out, tuple) else out)[0].double()))
        with torch.no_grad():
            model(ids)
        outs.append(got)
    return [float((c - r).norm() / r.norm()) for r, c in zip(*outs)]


def test_a_model_with_its_own_names_is_localised_with_no_modules_and_no_map(ray_cluster, tmp_path):
    """Default capture is the whole tree: a nudged leaf of a non-HF-named model is found exactly."""
    path = tmp_path / "custom.yaml"
    factory = "tests.native_factories:custom_tree"
    path.write_text(
        f"model: tiny-text\nreference: mine\nengines:\n  mine: {{type: native, factory: '{factory}'}}\n"
        f"  again: {{type: native, factory: '{factory}'}}\n"
        f"  nudged: {{type: native, factory: '{factory}', options: {{nudge: trunk.1.ff.down.weight}}}}\n"
        "samples:\n  - text: 'The quick brown fox jumps over the lazy dog.'\nlocalize: {tolerance: 1.0e-6}\n"
    )
    result = CliRunner().invoke(app, ["localize", str(path), "--output-dir", str(tmp_path / "out"), "--run-id", "c"])
    assert result.exit_code == 0, result.output
    layers = pd.read_parquet(tmp_path / "out" / "c" / "layers.parquet")
    nudged = layers[layers["cand_engine"] == "nudged"].sort_values("order")
    assert {"emb", "trunk.0.mix.q", "trunk.1.ff", "fin", "out"} <= set(nudged["module"]), "every module, whatever its name"
    first = nudged[nudged["max_abs_diff"] > 1e-6].iloc[0]
    assert first["module"] == "trunk.1.ff.down" and first["leaf"] and first["input_max_abs_diff"] == 0
    assert (nudged[nudged["order"] < first["order"]]["max_abs_diff"] == 0).all()
    assert "first divergence at module trunk.1.ff.down" in result.output and "appearing inside it" in result.output
    assert (layers.loc[layers["cand_engine"] == "again", "max_abs_diff"] == 0).all()


def test_a_capture_that_matches_nothing_says_why(ray_cluster, tmp_path):
    """HF names its embedding model.embed_tokens; `^emb$` captures nothing there: a message, no empty table."""
    path = tmp_path / "none.yaml"
    path.write_text(
        "model: tiny-text\nreference: mine\nengines:\n  mine: {type: native, factory: 'tests.native_factories:custom_tree'}\n"
        "  hf: {type: hf}\nsamples:\n  - text: 'The quick brown fox'\nlocalize: {modules: ['^emb$'], audit_buffers: false}\n"
    )
    result = CliRunner().invoke(app, ["localize", str(path), "--output-dir", str(tmp_path / "out"), "--run-id", "n"])
    assert result.exit_code == 0, result.output
    assert "hf: no module matches the reference's" in result.output and "mine has [emb], hf has [none]" in result.output
    assert not (tmp_path / "out" / "n" / "layers.parquet").exists()


def _engine_captures(kind: str, fixture: str):
    from crossengine.adapters import engine_class, make_spec

    engine = engine_class(kind)(make_spec(dict(type=kind, dtype="float32", device="cpu")), str(ensure_fixture(fixture)), kind)
    sample = engine.prepare([RawSample("s", "The quick brown fox jumps over the lazy dog.")])[0]
    return engine.capture([sample], None)[0]


def test_hf_and_olmo_core_align_without_the_built_in_map():
    """Two implementations, two naming schemes: forward order, shape and values pair them as the map does."""
    pytest.importorskip("olmo_core", reason="OLMo-core (ai2-olmo-core) is not installed")
    from crossengine.compare.localize import canonical, compare

    hf, olmo = _engine_captures("hf", "tiny-olmo2"), _engine_captures("native", "tiny-olmo2")
    key = lambda caps, kind: [{**c, "key": canonical(c["name"], kind, {})} for c in caps]  # noqa: E731
    with_map = compare(key(hf, "hf"), key(olmo, "olmo-core"), 1e-5)
    without = compare(key(hf, "hf"), key(olmo, "no-map"), 1e-5)
    anchored = with_map[[canonical(c, "olmo-core", {}) == canonical(m, "hf", {}) for m, c in zip(with_map["module"], with_map["cand_module"])]]
    assert len(anchored) >= 8, "embeddings, 2 blocks x (block, attention, MLP), final norm"
    pairs_without = set(zip(without["module"], without["cand_module"]))
    assert set(zip(anchored["module"], anchored["cand_module"])) <= pairs_without
    assert (without["module"] != without["cand_module"]).sum() > len(anchored) / 2, "names really differ"
    pd.testing.assert_frame_equal(
        anchored.drop(columns=["order"]).reset_index(drop=True),
        without[without["module"].isin(anchored["module"])].drop(columns=["order"]).reset_index(drop=True),
    )


def test_a_key_missing_from_the_checkpoint_is_flagged_by_name(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from crossengine.adapters import make_spec
    from crossengine.adapters.hf import HFEngine

    src = ensure_fixture("tiny-text")
    shutil.copytree(src, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights[NUDGED]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    engine = HFEngine(make_spec(dict(type="hf", dtype="float32", device="cpu")), str(tmp_path / "m"), "holey")
    flagged = {r["buffer"]: r for r in engine.audit() if not r["ok"]}
    assert NUDGED in flagged and flagged[NUDGED]["kind"] == "parameter"
    assert "missing from the checkpoint" in flagged[NUDGED]["issues"][0]
    assert len([r for r in flagged.values() if r["kind"] == "parameter"]) == 1


def test_audit_flags_an_uninitialised_non_persistent_buffer_under_transformers_5():
    import transformers
    from transformers import AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("meta-device loading of non-persistent buffers is transformers 5 behaviour")
    # The buffer is torch.empty memory: in this process, where earlier tests built and freed the same model, it
    # sometimes reused a block that held the right values (once in a full run). torch's deterministic mode fills
    # uninitialised memory with NaN, so what transformers leaves unset is unset in every run.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(ensure_fixture("tiny-remote"), trust_remote_code=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.isnan(model.rotary.inv_freq).all(), "left uninitialised by transformers 5 (filled with NaN here)"
    findings = {f["buffer"]: f for f in audit_buffers(model, model.config, "cpu")}
    rotary = findings["rotary.inv_freq"]
    assert not rotary["persistent"] and not rotary["ok"]
    assert any("differs from a fresh construction" in i for i in rotary["issues"])


def test_transformers_4_and_5_in_their_own_environments(ray_cluster, tmp_path):
    """Builds a Ray pip environment with transformers 4.57.6 (PyPI; about 20-40 s the first time)."""
    run_dir, _ = run_experiment(EXPERIMENTS / "transformers-versions.yaml", tmp_path / "results")
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["engines"]["hf-4.57"]["versions"]["transformers"] == "4.57.6"
    assert meta["engines"]["hf-5"]["versions"]["transformers"].startswith("5.")
    buffers = pd.read_parquet(run_dir / "buffers.parquet").set_index(["engine", "buffer"])
    assert buffers.loc[("hf-4.57", "rotary.inv_freq"), "ok"], "4.x computes the buffer in __init__"
    assert not buffers.loc[("hf-5", "rotary.inv_freq"), "ok"], "5.x leaves it uninitialised"
    layers = pd.read_parquet(run_dir / "layers.parquet").sort_values("order").reset_index(drop=True)
    rotary = layers.index[layers["module"] == "rotary"][0]
    assert (layers.loc[: rotary - 1, "max_abs_diff"] <= 1e-4).all(), "nothing before the rotary embedding differs"
    # the buffer is uninitialised memory (torch.empty): almost always garbage that makes the rotary output differ,
    # and then the localisation must name rotary first; once in many runs its output stayed within 1e-4 (the
    # memory's contents are not ours to choose: see the closing note of this change)
    if layers.loc[rotary, "max_abs_diff"] > 1e-4:
        first = layers[layers["max_abs_diff"] > 1e-4].iloc[0]
        assert first["module"] == "rotary", layers[["module", "max_abs_diff"]]


def test_a_failed_environment_names_engine_and_package(ray_cluster, write_experiment, tmp_path):
    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  old: {type: hf, env: {pip: ['transformers==0.0.999']}}\nsamples:\n  - text: hi there\n")
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "engine 'old'" in line and "transformers==0.0.999" in line
    assert not (tmp_path / "out").exists()
