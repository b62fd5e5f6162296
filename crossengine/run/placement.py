"""Where each engine runs, decided before any engine loads.

Inputs: each engine's footprint (parameter count read from the checkpoint's safetensors
headers, never the weights, times the engine's dtype size, plus headroom for the CUDA
context and activations, plus a KV cache for vLLM) and the cluster (GPUs from Ray's
resources; memory per GPU from `placement.gpu_memory_gb`, else nvidia-smi on a node, else
unknown). Nothing here asks torch.cuda: a cluster that advertises GPUs it does not have
(`ray start --num-gpus=N`) is planned exactly like a real one, which is how it is tested.

The rules, in order:
1. No GPUs in the cluster: every engine runs on CPUs; an explicit `num_gpus > 0` is an error
   (Ray would wait forever for it).
2. Enough GPUs for every engine's request (`num_gpus`, default 1): one wave, as requested.
3. Otherwise engines share GPUs by fractional `num_gpus`: their footprint's share of a GPU
   when the memory is known (vLLM's `gpu_memory_utilization` is set to that share), an
   equal split when it is not. Candidates that do not fit beside the reference run in later
   waves, the reference re-run in each (its scores are checked to be bitwise identical).
4. An engine that fits on no GPU, or beside the reference on none, is an error naming what
   it needs, what the cluster has and what to change: before anything loads, never a hang.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crossengine.errors import CrossengineError
from crossengine.experiment.plan import EngineInstance

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SHARE_STEP = 0.01  # fractional GPUs are rounded up to this grid


class PlacementError(CrossengineError):
    """The engines cannot be put on this cluster; says what they need and what it has."""


@dataclass(frozen=True)
class Cluster:
    gpus: float
    cpus: float
    gpu_memory_gb: float | None = None
    memory_source: str = "unknown"  # option | nvidia-smi | unknown


@dataclass(frozen=True)
class Slot:
    """One engine's place: Ray's num_gpus for its actor and the wave it runs in."""

    engine: str
    gpus: float
    wave: int
    weights_gb: float | None
    footprint_gb: float | None
    gpu_memory_utilization: float | None = None  # vLLM only, when it shares a GPU


@dataclass
class Placement:
    cluster: Cluster
    slots: dict[str, Slot]
    waves: list[list[EngineInstance]]  # candidates per wave; the reference runs in every one
    notes: list[str] = field(default_factory=list)

    @property
    def shares_gpus(self) -> bool:
        return any(0 < s.gpus < 1 for s in self.slots.values())

    def to_json(self) -> dict[str, Any]:
        return {"cluster": asdict(self.cluster), "engines": [asdict(s) for s in self.slots.values()], "notes": self.notes}

    def table(self):
        from rich.table import Table

        c = self.cluster
        mem = f", {c.gpu_memory_gb:g} GiB each ({c.memory_source})" if c.gpu_memory_gb else (", memory unknown" if c.gpus else "")
        t = Table(title=f"placement: {c.gpus:g} GPUs{mem}, {c.cpus:g} CPUs", title_justify="left")
        for col in ("engine", "GPUs", "wave", "weights GiB", "footprint GiB"):
            t.add_column(col, justify="left" if col == "engine" else "right")
        fmt = lambda x: "?" if x is None else f"{x:.3g}"  # noqa: E731
        for s in self.slots.values():
            waves = "all" if s.wave < 0 else str(s.wave)
            t.add_row(s.engine, f"{s.gpus:g}", waves, fmt(s.weights_gb), fmt(s.footprint_gb))
        return t


# --------------------------------------------------------------------------- footprints


def safetensors_parameters(model_path: str, revision: str | None = None) -> int | None:
    """Parameter count from the checkpoint's safetensors headers (8-byte length + JSON), no weights read.

    A local folder is read directly; a hub id asks the hub for the same headers. None when
    neither works (no safetensors, offline): the footprint is then unknown.
    """
    folder = Path(model_path)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        total = 0
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        return total
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(model_path, revision=revision)
        return int(sum(meta.parameter_count.values()))
    except Exception:  # noqa: BLE001 - offline, gated, or no safetensors: unknown, planned as such
        return None


def footprint_gb(inst: EngineInstance, params: int | None, spec) -> tuple[float | None, float | None]:
    """(weights, footprint) in GiB for one engine; None when the parameter count is unknown."""
    if params is None:
        return None, None
    weights = params * DTYPE_BYTES[inst.spec.dtype or "float32"] / GiB
    extra = spec.headroom_gb + (spec.vllm_kv_cache_gb if inst.traits.needs_kv_cache else 0.0)
    return weights, weights + extra


# --------------------------------------------------------------------------- the cluster


def probe_gpu_memory_gb(timeout_s: float = 20.0) -> float | None:
    """Smallest GPU memory nvidia-smi reports on a cluster node; None where there is none."""
    import ray

    @ray.remote(num_cpus=0)
    def smi() -> float | None:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            values = [float(x) for x in out.stdout.split() if x.strip()]
            return min(values) / 1024 if out.returncode == 0 and values else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    ref = smi.remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - a busy or odd cluster: memory stays unknown
        ray.cancel(ref, force=True)
        return None


def cluster_view(spec) -> Cluster:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    if not gpus:
        return Cluster(0.0, cpus)
    if spec.gpu_memory_gb:
        return Cluster(gpus, cpus, spec.gpu_memory_gb, "option")
    mem = probe_gpu_memory_gb()
    return Cluster(gpus, cpus, mem, "nvidia-smi") if mem else Cluster(gpus, cpus)


# --------------------------------------------------------------------------- the plan


def _ceil_share(x: float) -> float:
    return min(1.0, max(_SHARE_STEP, math.ceil(round(x / _SHARE_STEP, 6)) * _SHARE_STEP))


def _fits(demands: list[float], gpus: int) -> bool:
    """First-fit decreasing: whole-GPU demands take whole devices, shares pack the rest."""
    whole = sum(int(math.ceil(d)) for d in demands if d >= 1)
    if whole > gpus:
        return False
    bins = [1.0] * (gpus - whole)
    for d in sorted((d for d in demands if 0 < d < 1), reverse=True):
        for i, free in enumerate(bins):
            if free + 1e-9 >= d:
                bins[i] = free - d
                break
        else:
            return False
    return True


def _need(inst: EngineInstance, demand: float, weights, fp) -> str:
    size = f"~{fp:.3g} GiB ({weights:.3g} GiB of {inst.spec.dtype} weights + headroom)" if fp is not None else "an unknown amount of memory"
    return f"engine {inst.name!r} ({inst.spec.type}) needs {demand:g} GPU, {size}"


def plan_placement(always: list[EngineInstance], candidates: list[EngineInstance], cluster: Cluster, spec, params: dict[str, int | None]) -> Placement:
    """Slots and waves for `always` (the reference, and a generator) plus `candidates`.

    `params` maps engine name to its parameter count (None: unknown).
    """
    instances = [*always, *candidates]
    sizes = {i.name: footprint_gb(i, params.get(i.name), spec) for i in instances}
    notes: list[str] = []

    def slot(i: EngineInstance, gpus: float, wave: int, util: float | None = None) -> Slot:
        w, fp = sizes[i.name]
        return Slot(i.name, gpus, wave, w, fp, util)

    if cluster.gpus <= 0:
        explicit = [i for i in instances if (i.spec.num_gpus or 0) > 0]
        if explicit:
            i = explicit[0]
            raise PlacementError(
                f"engine {i.name!r} asks for num_gpus {i.spec.num_gpus:g} but the cluster has no GPUs ({cluster.cpus:g} CPUs): "
                "remove num_gpus to run on CPUs, or join a GPU cluster with --address"
            )
        return Placement(cluster, {i.name: slot(i, 0.0, -1 if i in always else 0) for i in instances}, [candidates], notes)

    gpus = int(cluster.gpus)
    requested = {i.name: (i.spec.num_gpus if i.spec.num_gpus is not None else 1.0) for i in instances}
    mem = cluster.gpu_memory_gb
    if mem:
        for i in instances:
            w, fp = sizes[i.name]
            if fp is not None and requested[i.name] <= 1 and requested[i.name] > 0 and fp > mem:
                raise PlacementError(
                    f"{_need(i, requested[i.name], w, fp)} but each of the cluster's {gpus} GPUs has {mem:g} GiB: "
                    "use a smaller dtype, tensor parallelism (num_gpus: 2 and the engine's option), or lower placement.headroom_gb"
                )
    for i in instances:
        if requested[i.name] > gpus:
            raise PlacementError(f"engine {i.name!r} asks for num_gpus {requested[i.name]:g} but the cluster has {gpus} GPUs")

    if sum(requested.values()) <= gpus:  # rule 2: everyone gets what they asked for
        slots = {i.name: slot(i, requested[i.name], -1 if i in always else 0) for i in instances}
        return Placement(cluster, slots, [candidates], notes)

    # rule 3: share
    demand: dict[str, float] = {}
    small = [i for i in instances if 0 < requested[i.name] <= 1]
    whole = sum(requested[i.name] for i in instances if requested[i.name] > 1)
    if mem:
        for i in instances:
            r = requested[i.name]
            fp = sizes[i.name][1]
            demand[i.name] = r if (r > 1 or r == 0) else (_ceil_share(fp / mem) if fp is not None else r)
    else:
        room = gpus - whole
        if room < 1 and small:
            raise PlacementError(f"engines asking for whole GPUs take all {gpus}; none is left for {', '.join(i.name for i in small)}")
        per_gpu = math.ceil(len(small) / room) if small else 1
        share = math.floor(1.0 / per_gpu / _SHARE_STEP) * _SHARE_STEP
        for i in instances:
            demand[i.name] = share if i in small else requested[i.name]
        notes.append(
            f"GPU memory unknown: {len(small)} engines share {room:g} GPUs equally ({share:g} each); "
            "set placement.gpu_memory_gb to plan by footprint"
        )

    base = [demand[i.name] for i in always]
    if not _fits(base, gpus):
        raise PlacementError(
            f"the reference{' and generator' if len(always) > 1 else ''} alone do not fit: "
            + "; ".join(_need(i, demand[i.name], *sizes[i.name]) for i in always)
            + f"; the cluster has {gpus} GPUs" + (f" of {mem:g} GiB" if mem else "")
        )
    waves: list[list[EngineInstance]] = [[]]
    for c in candidates:
        if _fits(base + [demand[x.name] for x in waves[-1]] + [demand[c.name]], gpus):
            waves[-1].append(c)
            continue
        if not _fits(base + [demand[c.name]], gpus):
            raise PlacementError(
                f"{_need(c, demand[c.name], *sizes[c.name])}, which does not fit beside the reference "
                f"({', '.join(f'{demand[i.name]:g} GPU' for i in always)}) on {gpus} GPUs"
                + (f" of {mem:g} GiB" if mem else "") + ": add GPUs, use a smaller dtype, or lower placement.headroom_gb"
            )
        waves.append([c])
    if len(waves) > 1:
        notes.append(f"{len(waves)} waves: the reference scores every batch once per wave")
    wave_of = {c.name: w for w, members in enumerate(waves) for c in members}
    slots = {}
    for i in instances:
        d = demand[i.name]
        option = i.traits.memory_share_option  # an engine that takes its memory up front is told its share
        util = round(d, 3) if option and 0 < d < 1 and option not in i.spec.options else None
        slots[i.name] = slot(i, d, wave_of.get(i.name, -1), util)
    return Placement(cluster, slots, waves, notes)


def make_placement(always: list[EngineInstance], candidates: list[EngineInstance], spec) -> Placement:
    """The cluster as Ray sees it, footprints from the checkpoints, then `plan_placement`."""
    cluster = cluster_view(spec)
    params: dict[str, int | None] = {}
    if cluster.gpus:
        cache: dict[tuple[str, str | None], int | None] = {}
        for i in [*always, *candidates]:
            key = (i.model_path, i.spec.revision)
            if key not in cache:
                cache[key] = safetensors_parameters(*key)
            params[i.name] = cache[key]
    return plan_placement(always, candidates, cluster, spec, params)
