"""Sweeps: many experiments over one cluster, an index of them all, a resume that skips finished members."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app

from .conftest import EXPERIMENTS, REPO

POOLED = {"modality": "all", "attention": "all", "segment": "all", "position_bucket": "all"}


def _pooled(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df[list(POOLED)] == "all").all(axis=1)]


@pytest.fixture(scope="module")
def drift(ray_cluster, tmp_path_factory):
    """experiments/sweep.yaml (3 checkpoints × 2 dtypes) from the CLI, on the session's cluster."""
    d = tmp_path_factory.mktemp("sweep")
    for f in ("sweep.yaml", "sweep-base.yaml"):
        shutil.copy(EXPERIMENTS / f, d / f)
    result = CliRunner().invoke(app, ["sweep", str(d / "sweep.yaml"), "--output-dir", str(d / "results")])
    return d / "results" / "drift", result


def test_a_six_member_sweep_completes_with_a_correct_index(drift):
    root, result = drift
    assert result.exit_code == 0, result.output
    index = pd.read_parquet(root / "index.parquet")
    members = index.drop_duplicates("member")
    assert sorted(members["member"]) == sorted(f"{s}-{d}" for s in (1, 2, 3) for d in ("float32", "bfloat16"))
    assert set(members["status"]) == {"complete"} and list(index.columns[:3]) == ["member", "step", "dtype"]
    for m in members.itertuples():
        summary = pd.read_parquet(root / m.member / "summary.parquet")
        mine = index[index["member"] == m.member]
        assert len(mine) == len(summary), "one index row per member × candidate × split"
        got = _pooled(mine).iloc[0]
        want = _pooled(summary.astype({k: str for k in POOLED})).iloc[0]
        for metric in ("n_tokens", "gen_kl_error", "abs_mean", "top1_agreement", "mismatch_kl"):
            assert got[metric] == want[metric], (m.member, metric)
        meta = json.loads((root / m.member / "run.json").read_text())
        ckpt = meta["experiment"]["engines"]["ckpt"]
        assert ckpt["model"] == f"tiny-text-step{m.step}" and ckpt["dtype"] == m.dtype, "each member is its base with its axes' values"


def test_members_one_after_another_share_the_engine_they_have_in_common(drift):
    """No GPUs, so members run one at a time: the reference (the same spec, model and seed in every member)
    stays loaded from one member to the next, in one worker; each member's checkpoint engine is its own."""
    root, _ = drift
    pids = {m.name: {e: info["extra"]["worker_pid"] for e, info in json.loads((m / "run.json").read_text())["engines"].items()} for m in root.iterdir() if (m / "run.json").exists()}
    assert len(pids) == 6
    assert len({p["step0"] for p in pids.values()}) == 1, pids
    assert len({p["ckpt"] for p in pids.values()}) == 6, pids


def test_checkpoints_drift_step_by_step(drift):
    """The fixture checkpoints add seeded noise per step: step 3 is further from step 0 than step 1, in both dtypes."""
    root, _ = drift
    pooled = _pooled(pd.read_parquet(root / "index.parquet")).set_index(["step", "dtype"])
    for dtype in ("float32", "bfloat16"):
        assert pooled.loc[("3", dtype), "abs_mean"] > pooled.loc[("1", dtype), "abs_mean"] > 0


def test_the_sweep_report_plots_each_metric_against_each_axis(drift):
    root, result = drift
    page = (root / "report.html").read_text()
    assert "report.html" in result.output
    for chart in ("gen_kl_error-by-step", "gen_kl_error-by-dtype", "abs_mean-by-step"):
        assert f'id="{chart}"' in page, chart
    assert page.count("complete") >= 6


SMALL = """\
name: small
experiment: sweep-base.yaml
axes:
  step:
    field: engines.ckpt.model
    values: {{1: tiny-text-step1, 2: tiny-text-step2, bad: {bad}}}
"""


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_members_and_a_bad_member_is_one_line(tmp_path, crossengine_home):
    """In a subprocess on its own local cluster advertising 4 GPUs, where two members of two engines run side
    by side: killed with SIGKILL once a member finished, run again: the finished member is skipped (its
    run.json untouched), the others finish, the bad model is one line, exit 1."""
    shutil.copy(EXPERIMENTS / "sweep-base.yaml", tmp_path / "sweep-base.yaml")
    (tmp_path / "small.yaml").write_text(SMALL.format(bad=tmp_path / "no-such-model"))
    cmd = [sys.executable, "-m", "crossengine.cli", "sweep", str(tmp_path / "small.yaml"), "--output-dir", str(tmp_path / "out"), "--num-gpus", "4"]
    env = {**os.environ, "CROSSENGINE_HOME": str(crossengine_home)}
    root = tmp_path / "out" / "small"
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = None
    other_started = False  # whether the other member's run had begun (its folder, locked at its start) when the first finished
    deadline = time.time() + 240
    while done is None and time.time() < deadline and first.poll() is None:
        for m in ("1", "2"):
            meta = root / m / "run.json"
            if meta.exists() and json.loads(meta.read_text()).get("status") == "complete":
                done = m
                other_started = (root / ("2" if m == "1" else "1")).is_dir()
        time.sleep(0.2)
    assert done is not None, first.communicate()[0] if first.poll() is not None else "no member finished in time"
    other = "2" if done == "1" else "1"
    while not (root / other / "run.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until its engines are up (run.json written): its started_at is then this first sweep's
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = {m for m in ("1", "2") if json.loads((root / m / "run.json").read_text())["status"] == "complete"}  # the other may have finished too
    before = {m: (root / m / "run.json").read_text() for m in finished}
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 1, out
    for m in finished:
        assert f"member {m}: finished before, skipped" in out
        assert (root / m / "run.json").read_text() == before[m], "a finished member is not run again"
    bad = [line for line in out.splitlines() if line.startswith("member bad: failed: ")]
    assert len(bad) == 1 and "no-such-model" in bad[0], out
    index = pd.read_parquet(root / "index.parquet")
    status = dict(index.drop_duplicates("member")[["member", "status"]].itertuples(index=False))
    assert status == {"1": "skipped" if "1" in finished else "complete", "2": "skipped" if "2" in finished else "complete", "bad": "failed"}, status
    assert _pooled(index[index["member"] == done])["n_tokens"].iloc[0] > 0, "a skipped member's rows are still in the index"
    assert "1 of 3 member(s) did not finish cleanly: bad" in out
    # side by side: the other member's run had begun when the first finished, and its engines were up (run.json's
    # started_at, kept on resume) no later than that second; one member at a time, it would begin only after, and
    # its engines would take seconds to load
    stamp = lambda m, key: datetime.strptime(json.loads((root / m / "run.json").read_text())[key], "%Y-%m-%dT%H:%M:%S%z")  # noqa: E731
    assert other_started and stamp(other, "started_at") <= stamp(done, "finished_at"), "4 GPUs hold two members of 2 engines at once"


def _sweep_file(tmp_path, axes: str) -> object:
    shutil.copy(EXPERIMENTS / "sweep-base.yaml", tmp_path / "sweep-base.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: sweep-base.yaml\naxes:\n{axes}")
    return path


def _one_line(result, *words):
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.splitlines() == [message] and message.startswith("error: "), result.output
    for word in words:
        assert word in message, (word, message)


def test_a_sweep_whose_output_folder_is_a_file_is_one_line(tmp_path):
    path = _sweep_file(tmp_path, "  step: {field: engines.ckpt.model, values: [tiny-text-step1]}\n")
    (tmp_path / "out").write_text("a file where the sweep's folder should be")
    _one_line(CliRunner().invoke(app, ["sweep", str(path), "--output-dir", str(tmp_path / "out")]), "cannot write the sweep's results", str(tmp_path / "out"))


def test_parallel_below_one_is_one_line(tmp_path):
    path = _sweep_file(tmp_path, "  step: {field: engines.ckpt.model, values: [tiny-text-step1]}\n")
    _one_line(CliRunner().invoke(app, ["sweep", str(path), "--parallel", "0"]), "--parallel", "(got 0)")


def test_two_labels_that_make_one_member_name_name_their_line(tmp_path):
    path = _sweep_file(tmp_path, "  step:\n    field: engines.ckpt.model\n    values:\n      step/1: tiny-text-step1\n      step_1: tiny-text-step2\n")
    _one_line(CliRunner().invoke(app, ["validate", str(path)]), f"{path}:8:", "axes.step.values", "'step/1' and 'step_1'", "'step_1'")


def test_a_member_whose_samples_failed_stays_errors_when_the_sweep_runs_again(ray_cluster, tmp_path):
    """A rerun does not turn red into green: the member is not run again (its samples would fail the same way),
    its index row stays `errors`, and the exit code stays 1."""
    path = _sweep_file(tmp_path, "  step: {field: engines.ckpt.model, values: [tiny-text-step1]}\n")
    base = (tmp_path / "sweep-base.yaml").read_text()
    (tmp_path / "sweep-base.yaml").write_text(base + "  - id: beyond-vocabulary\n    token_ids: [1, 40, 600]\n")
    runs = [CliRunner().invoke(app, ["sweep", str(path), "--output-dir", str(tmp_path / "out")]) for _ in range(2)]
    member = tmp_path / "out" / "s" / "tiny_text_step1"
    assert [r.exit_code for r in runs] == [1, 1], [r.output for r in runs]
    assert "finished before with 1 failed sample(s)" in runs[1].output and "did not finish cleanly: tiny_text_step1" in runs[1].stderr
    index = pd.read_parquet(tmp_path / "out" / "s" / "index.parquet")
    assert set(index["status"]) == {"errors"}
    assert json.loads((member / "run.json").read_text())["resumed_at"] == [], "the member was not run again"


@pytest.mark.slow
def test_an_interrupted_sweep_prints_the_exact_command_that_resumes_it(tmp_path, crossengine_home):
    """Ctrl-C once a member has finished: the printed command, flags included, run as printed (from another
    folder), resumes into the same output folder: the finished member is skipped, not run again elsewhere."""
    shutil.copy(EXPERIMENTS / "sweep-base.yaml", tmp_path / "sweep-base.yaml")
    (tmp_path / "two.yaml").write_text("name: two\nexperiment: sweep-base.yaml\naxes:\n  step: {field: engines.ckpt.model, values: [tiny-text-step1, tiny-text-step2]}\n")
    out = tmp_path / "elsewhere"
    cmd = ["sweep", str(tmp_path / "two.yaml"), "--output-dir", str(out), "--num-gpus", "0", "--parallel", "1"]
    env = {**os.environ, "CROSSENGINE_HOME": str(crossengine_home), "COLUMNS": "300"}
    first = subprocess.Popen([sys.executable, "-m", "crossengine.cli", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finished = out / "two" / "tiny_text_step1" / "run.json"
    deadline = time.time() + 240
    while not (finished.exists() and json.loads(finished.read_text()).get("status") == "complete"):
        assert first.poll() is None and time.time() < deadline, "the first member did not finish"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    line = next(x for x in err.splitlines() if "Resume with: " in x)
    printed = line.split("Resume with: ", 1)[1]
    assert shlex.split(printed) == ["crossengine", *cmd], printed
    again = subprocess.run([sys.executable, "-m", "crossengine.cli", *shlex.split(printed)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "member tiny_text_step1: finished before, skipped" in again.stdout
    assert not (tmp_path / "results").exists(), "nothing went to the default output folder"
