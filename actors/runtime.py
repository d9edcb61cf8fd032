"""Starting (or joining) Ray for fluxir: loopback-only local instances, quiet logs, worker env.

Every ``ray.init`` in the project goes through :func:`init_ray`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _gpu_present() -> bool:
    import torch

    return torch.cuda.device_count() > 0


def _pin_to_loopback() -> None:
    """Make a local Ray really stay on 127.0.0.1.

    Ray (2.60) rewrites ``_node_ip_address="127.0.0.1"`` to the routable IP and binds its gRPC
    servers to all interfaces unless it runs in its single-machine mode, which is keyed to this env var
    (default-on only on macOS/Windows). The env var reaches GCS, raylet, agents and workers; the
    constant is patched because ``ray`` may already be imported in this process.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def threads_for(resources: dict[str, float]) -> int:
    """Torch threads for an actor holding `resources`: every core its CPU share touches (1.2 CPUs -> 2).

    The phases of an RL iteration run one after another, so a learner whose logical share is a little
    over one CPU uses both cores of a 2-core machine while the rollout actors (fractions) wait.
    """
    return max(1, math.ceil(resources.get("CPU", 1) - 1e-9))


def worker_env_vars(num_cpus_per_worker: int = 1) -> dict[str, str]:
    """Env for every Ray worker: DeepSpeed on CPU when there is no GPU, bounded OpenMP, repo on path."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(num_cpus_per_worker))}
    if not _gpu_present():
        env["DS_ACCELERATOR"] = "cpu"
    # The repo is not necessarily pip-installed: let workers import fluxir/actors/tests from it.
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _runtime_env(extra: dict[str, Any] | None) -> dict[str, Any]:
    runtime_env = dict(extra or {})
    runtime_env["env_vars"] = {**worker_env_vars(), **runtime_env.get("env_vars", {})}
    return runtime_env


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """Start a loopback-only local Ray, or connect to ``address``/``RAY_ADDRESS``; no-op if already up.

    ``address="local"`` always starts a new local instance. Either way this process takes
    127.0.0.1 as its node address. Extra keyword arguments go to ``ray.init`` (a ``runtime_env``
    is merged with fluxir's worker env). Returns ``ray.cluster_resources()``.
    """
    if ray.is_initialized():
        log.debug("ray already initialised; leaving it as is")
        return ray.cluster_resources()
    if not _gpu_present():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver may import deepspeed too
    # Ray Train V2 workers block on each report until the controller polls (default every 2 s);
    # a local instance inherits this process's environment, so set it before starting one.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    target = (os.environ.get("RAY_ADDRESS") or None) if address is None else address
    opts: dict[str, Any] = {"logging_level": logging.WARNING, **kw, "_node_ip_address": LOOPBACK}
    opts["runtime_env"] = _runtime_env(kw.get("runtime_env"))
    _pin_to_loopback()
    if target in (None, "local"):
        opts.update(address="local", num_cpus=num_cpus, include_dashboard=dashboard)
        if dashboard:
            opts["dashboard_host"] = LOOPBACK
        log.info("starting local ray on %s (num_cpus=%s, dashboard=%s)", LOOPBACK, num_cpus, dashboard)
        ray.init(**opts)
    else:
        log.info("connecting to ray at %s", target)
        ray.init(address=target, **opts)
    return ray.cluster_resources()


_rendezvous_servers: list = []  # (listening socket, TCPStore) hosted by this process, alive as long as it is


def host_rendezvous() -> tuple[str, int]:
    """Host torch.distributed's rendezvous (a TCPStore, unauthenticated) on this node's Ray address only:
    127.0.0.1 on a single machine, the node's cluster address on a cluster. torch's own server listens on
    every interface; this one is handed a socket bound to that address, and the process group this process
    then initialises at (host, port) shares it (a multi-tenant store on the same port). Returns (host, port)."""
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    host = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    store = TCPStore(host, port, is_master=True, multi_tenant=True, master_listen_fd=listener.fileno(),
                     wait_for_workers=False, timeout=timedelta(minutes=30))
    _rendezvous_servers.append((listener, store))
    return host, port


def check_resources(stage: str, roles: list[tuple[str, dict[str, float], int]],
                    available: dict[str, float] | None = None, autoscaling: bool = False) -> None:
    """Refuse, naming the config keys and the numbers, a stage whose `roles` ((setting, resources per
    process, count)) cannot all be placed on the cluster (`ray.cluster_resources()` by default): Ray would
    otherwise wait for them for ever. On an `autoscaling` cluster (`ray.autoscaling`), which adds nodes on
    demand, the same message is a warning and the stage waits."""
    from fluxir.config import ConfigError

    available = ray.cluster_resources() if available is None else available
    for resource in sorted({r for _, res, _ in roles for r in res}):
        need = sum(res.get(resource, 0) * n for _, res, n in roles)
        if need > available.get(resource, 0) + 1e-9:
            parts = ", ".join(f"{key}={res.get(resource, 0):g} x {n}" for key, res, n in roles)
            message = (f"{stage} needs {need:g} {resource} ({parts}) but the Ray cluster has "
                       f"{available.get(resource, 0):g}")
            if not autoscaling:
                raise ConfigError(f"{message}; lower those settings or add nodes (ray.autoscaling=true waits "
                                  f"for an autoscaler to add them)")
            log.warning("%s; waiting for the autoscaler to add nodes (ray.autoscaling)", message)
