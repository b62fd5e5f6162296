"""Bad inputs and faults, tried as a new user would: one line, nothing outside the run folder,
nothing half-written, nothing silently merged or overwritten, and a resume that continues."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.experiment.load import load_experiment
from crossengine.results import RunDir

from .conftest import REPO, run_experiment
from .test_config_errors import GOOD as BASE  # noqa: E402 - one valid experiment, edited per test


def _one_line(result) -> str:
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    return message


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ 1. paths stay inside


def test_run_id_cannot_escape_the_output_folder(write_experiment, tmp_path):
    path = write_experiment(BASE)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["run", str(path), "--run-id", "../../escape", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--run-id '../../escape'" in _one_line(result)
    assert _tree(tmp_path) == before, "nothing written anywhere"


def test_experiment_name_cannot_escape_the_output_folder(write_experiment, tmp_path):
    path = write_experiment('name: "../evil"\n' + BASE)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = _one_line(result)
    assert f"{path}:1: name" in line and "results folder" in line
    assert _tree(tmp_path) == before


def test_engine_and_variant_names_cannot_be_reserved_words(write_experiment):
    path = write_experiment(BASE + "variants:\n  sampled: {engine: b}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "'sampled' is reserved" in _one_line(result)


# ------------------------------------------------------------------ 2. one run per folder


def test_a_running_run_holds_its_folder(write_experiment, tmp_path):
    path = write_experiment(BASE)
    holder = RunDir(tmp_path / "out" / "busy")
    holder.acquire()
    try:
        result = CliRunner().invoke(app, ["run", str(path), "--run-id", "busy", "--output-dir", str(tmp_path / "out")])
        assert result.exit_code == 2
        line = _one_line(result)
        assert f"pid {os.getpid()}" in line and "in use by a running crossengine" in line
    finally:
        holder.release()
    assert not (tmp_path / "out").exists(), "the holder created the folder and left it empty: removed"


def test_a_stale_lock_is_taken_over(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / RunDir.LOCK).write_text("pid 999999 on elsewhere, since yesterday")  # a run killed with -9
    run_dir = RunDir(root)
    run_dir.acquire()
    assert run_dir.took_over == "pid 999999 on elsewhere, since yesterday"
    assert f"pid {os.getpid()}" in (root / RunDir.LOCK).read_text()
    run_dir.release()
    assert not (root / RunDir.LOCK).exists() and root.exists(), "a folder it did not create stays"


# ------------------------------------------------------------------ 3. sample ids


def test_auto_ids_never_take_an_explicit_id(write_experiment):
    path = write_experiment(BASE.replace("  - text: hello there\n", '  - text: "a"\n  - {id: s0, text: "b"}\n  - text: "c"\n'))
    ids = [s.id for s in load_experiment(path).samples]
    assert len(set(ids)) == 3 and ids[1] == "s0" and ids[0] != "s0" and ids[2] == "s2"


def test_duplicate_explicit_ids_are_an_error(write_experiment):
    path = write_experiment(BASE.replace("  - text: hello there\n", '  - {id: x, text: "a"}\n  - {id: x, text: "b"}\n'))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "duplicate sample id 'x'" in _one_line(result)


# ------------------------------------------------------------------ 4 + 8. per-sample errors, non-finite numbers

FAULTY = """\
model: tiny-text
reference: a
engines:
  a: {type: hf}
  nan: {type: native, factory: "tests.native_factories:nonfinite_at", options: {position: 3}}
  inf: {type: native, factory: "tests.native_factories:nonfinite_at", options: {position: 4, value: inf}}
samples:
  - {id: ok, token_ids: [1, 60, 61, 62, 63, 64, 65]}
  - {id: long, token_ids: LONG}
"""


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tmp_path_factory):
    from transformers import AutoConfig

    from crossengine.experiment.fixtures import ensure_fixture

    limit = AutoConfig.from_pretrained(ensure_fixture("tiny-text")).max_position_embeddings
    d = tmp_path_factory.mktemp("faulty")
    path = d / "faulty.yaml"
    path.write_text(FAULTY.replace("LONG", json.dumps([1] + [60] * limit)))
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(d / "out"), "--run-id", "f"])
    return result, d / "out" / "f", limit


def test_a_prompt_longer_than_the_model_is_a_per_sample_error(faulty_run):
    result, run_dir, limit = faulty_run
    assert result.exit_code == 1, result.output
    errors = json.loads((run_dir / "run.json").read_text())["errors"]
    long_errors = [e for e in errors if e["sample_id"] == "long"]
    assert {e["engine"] for e in long_errors} == {"a", "nan", "inf"}, errors
    assert all(f"{limit + 1} tokens exceed max_position_embeddings {limit}" in e["error"] for e in long_errors)
    tokens = pd.read_parquet(run_dir / "tokens")
    assert set(tokens["sample_id"].astype(str)) == {"ok"}, "the long sample is skipped, the other scored"


def test_nonfinite_logits_are_flagged_never_turned_into_numbers(faulty_run):
    result, run_dir, _ = faulty_run
    tokens = pd.read_parquet(run_dir / "tokens")
    for cand, pos in (("nan", 3), ("inf", 4)):
        rows = tokens[tokens["cand_engine"] == cand].set_index("position")
        assert rows.loc[pos, "nonfinite"] == "cand"
        assert rows.drop(index=pos)["nonfinite"].isna().all()
        for col in ("lp_cand", "lp_diff", "kl_ref_cand", "kl_cand_ref", "gen_kl", "cos_sim", "topk_kl"):
            assert pd.isna(rows.loc[pos, col]), (cand, col)
        assert rows.drop(index=pos)["kl_ref_cand"].notna().all()
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary["modality"] == "all")].set_index("cand_engine")
    assert pooled.loc["nan", "n_nonfinite"] == 1 and pooled.loc["inf", "n_nonfinite"] == 1
    assert np.isfinite(pooled.loc["nan", "kl_mean"]) and np.isfinite(pooled.loc["nan", "abs_max"])
    assert "non-finite" in result.output and "'nan'" in result.output


# ------------------------------------------------------------------ 5. faults are one line


def test_an_output_folder_that_is_a_file_fails_before_anything_starts(write_experiment, tmp_path):
    path = write_experiment(BASE)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(blocker)])
    assert result.exit_code == 2
    line = _one_line(result)
    assert f"cannot write results to {blocker}/" in line and "Not a directory" in line
    assert "placement" not in result.output and "environment of" not in result.output, "nothing was placed or started"


DYING = """\
model: tiny-text
reference: a
engines:
  a: {type: hf}
  dying: {type: native, factory: "tests.native_factories:die_on_length", options: {length: 6, after: AFTER}}
  steady: {type: hf, attn_implementation: eager}
samples:
  - {id: four, token_ids: [1, 60, 61, 62]}
  - {id: five, token_ids: [1, 60, 61, 62, 63]}
  - {id: six, token_ids: [1, 60, 61, 62, 63, 64]}
batch_size: 1
"""


@pytest.mark.slow
def test_a_worker_that_dies_is_one_error_and_the_others_finish(write_experiment, tmp_path):
    """A candidate whose process dies (os._exit, on its third batch, once the driver holds its second):
    said once, naming engine, batch and resume; its finished batches kept; the other candidate finishes.
    As a user sees it, in a process of its own with stdout sent elsewhere: stderr alone names the dead
    engine, its batch and the resume command, the detailed line before the summary that points to it;
    Ray's own notice of the death reaches neither stream but the run's log."""
    out = tmp_path / "out"
    path = write_experiment(DYING.replace("AFTER", str(out / "d" / "tokens" / "part-dying-00001.parquet")))
    result = subprocess.run(
        [sys.executable, "-m", "crossengine.cli", "run", str(path), "--output-dir", str(out), "--run-id", "d"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr.splitlines()
    died = [n for n, line in enumerate(err) if "engine 'dying' died while scoring batch 2 (samples six)" in line]
    summary = [n for n, line in enumerate(err) if line.startswith("engine(s) 'dying' died (see above)")]
    assert len(died) == 1 and len(summary) == 1 and died[0] < summary[0], result.stderr
    resume = f"Resume with: crossengine run {path} --run-id d --output-dir {out}"
    assert resume in err[died[0]] and resume in err[summary[0]]
    assert "died" not in result.stdout and "raylet" not in result.stdout + result.stderr, result.stdout
    log = (out / "d" / "crossengine.log").read_text()
    assert f"traceback: {out / 'd' / 'crossengine.log'}" in err[died[0]] and "Traceback" in log
    assert "Ray's notice" in log and "A worker died" in log
    parts = sorted(p.name for p in (out / "d" / "tokens").iterdir())
    assert parts == ["part-dying-00000.parquet", "part-dying-00001.parquet", *(f"part-steady-0000{b}.parquet" for b in range(3))]
    meta = json.loads((out / "d" / "run.json").read_text())
    assert meta["status"] == "incomplete" and [(e["engine"], e["sample_id"]) for e in meta["errors"]] == [("dying", "")]
    assert not (out / "d" / RunDir.LOCK).exists()


GATED = """\
model: tiny-text
reference: a
engines:
  a: {type: hf}
  slow: {type: native, factory: "tests.native_factories:gated", options: {gate: GATE}}
samples:
SAMPLES
batch_size: 1
"""


def gated_experiment(folder: Path, released: bool) -> Path:
    """12 one-sample batches; the candidate blocks on its second sample until GATE/release exists."""
    gate = folder / "gate"
    gate.mkdir(parents=True)
    if released:
        (gate / "release").touch()
    samples = "".join(f"  - {{id: p{i}, token_ids: {[1] + list(range(60, 64 + i))}}}\n" for i in range(12))
    path = folder / "slow.yaml"
    path.write_text(GATED.replace("SAMPLES\n", samples).replace("GATE", str(gate)))
    return path


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    run_dir, _ = run_experiment(gated_experiment(folder, released=True), folder / "results", run_id="whole")
    return _tokens(run_dir)


def _tokens(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "tokens").drop(columns=["run_id"])
    return df.sort_values(["sample_id", "position"]).reset_index(drop=True)


# No wall-clock bound here: each stop test holds the run on something that never ends by itself (a gated engine,
# an import that sleeps a minute), so a run that waited for it would not end before the test's own timeout. How
# fast a stop is (0.2-0.25 s here) is measured by bench/soak.py and written in docs/guarantees.md.


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupt_then_resume_is_bitwise_an_uninterrupted_run(sig, uninterrupted, tmp_path):
    """What a scheduler or a user does to a running job, while the driver waits on an engine that
    will not finish by itself (so the run cannot end first, however slow the machine): it stops
    promptly, and the resume command continues it."""
    path = gated_experiment(tmp_path, released=False)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossengine.cli", "run", str(path), "--run-id", "i", "--output-dir", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    try:
        deadline = time.time() + 180
        while not ((tmp_path / "gate" / "blocked").exists() and list((out / "i" / "tokens").glob("part-slow-*.parquet"))):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its second batch"
            time.sleep(0.05)
        os.kill(proc.pid, getattr(signal, sig))
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None or sig == "SIGKILL":
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a killed job's local Ray cluster goes with it
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    done = sorted(p.name for p in (out / "i" / "tokens").glob("part-slow-*.parquet"))
    assert done == ["part-slow-00000.parquet"], "the finished batch is kept and nothing after it was written"
    if sig != "SIGKILL":
        assert proc.returncode == (130 if sig == "SIGINT" else 143), output
        assert f"Resume with: crossengine run {path} --run-id i --output-dir {out}" in output, output
        assert "Traceback" not in output
    (tmp_path / "gate" / "release").touch()
    resumed, _ = run_experiment(path, out, run_id="i")
    pd.testing.assert_frame_equal(_tokens(resumed), uninterrupted)


def test_a_stop_while_the_checks_import_user_code_ends_the_command_at_once(write_experiment, tmp_path):
    """Ctrl-C in the first seconds, while the checks before Ray import transformers or user code: the command
    ends with 130 and one line, nothing written (a KeyboardInterrupt raised inside such an import was seen
    swallowed, the run going on to the end)."""
    path = write_experiment("model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  slow: {type: native, factory: 'tests.slow_import:factory'}\nsamples:\n  - token_ids: [1, 2, 3]\n")
    started = tmp_path / "importing"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossengine.cli", "run", str(path), "--output-dir", str(tmp_path / "out")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "CROSSENGINE_TEST_SLOW_IMPORT": str(started)},
    )
    deadline = time.time() + 60
    while not started.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # the import sleeps 60 s: a stop that waited for it would time out here
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted before anything started; nothing was written", err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 7. validate checks what run would


@pytest.mark.parametrize(
    "name,edit,words",
    [
        ("token id beyond vocab", ("- text: hello there", "- token_ids: [1, 60, 600]"), ["samples[0].token_ids[2]", "token id 600 >= vocab size 512"]),
        ("not an image", ("- text: hello there", "- {text: 'look <start_of_image>', images: [data/fake.png]}"), ["samples[0].images[0]", "fake.png is not an image"]),
        (
            "two placeholders one image",
            ("- text: hello there", "- {text: 'a <start_of_image> b <start_of_image>', images: [data/gradient.png]}"),
            ["samples[0].text", "2 <start_of_image> placeholder(s) for 1 image(s)"],
        ),
        ("unknown patch", ("{type: hf, attn_implementation: eager}", "{type: hf, patches: [rope_on_cpu]}"), ["engines.b.patches", "unknown patch 'rope_on_cpu'"]),
        (
            "factory that does not import",
            ("{type: hf, attn_implementation: eager}", "{type: native, factory: 'tests.no_such_module:f'}"),
            ["engines.b.factory", "cannot import 'tests.no_such_module:f'"],
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_validate_rejects_what_run_would_reject(name, edit, words, write_experiment, tmp_path):
    (tmp_path / "data" / "fake.png").write_text("not a png")
    text = BASE.replace(*edit)
    if "images" in edit[1]:
        text = text.replace("model: tiny-text", "model: tiny-vision")
    path = write_experiment(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    line = _one_line(result)
    for w in words:
        assert w in line, (w, line)
    assert "environment of" not in result.output and "placement" not in result.output, "no engines are started to validate"


# ------------------------------------------------------------------ 9. file modes


def test_result_files_follow_the_umask(tmp_path):
    """mkstemp makes 0600; a result file is created like any other tool's, 0666 & ~umask."""
    code = "import os, sys; os.umask(0o022); from crossengine.results import write_json; write_json(__import__('pathlib').Path(sys.argv[1]), {})"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.json")], check=True, cwd=REPO)
    assert stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode) == 0o644
