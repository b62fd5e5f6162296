"""Runs a plan: one Ray actor per engine instance, batches streamed through, parts on disk.

The run folder is locked first (before Ray: an unwritable or busy folder fails in a second),
then engines are placed (crossengine/run/placement.py) and started wave by wave. For each batch
the reference prepares the samples (tokenises, expands images), every engine scores them
concurrently, and each candidate compares its scores with the reference's in its own worker
(crossengine/run/worker.py: the reference's logits go worker to worker, never to the driver).
While the engines work on batch n+1 the driver writes batch n's token rows, one Parquet part
per candidate. Logits never outlive their batch and never reach the driver (in score mode
nor do the samples). A batch whose parts all exist is skipped, which
is all a resumed run needs. Summary, nearest table and report are reduced from the Parquet in
a Ray worker. Every stop (Ctrl-C, SIGTERM, a dead worker) keeps the finished batches and
prints the exact command that resumes.
"""

from __future__ import annotations

import shlex
import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

from crossengine.adapters.base import Sample, SampleError
from crossengine.adapters.checkpoint import vocab_size_of
from crossengine.compare.floor import expectations
from crossengine.compare.metrics import WARM_UP_FROM_VOCAB
from crossengine.compare.sampling import check_line
from crossengine.errors import CrossengineError, EngineDied, EngineFailure
from crossengine.experiment.plan import EngineInstance, Plan
from crossengine.experiment.schema import CONTROL_SUFFIX
from crossengine.results import RunDir, write_table
from crossengine.run.cluster import ensure_ray, send_ray_notices_to
from crossengine.run.localise import localise_wave
from crossengine.run.meta import new_run_meta, stage_table
from crossengine.run.modes import MODES, RunContext, raw_batch
from crossengine.run.placement import make_placement
from crossengine.run.pool import EnginePool, one_line
from crossengine.run.progress import engine_progress
from crossengine.run.reducer import reducer_class
from crossengine.run.refit import finish_refits
from crossengine.run.signals import StopSignals
from crossengine.run.transport import choose_transports
from crossengine.run_meta import RunMeta


class Runner:
    """Drives one run; `run()` returns the run folder.

    `address`/`num_gpus` are how the CLI reached Ray; they are part of the resume command
    printed when a run stops early, so that following it continues this very run.
    """

    def __init__(
        self,
        plan: Plan,
        console=None,
        address: str | None = None,
        err_console=None,
        overwrite: bool = False,
        localize_only: bool = False,
        num_gpus: float | None = None,
        cluster=None,
        keeper=None,
        signals: StopSignals | None = None,
    ):
        self.plan = plan
        self.cluster = cluster  # a sweep member: the part of the cluster it may use (placement.Cluster); None: all of it
        self.keeper = keeper  # a sweep's pool.EngineKeeper: engines the previous member left loaded, and where this one leaves its own
        self.localize_only = localize_only
        self.console = console  # results and progress (stdout)
        self.err_console = err_console if err_console is not None else console  # errors and warnings (stderr)
        self.address = address
        self.num_gpus = num_gpus
        self.overwrite = overwrite
        self.signals = signals or StopSignals()  # the CLI's, installed before the plan was made
        self.run_dir = RunDir(plan.run_dir)
        self.errors: list[dict[str, str]] = []
        self.dead: dict[str, str] = {}  # candidate -> why its engine died; the run goes on without it
        self.timings: dict[str, float] = {}
        self.reducer = None  # the run's Reducer actor (reducer_class), alive while the run is
        self.logits_transport: dict[str, str] = {}  # candidate -> object_store | gloo | nccl (run.json)
        self.placement = None
        self.sampling_lines: dict[str, str] = {}  # dump candidate -> its sampling check's line (run.json `sampling_checks`)
        self.expect_failures: list[str] = []  # `expect: bitwise` claims the floors contradict (the CLI exits 1)
        self.expect_notes: list[str] = []  # claims that held, and what their negative controls showed
        self._ref_digests: dict[int, str] = {}  # batch -> digest of the first wave's reference scores
        self.context = RunContext(plan, self.run_dir, self.timings, self.fetch, self.record_error, self.prepare, self.check_reference, self.say_plain, self.warn, self.dead, self.engine_died)
        self.mode = MODES[plan.experiment.mode](self.context)

    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, soft_wrap=True)  # never wrapped: lines hold commands to copy

    def say_plain(self, msg: str) -> None:
        """A line holding user text (prompts, token texts): never read as rich markup."""
        if self.console is not None:
            self.console.print(msg, soft_wrap=True, markup=False, highlight=False)

    def warn(self, msg: str) -> None:
        """An error or warning line, on stderr (Unix convention: a user who redirects the results still sees it);
        never read as markup, since it holds engines' own messages."""
        if self.err_console is not None:
            self.err_console.print(msg, soft_wrap=True, markup=False, highlight=False)

    @property
    def resume_command(self) -> str:

        cmd = ["crossengine", "localize" if self.localize_only else "run", str(self.plan.experiment_path), "--run-id", self.plan.run_id, "--output-dir", str(self.plan.run_dir.parent)]
        if self.address:
            cmd += ["--address", self.address]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", f"{self.num_gpus:g}"]
        return shlex.join(cmd)

    def _check_existing(self) -> RunMeta | None:
        meta = self.run_dir.read_meta()
        if meta is None:
            return None
        if meta.status == "complete" and not self.overwrite:
            raise CrossengineError(f"{self.run_dir.root}: run {self.plan.run_id!r} is complete; pass --overwrite or choose another --run-id")
        if meta.fingerprint != self.plan.fingerprint and not self.overwrite:
            changed = [f for f, digest in self.plan.files.items() if f in meta.files and meta.files[f] != digest]
            what = f"{changed[0]} changed (its content) since this run started" if changed else "the experiment changed since this run started"
            raise CrossengineError(f"{self.run_dir.root}: {what}; pass --overwrite or choose another --run-id")
        if self.overwrite:
            self.run_dir.clear()
            return None
        return meta

    def run(self) -> Path:
        """Lock the run folder (before Ray: an unwritable or busy folder fails in a second), run, unlock."""
        self.run_dir.acquire()
        if self.run_dir.took_over:
            self._say(f"taking over the run folder from a run that no longer holds it ({self.run_dir.took_over})")
        self.signals.install()
        try:
            return self._run()
        except KeyboardInterrupt:
            self.warn(f"interrupted; finished batches are kept. Resume with: {self.resume_command}")
            raise
        finally:
            self.signals.restore()
            self.run_dir.release()

    @property
    def terminated(self) -> bool:
        """Whether the run was stopped by SIGTERM (exit 143) rather than Ctrl-C (130)."""
        return self.signals.received == signal.SIGTERM

    def _run(self) -> Path:
        t0 = time.time()
        resumed = self._check_existing()
        ensure_ray(self.address, self.num_gpus)
        send_ray_notices_to(lambda text: self.run_dir.append_log("Ray's notice", text))
        self.signals.install()  # ray.init replaced the SIGTERM handler with its own
        self.timings["ray_init_s"] = time.time() - t0
        self.reducer = reducer_class().remote()  # its imports happen while the engines load, not after the last batch
        try:
            return self._run_engines(t0, resumed)
        finally:
            import ray

            try:
                ray.kill(self.reducer)
            except Exception:  # noqa: BLE001 - a stopped cluster took it already
                pass
            self.reducer = None

    def _run_engines(self, t0: float, resumed: RunMeta | None) -> Path:

        exp = self.plan.experiment
        always = self.mode.always_loaded()
        self.placement = make_placement(always, [c for c in self.plan.candidates if c not in always], exp.placement, self.cluster)
        if self.console is not None and (self.placement.cluster.gpus or self.placement.notes):
            self.console.print(self.placement.table())
            for note in self.placement.notes:
                self._say(note)
        waves = [[c for c in self.plan.candidates if c in always] + wave for wave in self.placement.waves]
        infos: dict[str, dict] = {}
        started = False
        for w, wave in enumerate(waves):
            t = time.time()
            members = [self.plan.reference, *[m for m in always if m is not self.plan.reference and m not in wave], *wave]
            transports = self._transports(wave)
            pool = EnginePool(
                members,
                self.placement,
                exp.seed,
                self.plan.experiment_path.parent,
                exp.placement,
                self.console,
                self.keeper,
                self.plan.routed(),
                self._warm_vocab(wave),
                transports,
                exp.placement.logits_budget_bytes,
                self.run_dir.append_log,
                self.plan.score_as(),
            )
            self.timings[f"engine_start_s_wave{w}"] = time.time() - t
            self.logits_transport.update(pool.paths)  # as the wave runs: a group that did not form fell back
            self.timings.update({f"{name}.ready_after_s": v for name, v in pool.start_s.items()})
            infos.update(pool.infos)
            try:
                if not started:
                    self.context.vocab_text = pa.array(self.fetch(self.plan.reference.name, pool.call(self.plan.reference.name, "token_texts"), "listing its vocabulary"), pa.string())
                    self._start_meta(infos, resumed)
                    started = True
                if not self.localize_only:
                    self._run_wave(pool, wave, w)
                if exp.localize is not None:
                    localise_wave(self, pool)
                for name, t_engine in pool.engine_timings(skip=self.dead).items():
                    self.timings.update({f"{name}.{k}": v for k, v in t_engine.items()})
                finish_refits(self, pool, wave)
            except KeyboardInterrupt:
                pool.close(graceful=False)  # a stop is prompt: the workers are killed, not asked to finish
                raise
            finally:
                t = time.time()
                pool.close(dead=self.dead)
                self.timings["engine_stop_s"] = self.timings.get("engine_stop_s", 0.0) + time.time() - t
        if self.localize_only:
            self._finish_meta(infos)
            return self.run_dir.root
        t = time.time()
        summary, nearest, alarms, floors, routing = self._reduce()
        write_table(self.run_dir.summary, pa.Table.from_pandas(summary, preserve_index=False))
        if not floors.empty:
            write_table(self.run_dir.root / "noise.parquet", pa.Table.from_pandas(floors, preserve_index=False))
        if routing is not None:
            write_table(self.run_dir.root / "routing.parquet", pa.Table.from_pandas(routing, preserve_index=False))
        self._check_expectations(floors)
        for name, (reading, fitted) in self.context.sampling.items():  # each dump's `sampling:` claim against the reference's logits
            self.sampling_lines[name] = check_line(name, fitted, reading)
            self.say_plain(self.sampling_lines[name])
        if nearest is not None:
            write_table(self.run_dir.root / "nearest.parquet", pa.Table.from_pandas(nearest, preserve_index=False))
        write_table(self.run_dir.root / "alarms.parquet", pa.Table.from_pandas(alarms, preserve_index=False))
        self.timings["summary_s"] = time.time() - t
        self.timings["total_s"] = time.time() - t0
        self._finish_meta(infos)
        self._write_report()
        return self.run_dir.root

    def _check_expectations(self, floors: pd.DataFrame) -> None:
        """`expect: bitwise` claims against the floors measured: a failure names the first token that differs (the run exits 1)."""
        controls = {i.name: f"{i.name}{CONTROL_SUFFIX}" for i in self.plan.instances if i.spec.expect}
        claims = {name: control if control in self.plan.names() else None for name, control in controls.items()}
        if claims and not self.dead:
            self.expect_failures, self.expect_notes = expectations(floors, claims)

    def _write_report(self) -> None:
        """report.html, built in a Ray worker like the summary; a failure is a note, never a failed run."""
        import ray

        try:
            path = ray.get(self.reducer.report.remote(self.run_dir.root), timeout=600)
            self._say(f"report: {path}")
        except Exception as exc:  # noqa: BLE001
            self.warn(f"note: report.html was not written ({one_line(exc)}); try crossengine report {self.run_dir.root} --html")

    def _reduce(self):
        """Summary and nearest-engine tables, computed in a Ray worker from the token Parquet:
        the driver never holds a run's token rows, only these small tables."""
        expected = [(c.cand_engine, c.variant) for c in self.plan.candidates]
        exp = self.plan.experiment
        dense = self.plan.reference.is_dense()
        return self.fetch("summary", self.reducer.reduce.remote(str(self.run_dir.root), self.plan.reference.name, expected, exp.alarms, dense, exp.routing), "summarising the run")

    # ---------------------------------------------------------------- engine calls

    def fetch(self, engine: str, ref, doing: str):
        """ray.get of one engine's work; a dead or raising worker becomes one line with the resume command."""
        import ray
        from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except (RayActorError, RayTaskError, OutOfMemoryError) as exc:  # Ray's memory monitor kills the worker: it died
            cause = getattr(exc, "cause", None)
            died = isinstance(exc, (RayActorError, OutOfMemoryError)) or bool(getattr(cause, "dead", False))
            head = f"engine {engine!r} {'died' if died else 'failed'} while {doing}: {one_line(exc)}"
            log = self.run_dir.log_exception(head, exc)
            if getattr(cause, "output", ""):  # what its processes printed: the root cause in full
                self.run_dir.append_log(f"engine {engine!r}: traceback and output", cause.output)
            error = EngineDied if died else EngineFailure
            raise error(f"{head}; finished batches are kept (traceback: {log}). Resume with: {self.resume_command}") from None

    def engine_died(self, engine: str, exc: EngineDied) -> None:
        """A candidate whose engine died: said once, recorded in run.json, left out of later batches."""
        self.dead[engine] = str(exc)
        self.errors.append({"sample_id": "", "engine": engine, "error": str(exc)})
        self.warn(f"error: {exc}; the other engines go on")

    def prepare(self, pool: EnginePool, indices: list[int], doing: str) -> list[Sample]:
        """Tokenise and expand samples on the reference, waiting; a sample it cannot prepare is reported and skipped."""
        ref = self.plan.reference.name
        prepared = self.fetch(ref, pool.call(ref, "prepare", raw_batch(self.plan, indices, self.record_error)), doing)
        for item in prepared:
            if isinstance(item, SampleError):
                self.record_error(ref, item)
        return [s for s in prepared if not isinstance(s, SampleError)]

    # --------------------------------------------------------------------- batches

    def _run_wave(self, pool: EnginePool, wave: list[EngineInstance], w: int) -> None:
        """Stream the batches through one wave; a pipelined mode submits batch n+1 before writing batch n."""
        mode, exp = self.mode, self.plan.experiment
        todo = [(b, idx, owed) for b, idx in enumerate(self.plan.batches) if (owed := mode.owed(wave, b))]
        progress = engine_progress(self.console, [self.plan.reference, *wave], len(exp.samples), self.plan, self.run_dir)
        t = time.time()
        ahead = lambda n: todo[n + 1][:2] if n + 1 < len(todo) else None  # noqa: E731 - the next batch (number, samples)
        submit = lambda n: mode.submit(pool, *todo[n], ahead=ahead(n)) if n < len(todo) else None  # noqa: E731
        with progress:
            pending = submit(0)
            for n in range(len(todo)):
                current = pending
                if mode.pipelined:  # engines start on the next batch while this one is written
                    pending = submit(n + 1)
                mode.write(current, w, progress)
                if not mode.pipelined:
                    pending = submit(n + 1)
        self.timings["scoring_s"] = self.timings.get("scoring_s", 0.0) + time.time() - t

    def _transports(self, wave: list[EngineInstance]) -> tuple[dict[str, str], str | None]:
        """How the reference's logits reach each candidate of this wave (run/transport.py); said where a requested
        tensor path is not taken, recorded in run.json."""
        exp, ref = self.plan.experiment, self.plan.reference
        paths, backend, note = choose_transports(exp.placement.logits_transport, exp.mode, ref, wave, self._full_vocab(wave), lambda i: self.placement.slots[i.name].gpus >= 1)  # NCCL: a GPU per rank
        if note:
            self.warn(note)
        return paths, backend

    def _warm_vocab(self, wave: list[EngineInstance]) -> dict[str, int]:
        """Candidates whose full-vocabulary metric kernel is worth compiling while they load, with the vocabulary
        (the reference's config.json): those comparing full logits of a real vocabulary."""
        full = [] if self.localize_only else self._full_vocab(wave)
        vocab = vocab_size_of(self.plan.reference.model_path, self.plan.reference.spec.revision) if full else None
        return {c.name: vocab for c in full} if vocab is not None and vocab >= WARM_UP_FROM_VOCAB else {}

    def _full_vocab(self, wave: list[EngineInstance]) -> list[EngineInstance]:
        """The wave's candidates compared with the reference over the full vocabulary (both hand over full logits)."""
        exp, ref = self.plan.experiment, self.plan.reference
        return [c for c in wave if exp.full_vocab and ref.full_logits and c.full_logits]

    def check_reference(self, b: int, w: int, digest: str) -> None:
        """Every wave re-runs the reference: its scores must be bitwise those of the first wave."""
        first = self._ref_digests.setdefault(b, digest)
        if first != digest:
            raise CrossengineError(
                f"the reference {self.plan.reference.name!r} scored batch {b} differently in wave {w} than in the first wave "
                "(not bitwise identical): its engine is not deterministic, so candidates of different waves are not comparable; "
                "run them in one wave (more GPUs, or placement.gpu_memory_gb) or make the reference deterministic"
            )

    def record_error(self, engine: str, err: SampleError) -> None:
        entry = {"sample_id": err.sample_id, "engine": engine, "error": err.message}
        if entry not in self.errors:
            self.errors.append(entry)
            where = ""
            if err.detail:  # an unexpected exception: its traceback goes to the run's log
                log = self.run_dir.append_log(f"engine {engine!r}, sample {err.sample_id}: {err.message}", err.detail)
                where = f"; traceback: {log}"
            self.warn(f"error: engine {engine!r}: {err} (sample skipped{where})")

    def _start_meta(self, infos: dict, resumed: RunMeta | None) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if resumed is None:
            meta = new_run_meta(self.plan, now)
        else:
            meta = resumed
            meta.resumed_at.append(now)
            self._say(f"resuming run {self.plan.run_id}: finished batches are skipped")
        meta.status, meta.engines, meta.placement = "running", infos, self.placement.to_json()
        self.run_dir.write_meta(meta)

    def _finish_meta(self, infos: dict) -> None:
        meta = self.run_dir.read_meta()
        assert meta is not None, "run.json is written when the engines start"
        # an engine that died leaves batches owed: the run is resumable, not complete
        meta.status, meta.engines, meta.timings, meta.stages = ("incomplete" if self.dead else "complete"), infos, self.timings, stage_table(self.timings)
        meta.sampling_checks = {**meta.sampling_checks, **self.sampling_lines}
        meta.logits_transport = {**meta.logits_transport, **self.logits_transport}  # a resumed run keeps what earlier batches used
        meta.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta.errors = meta.errors + self.errors
        if self.expect_failures or self.expect_notes:
            meta.expectations = {"failed": self.expect_failures, "notes": self.expect_notes}
        self.run_dir.write_meta(meta)
