"""A real `ray start --head` on loopback for integration tests, and a stop that touches nothing else.

`ray stop` kills every Ray process on the machine (the test session's own local Ray included), so
this head gets its own temp dir and ports, and `stop()` ends exactly the processes that carry them,
with their children.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from ipaddress import ip_address
from pathlib import Path

import psutil

from actors.submit import auth_token

LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((LOOPBACK, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalHead:
    """`ray start --head` bound to 127.0.0.1 with token auth as Ray configures it, for one test session."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="fxr", dir="/tmp")  # short: Unix socket paths are limited
        (self.gcs_port, self.dashboard_port, self.metrics_port, self.client_port, self.agent_port,
         self.agent_grpc_port, self.runtime_env_port) = free_ports(7)
        self.num_cpus = num_cpus
        self.ray = str(Path(sys.executable).with_name("ray"))
        # Token auth stays on: the user's token if there is one, else a fresh one (Ray's own format) for
        # this head only; the head, its jobs and every client below get it through RAY_AUTH_TOKEN.
        self.token = auth_token() or secrets.token_hex(32)

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment of the head and of every job it runs: this venv's python first on PATH, Ray's
        single-machine mode (its servers bind to loopback only), metrics pushed every second."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_metrics_report_interval_ms="1000",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, DS_ACCELERATOR="cpu")
        return env

    def start(self) -> None:
        cmd = [self.ray, "start", "--head", f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}",
               f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
               f"--metrics-export-port={self.metrics_port}", f"--ray-client-server-port={self.client_port}",
               f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
               f"--runtime-env-agent-port={self.runtime_env_port}", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")

    def processes(self) -> list[psutil.Process]:
        """This head's processes: those whose command line names its temp dir or its GCS/client port, and
        all their descendants (agents rename themselves, workers are children of the raylet)."""
        marks = (self.temp_dir, f":{self.gcs_port}", f"--port={self.client_port}")
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid != os.getpid() and any(m in line for m in marks):
                roots.append(p)
        found = {}
        for root in roots:
            try:
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def listeners(self) -> tuple[set[str], set[str]]:
        """(this head's sockets listening on every interface (an unspecified address), as "process title :port";
        the titles of its processes now), read from the kernel's socket table."""
        titles = {}
        for p in self.processes():
            try:
                titles[p.pid] = " ".join(p.cmdline())[:60]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        wildcard = {f"{titles[c.pid]} :{c.laddr.port}" for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and ip_address(c.laddr.ip).is_unspecified and c.pid in titles}
        return wildcard, set(titles.values())

    def stop(self) -> list[int]:
        """Terminate (then kill) this head's processes; returns the pids still alive (should be none)."""
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        left = [p.pid for p in self.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    # --- REST: the Jobs API and the State API, as a user's HTTP client would call them -------------
    def get(self, path: str) -> dict | list:
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def wait_for_job(self, job_id: str, timeout: float, poll=None, every: float = 2.0) -> dict:
        """Poll GET /api/jobs/<id> until the job is terminal; `poll()` runs at each tick (e.g. scrape metrics)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(f"/api/jobs/{job_id}")
            if poll:
                poll()
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['status']} after {timeout:.0f} s")
            time.sleep(every)
