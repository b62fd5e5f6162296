"""Inputs that used to end in a traceback or a wrong result: each is one line, or a correct result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.experiment.fixtures import ensure_fixture
from crossengine.run_meta import RunMeta
from crossengine.schemas import SCHEMA_VERSION

from .conftest import run_experiment
from .test_config_errors import GOOD


def _one_line(result) -> str:
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), result.output
    assert "Traceback" not in result.output
    return message


def test_an_experiment_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(GOOD.replace("hello there", "h\xe9llo").encode("latin-1"))
    message = _one_line(CliRunner().invoke(app, ["validate", str(path)]))
    assert f"{path}:7:" in message and "not UTF-8" in message and "0xe9 at column 12" in message, message


def test_a_samples_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "s.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.replace("- text: hello there", "- file: s.jsonl"))
    message = _one_line(CliRunner().invoke(app, ["validate", str(path)]))
    assert "s.jsonl:2:" in message and "not UTF-8" in message, message


def test_an_empty_adapter_file_is_one_line(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ensure_fixture("tiny-text-lora"), adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.replace("{type: hf, attn_implementation: eager}", f"{{type: hf, lora: {adapter}}}"))
    message = _one_line(CliRunner().invoke(app, ["validate", str(path)]))
    assert "engines.b.lora" in message and "adapter_model.safetensors is not a safetensors file (0 bytes)" in message, message


def test_a_monitor_folder_with_a_foreign_file_is_one_line(tmp_path):
    from crossengine.monitor import KLMonitor

    mon = KLMonitor(tmp_path / "mon")
    g = np.log(np.full((2, 4), 0.5))
    mon.step(0, g, g + 0.01, np.ones((2, 4), bool))
    mon.close()
    assert CliRunner().invoke(app, ["monitor", str(tmp_path / "mon")]).exit_code == 0, "the monitor's own folder reads"
    (tmp_path / "mon" / "steps" / "part-99999999.parquet").write_text("not parquet")
    message = _one_line(CliRunner().invoke(app, ["monitor", str(tmp_path / "mon")]))
    assert "part-99999999.parquet: not a KLMonitor step file" in message, message


def test_validate_imports_user_code_next_to_the_experiment_as_the_workers_do(tmp_path):
    (tmp_path / "my_patches.py").write_text("def noop(engine):\n    return 'nothing changed'\n")
    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.replace("{type: hf, attn_implementation: eager}", "{type: hf, patches: ['my_patches:noop']}"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "ok" in result.output, result.output


FAILING = """\
model: tiny-text
reference: a
engines:
  a: {type: hf}
  n: {type: native, factory: "tests.native_factories:hf_as_native"}
variants:
  broken: {engine: n, factory: "tests.native_factories:raise_always"}
samples:
  - {id: one, text: The quick brown fox.}
  - {id: two, text: Two roads diverged.}
"""


def test_a_variant_whose_every_sample_fails_still_gets_a_summary(ray_cluster, tmp_path):
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING)
    run_dir, runner = run_experiment(path, tmp_path / "results")
    assert {(e["engine"], e["sample_id"]) for e in runner.errors} == {("broken", "one"), ("broken", "two")}
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[summary["modality"].astype(str) == "all"].set_index("variant")
    assert pooled.loc["broken", "n_tokens"] == 0 and np.isnan(pooled.loc["broken", "kl_mean"])
    assert pooled.loc["base", "n_tokens"] > 0 and pooled.loc["base", "kl_mean"] < 1e-6
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_a_resume_over_a_changed_image_is_refused_naming_it(write_experiment, tmp_path):
    from PIL import Image

    from crossengine.experiment.load import load_experiment
    from crossengine.experiment.plan import make_plan
    from crossengine.run.runner import Runner

    text = GOOD.replace("tiny-text", "tiny-vision").replace("- text: hello there", "- {text: 'look <start_of_image>', images: [data/gradient.png]}")
    path = write_experiment(text)
    plan = make_plan(load_experiment(path), path, run_id="r", output_dir=tmp_path / "out")
    runner = Runner(plan)
    runner.run_dir.root.mkdir(parents=True)
    runner.run_dir.acquire()
    # what a run stopped after its first batch leaves
    meta = RunMeta(
        run_id="r",
        schema_version=SCHEMA_VERSION,
        crossengine_version="x",
        experiment_file=str(path),
        experiment={},
        fingerprint=plan.fingerprint,
        files=plan.files,
        reference="a",
        candidates={},
        started_at="now",
        n_samples=1,
        n_batches=1,
    )
    runner.run_dir.write_meta(meta)
    runner.run_dir.release()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "data" / "gradient.png")  # replaced between the stop and the resume
    result = CliRunner().invoke(app, ["run", str(path), "--run-id", "r", "--output-dir", str(tmp_path / "out")])
    message = _one_line(result)
    assert "gradient.png changed (its content) since this run started" in message, message


def test_an_image_sample_without_a_placeholder_is_refused_by_validate(write_experiment):
    text = GOOD.replace("tiny-text", "tiny-vision").replace("- text: hello there", "- {text: 'a picture', images: [data/gradient.png]}")
    message = _one_line(CliRunner().invoke(app, ["validate", str(write_experiment(text))]))
    assert "samples[0].text" in message and "no <start_of_image> placeholder for its 1 image(s)" in message, message


def test_an_unreachable_hub_id_is_one_line_within_seconds(tmp_path):
    """No network (here: a hub endpoint on a closed loopback port) and an empty cache: said at once."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.replace("tiny-text", "someorg/some-model"))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    check = subprocess.run([sys.executable, "-m", "crossengine.cli", "validate", str(path)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert check.returncode == 2, check.stdout + check.stderr
    message = check.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{path}:1: model:" in message, message
    assert "'someorg/some-model'" in message and "cannot be reached" in message and "127.0.0.1:9" in message, message
    assert "within 5s" in message, "the hub's own minute of retries is not waited for: one request, 5 s at most"


def test_a_worker_killed_for_memory_is_one_line_without_rays_advice():
    from ray.exceptions import OutOfMemoryError

    from crossengine.run.pool import one_line

    message = (  # the raylet's text (ray/core/src/ray/raylet), as Ray 2.x words it
        "Task was killed due to the node running low on memory.\n"
        "Memory on the node (IP: 127.0.0.1, ID: 5e1f) was 21.50GB used / 22.00GB limit (0.977273)\n"
        "OOM kill reason: the worker used the most memory\n"
        "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/ray-core/scheduling/ray-oom-prevention.html. "
        "Consider provisioning more memory on this node or reducing task parallelism by requesting more CPUs per task. "
        "To adjust the kill threshold, set the environment variable `RAY_memory_usage_threshold` when starting Ray."
    )
    line = one_line(OutOfMemoryError(message))
    assert line == "killed by Ray for lack of memory: Memory on the node (IP: 127.0.0.1, ID: 5e1f) was 21.50GB used / 22.00GB limit (0.977273)", line
