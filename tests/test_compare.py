"""Metrics next to the data: candidates compare in their own Ray workers, the driver gets token rows only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from .conftest import run_text

EXPERIMENT = """\
model: tiny-text
reference: ref
engines:
  ref: {type: hf, attn_implementation: sdpa}
  cand: {type: hf, attn_implementation: eager, dtype: bfloat16}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - text: "Numbers are computed, never typed in."
  - token_ids: [1, 60, 61, 62, 63, 64, 65, 66, 67]
batch_size: 2
top_k: 5
"""


@pytest.fixture(scope="module")
def worker_run(ray_cluster, tmp_path_factory):
    return run_text(tmp_path_factory, "compare", EXPERIMENT)


def _in_process_tokens(path, run_dir) -> pd.DataFrame:
    """The same comparison computed here, in the test process, from both engines' full logits:
    what a driver-side implementation would write."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from crossengine.adapters.hf import HFEngine
    from crossengine.compare.tables import token_table
    from crossengine.compare.tokens import CompareOptions, compare_batch
    from crossengine.experiment.load import load_experiment
    from crossengine.experiment.plan import make_plan
    from crossengine.run.modes import raw_sample

    plan = make_plan(load_experiment(path), path, run_id="in-process", output_dir=run_dir.parent)
    exp = plan.experiment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the run's two workers on this 2-CPU cluster
    try:
        engines = {i.name: HFEngine(i.spec, i.model_path, i.name, exp.seed) for i in plan.instances}
        ref, cand = engines["ref"], engines["cand"]
        batch = ref.prepare([raw_sample(plan, i) for i in range(len(exp.samples))])
        inst = next(i for i in plan.instances if i.name == "cand")
        options = CompareOptions("ref", inst.name, inst.cand_engine, inst.variant, exp.tie_eps)
        part = compare_batch(batch, ref.score(batch, exp.top_k, True), cand.score(batch, exp.top_k, True), options)
    finally:
        torch.set_num_threads(threads)
    vocab = pa.array(ref.token_texts(), pa.string())
    out = run_dir.parent / "in-process.parquet"
    pq.write_table(token_table(part.rows, "in-process", "ref", inst.cand_engine, inst.variant, vocab), out)
    return pd.read_parquet(out)


def test_worker_metrics_equal_an_in_process_computation(worker_run):
    path, run_dir, _ = worker_run
    got = pd.read_parquet(run_dir / "tokens").sort_values(["sample_id", "position"]).reset_index(drop=True)
    want = _in_process_tokens(path, run_dir).sort_values(["sample_id", "position"]).reset_index(drop=True)
    assert len(got) == len(want) > 0
    assert got["kl_ref_cand"].notna().all(), "full-vocabulary columns were computed"
    for col in want.columns:
        if col == "run_id":
            continue
        a, b = got[col].to_numpy(), want[col].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=col)
        else:
            assert (a.astype(str) == b.astype(str)).all(), col


def test_the_driver_never_receives_logits(worker_run):
    """run.json records the bytes of every candidate's reply: token columns, far below T×V floats."""
    _, run_dir, _ = worker_run
    meta = json.loads((run_dir / "run.json").read_text())
    tokens = pd.read_parquet(run_dir / "tokens")
    vocab = meta["engines"]["ref"]["extra"]["vocab_size"]
    logits_bytes = len(tokens) * vocab * 4  # one side's full logits for the scored positions
    received = meta["timings"]["bytes_to_driver"]
    assert 0 < received < logits_bytes / 10, (received, logits_bytes)
    assert meta["timings"]["cand.metrics_s"] > 0, "the candidate's worker timed its metric work"
