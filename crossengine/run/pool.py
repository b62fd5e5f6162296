"""The engines of one wave as Ray actors: one actor per engine instance, each in its own
environment where the experiment names one, the adapter imported inside the actor.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crossengine.adapters import user_code_paths
from crossengine.errors import CrossengineError
from crossengine.experiment.plan import EngineInstance
from crossengine.run.transport import OBJECT_STORE
from crossengine.run.worker import worker_class


def runtime_env(inst: EngineInstance, base: Path, logits_budget: int | None = None) -> dict[str, Any]:
    """Ray runtime_env: the driver's import path always; pip or another interpreter where the engine names one.
    Under a logits budget, glibc returns every freed block over 1 MiB to the system at once: by default it raises
    that threshold to the largest block freed and keeps later ones in its heap, so a worker that frees each
    block of logits after use would still grow by several (measured: 193 MB peak vs 22 MB for 8 MB blocks)."""
    env = inst.spec.env

    # user code named as "module:function" or an engine's "module:Class" imports from where the driver imports it
    paths = [*user_code_paths(base), os.environ.get("PYTHONPATH", "")]
    out: dict[str, Any] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}}
    if logits_budget:
        out["env_vars"]["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    if env is None:
        return out
    if env.pip:
        out["pip"] = list(env.pip)
    if env.python:
        out["py_executable"] = env.python  # made absolute by plan.resolve_python
    out["env_vars"].update(env.env_vars)
    return out


def _attempt(fn, *args, **kwargs):
    """fn(...)'s result, or the exception it raised (for a call made on a watched thread, or best effort)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return exc


def one_line(exc: BaseException) -> str:
    """The last meaningful line of a (possibly Ray-wrapped) exception; Ray's advice paragraphs left out."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    if any("low on memory" in line or "Memory on the node" in line for line in text):  # Ray's out-of-memory kill
        usage = next((line.strip() for line in text if line.strip().startswith("Memory on the node")), "")
        return f"killed by Ray for lack of memory{': ' + usage if usage else ''}"  # the fact, not Ray's page of advice
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("Traceback", "  File", "File "))]
    return lines[-1] if lines else type(cause).__name__


class EnginePool:
    """The live actors of one wave, created together so their models load in parallel.

    Every wait has a limit: placement (`placement.timeout_s`, or `env_timeout_s` for an
    engine whose environment is built first) and loading (`load_timeout_s`); each failure
    is one line naming the engine.
    """

    def __init__(
        self,
        instances: list[EngineInstance],
        placement,
        seed: int,
        base: Path,
        timeouts,
        console=None,
        keeper: EngineKeeper | None = None,
        routing: bool | set[str] = False,
        warm: dict[str, int] | None = None,
        transports: tuple[dict[str, str], str | None] = ({}, None),
        logits_budget: int | None = None,
        log: Callable[[str, str], Path] | None = None,
        score_as: dict | None = None,
    ):
        self.log = log  # the run's log (RunDir.append_log): where a failed load's traceback and output go
        worker = worker_class()
        members = [i.name for i in instances]
        cpus = {name: placement.cpu_share(name, members) for name in members}  # its part of its node's CPUs
        self.instances = instances
        self.actors: dict[str, Any] = {}
        self.infos: dict[str, dict] = {}
        self.start_s: dict[str, float] = {}
        self.console = console
        self.keeper = keeper
        self.paths, self.backend = transports  # candidate -> how the reference's logits reach it (run/transport.py)
        self.group = None  # the Ray Direct Transport collective group of this wave, where it has one
        slots = placement.slots
        routed = set(members) if routing is True else set(routing or ())  # the engines that record routing (Plan.routed)
        self.keys = {
            i.name: EngineKeeper.key(i, seed, slots[i.name].gpus, placement.node_id(i.name), cpus[i.name]) + f"|routing={i.name in routed}|budget={logits_budget}|as={score_as}" for i in instances
        }
        if keeper is not None:
            keeper.evict_except(set(self.keys.values()))  # kept engines no member of this wave uses give their resources back first
            for inst in instances:
                kept = keeper.take(self.keys[inst.name])
                if kept is not None:
                    self.actors[inst.name], self.infos[inst.name] = kept
                    self.start_s[inst.name] = 0.0
        t0 = time.time()
        try:
            for inst in [i for i in instances if i.name not in self.actors]:
                # its part of its node's CPUs, pinned to the node the plan chose: Ray never has to find room the plan did not see
                options: dict[str, Any] = {"num_cpus": min(1.0, cpus[inst.name]), "num_gpus": slots[inst.name].gpus, "runtime_env": runtime_env(inst, base, logits_budget)}
                node = placement.node_id(inst.name)
                if node:
                    from ray.util.scheduling_strategies import (
                        NodeAffinitySchedulingStrategy,
                    )

                    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
                self.actors[inst.name] = worker.options(**options).remote()
            fresh = [i for i in instances if i.name not in self.infos]
            for inst in fresh:
                self._await_placement(inst, placement, timeouts, t0)
            # an engine that takes its GPU memory up front (vLLM) loads first where engines share a GPU
            first = [i for i in fresh if placement.shares_gpus and i.traits.loads_first]
            for group in (first, [i for i in fresh if i not in first]):
                loads = {
                    i.name: self.actors[i.name].load.remote(
                        i.spec.type,
                        i.spec.model_dump(mode="json"),
                        i.model_path,
                        i.name,
                        seed,
                        max(1, int(cpus[i.name])),
                        slots[i.name].gpu_memory_utilization,
                        i.name in routed,
                        (warm or {}).get(i.name),
                        logits_budget,
                        score_as,
                    )
                    for i in group
                }
                for inst in group:
                    self.infos[inst.name] = self._get(inst, loads[inst.name], timeouts.load_timeout_s, "failed to load")
                    self.start_s[inst.name] = time.time() - t0
            if self.backend:
                self._join_group(instances[0].name, timeouts.timeout_s)
        except BaseException:
            self.close()
            raise

    def _join_group(self, reference: str, timeout: float) -> None:
        """One collective group (Ray Direct Transport) over the reference and the candidates that take its tensors;
        where it does not form within `timeout` (placement.timeout_s) or fails, the object store carries the logits."""
        from ray.experimental.collective import create_collective_group

        members = [self.actors[reference], *(self.actors[n] for n, path in self.paths.items() if path == self.backend)]
        done: list = []
        worker = threading.Thread(target=lambda: done.append(_attempt(create_collective_group, members, backend=self.backend)), daemon=True)
        worker.start()
        worker.join(timeout)
        outcome = done[0] if done else TimeoutError(f"not formed within {timeout:g}s (placement.timeout_s)")
        if isinstance(outcome, BaseException):  # the same numbers go through the object store: said, never a lost run
            if self.console is not None:
                self.console.print(
                    f"logits_transport {self.backend}: the collective group of {reference!r} and its candidates did not form ({one_line(outcome)}); the object store carries the logits instead",
                    markup=False,
                    highlight=False,
                )
            self.paths = {name: OBJECT_STORE for name in self.paths}
            self.backend = None
            return
        self.group = outcome

    def _await_placement(self, inst: EngineInstance, placement, timeouts, t0: float) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RuntimeEnvSetupError

        env = inst.spec.env
        what = f"pip: {', '.join(env.pip)}" if env and env.pip else (f"python: {env.python}" if env else "")
        limit = timeouts.env_timeout_s if env else timeouts.timeout_s
        status = self.console.status(f"building the environment of {inst.name} ({what})") if env and self.console else contextlib.nullcontext()
        try:
            with status:
                ray.get(self.actors[inst.name].ping.remote(), timeout=max(1.0, limit - (time.time() - t0)))
        except GetTimeoutError:
            free = ray.available_resources()
            slot = placement.slots[inst.name]
            building = f" (building its environment, {what}, took too long: raise placement.env_timeout_s)" if env else ""
            raise CrossengineError(
                f"engine {inst.name!r} was not placed within {limit:g}s{building}: it needs {slot.gpus:g} GPU; the cluster has "
                f"{free.get('GPU', 0):g} of {placement.cluster.gpus:g} GPUs and {free.get('CPU', 0):g} of {placement.cluster.cpus:g} CPUs free "
                "(a busy cluster? free it, lower num_gpus, or raise placement.timeout_s)"
            ) from None
        except RuntimeEnvSetupError as exc:
            raise CrossengineError(f"engine {inst.name!r}: its environment ({what}) could not be built: {one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise CrossengineError(f"engine {inst.name!r} ({inst.spec.type}) failed to start: {one_line(exc)}") from None
        if env and self.console:
            self.console.print(f"environment of {inst.name} ready ({what}) after {time.time() - t0:.1f}s", highlight=False)

    def _get(self, inst: EngineInstance, ref, timeout: float, doing: str):
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise CrossengineError(f"engine {inst.name!r} ({inst.spec.type}) did not finish loading within {timeout:g}s (placement.load_timeout_s)") from None
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one line naming the engine
            where = ""
            if self.log is not None:  # the whole story (traceback, the engine's own output) stays in the run folder
                cause = getattr(exc, "cause", None)
                detail = getattr(cause, "output", "") or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                where = f" (traceback and the engine's output: {self.log(f'engine {inst.name!r} {doing}', detail)})"
            raise CrossengineError(f"engine {inst.name!r} ({inst.spec.type}) {doing}: {one_line(exc)}{where}") from None

    def call(self, name: str, method: str, *args):
        """An ObjectRef for `engine.method(*args)` in engine `name`'s worker."""
        return self.actors[name].call.remote(method, *args)

    def score_reference(self, name: str, batch, top_k: int, full_vocab: bool, noise=None, key: str = ""):
        """(ObjectRef of the reference's scores, ObjectRef of its ReferenceCheck); nothing is fetched. With a tensor
        transport the scores are an RDT object the candidates' compare calls receive as an argument. `key`: the
        batch, for `release` (long samples' logits are held in the reference's worker until then)."""
        actor = self.actors[name]
        if self.backend is None:
            return actor.score_reference.remote(batch, top_k, full_vocab, noise, False, key)
        out = actor.score_reference.options(num_returns=1, tensor_transport=self.backend).remote(batch, top_k, full_vocab, noise, True, key)
        return out, actor.take_reference_check.remote()

    def release(self, name: str, key: str) -> None:
        """Every candidate has compared batch `key`: the reference drops what it held for it."""
        self.actors[name].release.remote(key)

    def score_and_compare(self, name: str, batch, ref_out, top_k: int, full_vocab: bool, options, raw=None, noise=None):
        """ObjectRef of the candidate's `compare.Part` for one batch; `ref_out` goes worker to worker. Two calls: the
        engine scores on the worker's main thread, its compare thread turns the scores into a Part (see EngineWorker)."""
        key = uuid.uuid4().hex
        actor = self.actors[name]
        direct = self.paths.get(name, OBJECT_STORE) != OBJECT_STORE  # an RDT object goes as an argument, never nested
        actor.score_for_compare.remote(key, batch, None if direct else [ref_out], top_k, full_vocab, raw, noise)
        return actor.compare_scored.remote(key, batch, ref_out if direct else [ref_out], options, direct)

    def capture(self, name: str, batch, patterns, max_positions: int, raw=None):
        """ObjectRef of the per-sample module captures of engine `name` (see the worker's `capture`)."""
        return self.actors[name].capture.remote(batch, patterns, max_positions, raw)

    def engine_timings(self, skip=()) -> dict[str, dict[str, float]]:
        """Each live engine's own timings (run.json); an engine in `skip` (dead) or that cannot answer has none."""
        import ray

        out = {}
        for name in self.actors:
            if name in skip:
                continue
            try:
                out[name] = ray.get(self.actors[name].timings.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - timings are a report, never a reason to fail a finished run
                pass
        return out

    def close(self, graceful: bool = True, dead=()) -> None:
        """Ask each loaded engine to release its model, then kill its worker; `graceful=False` (a stop) kills at once.
        With a keeper, loaded engines that did not die (`dead`) are handed to it instead, still loaded."""
        import ray

        if self.group is not None:  # a kept engine joins the next wave's group: an actor can be in one per backend
            from ray.experimental.collective import destroy_collective_group

            _attempt(destroy_collective_group, self.group)
            self.group = None
        for name, actor in self.actors.items():
            if graceful and self.keeper is not None and name in self.infos and name not in dead:
                self.keeper.give(self.keys[name], actor, self.infos[name])
                continue
            if graceful and name in self.infos:
                try:
                    ray.get(actor.shutdown.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - best effort; the actor is killed next
                    pass
            ray.kill(actor)
        self.actors = {}


class EngineKeeper:
    """Loaded engines kept between the runs of one process (a sweep's members, one after another): an
    engine whose spec, model, seed and share of its node match one a finished run left is handed to
    the next run still loaded, instead of being started again (a fresh worker, imports, a model load).

    Only idle engines are kept here; `take` hands one to a single pool at a time, so concurrent runs
    never share a worker. A pool evicts kept engines it does not use before starting its own, so an
    idle engine never holds resources a new one waits for."""

    def __init__(self):
        self.idle: dict[str, tuple[Any, dict]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def key(inst: EngineInstance, seed: int, gpus: float, node: str, cpus: float) -> str:

        return json.dumps([inst.name, inst.spec.model_dump(mode="json"), inst.model_path, seed, gpus, node, round(cpus, 3)], sort_keys=True, default=str)

    def take(self, key: str):
        with self.lock:
            return self.idle.pop(key, None)

    def give(self, key: str, actor, info: dict) -> None:
        with self.lock:
            previous = self.idle.get(key)
            self.idle[key] = (actor, info)
        if previous is not None:
            _kill(previous[0])

    def evict_except(self, keys: set[str]) -> None:
        with self.lock:
            gone = [k for k in self.idle if k not in keys]
            actors = [self.idle.pop(k)[0] for k in gone]
        for actor in actors:
            _kill(actor, graceful=True)

    def close(self) -> None:
        self.evict_except(set())


def _kill(actor, graceful: bool = False) -> None:
    import ray

    if graceful:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - best effort; the actor is killed next
            pass
    ray.kill(actor)
