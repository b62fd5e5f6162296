"""Engines own what they can do: a new engine is one file, found by `module:Class` or an entry point,
and the core never names an engine."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.adapters import BUILTIN
from crossengine.cli import app

from .conftest import REPO, run_text

CUSTOM = """\
model: tiny-text
reference: hf
engines:
  hf: {type: hf}
  scaled: {type: 'tests.custom_engine:ScaledHF', temperature: 2.0}
samples:
  - {id: fox, text: The quick brown fox jumps over the lazy dog.}
  - {id: two, text: Two roads diverged in a yellow wood.}
"""


@pytest.fixture(scope="module")
def custom_run(ray_cluster, tmp_path_factory):
    return run_text(tmp_path_factory, "custom", CUSTOM)


def test_an_engine_from_the_tests_folder_runs_end_to_end(custom_run):
    """Its own field reaches its worker: its log-probs are the HF model's at temperature 2, recomputed here."""
    from crossengine.adapters import make_spec
    from crossengine.adapters.base import RawSample
    from crossengine.adapters.hf import HFEngine
    from crossengine.experiment.fixtures import ensure_fixture

    _, run_dir, _ = custom_run
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["engines"]["scaled"]["engine"] == "scaled-hf"
    tokens = pd.read_parquet(run_dir / "tokens")
    assert set(tokens["cand_engine"].astype(str)) == {"scaled"}
    hf = HFEngine(make_spec(dict(type="hf", dtype="float32", device="cpu")), str(ensure_fixture("tiny-text")), "hf")
    for sample in hf.prepare([RawSample("fox", "The quick brown fox jumps over the lazy dog.")]):
        logp = torch.log_softmax(hf.forward_logits(sample).double() / 2.0, -1)
        ids = torch.as_tensor(sample.input_ids)
        want = logp[torch.arange(len(ids) - 1), ids[1:]].numpy()
        got = tokens[tokens["sample_id"].astype(str) == "fox"].sort_values("position")["lp_cand"].to_numpy()
        assert np.abs(got - want).max() < 1e-5, "the engine's own temperature field scaled its logits"
        assert np.abs(got - tokens[tokens["sample_id"].astype(str) == "fox"].sort_values("position")["lp_ref"].to_numpy()).max() > 0.1


def test_the_core_reads_the_engines_traits(custom_run, tmp_path):
    """Placement plans the KV cache the custom engine declares (and not for hf, which declares none)."""
    from crossengine.experiment.plan import make_plan
    from crossengine.experiment.schema import PlacementSpec
    from crossengine.run.placement import footprint_gb

    path, _, runner = custom_run
    plan = runner.plan
    spec = PlacementSpec(headroom_gb=1.0, vllm_kv_cache_gb=3.0)
    sizes = {i.name: footprint_gb(i, 10**9, spec) for i in plan.instances}
    assert sizes["scaled"][1] - sizes["scaled"][0] == pytest.approx(4.0)
    assert sizes["hf"][1] - sizes["hf"][0] == pytest.approx(1.0)
    assert make_plan(plan.experiment, path).candidates[0].traits.needs_kv_cache


@pytest.mark.parametrize(
    "engine,words",
    [
        ("{type: 'tests.custom_engine:NotAnEngine'}", ["engines.scaled.type", "NotAnEngine", "not a subclass"]),
        ("{type: 'tests.custom_engine:ScaledHF', lora: tiny-text-lora}", ["engines.scaled.lora", "take no LoRA"]),
        ("{type: 'tests.custom_engine:ScaledHF', temperature: 0}", ["engines.scaled.temperature", "greater than 0"]),
        ("{type: 'tests.custom_engine:ScaledHF', full_vocab: true}", ["engines.scaled.full_vocab", "not a field of tests.custom_engine:ScaledHF", "vllm"]),
    ],
)
def test_a_wrong_custom_engine_is_one_line_before_anything_starts(engine, words, write_experiment, tmp_path):
    path = write_experiment(CUSTOM.replace("{type: 'tests.custom_engine:ScaledHF', temperature: 2.0}", engine))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{path}:5:" in message, message
    for word in words:
        assert word in message, (word, message)


def test_an_installed_package_registers_an_engine_by_entry_point(tmp_path):
    """A package's `crossengine.engines` entry point makes its engine a type by name (`crossengine engines` lists it)."""
    dist = tmp_path / "site" / "scaled_engine-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scaled-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[crossengine.engines]\nscaled = tests.custom_engine:ScaledHF\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(CUSTOM.replace("'tests.custom_engine:ScaledHF'", "scaled"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)]), "COLUMNS": "250"}
    listing = subprocess.run([sys.executable, "-m", "crossengine.cli", "engines"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("│ scaled "))
    row = " ".join(lines[first : next(i for i in range(first, len(lines)) if lines[i][0] in "├└")])  # the row, wrapped or not
    assert "entry point" in row and "temperature" in row and "needs_kv_cache=True" in row, row
    check = subprocess.run([sys.executable, "-m", "crossengine.cli", "validate", str(exp)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout + check.stderr
    env["PYTHONPATH"] = str(REPO)  # without the package the name is unknown, in one line listing the known ones
    check = subprocess.run([sys.executable, "-m", "crossengine.cli", "validate", str(exp)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert check.returncode == 2 and "unknown engine type 'scaled'" in check.stderr and "'hf', 'logprobs', 'native', 'vllm'" in check.stderr, check.stderr


def _literal_engine_comparisons(source: str) -> list[int]:
    """Lines where code compares something with a built-in engine's name (==, !=, in a literal collection)."""
    names = set(BUILTIN)
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                consts = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    lines.append(node.lineno)
    return lines


def test_no_core_module_compares_an_engine_type_with_a_name():
    found = {str(p.relative_to(REPO)): lines for p in sorted((REPO / "crossengine").rglob("*.py")) if (lines := _literal_engine_comparisons(p.read_text()))}
    assert not found, f"core modules that branch on an engine's name instead of its traits: {found}"
    assert _literal_engine_comparisons("if spec.type == 'vllm':\n    pass\nok = kind in ('hf', 'native')\n") == [1, 3], "the check itself finds them"
