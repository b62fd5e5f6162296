"""Localisation (first divergent module), the buffer audit, and engines in their own environments."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.adapters.inspect import audit_buffers
from crossengine.cli import app
from crossengine.fixtures import ensure_fixture

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
    assert over.iloc[0]["module"] == "layers.1.mlp", over[["module", "max_abs_diff"]]
    before = nudged[nudged["order"] < over.iloc[0]["order"]]
    assert len(before) >= 4 and (before["max_abs_diff"] == 0).all(), "embeddings, layer 0 and layer 1's attention are untouched"
    same = layers[layers["cand_engine"] == "same"]
    assert len(same) == len(nudged) and (same["max_abs_diff"] == 0).all() and (same["first_position"] == -1).all()
    assert "first divergence at module layers.1.mlp" in result.output
    assert not (tmp_path / "out" / "l" / "tokens").exists(), "localize alone scores nothing"


def test_audit_flags_an_uninitialised_non_persistent_buffer_under_transformers_5():
    import transformers
    from transformers import AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("meta-device loading of non-persistent buffers is transformers 5 behaviour")
    model = AutoModelForCausalLM.from_pretrained(ensure_fixture("tiny-remote"), trust_remote_code=True)
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
    layers = pd.read_parquet(run_dir / "layers.parquet").sort_values("order")
    first = layers[layers["max_abs_diff"] > 1e-4].iloc[0]
    assert first["module"] == "rotary"


def test_a_failed_environment_names_engine_and_package(ray_cluster, write_experiment, tmp_path):
    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  old: {type: hf, env: {pip: ['transformers==0.0.999']}}\nsamples:\n  - text: hi there\n")
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "engine 'old'" in line and "transformers==0.0.999" in line
    assert not (tmp_path / "out").exists()
