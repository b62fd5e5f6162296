"""A slime/miles debug rollout (`--save-debug-rollout-data`: a torch.save of Sample.to_dict() records) read as it is:
its numbers, its loss mask, its recorded routing compared with HF's and replayed (R3) from the dump alone.

The dump is written here the way slime writes it, from tiny-moe's own bf16 forwards (HF, routing recorded), with
one planted token; slime's fields and shapes are those of slime/utils/types.py and slime/ray/rollout.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.adapters.base import Sample
from crossengine.adapters.hf import HFEngine, HFSpec
from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture

from .conftest import run_text

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the engines compare their numbers, token by token.",
    "When two engines disagree, the engineer wants to know which token, which layer and which buffer.",
    "Small differences in attention masks, rotary frequencies or data types add up over many layers.",
    "Reinforcement learning samples tokens with one engine and scores them with another one.",
]
RESPONSE = 14  # the last 14 tokens of each are "the response"
PLANTED = ("3", 5)  # (sample index, response token) whose log-prob is moved by -2
UNMASKED = ("0", [12, 13])  # response tokens of sample 0 with loss_mask 0 (e.g. a tool's output)
EXPERIMENT = """\
model: tiny-moe
reference: rollout
routing: true
engines:
  rollout: {type: logprobs, path: rollout_3.pt, layout: slime}
  trainer: {type: hf, dtype: float32}
  trainer-r3: {type: hf, dtype: float32, routing: replay}
samples:
  - dump: rollout
top_k: 5
"""


class Planted:
    """An object whose unpickling would touch a file: a dump holding one must be refused before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def slime_dump(path, extra=None) -> dict:
    """Write a slime debug rollout from tiny-moe bf16; returns {index: (token ids, response log-probs as written)}."""
    folder = ensure_fixture("tiny-moe", seed=0)
    engine = HFEngine(HFSpec(type="hf", dtype="bfloat16"), str(folder), "rollout", 0)
    engine.report_routing()
    written, samples = {}, []
    for i, text in enumerate(TEXTS):
        ids = np.asarray(engine.tokenizer(text).input_ids, np.int64)
        out = engine.score([Sample(str(i), ids, np.zeros(len(ids), np.int8))], top_k=1, full_vocab=False)[0]
        lps = out.token_logprobs[-RESPONSE:].astype(np.float32).copy()
        if str(i) == PLANTED[0]:
            lps[PLANTED[1]] -= 2.0
        mask = [0 if str(i) == UNMASKED[0] and j in UNMASKED[1] else 1 for j in range(RESPONSE)]
        samples.append(
            {
                "group_index": 0,
                "index": i,
                "prompt": text,
                "tokens": ids.tolist(),
                "response": "",
                "response_length": RESPONSE,
                "reward": 1.0,
                "loss_mask": mask,
                "rollout_log_probs": lps.tolist(),
                "rollout_routed_experts": out.routing[:-1].astype(np.int32),  # slime: one row per token but the last
                "status": "completed",
                "metadata": {} if extra is None else {"extra": extra},
            }
        )
        written[str(i)] = (ids, lps, mask)
    engine.close()
    torch.save({"rollout_id": 3, "samples": samples}, path)
    return written


@pytest.fixture(scope="module")
def slime_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("slime")
    written = slime_dump(d / "rollout_3.pt")
    (d / "rollout_3.pt").rename(d / "keep.pt")
    _, run_dir, _ = run_text(tmp_path_factory, "slime", EXPERIMENT.replace("rollout_3.pt", str(d / "keep.pt")))
    return written, run_dir, pd.read_parquet(run_dir / "tokens")


def test_the_dump_is_read_as_written_only_its_loss_mask_tokens(slime_run):
    written, _, tokens = slime_run
    mine = tokens[tokens["cand_engine"] == "trainer"]
    got = {(str(s), int(p)): lp for s, p, lp in zip(mine["sample_id"], mine["position"], mine["lp_ref"])}
    want = {}
    for sid, (ids, lps, mask) in written.items():
        start = len(ids) - RESPONSE
        want.update({(sid, start + j): lps[j] for j in range(RESPONSE) if mask[j]})
    assert set(got) == set(want), "rows: exactly the response tokens its loss mask keeps"
    assert all(np.float32(got[k]) == np.float32(want[k]) for k in want), "the dump's numbers, bitwise"


def test_the_planted_token_is_the_worst(slime_run):
    written, _, tokens = slime_run
    mine = tokens[tokens["cand_engine"] == "trainer"]
    worst = mine.loc[mine["abs_lp_diff"].idxmax()]
    ids, _, _ = written[PLANTED[0]]
    assert (str(worst["sample_id"]), int(worst["position"])) == (PLANTED[0], len(ids) - RESPONSE + PLANTED[1])


def test_the_dumps_routing_shows_flips_and_replaying_it_removes_them(slime_run):
    _, run_dir, tokens = slime_run
    plain = tokens[tokens["cand_engine"] == "trainer"].set_index(["sample_id", "position"])
    r3 = tokens[tokens["cand_engine"] == "trainer-r3"].set_index(["sample_id", "position"])
    assert plain["routing_flips"].sum() > 0, "fp32 HF routes some tokens otherwise than the bf16 rollout recorded"
    assert (r3["routing_flips"] == 0).all(), "replaying the dump's routing: no flip left"
    flipped = plain.index[plain["routing_flips"] > 0]
    assert r3.loc[flipped, "abs_lp_diff"].mean() < plain.loc[flipped, "abs_lp_diff"].mean(), "where routing flipped, replay closes the gap"
    layers = pd.read_parquet(run_dir / "routing.parquet").set_index("candidate")  # per candidate and MoE layer
    assert (layers.loc["trainer-r3", "router_disagreement"] == 0).all() and (layers.loc["trainer", "router_disagreement"] > 0).all()


def test_a_dump_that_needs_arbitrary_unpickling_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    slime_dump(tmp_path / "rollout_3.pt", extra=Planted(marker))
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "exp.yaml")])
    assert result.exit_code == 2 and not marker.exists(), result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "rollout_3.pt" in line and "weights_only" in line and "never unpickles arbitrary objects" in line, line
