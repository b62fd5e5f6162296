"""LoRA: one adapter under HF + PEFT (unmerged), merged, and bad adapters rejected before scoring.
vLLM's LoRA path is in tests/test_vllm.py (it needs the vLLM environment)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.adapters.base import RawSample
from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import run_experiment

pytest.importorskip("peft", reason="peft is not installed (a crossengine dependency: pip install -e .)")

HF_LORA = """\
model: tiny-text
reference: plain
engines:
  plain: {type: hf}
  zero: {type: hf, lora: tiny-text-lora-zero}
  peft: {type: hf, lora: tiny-text-lora}
variants:
  merged: {engine: peft, lora_merge: true}
samples:
  - text: "The quick brown fox jumps over the lazy dog while the engines compare their numbers."
  - text: "Reinforcement learning samples tokens with one engine and scores them with another one."
"""


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    (d / "lora.yaml").write_text(HF_LORA)
    run_dir, _ = run_experiment(d / "lora.yaml", d / "out")
    tokens = pd.read_parquet(run_dir / "tokens")
    tokens["name"] = np.where(tokens["variant"].astype(str) == "base", tokens["cand_engine"].astype(str), tokens["variant"].astype(str))
    return run_dir, tokens


def test_an_adapter_whose_b_is_zero_gives_exactly_the_base_model(lora_run):
    _, tokens = lora_run
    zero = tokens[tokens["name"] == "zero"]
    assert len(zero) > 0 and (zero["lp_diff"] == 0).all() and (zero["kl_ref_cand"] == 0).all()


def test_the_adapter_moves_log_probs_and_merging_keeps_them(lora_run):
    _, tokens = lora_run
    peft = tokens[tokens["name"] == "peft"].set_index(["sample_id", "position"]).sort_index()
    merged = tokens[tokens["name"] == "merged"].set_index(["sample_id", "position"]).sort_index()
    assert peft["abs_lp_diff"].max() > 0.1, "a non-zero adapter changes the model measurably"
    # merged vs unmerged, straight from the two candidates' own log-probs: float32 noise only
    gap = (merged["lp_cand"] - peft["lp_cand"]).abs()
    assert len(gap) == len(peft) and gap.max() < 1e-4


def test_run_json_records_the_adapter(lora_run):
    run_dir, _ = lora_run
    meta = json.loads((run_dir / "run.json").read_text())
    path = ensure_fixture("tiny-text-lora")
    config = json.loads((path / "adapter_config.json").read_text())
    h = hashlib.sha256()
    for f in sorted(path.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    lora = meta["engines"]["peft"]["extra"]["lora"]
    assert lora == {"path": str(path), "rank": config["r"], "alpha": config["lora_alpha"], "target_modules": config["target_modules"], "sha256": h.hexdigest()[:16], "merged": False}
    assert meta["engines"]["merged"]["extra"]["lora"]["merged"] is True
    assert "lora" not in meta["engines"]["plain"]["extra"]


def test_the_vision_adapter_covers_the_vision_tower():
    import torch

    from crossengine.adapters import make_spec
    from crossengine.adapters.hf import HFEngine
    from crossengine.experiment.preflight import adapter_modules

    adapter = ensure_fixture("tiny-vision-lora")
    modules = adapter_modules(str(adapter))
    assert any("vision_tower" in m for m in modules) and any("language_model" in m for m in modules)
    from .conftest import EXPERIMENTS

    raw = [RawSample("img", "Look <start_of_image> here", [str(EXPERIMENTS / "data" / "gradient.png")])]
    spec = make_spec(dict(type="hf", dtype="float32", device="cpu"))
    base = HFEngine(spec, str(ensure_fixture("tiny-vision")), "base")
    tuned = HFEngine(spec.model_copy(update={"lora": str(adapter)}), str(ensure_fixture("tiny-vision")), "tuned")
    sample = base.prepare(raw)[0]
    diff = (base.forward_logits(sample) - tuned.forward_logits(sample)).abs().max(-1).values
    first_image = int(np.flatnonzero(sample.modality == 1)[0])
    assert torch.all(diff[first_image:] > 0), "the adapted vision tower and language model change what follows the image"


@pytest.mark.parametrize(
    "edit,words",
    [
        ("lora: ./no-such-adapter", ["engines.b.lora", "no such adapter folder"]),
        ("lora: tiny-vision-lora", ["engines.b.lora", "engine 'b': the adapter targets", "which model tiny-text does not have", "another base model"]),
        ("lora: HIDDEN", ["engines.b.lora", "but the model's maps 128 ->", "hidden size"]),
        ("lora: tiny-text-lora, lora_merge: true, type: vllm", ["engines.b.lora_merge", "not a field of vllm engines (hf engines take it)"]),
    ],
    ids=["missing", "other-base", "hidden-size", "merge-on-vllm"],
)
def test_a_bad_adapter_is_one_line_before_scoring(edit, words, write_experiment, tmp_path):
    from safetensors.torch import load_file, save_file

    if "HIDDEN" in edit:  # the same adapter, but its A matrices made for a model of hidden size 64
        shutil.copytree(ensure_fixture("tiny-text-lora"), tmp_path / "hidden")
        w = load_file(tmp_path / "hidden" / "adapter_model.safetensors")
        w = {k: (v[:, :64].contiguous() if k.endswith("q_proj.lora_A.weight") else v) for k, v in w.items()}
        save_file(w, tmp_path / "hidden" / "adapter_model.safetensors")
        edit = edit.replace("HIDDEN", str(tmp_path / "hidden"))
    text = f"model: tiny-text\nreference: a\nengines:\n  a: {{type: hf}}\n  b: {{type: hf, {edit}}}\nsamples:\n  - text: hello there\n"
    if "type: vllm" in edit:
        text = text.replace("{type: hf, lora", "{lora").replace("type: vllm}", "type: vllm}")
    path = write_experiment(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for w in words:
        assert w in line, (w, line)
