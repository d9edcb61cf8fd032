"""fluxir functions run as Ray tasks on workers that hold given resources.

Stage 2's teacher side (the `tasks` of `fluxir.teacher.prepare`, with `distill.teacher_resources`) and the
pipeline's evaluations (`eval.resources`) run this way: on a GPU cluster each call is a worker with a GPU
of its own, where `fluxir.accel` places the model, and the driver needs none.
"""
from __future__ import annotations

from typing import Any, Callable

import ray

from actors.learner import actor_options
from actors.runtime import check_resources, init_ray, threads_for


@ray.remote
def _call(fn: Callable[..., Any], threads: int, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` with torch on `threads` threads (the task's CPU share)."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def ray_tasks(resources: dict[str, float]) -> Callable[..., list]:
    """run(fn, calls, **kwargs) -> [fn(*args, **kwargs) for args in calls], each call a Ray task named
    `<fn>-<i>` holding `resources`; all are submitted at once, so they run side by side as the cluster allows."""
    options, threads = actor_options(resources), threads_for(resources)

    def run(fn: Callable[..., Any], calls: list[tuple], **kwargs) -> list:
        return ray.get([_call.options(name=f"{fn.__name__}-{i}", **options).remote(fn, threads, args, kwargs)
                        for i, args in enumerate(calls)])
    return run


def join_ray(cfg, stage: str, roles: list[tuple[str, dict[str, float], int]]) -> None:
    """Start or join the Ray that `cfg.ray` names and refuse, with the numbers, `roles` ((setting, resources,
    count)) the cluster cannot hold (`actors.runtime.check_resources`)."""
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    check_resources(stage, roles, autoscaling=cfg.ray.autoscaling)

