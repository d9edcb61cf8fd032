"""Disk full while saving a checkpoint, on a small tmpfs: stages 0 and 1 say "no space left on device" and
where, leave no folder that looks complete but is not, and stage 0 resumes from its last whole checkpoint."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _resize(mount: Path, kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mount)], check=True)


def _fluxir(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "actors", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _used_kib(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // 1024


def test_stage0_checkpoints_are_whole_or_absent_and_resume_skips_the_broken_one(tmpfs):
    smoke = str(ROOT / "configs/smoke.yaml")
    failed = _fluxir("pretrain", smoke, f"output_dir={tmpfs}")  # 2 MiB: checkpoint 3 fits, checkpoint 6 does not
    run = tmpfs / "smoke" / "pretrain"
    assert failed.returncode != 0
    assert f"no space left on device while writing {run / '.tmp-checkpoint_00000006'}" in failed.stderr
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000003"]
    _resize(tmpfs, 8192)
    resumed = _fluxir("pretrain", smoke, f"output_dir={tmpfs}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removing incomplete checkpoint" in resumed.stderr and "at step 3" in resumed.stderr
    assert not list(run.glob(".tmp-*")) and (run / "checkpoint_00000006" / "fluxir_state.json").is_file()


def test_stage1_disk_full_names_the_device_and_keeps_no_partial_checkpoint(tmpfs):
    smoke = str(ROOT / "configs/smoke.yaml")
    _resize(tmpfs, 16384)
    assert _fluxir("pretrain", smoke, f"output_dir={tmpfs}").returncode == 0
    _resize(tmpfs, _used_kib(tmpfs) + 700)  # room for stage 1's start, not for its learners' checkpoint
    failed = _fluxir("rl", smoke, f"output_dir={tmpfs}")
    ckpts = tmpfs / "smoke" / "rl" / "checkpoints"
    assert failed.returncode != 0
    assert f"no space left on device while writing {ckpts / '.tmp-iter_00000002'}" in failed.stderr, failed.stderr[-3000:]
    assert not list(ckpts.iterdir())
