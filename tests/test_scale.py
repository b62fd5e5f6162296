"""Full-vocabulary comparison at scale: logits as tensors over Ray Direct Transport (gloo here), long samples
compared a block of positions at a time under placement.logits_budget_gb, and the worker memory that bounds.

The baseline is the README's quickstart run (session fixture: object store, whole samples); each test here
reruns that experiment with one thing changed and checks the token columns against it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import EXPERIMENTS, run_experiment, run_text

KEYS = ["cand_engine", "variant", "sample_id", "position"]


def _tokens(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "tokens").drop(columns=["run_id"]).sort_values(KEYS).reset_index(drop=True)


def _quickstart_with(tmp_path_factory, name: str, **placement):
    """The quickstart experiment with these placement fields, run in-process next to a copy of its data."""
    exp = yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())
    exp["placement"] = placement
    d = tmp_path_factory.mktemp(name)
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return run_experiment(path, d / "results")[0]


@pytest.fixture(scope="module")
def gloo_run(ray_cluster, tmp_path_factory):
    return _quickstart_with(tmp_path_factory, "gloo", logits_transport="gloo")


def test_tensor_path_gives_bitwise_the_object_store_columns(quickstart_cli, gloo_run):
    base_dir, result = quickstart_cli
    assert result.exit_code == 0, result.output
    assert json.loads((base_dir / "run.json").read_text())["logits_transport"] == {"hf-eager": "object_store", "hf-bf16": "object_store"}
    assert json.loads((gloo_run / "run.json").read_text())["logits_transport"] == {"hf-eager": "gloo", "hf-bf16": "gloo"}
    base, gloo = _tokens(base_dir), _tokens(gloo_run)
    assert len(base) > 100 and base["kl_ref_cand"].notna().all()  # full-vocabulary columns, so logits moved
    pd.testing.assert_frame_equal(gloo, base, check_exact=True)


def test_chunked_scoring_equals_whole_samples(quickstart_cli, tmp_path_factory):
    """A budget below every sample's logits (V = 512: 2 positions per block) scores and compares in blocks;
    the reference's blocks reach the candidates from its worker one at a time."""
    run_dir = _quickstart_with(tmp_path_factory, "chunked", logits_budget_gb=2**-17)
    base, chunked = _tokens(quickstart_cli[0]), _tokens(run_dir)
    floats = [c for c in base.columns if base[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(chunked.drop(columns=floats), base.drop(columns=floats), check_exact=True)
    for col in floats:  # a block's matrix product may round a row's last bit differently from the whole sample's
        np.testing.assert_allclose(chunked[col], base[col], rtol=1e-4, atol=1e-5, err_msg=col)
    assert (chunked["lp_cand"] == base["lp_cand"]).mean() > 0.5


BIG_VOCAB = 32000
LONG = 1024


@pytest.fixture(scope="module")
def big_vocab_model(tmp_path_factory):
    """A one-layer Llama with a 32k vocabulary and a 64-wide hidden state: logits dominate its memory."""
    from crossengine.experiment.fixture_builders import build_logits_heavy

    return build_logits_heavy(tmp_path_factory.mktemp("big-vocab"), BIG_VOCAB, 2 * LONG)


def _memory_run(tmp_path_factory, model, name: str, budget: float | None):
    rng = np.random.default_rng(0)
    samples = "".join(f"  - token_ids: {[1] + rng.integers(3, 500, LONG - 1).tolist()}\n" for _ in range(2))
    placement = f"placement: {{logits_budget_gb: {budget}}}\n" if budget else ""
    text = f"model: {model}\nreference: ref\nengines:\n  ref: {{type: hf, attn_implementation: sdpa}}\n  cand: {{type: hf, attn_implementation: eager}}\nsamples:\n{samples}batch_size: 1\n{placement}"
    _, run_dir, _ = run_text(tmp_path_factory, name, text)
    return run_dir, json.loads((run_dir / "run.json").read_text())["timings"]


def test_a_worker_stays_within_the_logits_budget(ray_cluster, tmp_path_factory, big_vocab_model):
    """Two 1024-token samples at V = 32k (131 MB of logits per side each) under a 32 MiB budget: neither worker's
    resident memory rises by more than the budget above what it held after loading; without the budget both rise
    by several times it (the control: this measurement can fail), and the columns agree."""
    budget = 1 / 32
    whole_dir, whole = _memory_run(tmp_path_factory, big_vocab_model, "whole", None)
    part_dir, part = _memory_run(tmp_path_factory, big_vocab_model, "blocks", budget)
    for engine in ("ref", "cand"):
        assert whole[f"{engine}.peak_above_load_gb"] > 3 * budget, whole
        assert part[f"{engine}.peak_above_load_gb"] <= budget, part
    a, b = _tokens(whole_dir), _tokens(part_dir)
    np.testing.assert_allclose(b["kl_ref_cand"], a["kl_ref_cand"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b["lp_cand"], a["lp_cand"], rtol=1e-5, atol=1e-6)


def test_the_plan_says_where_the_budget_splits_samples(write_experiment):
    from typer.testing import CliRunner

    from crossengine.cli import app

    path = write_experiment(
        "model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  n: {type: native, factory: 'tests.native_factories:hf_as_native'}\nsamples:\n  - text: hi\nplacement: {logits_budget_gb: 0.001}\n"
    )
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 0, out.output
    assert "logits budget 0.001 GiB per worker: a scores samples beyond 524 tokens (V = 512) in position blocks" in out.output
    assert "skipped: logits budget for engine 'n': native engines cannot score in position blocks" in out.output


def test_the_tensor_path_is_chosen_from_what_the_plan_knows(write_experiment, tmp_path):
    from crossengine.experiment.load import load_experiment
    from crossengine.experiment.plan import make_plan
    from crossengine.run.transport import choose_transports

    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf, dtype: bfloat16}\n  s: {type: 'tests.custom_engine:ScaledHF'}\nsamples:\n  - text: hi\n")
    plan = make_plan(load_experiment(path), path, run_id="x", output_dir=tmp_path / "out")
    ref, b, s = plan.reference, plan.instance("b"), plan.instance("s")
    on_gpu, on_cpu = (lambda i: True), (lambda i: False)
    # auto: NCCL between torch engines on GPUs, only where it imports (a cluster may advertise GPUs it lacks)
    assert choose_transports("auto", "score", ref, [b], [b], on_gpu, nccl=lambda: True)[:2] == ({"b": "nccl"}, "nccl")
    assert choose_transports("auto", "score", ref, [b], [b], on_gpu, nccl=lambda: False)[:2] == ({"b": "object_store"}, None)
    assert choose_transports("auto", "score", ref, [b], [b], on_cpu, nccl=lambda: True)[:2] == ({"b": "object_store"}, None)
    assert choose_transports("gloo", "score", ref, [b], [], on_cpu)[:2] == ({"b": "object_store"}, None), "no full logits move"
    # one candidate that cannot take tensors keeps the wave on the object store, said in one line
    paths, backend, note = choose_transports("gloo", "score", ref, [b, s], [b, s], on_cpu)
    assert backend is None and set(paths.values()) == {"object_store"}
    assert note == ("logits_transport gloo: the reference's logits go through the object store to every candidate of this wave: engine 's' (tests.custom_engine:ScaledHF) hands over host arrays")
    assert "the generate mode" in choose_transports("gloo", "generate", ref, [b], [b], on_cpu)[2]
    assert "NCCL group does not import" in choose_transports("nccl", "score", ref, [b], [b], on_gpu, nccl=lambda: False)[2]
