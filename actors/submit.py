"""`fluxir submit`: a thin wrapper over the Ray Jobs SDK (what `ray job submit` does, with fluxir's defaults).

It submits `python -m actors <command> CONFIG [overrides]` with `cluster/runtime_env.yaml`, prints the
job id and its dashboard URL, and with `follow` streams the logs and returns the job's exit status.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import yaml

# Not from actors.runtime: that imports ray, and RAY_AUTH_MODE must be set before ray is imported.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = PROJECT_ROOT / "cluster" / "runtime_env.yaml"


class SubmitError(RuntimeError):
    """The job could not be submitted (no cluster at the address, a wrong address); one line for the user."""


def auth_token() -> str | None:
    """The Ray auth token this client would send: $RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token (Ray's own lookup order), else None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def enable_token_auth() -> None:
    """Send Ray's auth token when one is available: the Jobs client sends it only with RAY_AUTH_MODE=token
    (read when ray is imported), and a token-protected cluster refuses requests without it."""
    if "RAY_AUTH_MODE" not in os.environ and auth_token():
        os.environ["RAY_AUTH_MODE"] = "token"


def load_runtime_env(path: str | Path | None) -> dict:
    path = Path(path) if path else DEFAULT_RUNTIME_ENV
    if not path.is_file():
        raise FileNotFoundError(f"runtime env {path} not found")
    env = yaml.safe_load(path.read_text()) or {}
    if not isinstance(env, dict):
        raise ValueError(f"runtime env {path}: expected a mapping, got {type(env).__name__}")
    return env


def entrypoint(command: str, config: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "actors", command, config, *overrides])


def dashboard_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(config: str, overrides: list[str], command: str = "run", address: str | None = None,
           runtime_env: str | None = None, follow: bool = False, submission_id: str | None = None,
           entrypoint_gpus: float = 0) -> int:
    """Submit one fluxir job; returns 0 (submitted, or followed to SUCCEEDED) or 1 (followed to a failure)."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not address.startswith("http"):
        raise SubmitError(f"--address {address!r}: the Jobs API needs the dashboard's http(s) URL, e.g. {DEFAULT_ADDRESS}")
    enable_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except ConnectionError:
        raise SubmitError(f"no Ray cluster answers at {address} (start one with `ray start --head "
                          f"--node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1`, or give --address / RAY_ADDRESS)"
                          ) from None
    job_id = client.submit_job(entrypoint=entrypoint(command, config, overrides),
                               runtime_env=load_runtime_env(runtime_env), submission_id=submission_id,
                               entrypoint_num_gpus=entrypoint_gpus or None,
                               metadata={"fluxir_config": config, "fluxir_command": command})
    print(f"submitted job {job_id}\n  dashboard: {dashboard_url(address, job_id)}\n"
          f"  logs:      ray job logs --address {address} -f {job_id}")
    if not follow:
        return 0
    asyncio.run(_stream(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr if status != JobStatus.SUCCEEDED else sys.stdout)
    return 0 if status == JobStatus.SUCCEEDED else 1
