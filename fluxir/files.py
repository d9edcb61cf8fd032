"""Writing files so that nothing is lost: files and folders put in place whole or not at all, a write that
failed for want of space said plainly, and one writer per run folder."""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".fluxir.lock"
NEARLY_FULL = 1 << 20  # bytes: below this a failed write is put down to a full device


class RunFolderBusy(RuntimeError):
    """Another process writes into this run folder."""


def free_bytes(path: Path) -> int:
    """Free bytes on the device that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def write_error(path: Path, err: BaseException) -> OSError:
    """An OSError for a failed write under `path` that says where and, when the device is full (ENOSPC, or
    a library's own wording such as "iostream error" with under 1 MiB free), "no space left on device"."""
    free = free_bytes(path)
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or free < NEARLY_FULL
    if full:
        return OSError(errno.ENOSPC, f"no space left on device while writing {path} "
                                     f"({free / 2**20:.1f} MiB free there; {type(err).__name__}: {err})")
    return OSError(getattr(err, "errno", None) or errno.EIO, f"could not write {path}: {type(err).__name__}: {err}")


@contextmanager
def replaced_whole(path: Path):
    """A binary file that takes `path`'s place only once written in full: it is written beside the target
    (a link is followed to the file it names) and renamed over it; on any error it is removed and the target
    is untouched."""
    target = Path(os.path.realpath(path))
    partial = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")
    try:
        with open(partial, "xb") as f:  # mode from the umask, as a plain open() would give
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` in place as `final` (replacing one of the same name)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_incomplete(root: Path, pattern: str = ".tmp-*") -> None:
    """Remove the folders under `root` a run did not finish saving (killed, or out of space): they never
    carried their final name."""
    for stale in sorted(Path(root).glob(pattern)):
        log.warning("removing incomplete checkpoint %s (its run stopped while saving it)", stale)
        shutil.rmtree(stale, ignore_errors=True)


# --- one writer per run folder ------------------------------------------------------------------

_held: dict[Path, Path] = {}  # run folder -> its lock file, held by this process


def _process_started(pid: int) -> float | None:
    """The start time of a live process, None if there is none with that pid."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # vanished, or half-written by a process that died at once: not a live holder


def _is_stale(holder: dict | None) -> bool:
    """A lock whose writer is gone: a dead (or reused) pid on this host, or an unreadable lock file."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # a process on another machine: its liveness cannot be checked from here
    started = _process_started(int(holder.get("pid", -1)))
    return started is None or abs(started - float(holder.get("pid_started", started))) > 1.0


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command', '?')}`, since {when})"


def lock_run_folder(run_dir: Path, command: str) -> Path:
    """Take `run_dir`'s lock for this process until it exits (again in the same process: a no-op).

    A lock held by a live process is refused by name (RunFolderBusy); one left by a dead process on this
    host is taken over with a warning. Returns the lock file."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return _held[run_dir]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_started(os.getpid()),
          "started": time.time(), "command": command}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if not _is_stale(holder):
                raise RunFolderBusy(f"{run_dir} is in use by {_describe(holder)}; wait for it to finish or "
                                    f"write elsewhere (another name= or output_dir=); if that process is "
                                    f"gone, remove {lock}") from None
            log.warning("taking over %s: left by %s, which is no longer running", lock,
                        _describe(holder) if holder else "a process that did not finish writing it")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[run_dir] = lock
        atexit.register(_release, run_dir)
        return lock
    raise RunFolderBusy(f"{run_dir}: another process took {lock} while this one was taking over a stale lock")


def _release(run_dir: Path) -> None:
    lock = _held.pop(run_dir, None)
    if lock is not None and (_holder(lock) or {}).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def release_run_folder(run_dir: Path) -> None:
    """Give up this process's lock on `run_dir` before it exits (tests, long-lived drivers)."""
    _release(Path(run_dir).resolve())


def held_run_folders() -> list[Path]:
    """The run folders this process holds the lock of."""
    return list(_held)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of any stage under `run_dir` (stage 0's `checkpoint_N`, stage 1's
    `iter_N`, a student trial's `checkpoint_N`; `.tmp-` folders are never complete), or None."""
    found = [p for pattern in ("checkpoint_0*", "iter_0*") for p in Path(run_dir).rglob(pattern) if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
