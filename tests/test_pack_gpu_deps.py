"""benchmarks/pack_gpu_deps.py and benchmarks/ray_gpu_check.py, offline: the slimming keeps executables and
drops what it should, every packed distribution is pinned, requirements are judged, the import guard refuses
what the GPU machine lacks, and the GPU check's overrides load."""
from __future__ import annotations

import importlib.util
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    """A script of benchmarks/ as a module, without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pack, check = load("pack_gpu_deps"), load("ray_gpu_check")


def fake_wheel(path: Path) -> Path:
    """A wheel shaped like Ray's: an executable, a kept module, dropped folders, a dist-info."""
    files = {"ray/__init__.py": 0o644, "ray/core/raylet": 0o755, "ray/jars/ray_dist.jar": 0o644,
             "ray/rllib/__init__.py": 0o644, "ray/dashboard/client/build/index.html": 0o644,
             "ray/dashboard/agent.py": 0o644, "ray-9.9.dist-info/METADATA": 0o644}
    with zipfile.ZipFile(path, "w") as z:
        for name, mode in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, f"contents of {name}")
    return path


def test_slim_ray_keeps_modes_and_drops_the_unused_parts(tmp_path):
    wheel = fake_wheel(tmp_path / "ray-9.9-cp312-cp312-manylinux2014_x86_64.whl")
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    entry = pack.slim_ray(wheel, out, work, previous={})
    assert set(entry["dropped_bytes"]) == {"ray/jars", "ray/rllib", "ray/dashboard/client"}
    assert entry["slim_bytes"] < entry["unpacked_bytes"] and not (work / "ray-site").exists()
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / entry["archive"]) as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "ray/core/raylet").stat().st_mode & 0o111  # still executable after zip -> tar.xz
    assert (unpacked / "ray/dashboard/agent.py").is_file() and (unpacked / "ray-9.9.dist-info/METADATA").is_file()
    assert not any((unpacked / rel).exists() for rel in pack.RAY_DROP)
    assert pack.slim_ray(wheel, out, work, previous=entry) is entry  # same wheel, same drop list: kept


def test_every_packed_distribution_is_pinned():
    pins = pack.read_pins(ROOT / "constraints.txt")
    assert set(pack.PACKED) <= set(pins)
    assert not set(pack.PACKED) & pack.GPU_MACHINE - {"peft", "typing-extensions"}  # packed: what it lacks


def test_requirements_are_judged_against_the_packed_set_and_the_gpu_machine():
    from packaging.requirements import Requirement

    packed = {"pydantic-core": "2.50.5"}
    assert pack.judge(Requirement("pydantic-core==2.50.5"), "pydantic", packed)[0] == "ok"
    assert pack.judge(Requirement("pydantic-core==2.41.0"), "pydantic", packed)[0] == "missing"
    assert pack.judge(Requirement("numpy>=99"), "x", packed)[0] == "missing"  # the GPU machine's is known
    assert pack.judge(Requirement("packaging>=24.2"), "ray", packed)[0] == "unverified"
    assert pack.judge(Requirement("tensorboardX>=1.9"), "ray", packed)[0] == "not needed"
    assert pack.judge(Requirement("torch==2.14.1"), "fluxir", packed)[0] == "machine's own"
    assert pack.judge(Requirement("left-pad"), "x", packed)[0] == "missing"


def test_the_guard_refuses_what_the_gpu_machine_lacks_and_the_dropped_parts_of_ray():
    guard = pack.GpuMachineGuard({"ray", "numpy"}, {"wandb": ["wandb"], "numpy": ["numpy"], "ray": ["ray"]}, None)
    assert guard.refused("wandb") and guard.refused("wandb.sdk")
    assert guard.refused("ray.rllib") and guard.refused("ray.serve.api")
    assert not guard.refused("ray.train") and not guard.refused("numpy.linalg")
    assert not guard.refused("json") and not guard.refused("fluxir.config")  # stdlib, the repository
    with pytest.raises(ModuleNotFoundError, match="not on the GPU machine"):
        guard.find_spec("wandb")


def test_the_gpu_checks_overrides_load():
    from fluxir.config import load_config

    cfg = load_config(ROOT / check.CONFIG, check.overrides(check.DS_JSON, "/tmp/unused"))
    assert cfg.rl.colocate and cfg.rl.num_learners == cfg.rl.num_rollout_actors == cfg.rl.num_reward_workers == 1
    gpu = cfg.rl.learner_resources["GPU"] + cfg.rl.rollout_resources["GPU"] + cfg.rl.reward_resources["GPU"]
    assert gpu == pytest.approx(1.0) and cfg.pretrain.worker_resources["GPU"] == 1
    assert cfg.model.dtype == "bfloat16" and cfg.rl.deepspeed.endswith("zero2_bf16.json")


def test_the_fluxir_command_is_the_entry_point_pyproject_names():
    code = check.fluxir("pretrain")[2]
    module = code.split("from ", 1)[1].split(" import", 1)[0]
    assert importlib.util.find_spec(module) is not None


def test_the_excerpt_and_the_learner_facts_are_read_from_the_log(tmp_path):
    lines = ["(LearnerActor pid=1) h:1:2 [0] NCCL INFO NCCL version 2.27.7+cuda13.0",
             "(PlacementGroupCleaner pid=2) Failed to query Ray Train Controller actor state. State API ...",
             "INFO actors.learner: learner group: 1 rank(s), {'rank': 0, 'backend': 'nccl', 'zero_stage': 2}",
             "rl:  33%|###  | 1/3"]
    assert check.excerpt(lines) == [lines[0], lines[2]]
    assert check.rl_facts(tmp_path, lines)["learner"] == {"rank": 0, "backend": "nccl", "zero_stage": 2}
