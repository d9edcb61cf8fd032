"""Shared test fixtures: one loopback-only local Ray for the whole session, started on first use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# This interpreter's bin first (as the Makefile does): Ray workers, jobs and DeepSpeed's op build then
# all find the same python and ninja (two ninja versions make DeepSpeed rebuild its op each time).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Ray Train V2 workers block on each report until the controller polls (default every 2 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray bound to 127.0.0.1 with 2 CPUs and 2 logical GPUs, shut down after the session.

    The dashboard is on (loopback, any free port) because Ray Train V2's placement-group cleaner
    polls the State API, which the dashboard serves; without it the cleaner logs a warning a second.
    The GPUs are Ray's bookkeeping only: a task or actor that asks for one is scheduled as on a GPU node
    and sees a GPU id, while torch finds no CUDA device and computes on the CPU (tests/test_gpu_placement.py).
    """
    import ray

    from actors.runtime import init_ray

    init_ray(num_cpus=2, num_gpus=2, dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_smoke_run(tmp_path_factory):
    """`configs/smoke.yaml` run as a user runs it on a cluster: `ray start --head` on loopback, then plain
    `ray job submit` (cluster/runtime_env.yaml), watched through the Jobs REST API while the node's
    Prometheus endpoint is scraped; then `fluxir submit --follow` of a short job. The head is stopped at
    the end, also on failure. Returns what the tests check (the run folder, status, logs, metric names,
    actor names, the `fluxir submit` output, pids left alive, sockets of the head's processes listening on
    every interface and the titles of its processes, both sampled every tick)."""
    import re
    import subprocess
    import uuid
    from types import SimpleNamespace

    from tests.ray_head import LocalHead

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("runs")
    run_args = ["run", str(root / "configs/smoke.yaml"), f"output_dir={out}"]
    head, seen = LocalHead(num_cpus=2), set()
    result = SimpleNamespace(run_dir=out / "smoke", args=run_args, status=None, logs="", metrics=seen, actors=[],
                             submit=None, left=None, open_to_all=set(), processes=set())

    def scrape():
        wildcard, titles = head.listeners()
        result.open_to_all.update(wildcard)
        result.processes.update(titles)
        try:
            seen.update(re.findall(r"^ray_(fluxir_\w+?)(?:\{| )", head.metrics_text(), re.M))
        except OSError:
            pass  # the agent may not serve yet; the next tick tries again

    try:
        head.start()
        job_id = f"fluxir-smoke-{uuid.uuid4().hex[:8]}"
        subprocess.run([head.ray, "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
                        "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m", "actors", "run",
                        "configs/smoke.yaml", f"output_dir={out}"],
                       cwd=root, env=head.env(), check=True, capture_output=True, timeout=180)
        info = head.wait_for_job(job_id, timeout=600, poll=scrape, every=0.5)
        scrape()
        result.status, result.job = info["status"], info
        result.logs = head.get(f"/api/jobs/{job_id}/logs")["logs"]
        result.actors = [a.get("name") for a in head.get("/api/v0/actors?limit=10000")["data"]["result"]["result"]]
        result.submit = subprocess.run(
            [sys.executable, "-m", "actors", "submit", "configs/smoke.yaml", f"output_dir={out}", "--command",
             "testset", "--address", head.address, "--follow"],
            cwd=root, env=head.env(), capture_output=True, text=True, timeout=300)
    finally:
        result.left = head.stop()
    return result
