"""Shared test fixtures: one Ray cluster per session, fixtures built once into a temp home."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# A test is `slow` (left out of the quick loop, `pytest -m "not slow"`) when it needs the session's
# Ray cluster, directly or through a shared run; tests that start processes of their own (the CLI
# in a subprocess, vLLM, a local multi-node cluster) carry the mark themselves.
SLOW_FIXTURES = {"ray_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def crossengine_home(tmp_path_factory):
    """Keep fixtures out of the user's cache unless CROSSENGINE_HOME is set (CI sets it)."""
    if "CROSSENGINE_HOME" not in os.environ:
        os.environ["CROSSENGINE_HOME"] = str(tmp_path_factory.mktemp("crossengine-home"))
    yield Path(os.environ["CROSSENGINE_HOME"])


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # address="local": a private cluster even when `ray start` left one running on the machine
        ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def write_experiment(tmp_path):
    """Write an experiment YAML next to copies of the sample data; returns its path."""
    shutil.copytree(EXPERIMENTS / "data", tmp_path / "data")

    def write(text: str, name: str = "exp.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def run_text(tmp_path_factory, name: str, text: str, **kwargs):
    """Write an experiment's YAML text into a fresh folder and run it there; (path, run folder, runner)."""
    d = tmp_path_factory.mktemp(name)
    path = d / f"{name}.yaml"
    path.write_text(text)
    run_dir, runner = run_experiment(path, d / "results", **kwargs)
    return path, run_dir, runner


def run_experiment(path: Path, output_dir: Path, run_id: str = "t", **kwargs):
    """Run an experiment in-process on the session's Ray cluster; returns the run folder."""
    from crossengine.experiment.load import load_experiment
    from crossengine.experiment.plan import make_plan
    from crossengine.run.runner import Runner

    plan = make_plan(load_experiment(path), path, run_id=run_id, output_dir=output_dir)
    runner = Runner(plan, **kwargs)
    return runner.run(), runner


@pytest.fixture(scope="session")
def quickstart_cli(ray_cluster, tmp_path_factory):
    """The README's main job as a new user runs it (`crossengine run experiments/quickstart.yaml`), once per
    session: (run folder, CLI result). Tests of its output and of its report share it."""
    from typer.testing import CliRunner

    from crossengine.cli import app

    out = tmp_path_factory.mktemp("quickstart") / "results"
    result = CliRunner().invoke(app, ["run", str(EXPERIMENTS / "quickstart.yaml"), "--output-dir", str(out), "--run-id", "qs"])
    return out / "qs", result


@pytest.fixture(scope="session")
def vision_bidirectional(ray_cluster, tmp_path_factory):
    """experiments/vision-bidirectional.yaml, run once per session (its numbers and its report are tested apart)."""
    run_dir, _ = run_experiment(EXPERIMENTS / "vision-bidirectional.yaml", tmp_path_factory.mktemp("vision-bidi") / "results")
    return run_dir
