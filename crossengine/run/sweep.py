"""`crossengine sweep`: the members of a sweep run concurrently as far as one Ray cluster holds them.

Contract. Each member is an ordinary run (`Runner`) in `<output_dir>/<sweep>/<member>/` on the
sweep's one cluster, in a thread of this driver. A member starts when its placement fits in
what the running members leave free (node by node: GPUs, and CPU shares), planned against
that remainder so that Ray never waits on a node another member holds; a member that fits
nowhere beside the others waits for the cluster to empty and then runs on all of it (waves
as usual). On a cluster without GPUs the engines of concurrent members would only split the
same cores, so members run one at a time unless `parallel` says otherwise.

A finished member (its run.json says complete) is skipped, so a sweep stopped by Ctrl-C, a
kill or a crash resumes by running the same command; an unfinished member resumes its own
run. A member that finished with failed samples is not run again (they would fail the same
way) and stays `errors` in the index, so a rerun exits 1 as the first run did. A member that fails (a bad model, an engine error) is one line and the sweep goes on;
the CLI exits 1 at the end. Then `index.parquet` (one row per member × candidate × split,
the axes' labels as columns) and `report.html` (each metric against each axis) are written.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from crossengine.compare.gates import check_gates
from crossengine.errors import CrossengineError
from crossengine.experiment.load import load_experiment
from crossengine.experiment.plan import make_plan
from crossengine.experiment.schema import PlacementSpec
from crossengine.experiment.sweep import Member, Sweep
from crossengine.identity import BASE
from crossengine.results import write_table
from crossengine.run.cluster import ensure_ray
from crossengine.run.placement import Node, PlacementError, cluster_view, make_placement
from crossengine.run.pool import EngineKeeper, one_line
from crossengine.run_meta import RunMeta

POLL_S = 0.1


@dataclass
class Outcome:
    member: Member
    status: str  # complete | skipped (finished before) | errors (finished, some samples failed) | failed | incomplete
    message: str = ""
    seconds: float = 0.0
    run_dir: Path | None = None
    gates_broken: int = 0  # the member's broken gates (its `gates:`, --fail-on-alarm), said and in the index


@dataclass
class _Running:
    member: Member
    demand: dict[int, tuple[float, float]]  # node index -> (GPUs, CPUs) the member holds
    started: float
    runner: Any  # its run.Runner
    thread: threading.Thread | None = None  # runs the runner
    failure: BaseException | None = None  # what its run raised, if it did


class SweepRunner:
    def __init__(self, sweep: Sweep, output_dir: Path | None = None, address: str | None = None, num_gpus: float | None = None, parallel: int | None = None, console=None, fail_on_alarm: bool = False):
        self.fail_on_alarm = fail_on_alarm
        self.sweep = sweep
        self.root = Path(output_dir or sweep.spec.output_dir).absolute() / sweep.name
        self.address, self.num_gpus = address, num_gpus
        self.parallel = parallel or sweep.spec.parallel
        self.console = console
        self.outcomes: dict[str, Outcome] = {}
        self.keeper: EngineKeeper | None = None
        self._plans: dict[str, Any] = {}  # member -> its plan, made once however long it waits for room

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, soft_wrap=True, markup=False, highlight=False)

    # ------------------------------------------------------------------ members

    def plan(self, member: Member):
        """The member's plan: its base experiment with its axes' values, validated like any experiment."""

        if member.name not in self._plans:
            exp = load_experiment(self.sweep.base, member.overrides)
            self._plans[member.name] = make_plan(exp, self.sweep.base, run_id=member.name, output_dir=self.root)
        return self._plans[member.name]

    def run(self) -> list[Outcome]:

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CrossengineError(f"cannot write the sweep's results to {self.root}: {exc.strerror or exc}") from None
        members = self.sweep.members()
        pending = []
        for m in members:
            meta = RunMeta.read(self.root / m.name) if (self.root / m.name / "run.json").exists() else None
            failed = len({e["sample_id"] for e in meta.errors if e.get("sample_id")}) if meta is not None else 0
            if meta is not None and meta.status == "complete" and failed:
                # a finished member's failed samples fail again the same way: kept as `errors` (and the exit code 1) until fixed
                note = f"finished before with {failed} failed sample(s) (see its run.json); remove {self.root / m.name} to run it again"
                self.outcomes[m.name] = Outcome(m, "errors", note, run_dir=self.root / m.name)
                self.say(f"member {m.name}: {note}")
            elif meta is not None and meta.status == "complete":
                broken = len(meta.gates.get("broken", []))  # judged when it ran: kept (and the exit code 3) like errors
                self.outcomes[m.name] = Outcome(m, "skipped", "finished before", run_dir=self.root / m.name, gates_broken=broken)
                self.say(f"member {m.name}: finished before, skipped{f' ({broken} gate(s) broken then)' if broken else ''}")
            else:
                pending.append(m)
        ensure_ray(self.address, self.num_gpus)
        total = cluster_view(PlacementSpec())
        # one member after another (no GPUs, no --parallel): an engine the next member shares stays loaded for it
        self.keeper = EngineKeeper() if not total.gpus and not self.parallel else None
        running: dict[str, _Running] = {}
        room_changed = True  # a waiting member can only start once a running one has finished
        while pending or running:
            for m in list(pending) if room_changed else []:
                if self.parallel and len(running) >= self.parallel:
                    break
                started = self._try_start(m, total, running)
                if started is not None:
                    pending.remove(m)
                    if started:
                        running[m.name] = started
            room_changed = False
            time.sleep(POLL_S)
            for name, r in list(running.items()):
                if not r.thread.is_alive():
                    r.thread.join()
                    self._finish(r)
                    del running[name]
                    room_changed = True
            room_changed = room_changed or not running  # members that failed at once left the cluster empty
        if self.keeper is not None:
            self.keeper.close()
        self.write_index()
        return [self.outcomes[m.name] for m in members]

    def _try_start(self, m: Member, total, running: dict[str, _Running]):
        """A started member, False (it failed at once: reported), or None (it waits for room)."""
        from crossengine.run.runner import Runner

        cpu_only = not total.gpus
        if running and cpu_only and not self.parallel:
            return None  # its engines would only split the cores the running member uses
        try:
            plan = self.plan(m)
        except CrossengineError as exc:
            self._fail(m, str(exc), 0.0)
            return False
        view = self._free(total, running) if running or (cpu_only and self.parallel) else None  # None: the whole cluster
        runner = Runner(plan, console=None, address=self.address, num_gpus=self.num_gpus, cluster=view, keeper=self.keeper)
        always = runner.mode.always_loaded()
        try:
            placement = make_placement(always, [c for c in plan.candidates if c not in always], plan.experiment.placement, view)
        except PlacementError as exc:
            if running:
                return None  # it may fit once the others finish
            self._fail(m, str(exc), 0.0)
            return False
        if running and len(placement.waves) > 1:
            return None  # beside the others it would need waves: wait for room instead
        r = _Running(m, _demand(placement, [i.name for i in plan.instances]), time.time(), runner)
        r.thread = threading.Thread(target=self._run_member, args=(r,), name=f"sweep-{m.name}", daemon=True)
        r.thread.start()
        self.say(f"member {m.name}: started ({', '.join(f'{k}={v}' for k, v in m.labels.items())})")
        return r

    def _free(self, total, running: dict[str, _Running]):
        """What the running members leave of each node (a CPU-only cluster with `parallel`: its cores split evenly)."""

        if not total.gpus and self.parallel:
            nodes = tuple(Node(n.id, 0.0, n.cpus / self.parallel) for n in total.node_list)
        else:
            nodes = tuple(
                Node(n.id, max(0.0, n.gpus - sum(r.demand.get(i, (0, 0))[0] for r in running.values())), max(0.0, n.cpus - sum(r.demand.get(i, (0, 0))[1] for r in running.values())))
                for i, n in enumerate(total.node_list)
            )
        return replace(total, gpus=sum(n.gpus for n in nodes), cpus=sum(n.cpus for n in nodes), nodes=nodes if total.nodes else ())

    @staticmethod
    def _run_member(r: _Running) -> None:
        try:
            r.runner.run()
        except BaseException as exc:  # noqa: BLE001 - a member's failure is its outcome, never the sweep's
            r.failure = exc

    def _finish(self, r: _Running) -> None:

        runner = r.runner
        seconds = time.time() - r.started
        failure = r.failure
        if failure is not None:
            self._fail(r.member, one_line(failure) if not isinstance(failure, CrossengineError) else str(failure), seconds)
            return
        failed = len({e["sample_id"] for e in runner.errors if e["sample_id"]})  # samples, whichever engines failed them
        status = "incomplete" if runner.dead else ("errors" if failed else "complete")
        note = f"{failed} sample(s) failed (see its run.json)" if failed else ("an engine died: rerun to resume it" if runner.dead else "")
        gates = runner.plan.experiment.gates
        broken = check_gates(runner.run_dir.root, gates, self.fail_on_alarm) if (gates or self.fail_on_alarm) and runner.run_dir.summary.exists() else []
        self.outcomes[r.member.name] = Outcome(r.member, status, note, seconds, runner.run_dir.root, len(broken))
        self.say(f"member {r.member.name}: {status} in {seconds:.1f} s{'; ' + note if note else ''}{f'; {len(broken)} gate(s) broken' if broken else ''}")
        for line in broken:
            self.say(f"member {r.member.name}: {line}")

    def _fail(self, m: Member, message: str, seconds: float) -> None:
        self.outcomes[m.name] = Outcome(m, "failed", message, seconds, None)
        self.say(f"member {m.name}: failed: {message}")

    # ------------------------------------------------------------------ index

    def write_index(self) -> pd.DataFrame:
        """index.parquet: every member's summary rows with the axes' labels, member, status and run folder;
        a member without a summary (failed) is one row with its status and message."""
        frames = []
        for m in self.sweep.members():
            o = self.outcomes.get(m.name) or Outcome(m, "pending")
            head = {"member": m.name, **m.labels, "status": o.status, "message": o.message, "gates_broken": o.gates_broken, "run_dir": str(self.root / m.name)}
            summary_path = self.root / m.name / "summary.parquet"
            if o.status != "failed" and summary_path.exists():
                df = pd.read_parquet(summary_path)
                for c in df.columns:
                    if isinstance(df[c].dtype, pd.CategoricalDtype):
                        df[c] = df[c].astype(str)
                frames.append(pd.DataFrame({k: [v] * len(df) for k, v in head.items()}).join(refit_columns(df, self.root / m.name)))
            else:
                frames.append(pd.DataFrame([head]))
        index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        write_table(self.root / "index.parquet", pa.Table.from_pandas(index, preserve_index=False))
        return index


def refit_columns(summary: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """A member's summary with, for each `refit:` candidate, its last step against a fresh load (run.json `refit`):
    refit_bitwise, refit_max_abs_diff, refit_stale; other candidates' rows hold nulls."""
    try:
        refit = json.loads((run_dir / "run.json").read_text()).get("refit") or {}
    except (OSError, ValueError):
        refit = {}
    if not refit:
        return summary
    last = {name: steps[-1] for name, steps in refit.items() if steps}
    name = summary["cand_engine"].astype(str).where(summary["variant"].astype(str) == BASE, summary["variant"].astype(str))
    out = summary.copy()
    for col, key in (("refit_bitwise", "bitwise"), ("refit_max_abs_diff", "max_abs_diff"), ("refit_stale", "stale")):
        out[col] = name.map(lambda n, key=key: last[n][key] if n in last else None)
    return out


def _demand(placement, names: list[str]) -> dict[int, tuple[float, float]]:
    """Per node, the GPUs and CPU reservations a member's engines hold (every wave counted: an upper bound)."""
    out: dict[int, tuple[float, float]] = {}
    for name in names:
        slot = placement.slots[name]
        cpu = min(1.0, placement.cpu_share(name, names))
        g, c = out.get(slot.node, (0.0, 0.0))
        out[slot.node] = (g + slot.gpus, c + cpu)
    return out
