"""Alarms: each published limit fires on a case planted for it, stays quiet on an identical pair,
and its per-sample numbers are those of `framework_metrics` on that sample alone."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.adapters.checkpoint import model_is_dense
from crossengine.cli import app
from crossengine.compare.alarms import RULES, TURN_K3, check, per_sample, rules
from crossengine.compare.frameworks import framework_metrics

RNG = np.random.default_rng(7)


def _tokens(t: np.ndarray, g: np.ndarray, n_samples: int) -> pd.DataFrame:
    sid = np.repeat([f"s{i}" for i in range(n_samples)], len(t) // n_samples)
    return pd.DataFrame({"sample_id": sid, "segment": "completion", "lp_ref": t, "lp_cand": g})


def _alarms(t: np.ndarray, g: np.ndarray, n_samples: int = 4, dense: bool | None = True, limits=None) -> dict[str, list[str]]:
    tokens = _tokens(t, g, n_samples)
    pooled = framework_metrics(g, t, pd.factorize(tokens["sample_id"])[0])
    return {a.rule.name: [s for s, _ in a.samples] for a in check(pooled, per_sample(tokens), rules(limits).values(), dense)}


def _pair(n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    t = np.log(RNG.uniform(0.05, 0.95, n))
    return t, t.copy()


# one planted case per alarm: how g departs from t in sample s1 (20 tokens each, 4 samples)
PLANTED = {
    "token_mult_prob_error": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] + 0.2),
    "gen_kl_error": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] + 0.2),
    "rollout_is_mean": lambda t, g: g.__setitem__(slice(None), t - 1.0),  # ρ = e on every token
    "rollout_is_eff_sample_size": lambda t, g: g.__setitem__(slice(20, 21), t[20] - 5.0),  # one token carries the weight: ESS ≈ 0.04
    "kl": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] + 0.5),
    "chi2_token": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] - 1.0),
    "abs_lp_diff_dense": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] + 0.2),
    "template_mismatch": lambda t, g: g.__setitem__(slice(20, 40), t[20:40] + 1.5),  # k3 ≈ 0.72 on every token of s1's turn
}


def test_an_identical_pair_trips_no_alarm():
    t, g = _pair()
    assert _alarms(t, g) == {}


@pytest.mark.parametrize("name", sorted(RULES))
def test_each_alarm_fires_on_its_planted_case(name):
    t, g = _pair()
    PLANTED[name](t, g)
    got = _alarms(t, g)
    assert name in got, got
    assert _alarms(t, g, limits={name: None}).get(name) is None, "switched off by name"
    if name != "rollout_is_mean":  # planted on every sample
        assert got[name][0] == "s1", got[name]


def test_the_dense_only_alarm_is_silent_on_a_moe_model():
    t, g = _pair()
    PLANTED["abs_lp_diff_dense"](t, g)
    assert "abs_lp_diff_dense" not in _alarms(t, g, dense=False)
    assert model_is_dense({"num_hidden_layers": 2, "vocab_size": 512})
    assert not model_is_dense({"num_local_experts": 8, "num_experts_per_tok": 2})
    assert not model_is_dense({"text_config": {"num_experts": 64}})


def test_limits_change_by_name_and_bad_ones_are_one_line():
    t, g = _pair()
    g[20:40] = t[20:40] + 0.05  # mult_prob_error 1.051 on s1, pooled about 1.013
    assert "token_mult_prob_error" not in _alarms(t, g)
    assert "token_mult_prob_error" in _alarms(t, g, limits={"token_mult_prob_error": 1.01})
    with pytest.raises(ValueError, match="unknown alarm 'gen_kl'; alarms are"):
        rules({"gen_kl": 1e-3})
    with pytest.raises(ValueError, match="takes \\[low, high\\]"):
        rules({"rollout_is_mean": 2.0})


def test_per_sample_numbers_equal_framework_metrics_of_each_sample():
    t = np.log(RNG.uniform(0.05, 0.95, 60))
    g = t + RNG.normal(0, 0.4, 60)
    got = per_sample(_tokens(t, g, 3))
    for i in range(3):
        want = framework_metrics(g[20 * i : 20 * (i + 1)], t[20 * i : 20 * (i + 1)])
        for metric in got.columns.drop(TURN_K3):
            assert got.loc[f"s{i}", metric] == pytest.approx(want[metric], rel=1e-12, abs=1e-14), metric
        r = t[20 * i : 20 * (i + 1)] - g[20 * i : 20 * (i + 1)]
        assert got.loc[f"s{i}", TURN_K3] == pytest.approx(np.median(np.exp(r) - r - 1), rel=1e-12)


def test_an_experiment_overrides_alarms_and_names_a_bad_one(tmp_path):
    from crossengine.errors import ExperimentError
    from crossengine.experiment.load import load_experiment

    body = "model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf}\nsamples:\n  - token_ids: [1, 2, 3]\nalarms:\n"
    (tmp_path / "ok.yaml").write_text(body + "  gen_kl_error: 0.002\n  kl: null\n  rollout_is_mean: [0.8, 1.25]\n")
    assert load_experiment(tmp_path / "ok.yaml").alarms == {"gen_kl_error": 0.002, "kl": None, "rollout_is_mean": [0.8, 1.25]}
    (tmp_path / "bad.yaml").write_text(body + "  gen_kl: 0.002\n")
    with pytest.raises(ExperimentError, match=r"bad.yaml:9: alarms: unknown alarm 'gen_kl'"):
        load_experiment(tmp_path / "bad.yaml")


def test_the_monitor_says_alarms_with_their_samples_and_the_cli_overrides_them(tmp_path, caplog):
    from crossengine.monitor import KLMonitor

    t = np.log(RNG.uniform(0.05, 0.95, (4, 12)))
    g = t + RNG.normal(0, 1e-3, t.shape)
    g[2] += 0.3  # one rollout whose every token is off
    with caplog.at_level(logging.WARNING, logger="crossengine.monitor"), KLMonitor(tmp_path / "m") as monitor:
        monitor.step(0, t, t, np.ones_like(t), sample_ids=["a", "b", "c", "d"])
        monitor.step(1, g, t, np.ones_like(t), sample_ids=["a", "b", "c", "d"])
    said = [r.getMessage() for r in caplog.records if "alarm: " in r.getMessage()]
    assert said and all(m.startswith("step 1: alarm: ") for m in said), said
    assert any("gen_kl_error" in m and "samples that trip it alone: c (" in m for m in said), said
    shown = CliRunner().invoke(app, ["monitor", str(tmp_path / "m")])
    assert shown.exit_code == 0 and "step 1: alarm: gen_kl_error" in shown.output
    quiet = CliRunner().invoke(app, ["monitor", str(tmp_path / "m"), "--alarm", "gen_kl_error=off", "--alarm", "kl=5"])
    assert "alarm: gen_kl_error" not in quiet.output and "alarm: kl:" not in quiet.output and "alarm: token_mult_prob_error" in quiet.output
    bad = CliRunner().invoke(app, ["monitor", str(tmp_path / "m"), "--alarm", "gen_kl_error=lots"])
    assert bad.exit_code == 2 and "'lots' is not a number" in bad.output
