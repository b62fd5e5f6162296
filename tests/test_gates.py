"""`gates:` and --fail-on-alarm: a run (or sweep) that breaks one exits 3, naming the gate, the value and the worst samples."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.compare.gates import GATE_EXIT, check_gates
from crossengine.experiment.gates import GateSpec

from .conftest import EXPERIMENTS

EXPERIMENT = """\
name: gated
model: tiny-text
reference: fp32
engines:
  fp32: {type: hf, dtype: float32}
  bf16: {type: hf, dtype: bfloat16}
samples:
  - text: "The quick brown fox jumps over the lazy dog while the engines compare their numbers."
  - text: "When two engines disagree, the engineer wants to know which token."
  - file: data/prompts.jsonl
gates:
  - {metric: rollout_train_logprobs_abs_diff_mean, max: 1.0e-9}
  - {gen_kl_error: {max: 10.0}}
alarms: {gen_kl_error: 1.0e-12}
"""


@pytest.fixture(scope="module")
def gated(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("gates")
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    (d / "gated.yaml").write_text(EXPERIMENT)
    result = CliRunner().invoke(app, ["run", str(d / "gated.yaml"), "--output-dir", str(d / "out"), "--run-id", "g"])
    return d, d / "out" / "g", result


def test_a_broken_gate_exits_3_naming_the_value_and_the_worst_samples(gated):
    _, run_dir, result = gated
    assert result.exit_code == GATE_EXIT == 3, result.output
    tokens = pd.read_parquet(run_dir / "tokens")
    per = tokens.assign(d=(tokens["lp_cand"] - tokens["lp_ref"]).abs()).groupby("sample_id", observed=True)["d"].mean().sort_values(ascending=False)
    pooled = float((tokens["lp_cand"] - tokens["lp_ref"]).abs().mean())
    lines = [x for x in result.stderr.splitlines() if x.startswith("gate broken:")]
    assert len(lines) == 1, "the gen_kl_error gate (max 10) holds: only the broken one is said"
    line = lines[0]
    assert line.startswith(f"gate broken: rollout_train_logprobs_abs_diff_mean <= 1e-09: bf16 has {pooled:.4g}; worst samples: ")
    named = [part.split(" (")[0] for part in line.split("worst samples: ")[1].split(", ")]
    assert named == list(per.index[:5].astype(str)), "worst first, recomputed from the token rows"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["gates"]["broken"] == lines and len(meta["gates"]["checked"]) == 2


def test_gates_are_judged_from_the_run_folder_alike(gated):
    """check_gates on the same folder: a gate within bounds breaks nothing; --fail-on-alarm breaks on the tripped alarm."""
    _, run_dir, _ = gated
    assert check_gates(run_dir, [GateSpec(metric="abs_mean", max=10.0)]) == []
    assert check_gates(run_dir, [GateSpec(metric="top1_agreement", min=1.5)])[0].startswith("gate broken: top1_agreement >= 1.5: bf16 has ")
    alarms = pd.read_parquet(run_dir / "alarms.parquet")
    assert "gen_kl_error" in set(alarms["alarm"]), "the experiment's limit of 1e-12 trips it"
    assert check_gates(run_dir, [], fail_on_alarm=True) == [f"gate broken: --fail-on-alarm: alarm {a} tripped on bf16" for a in alarms["alarm"]]
    assert check_gates(run_dir, [GateSpec(alarm="gen_kl_error")]) == ["gate broken: alarm gen_kl_error must not trip: it tripped on bf16"]
    assert check_gates(run_dir, [GateSpec(alarm="gen_kl_error", candidates=["other"])]) == [], "`candidates:` narrows a gate"


SWEEP = """\
name: gated-sweep
experiment: base.yaml
axes:
  dtype:
    field: engines.cand.dtype
    values: [float32, bfloat16]
"""


def test_a_sweep_exits_3_when_a_member_breaks_a_gate_and_its_index_says_which(ray_cluster, tmp_path):
    base = "model: tiny-text\nreference: ref\nengines:\n  ref: {type: hf, dtype: float32}\n  cand: {type: hf, dtype: float32}\nsamples:\n  - text: hello there, engines\ngates:\n  - {metric: abs_max, max: 0.0}\n"
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    args = ["sweep", str(tmp_path / "sweep.yaml"), "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == GATE_EXIT, result.output
    index = pd.read_parquet(tmp_path / "out" / "gated-sweep" / "index.parquet").drop_duplicates("member").set_index("member")
    assert index.loc["float32", "gates_broken"] == 0 and index.loc["bfloat16", "gates_broken"] == 1, "fp32 is bitwise the reference; bf16 is not"
    assert "1 of 2 member(s) broke a gate: bfloat16" in result.stderr
    again = CliRunner().invoke(app, args)  # both finished: skipped, judged as they were
    assert again.exit_code == GATE_EXIT and "finished before, skipped (1 gate(s) broken then)" in again.output
    assert np.isfinite(pd.read_parquet(tmp_path / "out" / "gated-sweep" / "bfloat16" / "summary.parquet")["abs_max"]).all()
