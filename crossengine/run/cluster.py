"""The Ray cluster a run uses: joined (`--address`) or started locally, reached within a timeout, and
ended at a stop.

Why apart from the pool: a sweep shares one cluster among many runs' pools, and the CLI checks an
address before anything loads.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from crossengine.errors import CrossengineError

# Where Ray's own notices to the driver go (a worker died, a node was lost): the run's log, set by the
# runner; they never reach the terminal, where the run's one-line error already names the engine.
_notice_sinks: list[Callable[[str], None]] = []


def send_ray_notices_to(sink: Callable[[str], None] | None) -> None:
    """Route Ray's notices to `sink` (the run's log) from now on; None: back to nowhere."""
    _notice_sinks[:] = [sink] if sink else []


def _quiet_notices() -> None:
    """Ray's driver prints each error the cluster publishes (`(raylet) A worker died ...`) through
    `ray._private.worker.print_to_stdstream`, on stdout, even with log_to_driver=False. Those from the
    raylet go to the sink instead; every other line prints as Ray would. Private API: where a Ray version
    lacks it, its notices print as before."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_crossengine", False):
        return

    def route(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            for sink in _notice_sinks:
                sink("\n".join(data.get("lines", [])))
            return None
        return original(data, *args, **kwargs)

    route._crossengine = True
    ray_worker.print_to_stdstream = route


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str) -> None:
    """A cluster address nothing answers on is one line within CONNECT_TIMEOUT_S, not Ray's endless
    "Failed to connect to GCS" retries ('auto' and ray:// client addresses are left to Ray)."""

    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise CrossengineError(
            f"cannot reach a Ray cluster at {address} ({type(exc).__name__}: {exc}; waited at most {CONNECT_TIMEOUT_S:g}s): "
            "is `ray start --head` running there and its port open? Without --address (and RAY_ADDRESS) a local cluster is started"
        ) from None


def ensure_ray(address: str | None, num_gpus: float | None = None) -> None:
    """Join the cluster `--address` (or RAY_ADDRESS) names, else start a private local one (with
    `num_gpus` GPUs advertised, if given): never a cluster that `ray start` happens to have left
    on the machine, whose address file Ray would otherwise follow."""

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    kwargs: dict[str, Any] = {"address": address} if address else {"address": "local", "num_cpus": os.cpu_count()}
    if num_gpus is not None and not address:
        kwargs["num_gpus"] = num_gpus
    # Ray's notice that it enabled token authentication on the cluster it starts is about Ray, not the
    # user's run; its errors (a missing or invalid token) are still shown.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # ray.get looks for Ctrl-C/SIGTERM every second by default; a stop must act within one
    os.environ.setdefault("RAY_get_check_signal_interval_milliseconds", "100")
    _quiet_notices()
    ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False, **kwargs)


def stop_local_cluster() -> bool:
    """Kill the processes of a local Ray cluster this driver started (never a joined one) without
    Ray's graceful wait; True when it did, and then the driver must exit without ray.shutdown
    (which would wait on the dead cluster)."""
    import ray
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if not ray.is_initialized() or node is None or not node.is_head():
        return False
    # the raylet's agents and workers first: once the raylet is gone they linger ~60 s, and an agent
    # that sees it die prints "Raylet is terminated. Termination is unexpected" on the user's terminal
    for proc in _descendants(node):
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - gone already
            pass
    try:
        node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # noqa: BLE001 - best effort: then Ray's exit handler stops what is left
        return False
    return True


def _descendants(node) -> list:
    """Every process started under the local cluster's own processes (psutil, which Ray installs)."""
    import psutil

    out = []
    for infos in getattr(node, "all_processes", {}).values():
        for info in infos:
            try:
                out += psutil.Process(info.process.pid).children(recursive=True)
            except (psutil.Error, AttributeError):
                pass
    return out
