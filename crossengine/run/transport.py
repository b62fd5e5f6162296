"""How the reference's full logits reach each candidate's worker: `placement.logits_transport`.

object_store: the reference's worker hands host numpy arrays to Ray's object store and every
candidate's worker maps them (the default on CPUs, and for any candidate that cannot take
tensors). gloo / nccl: Ray Direct Transport (RDT) - the reference keeps its logits as torch
tensors where it computed them and Ray sends them worker to worker over a collective group
(gloo between CPU workers, NCCL between GPUs), so a GPU's logits never touch the host.

Decided per wave before any batch runs, from what the plan knows (engine traits,
environments, placement); run.json records the path of every candidate (`logits_transport`).
The numbers are the same either way: the tensors carry the very float32 values the arrays do
(tests/test_scale.py checks the token columns bitwise).
"""

from __future__ import annotations

from crossengine.experiment.plan import EngineInstance

OBJECT_STORE = "object_store"
TENSOR_TRANSPORTS = ("gloo", "nccl")


def nccl_available() -> bool:
    """Whether Ray's NCCL collective imports in this (the driver's) environment: it needs cupy."""
    try:
        from ray.util.collective.collective import nccl_available as available

        return bool(available())
    except Exception:  # noqa: BLE001
        return False


def choose_transports(
    requested: str, mode: str, reference: EngineInstance, wave: list[EngineInstance], full: list[EngineInstance], on_gpus, nccl=nccl_available
) -> tuple[dict[str, str], str | None, str | None]:
    """(candidate -> path, the RDT backend the wave uses or None, a note where a requested tensor path is not taken).

    `full`: the wave's candidates that compare full logits with the reference; `on_gpus(inst)`:
    whether the placement gives that engine a GPU of its own (NCCL wants one per rank: engines
    sharing a GPU keep the object store; CUDA IPC between them is not used yet). One backend per wave: a collective group
    spans the reference and every tensor candidate, and where one of them cannot take tensors
    the reference's logits go through the object store for all (it hands them over once).
    `auto` takes NCCL only where it imports (cupy), so a cluster that advertises GPUs it does
    not have, or lacks cupy, keeps the object store."""
    paths = {c.name: OBJECT_STORE for c in wave}
    if not full or requested == OBJECT_STORE:
        return paths, None, None
    backend = requested
    if requested == "auto":
        if not all(on_gpus(i) for i in [reference, *full]) or not nccl():
            return paths, None, None  # CPU workers: the object store maps the arrays without a copy, gloo would send them
        backend = "nccl"
    if backend == "nccl" and not nccl():
        blocker = "Ray's NCCL group does not import in this environment (it needs cupy)"
    elif mode != "score":
        blocker = f"the {mode} mode compares the reference's decode outside the engines' workers"
    else:
        blocker = next((f"engine {i.name!r} {why}" for i in [reference, *full] if (why := i.tensor_blocker())), None)
    if blocker is not None:
        note = f"logits_transport {backend}: the reference's logits go through the object store to every candidate of this wave: {blocker}"
        return paths, None, note if requested != "auto" else None
    paths.update({c.name: backend for c in full})
    return paths, backend, None
