"""The engines of one wave as Ray actors: one actor per engine instance, each in its own
environment where the experiment names one, the adapter imported inside the actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from .errors import CrossengineError
from .plan import EngineInstance


def runtime_env(inst: EngineInstance, base: Path) -> dict[str, Any]:
    """Ray runtime_env for an engine that names its own environment (DESIGN.md §3)."""
    env = inst.spec.env
    # user code named as "module:function" imports from where crossengine runs, as in the driver
    paths = [os.getcwd(), str(base.absolute()), os.environ.get("PYTHONPATH", "")]
    out: dict[str, Any] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}}
    if env is None:
        return out
    if env.pip:
        out["pip"] = list(env.pip)
    if env.python:
        python = Path(env.python).expanduser()  # relative to the experiment file, like images
        out["py_executable"] = str(python if python.is_absolute() else (base / python).absolute())
    out["env_vars"].update(env.env_vars)
    return out


def _worker_class():
    import ray

    @ray.remote
    class EngineWorker:
        """Hosts one engine; the adapter is imported here, in the worker's own environment."""

        def __init__(self, kind: str, spec: dict, model_path: str, instance: str, seed: int, threads: int):
            import torch

            torch.set_num_threads(threads)
            from crossengine.adapters import engine_class
            from crossengine.config import EngineSpec

            self.engine = engine_class(kind)(EngineSpec.model_validate(spec), model_path, instance, seed)

        def info(self) -> dict:
            return dataclasses.asdict(self.engine.info())

        def prepare(self, raw):
            return self.engine.prepare(raw)

        def score(self, samples, top_k, full_vocab):
            return self.engine.score(samples, top_k, full_vocab)

        def generate(self, samples, sampling, top_k):
            return self.engine.generate(samples, sampling, top_k)

        def token_texts(self):
            return self.engine.token_texts()

        def timings(self):
            return self.engine.timings()

        def capture(self, samples, patterns):
            return self.engine.capture(samples, patterns)

        def audit(self):
            return self.engine.audit()

        def close(self):
            self.engine.close()

    return EngineWorker


def one_line(exc: BaseException) -> str:
    """The last meaningful line of a (possibly Ray-wrapped) exception."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("Traceback", "  File", "File "))]
    return lines[-1] if lines else type(cause).__name__


class EnginePool:
    """The live actors of one wave, created together so their models load in parallel."""

    def __init__(self, instances: list[EngineInstance], seed: int, cpus: float, base: Path, console=None):
        import ray
        from ray.exceptions import RuntimeEnvSetupError

        worker = _worker_class()
        share = cpus / max(len(instances), 1)
        threads = max(1, int(share))
        self.instances = instances
        self.actors = {}
        for inst in instances:
            options: dict[str, Any] = {"num_cpus": min(share, 1.0), "num_gpus": inst.spec.num_gpus or 0, "name": None}
            options["runtime_env"] = runtime_env(inst, base)
            self.actors[inst.name] = worker.options(**options).remote(
                inst.spec.type, inst.spec.model_dump(mode="json"), inst.model_path, inst.name, seed, threads
            )
        self.infos: dict[str, dict] = {}
        self.start_s: dict[str, float] = {}
        t0 = time.time()
        # engines with their own environment first: building it is a step of its own
        for inst in sorted(instances, key=lambda i: i.spec.env is None):
            env = inst.spec.env
            what = f"pip: {', '.join(env.pip)}" if env and env.pip else (f"python: {env.python}" if env else "")
            status = console.status(f"building the environment of {inst.name} ({what}) and loading it") if env and console else contextlib.nullcontext()
            try:
                with status:
                    self.infos[inst.name] = ray.get(self.actors[inst.name].info.remote())
            except RuntimeEnvSetupError as exc:
                self.close()
                raise CrossengineError(f"engine {inst.name!r}: its environment ({what}) could not be built: {one_line(exc)}") from None
            except Exception as exc:  # noqa: BLE001 - any load failure becomes one line naming the engine
                self.close()
                raise CrossengineError(f"engine {inst.name!r} ({inst.spec.type}) failed to start: {one_line(exc)}") from None
            self.start_s[inst.name] = time.time() - t0
            if env and console:
                console.print(f"environment of {inst.name} ready ({what}) after {self.start_s[inst.name]:.1f}s", highlight=False)

    def engine_timings(self) -> dict[str, dict[str, float]]:
        import ray

        return {name: ray.get(actor.timings.remote()) for name, actor in self.actors.items()}

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - best effort; the actor is killed next
                pass
            ray.kill(actor)
        self.actors = {}


def ensure_ray(address: str | None) -> float:
    """Join a cluster or start a local one; returns the GPUs it has."""
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": os.cpu_count()}
        ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False, **kwargs)
    return float(ray.cluster_resources().get("GPU", 0))
