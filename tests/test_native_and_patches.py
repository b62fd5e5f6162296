"""Native engines (OLMo-core, user factories), patches proven to act, and the ablation run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.adapters import make_spec
from crossengine.adapters.base import RawSample
from crossengine.adapters.hf import HFEngine
from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import EXPERIMENTS, REPO, run_experiment

SAMPLE = [RawSample("a", "The quick brown fox jumps over the lazy dog.")]


def _sdpa_calls(engine) -> list[dict]:
    """Run one forward with torch's SDPA wrapped, and return what each call received."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append({"q_heads": q.shape[1], "k_heads": k.shape[1], "mask": attn_mask is not None, "is_causal": is_causal, "enable_gqa": enable_gqa})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        engine.score(engine.prepare(SAMPLE), 5, True)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return calls


def _engine(patches: list[str], model: str = "tiny-text") -> HFEngine:
    return HFEngine(make_spec(dict(type="hf", dtype="float32", device="cpu", attn_implementation="sdpa", patches=patches)), str(ensure_fixture(model)), "hf")


def test_gqa_patch_changes_the_attention_call():
    plain, patched = _sdpa_calls(_engine([])), _sdpa_calls(_engine(["gqa_repeat_interleave"]))
    assert plain and all(c["enable_gqa"] and c["k_heads"] == 1 for c in plain), "HF passes grouped K/V with enable_gqa"
    assert patched and all(not c["enable_gqa"] and c["k_heads"] == c["q_heads"] == 2 for c in patched)


def test_is_causal_patch_uses_sdpa_is_causal():
    calls = _sdpa_calls(_engine(["sdpa_is_causal_prefill"]))
    assert calls and all(c["is_causal"] and not c["mask"] for c in calls)


def test_rope_patch_repairs_frequencies_left_unset():
    """A planted fault: inv_freq zeroed, as meta-device loading can leave it. Without the patch the
    logits are wrong; with it they are the clean model's, because it recomputes them in forward."""
    clean = _engine([])
    sample = clean.prepare(SAMPLE)[0]
    want = clean.forward_logits(sample)
    gaps = {}
    for patches in ([], ["rope_on_device"]):
        engine = _engine(patches)
        rotary = [m for m in engine.model.modules() if hasattr(m, "inv_freq")]
        assert rotary
        for m in rotary:
            m.inv_freq.zero_()
        gaps[bool(patches)] = float((engine.forward_logits(sample) - want).abs().max())
    assert gaps[False] > 1e-2, "the planted fault shows"
    assert gaps[True] < 1e-5, "the patch repairs it"


def test_drop_token_type_ids_patch_makes_gemma3_causal():
    engine = _engine(["drop_token_type_ids"], model="tiny-vision")
    sample = engine.prepare([RawSample("v", "Look <start_of_image> here", [str(EXPERIMENTS / "data" / "gradient.png")])])
    out = engine.score(sample, 5, False)[0]
    assert "token_type_ids" in sample[0].model_inputs and not out.attention.any(), "no position is bidirectional without token_type_ids"


def test_unknown_patch_is_rejected_before_anything_starts(write_experiment, tmp_path):
    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf, patches: [no_such_patch]}\nsamples:\n  - text: hi there\n")
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "exp.yaml:5: engines.b.patches: unknown patch 'no_such_patch'" in result.stderr
    assert "sdpa_is_causal_prefill" in result.stderr, "the message lists the built-in patches"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        ("{type: hf, patches: ['crossengine.experiment.fixtures:FIXTURE_VERSION']}", "engines.b.patches[0]"),
        ("{type: native, factory: 'crossengine.experiment.fixtures:FIXTURE_VERSION'}", "engines.b.factory"),
    ],
    ids=["patch", "native-factory"],
)
def test_validate_refuses_user_code_that_is_not_a_function(write_experiment, engine, field):
    """validate imports each `module:function` and checks it is callable, as run would need it."""
    path = write_experiment(f"model: tiny-text\nreference: a\nengines:\n  a: {{type: hf}}\n  b: {engine}\nsamples:\n  - text: hi there\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.splitlines() == [message] and f"exp.yaml:5: {field}:" in message, message
    assert "is str '2', not a function" in message


def test_ablation_run_prints_and_writes_the_table(ray_cluster, tmp_path):
    result = CliRunner().invoke(app, ["run", str(EXPERIMENTS / "ablation.yaml"), "--output-dir", str(tmp_path), "--run-id", "abl"])
    assert result.exit_code == 0, result.output
    assert "ablation vs olmo-core" in result.output
    summary = pd.read_parquet(tmp_path / "abl" / "summary.parquet")
    pooled = summary[summary["modality"] == "all"].set_index("variant")
    assert {"hf-all-patches", "hf-no-is-causal", "hf-no-repeat-interleave", "hf-no-rope-on-device", "hf-eager"} <= set(pooled.index)
    for col in ("top1_agreement", "abs_max", "abs_mean", "cos_sim", "kl_mean"):
        assert pooled[col].notna().all(), col
    assert pooled.loc["hf-eager", "kl_mean"] > 0, "eager attention in bf16 is a real difference the table shows"
    table = result.output[result.output.index("ablation vs olmo-core") :]
    shown = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    from crossengine.identity import display_name

    by_name = {display_name(c, v): k for c, v, k in zip(pooled["cand_engine"], pooled.index, pooled["kl_mean"])}
    kl = np.array([by_name[name] for name in shown])
    assert len(shown) == len(by_name) >= 6
    assert (kl[:-1] >= kl[1:]).all(), "largest KL first"


USER_CODE = """\
model: tiny-text
reference: hf
engines:
  hf: {type: hf}
  mine: {type: native, factory: "tests.native_factories:hf_as_native", preprocess: "tests.native_factories:plain_tokens"}
variants:
  scaled: {engine: hf, patches: ["tests.native_factories:scale_logits"]}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
"""


def test_user_factory_and_user_patch(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # user code imports from where crossengine runs
    path = tmp_path / "user.yaml"
    path.write_text(USER_CODE)
    run_dir, runner = run_experiment(path, tmp_path / "results")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[summary["modality"] == "all"].set_index("cand_engine")
    assert pooled.loc["mine", "abs_max"] == 0, "the factory wraps the same model"
    assert summary[(summary["variant"] == "scaled") & (summary["modality"] == "all")]["kl_mean"].iloc[0] > 0
    meta = pd.read_json(run_dir / "run.json", typ="series")
    assert meta["engines"]["mine"]["implementation"] == "tests.native_factories:hf_as_native"
    assert meta["engines"]["scaled"]["extra"]["patches"] == {"tests.native_factories:scale_logits": "output embedding scaled by 1.01"}


def test_bad_factory_path_is_one_line(ray_cluster, write_experiment, tmp_path):
    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: native, factory: 'no_such_module:build'}\nsamples:\n  - text: hi there\n")
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot import 'no_such_module:build'" in result.stderr


@pytest.mark.skipif(not (REPO / ".venvs" / "vllm" / "bin" / "python").exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")
def test_olmo_core_hf_and_vllm_in_one_run(ray_cluster, tmp_path):
    run_dir, _ = run_experiment(EXPERIMENTS / "olmo2-three-engines.yaml", tmp_path / "results")
    nearest = pd.read_parquet(run_dir / "nearest.parquet")
    pairs = nearest.set_index(["candidate", "other"])["max_abs_diff"]
    assert pairs[("hf", "olmo-core")] < 1e-4 and pairs[("vllm", "olmo-core")] < 1e-4 and pairs[("vllm", "hf")] < 1e-4
