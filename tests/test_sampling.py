"""Sampling semantics: a dump's `sampling:` claim (temperature, top-k/top-p, raw or processed) makes the torch scoring
engines compute the same quantity, and the run reads the dump's numbers against other readings of the reference's logits.

The dumps are made here from tiny-text's own fp32 logits under a known processing, so the right reading is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossengine.adapters.sampling import Reading, processed
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import run_text

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the engines compare their numbers.",
    "When two engines disagree, the engineer wants to know which token, which layer and which buffer.",
    "Small differences in attention masks, rotary frequencies or data types add up over many layers.",
]


def dump_lines(reading: Reading) -> list[str]:
    """Generic-layout records whose log-probs are tiny-text's fp32 logits read as `reading` (tokens it filters out unscored)."""
    folder = ensure_fixture("tiny-text", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)
    lines = []
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            ids = torch.tensor(tok(text).input_ids)
            lp = torch.log_softmax(processed(model(ids[None]).logits[0, :-1], reading), -1).gather(-1, ids[1:, None])[:, 0]
            keep = torch.isfinite(lp)
            lines.append(json.dumps({"id": f"s{i}", "token_ids": ids.tolist(), "prompt_len": 1, "logprobs": torch.where(keep, lp, 0.0).tolist(), "mask": keep.tolist()}))
    return lines


def experiment(dumps: dict[str, str]) -> str:
    engines = "".join(f"  {name}: {{type: logprobs, path: {name}.jsonl{', sampling: ' + sampling if sampling else ''}}}\n" for name, sampling in dumps.items())
    return f"model: tiny-text\nreference: trainer\nengines:\n  trainer: {{type: hf, dtype: float32}}\n{engines}samples:\n  - dump: {next(iter(dumps))}\n"


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """Two runs: temperature 0.7 (declared, and the same numbers declared raw); top-p 0.9 (declared, and declared raw)."""
    out = {}
    for label, reading, sampling in (("t07", Reading(0.7), "{temperature: 0.7, logprobs: processed}"), ("p09", Reading(top_p=0.9), "{top_p: 0.9, logprobs: processed}")):
        d = tmp_path_factory.mktemp(label)
        lines = "\n".join(dump_lines(reading)) + "\n"
        for name in ("declared", "as_raw"):
            (d / f"{name}.jsonl").write_text(lines)
        text = experiment({"declared": sampling, "as_raw": ""})
        (d / "e.yaml").write_text(text)
        path, run_dir, runner = run_text(tmp_path_factory, label, text.replace("path: declared", f"path: {d}/declared").replace("path: as_raw", f"path: {d}/as_raw"))
        out[label] = (run_dir, pd.read_parquet(run_dir / "tokens"), json.loads((run_dir / "run.json").read_text()))
    return out


@pytest.mark.parametrize("label", ["t07", "p09"])
def test_a_processed_dump_scored_as_declared_agrees_to_fp32_noise(runs, label):
    _, tokens, _ = runs[label]
    mine = tokens[tokens["cand_engine"] == "declared"]
    assert len(mine) > 20 and mine["abs_lp_diff"].max() < 1e-5, "the trainer computed the same processed quantity"


@pytest.mark.parametrize(("label", "looks"), [("t07", "processed (temperature 0.7)"), ("p09", "processed (top_p 0.9)")])
def test_the_check_says_when_another_reading_fits_far_better(runs, label, looks):
    _, _, meta = runs[label]
    checks = meta["sampling_checks"]
    assert checks["as_raw"].startswith(f"sampling check: as_raw: its log-probs look {looks}"), checks["as_raw"]
    assert "but `sampling` says raw (temperature 1, unfiltered)" in checks["as_raw"]
    assert checks["declared"].startswith("sampling check: declared: no reading fits its log-probs far better"), checks["declared"]


def test_processed_keeps_the_smallest_top_p_set_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = torch.softmax(logits, -1)[0].numpy()
    order = np.argsort(-p)
    kept = order[: int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)]  # the smallest set reaching 0.8
    z = processed(logits, Reading(top_p=0.8))[0]
    assert set(np.flatnonzero(np.isfinite(z.numpy()))) == set(kept.tolist())
    assert set(np.flatnonzero(np.isfinite(processed(logits, Reading(top_k=2))[0].numpy()))) == {0, 1}
    np.testing.assert_allclose(processed(logits, Reading(0.5)).numpy(), logits.numpy() / 0.5)


GENERATE = """\
model: tiny-text
reference: trainer
engines:
  trainer: {type: hf, dtype: float32}
  rollout: {type: hf, dtype: float32}
mode: generate
generator: rollout
sampling: {temperature: 0.7, top_p: 0.9, max_tokens: 10, n: 2, seed: 5, logprobs: processed}
samples:
  - text: "The quick brown fox jumps over the lazy dog while the engines compare"
  - text: "When two engines disagree, the engineer wants to know"
"""


def test_generation_with_processed_logprobs_reports_and_scores_the_processed_quantity(ray_cluster, tmp_path_factory):
    """`sampling.logprobs: processed`: the generator reports its sampled tokens' processed log-probs and the trainer scores
    the same quantity (recomputed here from the logits), so the sampled rows agree; a raw reading would not be that."""
    _, run_dir, _ = run_text(tmp_path_factory, "gen-processed", GENERATE)
    tokens = pd.read_parquet(run_dir / "tokens")
    sampled = tokens[tokens["variant"] == "sampled"]
    assert len(sampled) > 10 and sampled["abs_lp_diff"].max() < 1e-4, "generator and trainer report one quantity"
    folder = ensure_fixture("tiny-text", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)
    row = sampled.iloc[len(sampled) // 2]
    base = tokens[(tokens["sample_id"] == row["sample_id"]) & (tokens["variant"] == "base")].sort_values("position")
    assert base["position"].tolist() == list(range(1, len(base) + 1))
    seq = torch.tensor([[tok.bos_token_id, *base["token_id"].tolist()]])  # the sequence the trainer scored
    with torch.no_grad():
        logits = model(seq).logits[0, int(row["position"]) - 1]  # the row that predicts this token
    as_processed = torch.log_softmax(processed(logits[None], Reading(0.7, 0, 0.9)), -1)[0, int(row["token_id"])].item()
    as_raw = torch.log_softmax(logits, -1)[int(row["token_id"])].item()
    assert row["lp_ref"] == pytest.approx(as_processed, abs=1e-4) and abs(as_raw - as_processed) > 1e-3
