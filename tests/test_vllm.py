"""vLLM for real, on the CPU, in its own environment (.venvs/vllm; scripts/setup-vllm-env.sh).

Each run starts vLLM once (about 20 s); the module keeps to four runs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app

from .conftest import EXPERIMENTS, REPO, run_experiment
from .test_noise import conditions_of, recomputed_floor

VLLM_PYTHON = REPO / ".venvs" / "vllm" / "bin" / "python"
VISION_PYTHON = REPO / ".venvs" / "vllm-vision" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run scripts/setup-vllm-env.sh")

LONG = " ".join(["the engines compare their numbers"] * 30)
GENERATE = f"""\
model: tiny-text
reference: hf
engines:
  hf: {{type: hf}}
  vllm: {{type: vllm, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 96}}}}
mode: generate
generator: vllm
sampling: {{temperature: 1.0, max_tokens: 12, n: 2, seed: 3, logprobs: processed}}  # at temperature 1, unfiltered: the raw numbers
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - id: too-long
    text: "{LONG}"
  - text: "Reinforcement learning samples tokens with one engine."
batch_size: 2
"""


@pytest.fixture(scope="module")
def generate_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    path = d / "gen.yaml"
    path.write_text(GENERATE)
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(d / "results"), "--run-id", "g"])
    return d / "results" / "g", result


def test_hf_and_vllm_agree_on_prompts_and_completions(generate_run):
    run_dir, _ = generate_run
    tokens = pd.read_parquet(run_dir / "tokens")
    teacher = tokens[tokens["variant"] == "base"]
    assert set(teacher["segment"].astype(str)) == {"prompt", "completion"}
    assert teacher["abs_lp_diff"].max() < 1e-4, "fp32 HF vs vLLM on tiny-text"
    assert teacher["kl_ref_cand"].isna().all() and teacher["cos_sim"].isna().all(), "vLLM is top-k only: full-vocab columns are null"
    assert teacher["topk_kl"].notna().all() and (teacher["topk_overlap"] > 0.5).all()
    assert set(teacher["sample_id"].astype(str)) == {"s0#0", "s0#1", "s2#0", "s2#1"}


def test_processed_logprobs_reach_vllm_as_its_logprobs_mode(generate_run):
    """`sampling.logprobs: processed` is passed to the vLLM generator as logprobs_mode (what vLLM itself reports)."""
    run_dir, _ = generate_run
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["engines"]["vllm"]["extra"]["logprobs_mode"] == "processed_logprobs"


def test_sampled_rows_carry_the_gen_kl_family(generate_run):
    run_dir, _ = generate_run
    tokens = pd.read_parquet(run_dir / "tokens")
    sampled = tokens[tokens["variant"] == "sampled"]
    assert len(sampled) > 0 and set(sampled["segment"].astype(str)) == {"completion"}
    summary = pd.read_parquet(run_dir / "summary.parquet")
    row = summary[(summary["variant"] == "sampled") & (summary["modality"] == "all") & (summary["position_bucket"] == "all")].iloc[0]
    for name in ("gen_kl_error", "policy_kl_error", "js_divergence_error", "token_mult_prob_error", "prob_diff_max", "prob_diff_mean", "prob_diff_std", "mismatch_kl", "vllm_kl"):
        assert pd.notna(row[name]), name
    assert 0 <= row["gen_kl_error"] < 1e-6 and 1 <= row["token_mult_prob_error"] < 1 + 1e-4
    buckets = set(summary.loc[summary["variant"] == "sampled", "position_bucket"].astype(str))
    assert {"first", "rest"} <= buckets


def test_a_prompt_too_long_for_vllm_fails_alone(generate_run):
    run_dir, result = generate_run
    assert result.exit_code == 1, result.output
    assert "sample too-long" in result.output and "max_model_len 96" in result.output
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete"
    assert [e["sample_id"] for e in meta["errors"]] == ["too-long"] and meta["errors"][0]["engine"] == "vllm"
    assert (run_dir / "tokens" / "part-vllm-00001.parquet").exists(), "the batch with the failed sample still wrote its other sample"


@pytest.mark.parametrize(
    "sample,words",
    [
        ("{token_ids: [1, 60, 9999, 62]}", ["samples[0].token_ids[2]", "9999 >= vocab size"]),
        ("{text: 'look <start_of_image>', images: [data/gradient.png]}", ["samples[0]", "image prompts need a reference that prepares pixels", "vllm expands images inside its engine"]),
    ],
    ids=["token-out-of-vocab", "image-for-text-only"],
)
def test_bad_input_with_vllm_as_reference(ray_cluster, write_experiment, tmp_path, sample, words):
    path = write_experiment(
        f"model: tiny-text\nreference: vllm\nengines:\n  vllm: {{type: vllm, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 96}}}}\n  hf: {{type: hf}}\nsamples:\n  - {sample}\n"
    )
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not VISION_PYTHON.exists(), reason="no vLLM vision environment: run scripts/setup-vllm-env.sh vision")
def test_vision_vllm_reports_which_mask_it_matches(ray_cluster, tmp_path):
    run_dir, _ = run_experiment(EXPERIMENTS / "vision-vllm.yaml", tmp_path / "results")
    nearest = pd.read_parquet(run_dir / "nearest.parquet")
    image = nearest[(nearest["candidate"] == "vllm") & (nearest["modality"] == "image")].set_index("other")
    causal, bidirectional = image.loc["hf-causal", "max_abs_diff"], image.loc["hf-bidirectional", "max_abs_diff"]
    assert min(causal, bidirectional) < 1e-4, "vLLM matches one of the two HF masks at image tokens"
    assert image.loc[image["nearest"]].index[0] == ("hf-causal" if causal < bidirectional else "hf-bidirectional")
    tokens = pd.read_parquet(run_dir / "tokens")
    vllm_rows = tokens[tokens["cand_engine"] == "vllm"]
    assert (vllm_rows["modality"].astype(str) == "image").sum() == 12, "vLLM expanded the images to the reference's ids"


def test_lora_experiment_vllm_agrees_with_hf_peft(ray_cluster, tmp_path):
    """experiments/lora.yaml as shipped: vLLM's LoRA path vs HF + PEFT (unmerged) in fp32, and the merges."""
    pytest.importorskip("peft", reason="peft is not installed (a crossengine dependency)")
    run_dir, runner = run_experiment(EXPERIMENTS / "lora.yaml", tmp_path / "results")
    assert not runner.errors, runner.errors
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[summary["modality"] == "all"]
    pooled = pooled.assign(name=[c if v == "base" else v for c, v in zip(pooled["cand_engine"].astype(str), pooled["variant"].astype(str))]).set_index("name")
    assert pooled.loc["vllm-lora", "abs_max"] < 1e-4 and pooled.loc["vllm-lora", "top1_agreement"] == 1
    assert pooled.loc["hf-merged", "abs_max"] < 1e-4
    assert pooled.loc["hf-merged-bf16", "abs_max"] > 100 * pooled.loc["hf-merged", "abs_max"]
    assert pooled.loc["hf-base", "abs_max"] > 0.1, "the adapter matters: without it the model differs"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["engines"]["vllm-lora"]["extra"]["lora"]["rank"] == 8


def test_vllm_full_vocab_gives_exact_kl_and_rank(ray_cluster, tmp_path):
    """full_vocab: true on a vLLM engine: the whole distribution (its logits, from its worker), so KL both ways, rank and
    cosine are exact, not top-k.
    vLLM also prepares its own inputs here (inputs: own) and renders the chat sample with its own
    template: the ids differ, so it scores the reference's rendered prompt with its own tokenizer."""
    from .test_chat import QWEN, TEMPLATE

    (tmp_path / "user.jinja").write_text(TEMPLATE)
    (tmp_path / "qwen.jinja").write_text(QWEN)
    path = tmp_path / "full.yaml"
    path.write_text(
        f"model: tiny-text\nreference: hf\nengines:\n  hf: {{type: hf, chat_template: user.jinja}}\n"
        f"  vllm-full: {{type: vllm, full_vocab: true, inputs: own, chat_template: qwen.jinja, max_num_seqs: 2, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 128}}}}\n"
        "noise: {conditions: [alone, shuffled], fillers: 3, engines: {hf: []}}\n"
        "samples:\n  - text: 'The quick brown fox jumps over the lazy dog while the engines compare their numbers.'\n"
        "  - {id: raw, token_ids: [1, 60, 61, 62, 63, 64, 65, 66]}\n"
        "  - {id: chat, messages: [{role: user, content: 'The quick brown fox'}, {role: assistant, content: 'jumps over the lazy dog'}]}\ntop_k: 5\n"
    )
    run_dir, runner = run_experiment(path, tmp_path / "out")
    assert not runner.errors
    inputs = pd.read_parquet(run_dir / "inputs").set_index(["sample_id", "input"])
    assert inputs.loc[("chat", "input_ids"), "status"] == "differs" and inputs.loc[("chat", "input_ids"), "scored"] == "reference_text"
    assert inputs.loc[("raw", "input_ids"), "status"] == "equal" and inputs.loc[("raw", "input_ids"), "scored"] == "own"
    tokens = pd.read_parquet(run_dir / "tokens")
    assert len(tokens) > 0 and tokens["kl_ref_cand"].notna().all() and tokens["kl_cand_ref"].notna().all()
    assert tokens["kl_ref_cand"].max() < 1e-5 and tokens["kl_cand_ref"].max() < 1e-5, "fp32 HF and vLLM: the same distribution"
    assert tokens["rank_in_cand"].notna().all(), "exact rank: never null beyond k with the whole vocabulary"
    assert tokens["cos_sim"].notna().all() and (tokens["cos_sim"] > 0.9999).all(), "raw logits from vLLM's worker: a cosine"
    summary = pd.read_parquet(run_dir / "summary.parquet")
    assert set(summary["kl_source"].astype(str)) == {"full"}
    # run conditions and the noise floor: each sample alone vs among 3 fillers in batches of 2 (max_num_seqs)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["engines"]["vllm-full"]["extra"]["run_conditions"]["max_num_seqs"] == 2, "vLLM ran with the field's value"
    noise = conditions_of(run_dir)
    assert set(noise["engine"]) == {"vllm-full"} and set(noise["condition"]) == {"alone", "shuffled"}, "hf: [] has no floor"
    floor = recomputed_floor(noise).loc["vllm-full"]
    tokens["sample_id"] = tokens["sample_id"].astype(str)
    mine = floor.reindex(pd.MultiIndex.from_frame(tokens[["sample_id", "position"]]))
    np.testing.assert_array_equal(tokens["noise_cand"].to_numpy(np.float32), mine["noise"].to_numpy(np.float32))
    np.testing.assert_array_equal(tokens["noise_kl_cand"].to_numpy(np.float32), mine["kl"].to_numpy(np.float32))
    rounding = 8 * 2.0**-23 * np.maximum(np.maximum(tokens["lp_ref"].abs(), tokens["lp_cand"].abs()), 1.0).to_numpy()  # both float32: noise.rounding_ulps's default
    above = (tokens["abs_lp_diff"].to_numpy() > mine["noise"].to_numpy()) & (tokens["abs_lp_diff"].to_numpy() > rounding)
    assert tokens["noise_ref"].isna().all() and (tokens["above_noise"].to_numpy(bool) == above).all()
    table = pd.read_parquet(run_dir / "noise.parquet").set_index(["engine", "condition"])
    assert bool(table.loc[("vllm-full", "all"), "bitwise"]) == bool((noise["lp"] == noise["lp_base"]).all())


DEAD = f"""\
model: MODEL
reference: hf
engines:
  hf: {{type: hf}}
  vllm: {{type: vllm, env: {{python: {VLLM_PYTHON}}}}}
  eager: {{type: hf, attn_implementation: eager}}
samples:
  - {{id: one, text: The quick brown fox.}}
  - {{id: two, text: Two roads diverged in a wood.}}
  - {{id: three, text: Engines compare numbers.}}
batch_size: 1
"""


def test_a_vllm_engine_that_dies_is_one_error_with_its_root_cause(ray_cluster, tmp_path):
    """head_dim 16, which vLLM's CPU attention rejects inside its EngineCore process: the real line reaches
    the terminal once, no sample is blamed, the other candidate finishes, and the run can be resumed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from crossengine.experiment.fixture_builders import _build_causal_lm

    model = tmp_path / "hd16"
    _build_causal_lm(model, 0, LlamaConfig, LlamaForCausalLM, head_dim=16)
    path = tmp_path / "dead.yaml"
    path.write_text(DEAD.replace("MODEL", str(model)))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(out), "--run-id", "d"])
    assert result.exit_code == 1, result.output
    died = [line for line in result.output.splitlines() if "engine 'vllm' died" in line]
    assert len(died) == 1, result.output
    assert "head_dim=16" in died[0] and "RuntimeError" in died[0], died[0]
    assert "EngineCore encountered an issue" not in died[0] or "its process said" in died[0], died[0]
    assert not [line for line in result.output.splitlines() if "error engine 'vllm'" in line and "sample" in line], "no sample is blamed"
    meta = json.loads((out / "d" / "run.json").read_text())
    assert meta["status"] == "incomplete" and [e["engine"] for e in meta["errors"]] == ["vllm"]
    tokens = pd.read_parquet(out / "d" / "tokens")
    assert set(tokens[tokens["cand_engine"].astype(str) == "eager"]["sample_id"].astype(str)) == {"one", "two", "three"}
    log = (out / "d" / "crossengine.log").read_text()
    assert "head_dim=16" in log and "the engine's output" in log, "its traceback and output are kept in the run's log"


def test_a_vllm_load_failure_names_the_field_and_keeps_its_log(ray_cluster, write_experiment, tmp_path):
    """max_model_len above what the model allows: vLLM refuses in its pydantic config. The line says the field
    and the reason (not pydantic's docs URL), and the run folder keeps crossengine.log with the traceback and
    the engine's own output."""
    path = write_experiment(
        f"model: tiny-text\nreference: hf\nengines:\n  hf: {{type: hf}}\n  vllm: {{type: vllm, env: {{python: {VLLM_PYTHON}}}, options: {{max_model_len: 99999}}}}\nsamples:\n  - text: hello there\n"
    )
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out"), "--run-id", "x"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert "engine 'vllm' (vllm) failed to load: ValidationError: User-specified max_model_len (99999) is greater than" in message, message
    assert "errors.pydantic.dev" not in result.output and "[type=" not in message
    log = tmp_path / "out" / "x" / "crossengine.log"
    assert f"(traceback and the engine's output: {log})" in message and "max_model_len" in log.read_text()
