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

A Ray actor runs on one node, so all of this is done node by node (Ray's `ray.nodes()`): an
engine's GPUs must be on one node (tensor parallel included), shares pack into each node's
GPUs, and each engine is pinned to the node the plan chose (node affinity), with its share
of that node's CPUs. What the plan cannot know (a cluster busy with other jobs) stays a
timeout; what it can know is said before anything loads, naming the node sizes.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
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
class Node:
    """One Ray node's resources, as Ray advertises them (advertised GPUs count like real ones)."""

    id: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class Cluster:
    gpus: float
    cpus: float
    gpu_memory_gb: float | None = None
    memory_source: str = "unknown"  # option | nvidia-smi | unknown
    nodes: tuple[Node, ...] = ()  # empty: one node with all of the above (a plan made without Ray)

    @property
    def node_list(self) -> tuple[Node, ...]:
        return self.nodes or (Node("", self.gpus, self.cpus),)

    def describe(self) -> str:
        """'2 nodes of 1 GPU + 2 CPUs', or each node's size where they differ."""
        sizes = [f"{n.gpus:g} GPU + {n.cpus:g} CPUs" for n in self.node_list]
        if len(sizes) == 1:
            return f"one node of {sizes[0]}"
        return f"{len(sizes)} nodes of {sizes[0]}" if len(set(sizes)) == 1 else f"{len(sizes)} nodes ({'; '.join(sizes)})"


@dataclass(frozen=True)
class Slot:
    """One engine's place: Ray's num_gpus for its actor and the wave it runs in."""

    engine: str
    gpus: float
    wave: int
    weights_gb: float | None
    footprint_gb: float | None
    gpu_memory_utilization: float | None = None  # vLLM only, when it shares a GPU
    node: int = 0  # index into the cluster's node_list: where the engine is pinned


@dataclass
class Placement:
    cluster: Cluster
    slots: dict[str, Slot]
    waves: list[list[EngineInstance]]  # candidates per wave; the reference runs in every one
    notes: list[str] = field(default_factory=list)

    @property
    def shares_gpus(self) -> bool:
        return any(0 < s.gpus < 1 for s in self.slots.values())

    def cpu_share(self, name: str, members: list[str]) -> float:
        """An engine's equal part of its node's CPUs among the `members` of its wave (Ray reserves at most 1 of it; torch uses it as threads)."""
        node = self.slots[name].node
        together = sum(1 for m in members if self.slots[m].node == node)
        return self.cluster.node_list[node].cpus / max(together, 1)

    def node_id(self, name: str) -> str:
        """The Ray node id the engine is pinned to ('' when the plan was made without Ray's node list)."""
        return self.cluster.node_list[self.slots[name].node].id

    def to_json(self) -> dict[str, Any]:
        return {"cluster": asdict(self.cluster), "engines": [asdict(s) for s in self.slots.values()], "notes": self.notes}

    def table(self):
        from rich.table import Table

        c = self.cluster
        mem = f", {c.gpu_memory_gb:g} GiB each ({c.memory_source})" if c.gpu_memory_gb else (", memory unknown" if c.gpus else "")
        t = Table(title=f"placement: {c.gpus:g} GPUs{mem}, {c.cpus:g} CPUs, {c.describe()}", title_justify="left")
        for col in ("engine", "node", "GPUs", "wave", "weights GiB", "footprint GiB"):
            t.add_column(col, justify="left" if col == "engine" else "right")
        fmt = lambda x: "?" if x is None else f"{x:.3g}"  # noqa: E731
        for s in self.slots.values():
            waves = "all" if s.wave < 0 else str(s.wave)
            t.add_row(s.engine, str(s.node), f"{s.gpus:g}", waves, fmt(s.weights_gb), fmt(s.footprint_gb))
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
    """The cluster node by node, as Ray advertises it (alive nodes with CPUs or GPUs)."""
    import ray

    nodes = tuple(
        Node(n["NodeID"], float(n["Resources"].get("GPU", 0)), float(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))
    )
    gpus, cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    if not gpus:
        return Cluster(0.0, cpus, nodes=nodes)
    if spec.gpu_memory_gb:
        return Cluster(gpus, cpus, spec.gpu_memory_gb, "option", nodes)
    mem = probe_gpu_memory_gb()
    return Cluster(gpus, cpus, mem, "nvidia-smi", nodes) if mem else Cluster(gpus, cpus, nodes=nodes)


# --------------------------------------------------------------------------- the plan


def _ceil_share(x: float) -> float:
    return min(1.0, max(_SHARE_STEP, math.ceil(round(x / _SHARE_STEP, 6)) * _SHARE_STEP))


def _pack(demands: list[tuple[str, float]], nodes: tuple[Node, ...]) -> dict[str, int] | None:
    """Engine -> node index, or None when they do not fit. Engines are placed in the order given
    (the reference first, so it lands on the same node in every wave), each on the first node
    that holds it: whole-GPU demands take whole free GPUs of one node, shares go into any GPU of
    a node with room, CPU-only engines onto the node with the most CPUs per engine."""
    free = [[1.0] * int(n.gpus) for n in nodes]
    count = [0] * len(nodes)
    where: dict[str, int] = {}
    for name, d in demands:
        placed = None
        if d >= 1:
            k = int(math.ceil(d))
            for j, gpus in enumerate(free):
                whole = [g for g, f in enumerate(gpus) if f >= 1.0 - 1e-9]
                if len(whole) >= k:
                    for g in whole[:k]:
                        gpus[g] = 0.0
                    placed = j
                    break
        elif d > 0:
            for j, gpus in enumerate(free):
                g = next((g for g, f in enumerate(gpus) if f + 1e-9 >= d), None)
                if g is not None:
                    gpus[g] -= d
                    placed = j
                    break
        else:
            with_cpus = [j for j, n in enumerate(nodes) if n.cpus > 0]
            placed = max(with_cpus, key=lambda j: nodes[j].cpus / (count[j] + 1), default=None)
        if placed is None:
            return None
        where[name] = placed
        count[placed] += 1
    return where


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

    def slot(i: EngineInstance, gpus: float, wave: int, util: float | None = None, node: int = 0) -> Slot:
        w, fp = sizes[i.name]
        return Slot(i.name, gpus, wave, w, fp, util, node)

    nodes = cluster.node_list
    if cluster.gpus <= 0:
        explicit = [i for i in instances if (i.spec.num_gpus or 0) > 0]
        if explicit:
            i = explicit[0]
            raise PlacementError(
                f"engine {i.name!r} asks for num_gpus {i.spec.num_gpus:g} but the cluster has no GPUs ({cluster.cpus:g} CPUs): remove num_gpus to run on CPUs, or join a GPU cluster with --address"
            )
        where = _pack([(i.name, 0.0) for i in instances], nodes) or {}
        return Placement(cluster, {i.name: slot(i, 0.0, -1 if i in always else 0, node=where.get(i.name, 0)) for i in instances}, [candidates], notes)

    gpus = int(cluster.gpus)
    biggest = max(int(n.gpus) for n in nodes)
    requested = {i.name: (i.spec.num_gpus if i.spec.num_gpus is not None else (1.0 if i.traits.uses_gpu else 0.0)) for i in instances}
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
            raise PlacementError(f"engine {i.name!r} asks for num_gpus {requested[i.name]:g} but the cluster has {gpus} GPUs ({cluster.describe()})")
        if requested[i.name] > biggest:
            raise PlacementError(
                f"engine {i.name!r} asks for num_gpus {requested[i.name]:g}, but an engine's GPUs must be on one node and no node has more "
                f"than {biggest} ({cluster.describe()}): lower num_gpus, or join nodes with more GPUs"
            )

    as_requested = _pack([(i.name, requested[i.name]) for i in instances], nodes)  # the reference first
    if as_requested is not None:  # rule 2: everyone gets what they asked for, node by node
        slots = {i.name: slot(i, requested[i.name], -1 if i in always else 0, node=as_requested[i.name]) for i in instances}
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
        notes.append(f"GPU memory unknown: {len(small)} engines share {room:g} GPUs equally ({share:g} each); set placement.gpu_memory_gb to plan by footprint")

    def pack(members: list[EngineInstance]) -> dict[str, int] | None:
        return _pack([(i.name, demand[i.name]) for i in [*always, *members]], nodes)

    if pack([]) is None:
        raise PlacementError(
            f"the reference{' and generator' if len(always) > 1 else ''} alone do not fit: "
            + "; ".join(_need(i, demand[i.name], *sizes[i.name]) for i in always)
            + f"; the cluster has {gpus} GPUs"
            + (f" of {mem:g} GiB" if mem else "")
            + f", {cluster.describe()}"
        )
    waves: list[list[EngineInstance]] = [[]]
    for c in candidates:
        if pack([*waves[-1], c]) is not None:
            waves[-1].append(c)
            continue
        if pack([c]) is None:
            raise PlacementError(
                f"{_need(c, demand[c.name], *sizes[c.name])}, which does not fit beside the reference "
                f"({', '.join(f'{demand[i.name]:g} GPU' for i in always)}) on {gpus} GPUs"
                + (f" of {mem:g} GiB" if mem else "")
                + f", {cluster.describe()}: add GPUs, use a smaller dtype, or lower placement.headroom_gb"
            )
        waves.append([c])
    if len(waves) > 1:
        notes.append(f"{len(waves)} waves: the reference scores every batch once per wave")
    wave_of = {c.name: w for w, members in enumerate(waves) for c in members}
    node_of: dict[str, int] = {}
    for members in waves:
        node_of.update(pack(members) or {})
    slots = {}
    for i in instances:
        d = demand[i.name]
        option = i.traits.memory_share_option  # an engine that takes its memory up front is told its share
        util = round(d, 3) if option and 0 < d < 1 and option not in i.spec.options else None
        slots[i.name] = slot(i, d, wave_of.get(i.name, -1), util, node_of.get(i.name, 0))
    return Placement(cluster, slots, waves, notes)


def make_placement(always: list[EngineInstance], candidates: list[EngineInstance], spec, cluster: Cluster | None = None) -> Placement:
    """The cluster as Ray sees it (or the part of it a sweep gives this run), footprints from the checkpoints, then `plan_placement`."""
    cluster = cluster or cluster_view(spec)
    params: dict[str, int | None] = {}
    if cluster.gpus:
        cache: dict[tuple[str, str | None], int | None] = {}
        for i in [*always, *candidates]:
            key = (i.model_path, i.spec.revision)
            if key not in cache:
                cache[key] = safetensors_parameters(*key)
            params[i.name] = cache[key]
    return plan_placement(always, candidates, cluster, spec, params)
