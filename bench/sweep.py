"""A sweep's wall time vs running its members one after another, each as its own `crossengine run`.

    python bench/sweep.py [--sweep experiments/sweep.yaml]

Both sides run the same members to completion from the CLI, as a user would, in fresh
processes: the sweep once (one Ray cluster for every member, members side by side where the
cluster holds them), the members one `crossengine run` each (a Ray cluster and a process per
member). Wall time from the shell's view, fixtures already built. On a CPU-only machine the
sweep runs one member at a time too (concurrent members would only split the same cores), so
its saving here is the per-member start of Ray and of the process; docs/benchmarks.md gives the
8-GPU-node arithmetic.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import REPO, tmpdir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default=str(REPO / "experiments" / "sweep.yaml"))
    args = ap.parse_args()
    from crossengine.experiment.fixtures import DRIFT_STEPS, ensure_fixture
    from crossengine.experiment.sweep import load_sweep

    for k in range(1, DRIFT_STEPS + 1):
        ensure_fixture(f"tiny-text-step{k}")
    sweep = load_sweep(args.sweep)
    d = tmpdir()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crossengine.cli", "sweep", args.sweep, "--output-dir", str(d / "sweep")], check=True, capture_output=True)
    swept = time.perf_counter() - t
    t = time.perf_counter()
    for m in sweep.members():
        subprocess.run([sys.executable, "-c", _RUN_ONE, str(sweep.base), str(d / "one"), m.name, repr(m.overrides)], check=True, capture_output=True)
    serial = time.perf_counter() - t
    n = len(sweep.members())
    print(f"{n} members: sweep {swept:.1f} s, one `crossengine run` after another {serial:.1f} s ({serial / swept:.2f}x); {(serial - swept) / n:.1f} s saved per member")


# One member as `crossengine run` would run it: its own process, its own local Ray cluster.
_RUN_ONE = """
import ast, sys
from pathlib import Path
from crossengine.experiment.load import load_experiment
from crossengine.experiment.plan import make_plan
from crossengine.run.runner import Runner
base, out, name, overrides = sys.argv[1], sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4])
plan = make_plan(load_experiment(base, overrides), Path(base), run_id=name, output_dir=Path(out))
Runner(plan).run()
"""


if __name__ == "__main__":
    main()
