"""Placement on GPU clusters, tested on a CPU machine with clusters that advertise GPUs
(`--num-gpus N` starts a local Ray cluster with N GPUs that torch cannot see): the plan
never asks torch.cuda, so it is the same plan a real GPU node gets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from crossengine.cli import app
from crossengine.experiment.load import load_experiment
from crossengine.experiment.plan import make_plan
from crossengine.experiment.schema import PlacementSpec
from crossengine.run.placement import (
    Cluster,
    Node,
    PlacementError,
    plan_placement,
    safetensors_parameters,
)

from .conftest import REPO, run_experiment

FOUR = """\
model: tiny-text
reference: ref
engines:
  ref:   {type: hf, num_gpus: 1}
  eager: {type: hf, num_gpus: 1, attn_implementation: eager}
  bf16:  {type: hf, num_gpus: 1, dtype: bfloat16}
  same:  {type: hf, num_gpus: 1}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - {id: raw, token_ids: [1, 60, 61, 62, 63, 64, 65]}
  - text: "Numbers are computed, never typed in."
batch_size: 2
"""


def _plan(write_experiment, text):
    path = write_experiment(text)
    return make_plan(load_experiment(path), path, run_id="p")


def test_one_gpu_three_engines_share_it_equally_when_memory_is_unknown(write_experiment):
    plan = _plan(write_experiment, FOUR.replace("  same:  {type: hf, num_gpus: 1}\n", ""))
    p = plan_placement([plan.reference], plan.candidates, Cluster(gpus=1, cpus=2), PlacementSpec(), {})
    assert [len(w) for w in p.waves] == [2]
    assert {s.gpus for s in p.slots.values()} == {0.33}
    assert "memory unknown" in p.notes[0]


def test_engines_that_do_not_fit_together_run_in_waves(write_experiment):
    plan = _plan(write_experiment, FOUR)
    params = {i.name: safetensors_parameters(i.model_path) for i in plan.instances}
    spec = PlacementSpec(gpu_memory_gb=3.0)  # ~2 GiB each with headroom: one engine per GPU
    p = plan_placement([plan.reference], plan.candidates, Cluster(gpus=2, cpus=2, gpu_memory_gb=3.0, memory_source="option"), spec, params)
    assert [[c.name for c in w] for w in p.waves] == [["eager"], ["bf16"], ["same"]]
    assert p.slots["ref"].wave == -1 and p.slots["bf16"].wave == 1
    roomy = plan_placement([plan.reference], plan.candidates, Cluster(2, 2, 9.0, "option"), PlacementSpec(gpu_memory_gb=9.0), params)
    assert [len(w) for w in roomy.waves] == [3], "four ~2 GiB engines fit on two 9 GiB GPUs at once"
    assert sum(s.gpus for s in roomy.slots.values()) <= 2


def test_enough_gpus_means_one_whole_gpu_each(write_experiment):
    plan = _plan(write_experiment, FOUR)
    p = plan_placement([plan.reference], plan.candidates, Cluster(gpus=8, cpus=16), PlacementSpec(), {})
    assert [len(w) for w in p.waves] == [3] and {s.gpus for s in p.slots.values()} == {1.0} and not p.notes


def test_the_default_reserves_gpus_on_a_gpu_cluster_and_none_on_cpus(write_experiment):
    plan = _plan(write_experiment, FOUR.replace(", num_gpus: 1", "").replace("num_gpus: 1, ", ""))
    assert all(i.spec.num_gpus is None for i in plan.instances)
    on_gpus = plan_placement([plan.reference], plan.candidates, Cluster(gpus=4, cpus=8), PlacementSpec(), {})
    assert {s.gpus for s in on_gpus.slots.values()} == {1.0}, "documented default: 1 on a GPU cluster"
    on_cpus = plan_placement([plan.reference], plan.candidates, Cluster(gpus=0, cpus=8), PlacementSpec(), {})
    assert {s.gpus for s in on_cpus.slots.values()} == {0.0}


def test_asking_for_gpus_on_a_cpu_cluster_is_an_error_not_a_hang(write_experiment):
    plan = _plan(write_experiment, FOUR)
    with pytest.raises(PlacementError, match="asks for num_gpus 1 but the cluster has no GPUs"):
        plan_placement([plan.reference], plan.candidates, Cluster(gpus=0, cpus=2), PlacementSpec(), {})


def test_footprint_is_read_from_safetensors_headers():
    from transformers import AutoModelForCausalLM

    from crossengine.experiment.fixtures import ensure_fixture

    path = ensure_fixture("tiny-text")
    model = AutoModelForCausalLM.from_pretrained(path)
    stored = {n for n, _ in model.named_parameters()}
    assert safetensors_parameters(str(path)) == sum(p.numel() for n, p in model.named_parameters() if n in stored) > 0


# --------------------------------------------------------------------------- end to end


def _cli(args, timeout):
    return subprocess.run([sys.executable, "-m", "crossengine.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def no_gpu_tokens(ray_cluster, tmp_path_factory):
    """The same experiment on the session's cluster, which has no GPUs: what placement must not change."""
    d = tmp_path_factory.mktemp("nogpu")
    path = d / "four.yaml"
    path.write_text(FOUR.replace(", num_gpus: 1", "").replace("num_gpus: 1, ", ""))
    run_dir, _ = run_experiment(path, d / "out")
    return _tokens(run_dir)


def _tokens(run_dir):
    df = pd.read_parquet(run_dir / "tokens").drop(columns=["run_id"])
    return df.sort_values(["cand_engine", "sample_id", "position"]).reset_index(drop=True)


SEVERAL_RUNS = """\
import sys
from crossengine.cli import app
from crossengine.run.cluster import ensure_ray
address, num_gpus, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
if num_gpus != "-":
    ensure_ray(None, float(num_gpus))  # one local cluster advertising these GPUs for every run below
codes = []
for args in runs:  # each run as `crossengine run ARGS`, its exit code and stderr line recorded
    try:
        code = app(["run", *args.split("\\x1f"), *(["--address", address] if address != "-" else [])], standalone_mode=False) or 0
    except SystemExit as e:
        code = e.code
    codes.append(code)
    print(f"EXIT {code}", file=sys.stderr, flush=True)
"""


def _several_runs(tmp_path, runs: list[list[str]], num_gpus: str = "-", address: str = "-", prelude: str = "", timeout: int = 400):
    """Several `crossengine run`s in one process, on one cluster: (stdout, [(exit code, the stderr lines of that run)])."""
    script = tmp_path / "several.py"
    script.write_text(prelude + SEVERAL_RUNS)
    result = subprocess.run(
        [sys.executable, str(script), address, num_gpus, *["\x1f".join(r) for r in runs]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "RAY_AUTH_MODE": "disabled"},
    )
    per_run, lines = [], []
    for line in result.stderr.splitlines():
        if line.startswith("EXIT "):
            per_run.append((int(line.split()[1]), lines))
            lines = []
        elif not line.startswith(("[", " ")) and line.strip():
            lines.append(line)
    assert len(per_run) == len(runs), result.stdout + result.stderr
    return result.stdout, per_run


@pytest.mark.slow
def test_two_gpus_four_engines_run_in_waves_and_one_too_big_for_every_gpu_fails_at_once(write_experiment, tmp_path, no_gpu_tokens):
    """One local cluster advertising two GPUs: an engine too big for every GPU is one line before anything
    loads (the first run, timed), then four engines run in the expected three waves with identical tokens."""
    too_big = write_experiment(FOUR + "placement: {gpu_memory_gb: 1}\n", name="big.yaml")
    waves = write_experiment(FOUR + "placement: {gpu_memory_gb: 3}\n", name="waves.yaml")
    out = tmp_path / "out"
    stdout, [(big_code, big_lines), (code, _)] = _several_runs(
        tmp_path, [[str(too_big), "--output-dir", str(tmp_path / "big")], [str(waves), "--output-dir", str(out), "--run-id", "g2"]], num_gpus="2"
    )
    assert big_code == 2 and len(big_lines) == 1, big_lines
    assert "engine 'ref' (hf) needs 1 GPU" in big_lines[0] and "each of the cluster's 2 GPUs has 1 GiB" in big_lines[0]
    assert not (tmp_path / "big").exists(), "said before anything loads: no run folder at all"
    assert code == 0, stdout
    assert "3 waves" in stdout
    meta = json.loads((out / "g2" / "run.json").read_text())
    waves_of = {e["engine"]: e["wave"] for e in meta["placement"]["engines"]}
    assert waves_of == {"ref": -1, "eager": 0, "bf16": 1, "same": 2}
    assert meta["placement"]["cluster"]["gpu_memory_gb"] == 3
    assert set(meta["logits_transport"].values()) == {"object_store"}, "advertised GPUs without NCCL (cupy): auto keeps the object store"
    pd.testing.assert_frame_equal(_tokens(out / "g2"), no_gpu_tokens, check_categorical=False)


def test_an_engine_the_busy_cluster_cannot_place_is_an_error_after_the_timeout(ray_cluster, write_experiment, tmp_path):
    """A shared cluster whose CPUs are all taken: the engine stays pending; the run stops in one line."""
    import ray

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        path = write_experiment(yaml.safe_dump({**yaml.safe_load(FOUR.replace(", num_gpus: 1", "").replace("num_gpus: 1, ", "")), "placement": {"timeout_s": 3}}))
        result = CliRunner().invoke(app, ["run", str(path), "--output-dir", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "was not placed within 3s" in line and "0 of 2 CPUs free" in line, line
    finally:
        ray.kill(hog)


def test_every_placement_error_is_one_readable_line(write_experiment):
    """Each error branch runs here, without Ray: what it needs, what the cluster has, what to change."""
    plan = _plan(write_experiment, FOUR)
    params = {i.name: safetensors_parameters(i.model_path) for i in plan.instances}
    one = Cluster(gpus=1, cpus=2, gpu_memory_gb=3.0, memory_source="option")
    spec = PlacementSpec(gpu_memory_gb=3.0)
    with pytest.raises(PlacementError) as beside:
        plan_placement([plan.reference], plan.candidates, one, spec, params)
    share = math.ceil((params["eager"] * 4 / 1024**3 + spec.headroom_gb) / 3.0 * 100) / 100  # footprint / GPU memory, on the 0.01 grid
    assert f"engine 'eager' (hf) needs {share:g} GPU, ~2 GiB" in str(beside.value) and "does not fit beside the reference" in str(beside.value)
    with pytest.raises(PlacementError) as alone:
        plan_placement([plan.reference, plan.candidates[0]], plan.candidates[1:], one, spec, params)
    assert "the reference and generator alone do not fit" in str(alone.value) and "1 GPUs of 3 GiB" in str(alone.value)
    with pytest.raises(PlacementError, match="asks for num_gpus 4 but the cluster has 2 GPUs"):
        big = _plan(write_experiment, FOUR.replace("ref:   {type: hf, num_gpus: 1}", "ref:   {type: hf, num_gpus: 4}"))
        plan_placement([big.reference], big.candidates, Cluster(gpus=2, cpus=2), PlacementSpec(), {})
    for err in (beside.value, alone.value):
        assert len(str(err).splitlines()) == 1


# ------------------------------------------------------------------ node by node

FIVE = FOUR.replace("  same:  {type: hf, num_gpus: 1}\n", "  same:  {type: hf, num_gpus: 1}\n  sdpa:  {type: hf, num_gpus: 1, attn_implementation: sdpa}\n")
TWO_NODES = (Node("a", 1.0, 2.0), Node("b", 1.0, 2.0))


def test_five_engines_on_two_nodes_are_packed_node_by_node(write_experiment):
    """The reported case: a whole-cluster count said one wave, then the fifth actor fitted on no node."""
    plan = _plan(write_experiment, FIVE)
    cluster = Cluster(gpus=2, cpus=4, nodes=TWO_NODES)
    p = plan_placement([plan.reference], plan.candidates, cluster, PlacementSpec(), {})
    names = [i.name for i in plan.instances]
    for w in range(len(p.waves)):
        members = [plan.reference.name, *(c.name for c in p.waves[w])]
        for j, node in enumerate(TWO_NODES):
            here = [m for m in members if p.slots[m].node == j]
            assert sum(p.slots[m].gpus for m in here) <= node.gpus + 1e-9, (w, j, here)
            assert sum(min(1.0, p.cpu_share(m, members)) for m in here) <= node.cpus + 1e-9, "Ray can reserve every engine's CPUs on its node"
    assert {p.slots[n].node for n in names} == {0, 1}, "both nodes are used"
    assert all(p.node_id(n) in ("a", "b") for n in names)


def test_an_engine_wider_than_every_node_fails_at_once_naming_the_nodes(write_experiment):
    plan = _plan(write_experiment, FOUR.replace("  eager: {type: hf, num_gpus: 1,", "  eager: {type: hf, num_gpus: 2,"))
    with pytest.raises(PlacementError) as err:
        plan_placement([plan.reference], plan.candidates, Cluster(gpus=2, cpus=4, nodes=TWO_NODES), PlacementSpec(), {})
    message = str(err.value)
    assert "engine 'eager' asks for num_gpus 2" in message and "must be on one node" in message and "2 nodes of 1 GPU + 2 CPUs" in message, message


TWO_NODE_CLUSTER = """\
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
cluster.add_node(num_cpus=2, num_gpus=1)
cluster.wait_for_nodes()
import sys
sys.argv[1] = cluster.address
"""


@pytest.mark.slow
def test_a_two_node_cluster_says_at_once_why_not_then_runs_five_engines(write_experiment, tmp_path):
    """Ray's multi-node test cluster on this machine: two nodes of one advertised GPU and two CPUs. An engine
    wider than every node is one line before anything loads (timed); then five engines run, node by node."""
    too_wide = write_experiment(FOUR.replace("  eager: {type: hf, num_gpus: 1,", "  eager: {type: hf, num_gpus: 2,"), name="wide.yaml")
    five = write_experiment(FIVE, name="five.yaml")
    out = tmp_path / "out"
    stdout, [(wide_code, wide_lines), (code, _)] = _several_runs(
        tmp_path, [[str(too_wide), "--output-dir", str(out), "--run-id", "w"], [str(five), "--output-dir", str(out), "--run-id", "m"]], address="set by the prelude", prelude=TWO_NODE_CLUSTER
    )
    assert wide_code == 2 and "must be on one node" in wide_lines[-1] and "2 nodes of 1 GPU + 2 CPUs" in wide_lines[-1], wide_lines
    assert not (out / "w" / "run.json").exists(), "said before any engine loaded, not after a placement timeout"
    assert code == 0, stdout
    assert "2 nodes of 1 GPU + 2 CPUs" in " ".join(stdout.split()), stdout
    meta = json.loads((out / "m" / "run.json").read_text())
    assert meta["status"] == "complete" and len({e["node"] for e in meta["placement"]["engines"]}) == 2
    assert set(pd.read_parquet(out / "m" / "tokens")["cand_engine"].astype(str)) == {"eager", "bf16", "same", "sdpa"}


def test_an_address_nothing_answers_on_is_one_line_at_once(write_experiment, tmp_path):
    path = write_experiment(FOUR.replace(", num_gpus: 1", "").replace("num_gpus: 1, ", ""))
    out = tmp_path / "out"
    result = _cli(["run", str(path), "--address", "127.0.0.1:1", "--output-dir", str(out), "--run-id", "x"], timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in line, line
    from crossengine.results import RunDir

    assert not (out / "x" / RunDir.LOCK).exists(), "the run folder's lock is not left behind"


@pytest.mark.slow
def test_a_cluster_left_by_ray_start_is_not_joined_and_one_advertised_gpu_holds_three_engines(write_experiment, tmp_path, no_gpu_tokens):
    """`ray start --head` running on the machine: a run without --address starts its own cluster. That run is
    the reported hang besides: three engines asking for a GPU each on a private cluster advertising one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--include-dashboard=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], capture_output=True, env=env, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(1)
        path = write_experiment(FOUR.replace("  same:  {type: hf, num_gpus: 1}\n", ""))
        out = tmp_path / "out"
        result = _cli(["run", str(path), "--num-gpus", "1", "--output-dir", str(out), "--run-id", "g1"], timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        meta = json.loads((out / "g1" / "run.json").read_text())
        assert meta["placement"]["cluster"]["cpus"] == os.cpu_count(), "its own local cluster, not the 1-CPU one ray start left"
        assert "placement: 1 GPUs" in result.stdout
        engines = {e["engine"]: e for e in meta["placement"]["engines"]}
        assert {e["gpus"] for e in engines.values()} == {0.33}
        assert all(meta["engines"][n]["gpu_ids"] == ["0"] for n in engines), "Ray assigned the (advertised) GPU"
        assert all(meta["engines"][n]["device"] == "cpu" for n in engines), "device auto: torch sees no CUDA here"
        expected = no_gpu_tokens[no_gpu_tokens["cand_engine"] != "same"].reset_index(drop=True)
        pd.testing.assert_frame_equal(_tokens(out / "g1"), expected, check_categorical=False)
    finally:
        os.killpg(head.pid, 9)  # that head alone: `ray stop` would stop every Ray cluster on the machine, the suite's too
        head.wait(timeout=60)
