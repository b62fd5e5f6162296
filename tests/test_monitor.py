"""KLMonitor: values, masking, identity, worst tokens, CLI; against the comparator's own summary."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.monitor import KLMonitor


def _k3(x: float) -> float:
    return math.exp(x) - x - 1


def test_hand_computed_example(tmp_path):
    # trainer p = 0.5 and 0.2, generator p = 0.4 and 0.25; one masked token with nonsense values
    t = np.log([[0.5, 0.2, 0.9]])
    g = np.log([[0.4, 0.25, 0.01]])
    mask = np.array([[1, 1, 0]])
    with KLMonitor(tmp_path) as mon:
        m = mon.step(0, g, t, mask)
    x = [math.log(0.5 / 0.4), math.log(0.2 / 0.25)]  # t − g per valid token
    assert m["n_tokens"] == 2
    assert m["gen_kl_error"] == pytest.approx(sum(_k3(v) for v in x) / 2, rel=1e-12)
    assert m["policy_kl_error"] == pytest.approx(sum(_k3(-v) for v in x) / 2, rel=1e-12)
    assert m["token_mult_prob_error"] == pytest.approx((0.5 / 0.4 + 0.25 / 0.2) / 2, rel=1e-12)
    assert m["rollout_probs_diff_max"] == pytest.approx(0.1, rel=1e-12)
    assert m["rollout_probs_diff_mean"] == pytest.approx((0.1 + 0.05) / 2, rel=1e-12)
    assert m["sampling_importance_ratio"] == pytest.approx((0.5 / 0.4 + 0.2 / 0.25) / 2, rel=1e-12)


def test_matches_each_frameworks_definition_on_masked_tokens(tmp_path):
    """The monitor's numbers against the independent per-framework reference, on the valid tokens only."""
    from .test_metrics import _framework_slow

    rng = np.random.default_rng(0)
    t = np.log(rng.uniform(0.01, 1, (4, 12)))
    g = t + rng.normal(0, 0.1, t.shape)
    mask = rng.random(t.shape) > 0.3
    with KLMonitor(tmp_path) as mon:
        m = mon.step(3, torch.tensor(g), torch.tensor(t), torch.tensor(mask))
    rows, _ = np.nonzero(mask)
    want = _framework_slow(list(g[mask]), list(t[mask]), list(rows))
    for name, value in want.items():
        if name != "n":
            assert m[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_keys_give_a_frameworks_own_names_and_an_unknown_one_fails_at_construction(tmp_path):
    """KLMonitor(keys=...): the step's numbers also under the framework's keys (the hand-computed example), logged as they are."""
    t, g, mask = np.log([[0.5, 0.2]]), np.log([[0.4, 0.25]]), np.array([[1, 1]])
    with KLMonitor(tmp_path / "a", keys="nemo-rl") as mon:
        m = mon.step(0, g, t, mask)
    assert m["train/token_mult_prob_error"] == m["token_mult_prob_error"] == pytest.approx((0.5 / 0.4 + 0.25 / 0.2) / 2, rel=1e-12)
    with KLMonitor(tmp_path / "b", keys="trl") as mon:
        m = mon.step(0, g, t, mask)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(max(abs(math.log(0.5 / 0.4)), abs(math.log(0.2 / 0.25))), rel=1e-12)
    with KLMonitor(tmp_path / "c") as mon:
        assert not any("/" in k and k.startswith(("train/", "sampling/")) for k in mon.step(0, g, t, mask)), "no keys asked: crossengine's names only"
    with pytest.raises(ValueError, match="unknown framework 'verl2'"):
        KLMonitor(tmp_path / "d", keys="verl2")


def test_masked_tokens_never_count(tmp_path):
    rng = np.random.default_rng(1)
    t = np.log(rng.uniform(0.05, 1, (3, 10)))
    g = t + rng.normal(0, 0.05, t.shape)
    mask = np.ones_like(t, dtype=bool)
    mask[:, :4] = False
    g2 = g.copy()
    g2[~mask] = -50.0  # garbage where the mask is off
    with KLMonitor(tmp_path / "a") as a, KLMonitor(tmp_path / "b") as b:
        ma, mb = a.step(0, g, t, mask), b.step(0, g2, t, mask)
    assert ma == mb
    worst = pd.read_parquet(tmp_path / "b" / "worst")
    assert (worst["position"] >= 4).all()


def test_identical_logprobs_and_thresholds(tmp_path, caplog):
    t = np.log(np.full((2, 5), 0.3))
    calls = []
    with KLMonitor(tmp_path, callback=lambda s, m, over: calls.append((s, over))) as mon:
        m = mon.step(0, t, t, np.ones_like(t))
        with caplog.at_level(logging.WARNING, logger="crossengine.monitor"):
            mon.step(1, t + 0.2, t, np.ones_like(t))
    assert m["gen_kl_error"] == 0 and m["token_mult_prob_error"] == 1 and m["first/gen_kl_error"] == 0
    assert calls[0] == (0, []) and "gen_kl_error" in calls[1][1]
    assert "gen_kl_error" in caplog.text and "over its threshold" in caplog.text


def test_worst_tokens_and_cli(tmp_path):
    rng = np.random.default_rng(2)
    with KLMonitor(tmp_path, worst_k=3) as mon:
        for step in range(5):
            t = np.log(rng.uniform(0.05, 1, (2, 8)))
            g = t + rng.normal(0, 0.02 * (step + 1), t.shape)
            mon.step(step, g, t, np.ones_like(t), token_ids=rng.integers(0, 100, t.shape), sample_ids=["a", "b"])
    worst = pd.read_parquet(tmp_path / "worst" / "part-00000004.parquet")
    k3 = np.expm1(worst["lp_train"] - worst["lp_gen"]) - (worst["lp_train"] - worst["lp_gen"])
    assert len(worst) == 3 and np.allclose(k3, worst["gen_kl"], rtol=1e-4) and worst["gen_kl"].is_monotonic_decreasing
    steps = pd.read_parquet(tmp_path / "steps")
    assert sorted(steps["step"]) == [0, 1, 2, 3, 4]
    out = CliRunner().invoke(app, ["monitor", str(tmp_path)])
    assert out.exit_code == 0 and "gen_kl_error" in out.output and "5 steps" in out.output
    out = CliRunner().invoke(app, ["monitor", str(tmp_path), "--step", "4"])
    assert out.exit_code == 0 and "worst tokens" in out.output
    out = CliRunner().invoke(app, ["monitor", str(tmp_path), "--step", "99"])
    assert out.exit_code == 2


def test_example_loop_shows_gen_kl_rising(tmp_path):
    import subprocess
    import sys

    from .conftest import EXPERIMENTS

    subprocess.run([sys.executable, str(EXPERIMENTS / "rl_monitor_example.py"), "--out", str(tmp_path), "--steps", "4", "--drift", "0.01"], check=True, capture_output=True)
    steps = pd.read_parquet(tmp_path / "steps").sort_values("step")
    assert steps["gen_kl_error"].iloc[0] < 1e-6 < steps["gen_kl_error"].iloc[-1]
