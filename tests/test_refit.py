"""`refit:` on hf engines: weights pushed in place, scored after each push, checked against fresh loads and audited.

One run from the CLI holds every case (a chain of three, two planted faults, sync code that raises, a checkpoint of
another shape); each number is recomputed here with transformers directly from the checkpoints on disk.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from crossengine.adapters.refit import audit_parameters, compare_values
from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .test_report import needs_browser, open_in_browser

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the engines compare their numbers.",
    "When two engines disagree, the engineer wants to know which token, which layer and which buffer.",
    "Small differences in attention masks add up.",
]
EXPERIMENT = f"""\
name: refit-hf
model: tiny-text
reference: ref
engines:
  ref: {{type: hf, dtype: float32, model: tiny-text-step3}}
  chain: {{type: hf, dtype: float32, refit: {{to: [tiny-text-step1, tiny-text-step2, tiny-text-step3]}}}}
  skip: {{type: hf, dtype: float32, refit: {{to: tiny-text-step3, update: "experiments.weight_sync:skip_one"}}}}
  rt: {{type: hf, dtype: float32, refit: {{to: tiny-text-step3, update: "experiments.weight_sync:bf16_round_trip"}}}}
  fails: {{type: hf, dtype: float32, refit: {{to: tiny-text-step3, update: "experiments.weight_sync:fails"}}}}
  wide: {{type: hf, dtype: float32, refit: {{to: tiny-text-32k}}}}
samples:
{chr(10).join(f'  - text: "{t}"' for t in TEXTS)}
top_k: 5
batch_size: 2
"""


@pytest.fixture(scope="module")
def refit_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("refit")
    (d / "refit.yaml").write_text(EXPERIMENT)
    result = CliRunner().invoke(app, ["run", str(d / "refit.yaml"), "--output-dir", str(d / "results"), "--run-id", "r"])
    run_dir = d / "results" / "r"
    return run_dir, result, pd.read_parquet(run_dir / "refit.parquet"), pd.read_parquet(run_dir / "refit_params.parquet")


def checkpoint(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ensure_fixture(name, seed=0) / "model.safetensors"))


def forward_lps(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per sample, log p(token t | < t) of tiny-text's architecture holding `weights`: transformers, unbatched."""
    folder = ensure_fixture("tiny-text", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.load_state_dict(weights)
    tok = AutoTokenizer.from_pretrained(folder)
    out = {}
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            ids = torch.tensor([tok(text).input_ids])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            out[f"s{i}"] = lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].numpy()
    return out


def column(rows: pd.DataFrame, engine: str, step: int, col: str) -> dict[str, np.ndarray]:
    mine = rows[(rows["engine"] == engine) & (rows["step"] == step) & (rows["via"] == "score")]
    return {str(sid): g.sort_values("position")[col].to_numpy() for sid, g in mine.groupby("sample_id", observed=True)}


def close_to(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float) -> bool:
    return set(got) == set(want) and all(np.abs(got[k] - want[k]).max() <= tol for k in want)


def test_a_chain_of_three_pushes_equals_three_fresh_loads_bitwise(refit_run):
    run_dir, result, rows, _ = refit_run
    chain = rows[rows["engine"] == "chain"]
    assert sorted(chain["step"].unique()) == [1, 2, 3] and list(chain.drop_duplicates("step")["to"]) == ["tiny-text-step1", "tiny-text-step2", "tiny-text-step3"]
    assert (chain["refit_diff"] == 0).all() and (chain["lp_synced"] == chain["lp_fresh"]).all()
    for step in (1, 2, 3):  # each fresh load is that checkpoint (recomputed here), and each push moved the scores
        want = forward_lps(checkpoint(f"tiny-text-step{step}"))
        assert close_to(column(rows, "chain", step, "lp_fresh"), want, 1e-5), step
    base = forward_lps(checkpoint("tiny-text"))
    assert not close_to(column(rows, "chain", 1, "lp_synced"), base, 1e-3), "the first push changed what the engine computes"
    tokens = pd.read_parquet(run_dir / "tokens")
    assert tokens[tokens["cand_engine"] == "chain"]["abs_lp_diff"].max() == 0, "its scores are the last push's: the reference is step 3 itself"
    for step in (1, 2, 3):
        assert f"refit: chain after refit to tiny-text-step{step}: bitwise equal to a fresh load" in result.output
    meta = json.loads((run_dir / "run.json").read_text())
    assert [s["bitwise"] for s in meta["refit"]["chain"]] == [True, True, True] and meta["refit"]["chain"][0]["first"] is None


def test_sync_code_that_skips_a_tensor_is_named_by_both_audits(refit_run):
    run_dir, result, rows, audit = refit_run
    base, step3 = checkpoint("tiny-text"), checkpoint("tiny-text-step3")
    mine = audit[audit["engine"] == "skip"]
    stream, params = mine[mine["source"] == "stream"], mine[mine["source"] == "parameters"]
    assert list(stream["name"]) == ["lm_head.weight"] and list(stream["finding"]) == ["never written"]
    assert list(params["name"]) == ["lm_head.weight"] and list(params["finding"]) == ["differs"]
    assert params["max_abs_diff"].iloc[0] == pytest.approx(float((base["lm_head.weight"] - step3["lm_head.weight"]).abs().max()), rel=1e-6)
    held = {**step3, "lm_head.weight": base["lm_head.weight"]}  # what the engine holds: step 3 with the old head
    assert close_to(column(rows, "skip", 1, "lp_synced"), forward_lps(held), 1e-5)
    assert not close_to(column(rows, "skip", 1, "lp_synced"), forward_lps(step3), 1e-3)
    meta = json.loads((run_dir / "run.json").read_text())["refit"]["skip"][0]
    assert meta["bitwise"] is False and meta["first"] == {"sample_id": "s0", "position": 1}, "the head matters from the first scored token"
    assert meta["max_abs_diff"] == pytest.approx(float(rows[rows["engine"] == "skip"]["refit_diff"].max()))
    assert "refit: skip after refit to tiny-text-step3: differs from a fresh load" in result.output and "lm_head.weight: never written [stream]" in result.output


def test_a_bfloat16_round_trip_is_named_as_such_with_its_size(refit_run):
    _, result, rows, audit = refit_run
    step3 = checkpoint("tiny-text-step3")
    trip = {n: t.to(torch.bfloat16).float() for n, t in step3.items()}
    changed = {n: float((trip[n] - t).abs().max()) for n, t in step3.items() if not torch.equal(trip[n], t)}
    for source in ("stream", "parameters"):
        mine = audit[(audit["engine"] == "rt") & (audit["source"] == source)]
        assert set(mine["finding"]) == {"bfloat16 round trip"} and set(mine["name"]) == set(changed), source
        assert all(r.max_abs_diff == pytest.approx(changed[r.name], rel=1e-6) for r in mine.itertuples())
    assert close_to(column(rows, "rt", 1, "lp_synced"), forward_lps(trip), 1e-5)
    assert f"{len(changed)} tensors: bfloat16 round trip" in result.output


def test_failing_sync_code_stops_its_engine_in_one_line_and_the_run_goes_on(refit_run):
    run_dir, result, rows, _ = refit_run
    meta = json.loads((run_dir / "run.json").read_text())
    errors = {e["engine"]: e["error"] for e in meta["errors"]}
    assert "refit step 1 (tiny-text-step3): experiments.weight_sync:fails raised KeyError" in errors["fails"]
    assert "refit step 1 (tiny-text-32k): the built-in sync raised ValueError: parameter" in errors["wide"] and "shape" in errors["wide"]
    assert set(rows["engine"]) == {"chain", "skip", "rt"}, "the other engines finished and were compared"
    assert meta["status"] == "incomplete" and "Unhandled error" not in result.output


def test_refit_lines_are_said_before_anything_loads(refit_run):
    _, result, _, _ = refit_run
    plan_line = result.output.index("refit: chain loads tiny-text, then pushes tiny-text-step1 -> tiny-text-step2 -> tiny-text-step3 by the built-in sync")
    assert plan_line < result.output.index("refit: chain after refit")
    assert "refit: skip loads tiny-text, then pushes tiny-text-step3 through experiments.weight_sync:skip_one" in result.output


def test_the_audits_compare_values_not_names():
    """compare_values / audit_parameters on planted tensors: each kind of difference, and none for equal tensors."""
    t = torch.randn(64, 32)
    assert compare_values(t.clone(), t) is None
    assert compare_values(t.to(torch.bfloat16).float(), t)[0] == "bfloat16 round trip"
    assert compare_values(t.to(torch.float16).float(), t)[0] == "float16 round trip"
    nudged = t.clone()
    nudged[3, 4] += 1e-3
    kind, size, _ = compare_values(nudged, t)
    assert kind == "differs" and size == pytest.approx(1e-3, rel=1e-3)
    found = audit_parameters({"a": t, "b": t.double(), "c": torch.empty(0), "d": t[:2]}, [("a", t), ("b", t), ("c", torch.empty(0)), ("d", t), ("e", t)])
    assert [(f["name"], f["finding"]) for f in found] == [("b", "dtype"), ("d", "shape"), ("e", "missing"), ("1 parameters", "unreadable")]


SWEEP = """\
name: refit-steps
experiment: base.yaml
axes:
  step:
    field: engines.rollout.refit.to
    values: {1: tiny-text-step1, 2: tiny-text-step2}
"""


def test_a_sweep_over_refit_steps_carries_the_refit_columns(ray_cluster, tmp_path):
    base = (
        EXPERIMENT.split("engines:")[0]
        + "engines:\n  ref: {type: hf, dtype: float32, model: tiny-text-step2}\n  rollout: {type: hf, dtype: float32, refit: {to: tiny-text-step1}}\nsamples:\n  - text: hello there\n"
    )
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    index = pd.read_parquet(tmp_path / "out" / "refit-steps" / "index.parquet")
    assert set(index["refit_bitwise"]) == {True} and set(index["refit_max_abs_diff"]) == {0.0} and set(index["refit_stale"]) == {0}
    for m in ("1", "2"):
        meta = json.loads((tmp_path / "out" / "refit-steps" / m / "run.json").read_text())
        assert meta["refit"]["rollout"][0]["to"] == f"tiny-text-step{m}", "each member pushed its own step"


@needs_browser
def test_the_report_has_a_weight_sync_section(refit_run, tmp_path):
    run_dir, _, _, _ = refit_run
    dom = open_in_browser(run_dir / "report.html", tmp_path)
    assert "Weight sync" in dom and "chain after refit to tiny-text-step2: bitwise equal to a fresh load" in dom
    assert "skip after refit to tiny-text-step3: differs from a fresh load" in dom and "never written" in dom


def test_validate_says_what_refit_will_push_and_keeps_it_out_of_the_noise_floor(tmp_path):
    """Before anything loads: the plan's refit line, and the noise floor left to the fresh loads (a refit engine's control)."""
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("top_k: 5", "top_k: 5\nnoise: true"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "refit: chain loads tiny-text, then pushes tiny-text-step1 -> tiny-text-step2 -> tiny-text-step3 by the built-in sync, its prefix cache reset" in result.output
    assert "noise floor: chain: none (a refit engine: its control is a fresh load of its checkpoints)" in result.output
    assert "noise floor: ref: alone, shuffled, repeat1" in result.output, "the others keep theirs"
