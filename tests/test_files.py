"""Run-folder lock, failed-write errors, folders put in place whole (fluxir.files)."""
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxir import files
from actors.cli import main
from fluxir.files import LOCK_FILE, RunFolderBusy, lock_run_folder, release_run_folder, write_error

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from fluxir.files import lock_run_folder; "
        "lock_run_folder(sys.argv[1], 'fluxir run held-by-test'); print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _hold(run_dir: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_by_name_before_anything_starts(tmp_path, capsys):
    run_dir = tmp_path / "smoke"
    holder = _hold(run_dir, 60)
    try:
        rc = main(["pretrain", str(ROOT / "configs/smoke.yaml"), f"output_dir={tmp_path}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"{run_dir} is in use by pid {holder.pid} on {socket.gethostname()}" in err
        assert "fluxir run held-by-test" in err
        assert not (run_dir / "pretrain").exists()  # refused before Ray or any stage started
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_at_exit_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir, 0)
    holder.wait()
    assert not (run_dir / LOCK_FILE).exists()  # released when the process exited
    killed = _hold(run_dir, 60)
    killed.kill()  # SIGKILL: no exit handler, the lock file stays
    killed.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == killed.pid
    try:
        assert lock_run_folder(run_dir, "test") == (run_dir / LOCK_FILE).resolve()
        assert f"pid {killed.pid}" in caplog.text and "no longer running" in caplog.text
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock_run_folder(run_dir, "again") == (run_dir / LOCK_FILE).resolve()  # same process: held
    finally:
        release_run_folder(run_dir)
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": "other-node", "pid": 1, "started": time.time(),
                                                 "command": "fluxir rl x.yaml"}))
    with pytest.raises(RunFolderBusy, match=f"in use by pid 1 on other-node .*remove {run_dir / LOCK_FILE}"):
        lock_run_folder(run_dir, "test")


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The lock records its process's start time: a live process with that pid but another start is not it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                 "pid_started": 1.0, "started": 1.0, "command": "old"}))
    try:
        lock_run_folder(run_dir, "test")
    finally:
        release_run_folder(run_dir)


def test_write_errors_say_no_space_and_where(tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "iter_00000002"
    err = write_error(target, OSError(errno.ENOSPC, "No space left on device"))
    assert err.errno == errno.ENOSPC and f"no space left on device while writing {target}" in str(err)
    # torch's writer says only "iostream error": a nearly full device is named as the cause
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    err = write_error(target, RuntimeError("[enforce fail at inline_container.cc:664] . iostream error"))
    assert "no space left on device" in str(err) and "0.0 MiB free" in str(err) and "iostream error" in str(err)
    monkeypatch.setattr(files, "free_bytes", lambda path: 10 << 30)
    err = write_error(target, PermissionError(errno.EACCES, "Permission denied"))
    assert f"could not write {target}: PermissionError" in str(err) and err.errno == errno.EACCES


def test_incomplete_checkpoints_are_removed_and_complete_ones_kept(tmp_path, caplog):
    for name in (".tmp-iter_00000004", "iter_00000002", ".tmp-checkpoint_00000006"):
        (tmp_path / name).mkdir()
    files.remove_incomplete(tmp_path, ".tmp-iter_*")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-checkpoint_00000006", "iter_00000002"]
    assert "removing incomplete checkpoint" in caplog.text and ".tmp-iter_00000004" in caplog.text
