"""Running on a cluster: the cluster files, and a real `ray start` + `ray job submit` of the smoke config.

The integration half shares one submitted smoke run (`cluster_smoke_run` in conftest.py) with
tests/test_cli.py, which checks that run's outputs.
"""
import copy
import json
from pathlib import Path

import pytest
import yaml

from actors.submit import entrypoint, load_runtime_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


# --- the files ---------------------------------------------------------------------------------

def test_cluster_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    full = prepare_config(copy.deepcopy(raw))
    validate_config(full)  # Ray's ray-schema.json: no field Ray does not define
    types = full["available_node_types"]
    assert types[full["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values()), "no GPU worker node type"
    head_start = " ".join(full["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--metrics-export-port" in head_start
    raw["available_node_types"]["head"]["gpus"] = 1  # a field Ray does not define is refused
    with pytest.raises(Exception, match="gpus"):
        validate_config(prepare_config(raw))


def _check_fields(obj: dict, allowed: list[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    assert not unknown, f"{where}: fields KubeRay's ray.io/v1 does not define: {unknown}"


def test_rayjob_manifest_uses_only_kuberay_fields():
    """Field names from KubeRay's Go types (tests/data/kuberay_v1_fields.json names the commits)."""
    api = json.loads((ROOT / "tests/data/kuberay_v1_fields.json").read_text())
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    spec = job["spec"]
    _check_fields(spec, api["RayJobSpec"], "spec")
    assert spec["submissionMode"] in api["submissionMode_values"]
    cluster = spec["rayClusterSpec"]
    _check_fields(cluster, api["RayClusterSpec"], "rayClusterSpec")
    _check_fields(cluster["headGroupSpec"], api["HeadGroupSpec"], "headGroupSpec")
    for required in api["fields_without_omitempty"]["HeadGroupSpec"]:
        assert required in cluster["headGroupSpec"], required
    for group in cluster["workerGroupSpecs"]:
        _check_fields(group, api["WorkerGroupSpec"], f"workerGroupSpecs[{group['groupName']}]")
        for required in api["fields_without_omitempty"]["WorkerGroupSpec"]:
            assert required in group, required
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    # the entrypoint runs fluxir on a config that exists; the runtime env is the same as runtime_env.yaml's
    args = spec["entrypoint"].split()
    assert args[:4] == ["python", "-m", "actors", "run"] and (ROOT / args[4]).is_file()
    embedded = yaml.safe_load(spec["runtimeEnvYAML"])
    local = load_runtime_env(CLUSTER / "runtime_env.yaml")
    assert embedded["env_vars"] == local["env_vars"] and embedded["excludes"] == local["excludes"]


def test_runtime_env_uses_only_ray_fields():
    from ray.runtime_env import RuntimeEnv

    env = load_runtime_env(None)  # the default: cluster/runtime_env.yaml
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks (env_vars: Dict[str, str], ...)
    assert env["working_dir"] == "." and "runs/" in env["excludes"]


def test_submit_entrypoint_quotes_overrides():
    assert entrypoint("run", "configs/tiny.yaml", ["name=my run", "rl.iterations=3"]) == (
        "python -m actors run configs/tiny.yaml 'name=my run' rl.iterations=3")


def test_submit_without_a_cluster_is_one_line():
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "actors", "submit", "configs/smoke.yaml", "--address",
                           f"http://127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert f"no Ray cluster answers at http://127.0.0.1:{port}" in proc.stderr


def test_stage_gauges_keep_their_latest_value_until_the_stage_closes(monkeypatch):
    """Ray's agent ages out a gauge not set within two report intervals: the stage re-sets its latest values."""
    import time

    import ray.util.metrics

    from actors import tracking

    sets = []

    class Gauge:
        def __init__(self, name, description="", tag_keys=()):
            self.name = name

        def set(self, value, tags=None):
            sets.append((self.name, value, tags["stage"]))

    monkeypatch.setattr(ray.util.metrics, "Gauge", Gauge)
    monkeypatch.setattr(tracking, "GAUGE_REFRESH_S", 0.05)
    with tracking.StageMetrics("rl", {"version": "fluxir_policy_version", "gap": "fluxir_ode_best_gap"}) as m:
        m.record({"version": 3, "other": 1.0})
        time.sleep(0.5)
        assert m._refresher.is_alive()
    closed = len(sets)
    time.sleep(0.2)
    assert not m._refresher.is_alive() and len(sets) == closed
    assert closed >= 4 and set(sets) == {("fluxir_policy_version", 3.0, "rl")}  # no value invented for `gap`


# --- the real thing ----------------------------------------------------------------------------

def test_ray_job_submit_of_the_smoke_config_succeeds(cluster_smoke_run):
    r = cluster_smoke_run
    assert r.status == "SUCCEEDED", f"job {r.status}:\n{r.logs[-4000:]}"
    assert r.job["entrypoint"].startswith("python -m actors run configs/smoke.yaml")
    assert "# fluxir run `smoke`" in r.logs and "## Stage 1: RL trajectory optimisation" in r.logs
    assert f"report: {r.run_dir / 'report.md'}" in r.logs


def test_fluxir_metrics_reach_prometheus(cluster_smoke_run):
    metrics = cluster_smoke_run.metrics
    assert len(metrics) >= 3, metrics
    for stage_metric in ("fluxir_train_loss", "fluxir_rollouts_total", "fluxir_policy_version",
                         "fluxir_distill_val_psnr"):
        assert stage_metric in metrics, sorted(metrics)


def test_no_socket_listens_on_every_interface(cluster_smoke_run):
    """Stages 0 and 1 (Ray Train ranks, learners) ran while the sockets were read; none of the head's
    processes, torch.distributed's rendezvous included, listened beyond loopback."""
    titles = " ".join(cluster_smoke_run.processes)
    assert "ray::RayTrainWorker" in titles and "ray::LearnerActor" in titles, sorted(cluster_smoke_run.processes)
    assert cluster_smoke_run.open_to_all == set()


def test_the_socket_reader_sees_a_socket_open_to_all(monkeypatch):
    """The reader behind the test above, on a socket table faked to hold one wildcard listener of ours
    (no test opens one for real) beside a loopback one."""
    import os
    import shutil
    from types import SimpleNamespace

    import psutil

    from tests.ray_head import LocalHead

    def listening(ip, port):
        return SimpleNamespace(status=psutil.CONN_LISTEN, laddr=SimpleNamespace(ip=ip, port=port), pid=os.getpid())

    monkeypatch.setattr(LocalHead, "processes", lambda self: [psutil.Process(os.getpid())])
    monkeypatch.setattr(psutil, "net_connections", lambda kind: [listening("::", 4242), listening("127.0.0.1", 4343)])
    head = LocalHead()  # never started: only its reader is used
    shutil.rmtree(head.temp_dir)
    wildcard, titles = head.listeners()
    assert len(wildcard) == 1 and next(iter(wildcard)).endswith(" :4242") and len(titles) == 1


def test_actors_are_named_in_the_dashboard(cluster_smoke_run):
    names = set(cluster_smoke_run.actors)
    for name in ("rollout-0", "rollout-1", "reward-0", "learner-0", "learner-1"):
        assert name in names, sorted(n for n in names if n)


def test_fluxir_submit_follows_a_job_to_success(cluster_smoke_run):
    proc = cluster_smoke_run.submit
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and "dashboard: http://127.0.0.1:" in proc.stdout
    assert "test set at" in proc.stdout and "SUCCEEDED" in proc.stdout


def test_the_head_is_stopped(cluster_smoke_run):
    assert cluster_smoke_run.left == []
