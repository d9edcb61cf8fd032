"""Shared test fixtures: one loopback-only local Ray for the whole session, started on first use."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Train V2 workers block on each report until the controller polls (default every 2 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray bound to 127.0.0.1 with 2 CPUs, shut down after the session.

    The dashboard is on (loopback, any free port) because Ray Train V2's placement-group cleaner
    polls the State API, which the dashboard serves; without it the cleaner logs a warning a second.
    """
    import ray

    from actors.runtime import init_ray

    init_ray(num_cpus=2, dashboard=True)
    yield ray
    ray.shutdown()
