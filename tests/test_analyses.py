"""Nothing requested is skipped in silence: each analysis an engine cannot do is one line before
anything loads, naming the engine and why (crossengine/experiment/analyses.py). Through
`crossengine validate`, as a user sees it: no Ray, no weights."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from crossengine.cli import app

DUMP = "  rollout: {type: logprobs, path: data/rollout-dump.jsonl}\n"
BASE = "model: tiny-text\nreference: trainer\nengines:\n  trainer: {type: hf}\n"


def _validate(write_experiment, text: str):
    out = CliRunner().invoke(app, ["validate", str(write_experiment(text))])
    assert out.exit_code == 0, out.output
    return out.output


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("localize: {}\n", "skipped: localise for engine 'rollout': logprobs engines cannot capture module outputs"),
        ("", "skipped: full vocabulary for engine 'rollout': logprobs engines give top-k only"),
        ("noise: true\n", "skipped: noise floor for engine 'rollout': its numbers are a file"),
    ],
    ids=["localise", "full-vocabulary", "noise-floor"],
)
def test_an_analysis_an_engine_cannot_do_is_said(write_experiment, extra, expected):
    output = _validate(write_experiment, BASE + DUMP + "samples:\n  - dump: rollout\n" + extra)
    assert expected in output
    assert "for engine 'trainer'" not in "\n".join(line for line in output.splitlines() if line.startswith("skipped:"))


def test_full_vocabulary_off_is_not_a_skip(write_experiment):
    """Negative control: where the experiment does not ask (full_vocab: false), nothing is said."""
    output = _validate(write_experiment, BASE + DUMP + "samples:\n  - dump: rollout\nfull_vocab: false\n")
    assert "skipped:" not in output


def test_logits_budget_names_an_engine_that_holds_whole_samples(write_experiment):
    text = BASE + "  n: {type: native, factory: 'tests.native_factories:hf_as_native'}\nsamples:\n  - text: hi\nplacement: {logits_budget_gb: 0.001}\n"
    output = _validate(write_experiment, text)
    assert "skipped: logits budget for engine 'n': native engines cannot score in position blocks" in output
    assert "for engine 'trainer'" not in output


def test_a_tensor_transport_names_an_engine_whose_logits_take_the_object_store(write_experiment):
    text = BASE + "  own: {type: hf, env: {python: " + sys.executable + "}}\nsamples:\n  - text: hi\nplacement: {logits_transport: gloo}\n"
    out = CliRunner().invoke(app, ["validate", str(write_experiment(text))])
    assert "skipped: tensor transport for engine 'own': it runs in its own Python environment" in out.output, out.output
