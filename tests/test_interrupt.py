"""A hurried user: Ctrl-C stops a run at once with the checkpoint to resume from; a resource request the
cluster cannot meet fails at once with the numbers instead of waiting for ever."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.runtime import check_resources
from fluxir.config import ConfigError
from fluxir.files import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "actors", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_resources_beyond_the_cluster_are_refused_with_the_numbers():
    roles = [("rl.rollout_resources", {"CPU": 1}, 2), ("rl.learner_resources", {"CPU": 1, "GPU": 1}, 2)]
    check_resources("stage 1", roles, {"CPU": 4, "GPU": 2})
    with pytest.raises(ConfigError, match=r"stage 1 needs 2 GPU \(rl.rollout_resources=0 x 2, "
                                          r"rl.learner_resources=1 x 2\) but the Ray cluster has 1"):
        check_resources("stage 1", roles, {"CPU": 4, "GPU": 1})


def test_an_autoscaling_cluster_waits_with_a_warning(caplog):
    check_resources("stage 0", [("pretrain.worker_resources", {"GPU": 1}, 8)], {"CPU": 8}, autoscaling=True)
    assert "stage 0 needs 8 GPU" in caplog.text and "waiting for the autoscaler" in caplog.text


@pytest.mark.slow  # starts Ray (~15 s); CI runs it (`make test-slow`)
def test_an_impossible_request_fails_at_once(tmp_path):
    proc = _start("pretrain", SMOKE, f"output_dir={tmp_path}", "pretrain.num_workers=4", "ray.num_cpus=2")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-3000:]
    assert ("stage 0 needs 4 CPU (pretrain.worker_resources=1 x 4) but the Ray cluster has 2"
            in err.strip().splitlines()[-1])


@pytest.mark.slow  # a stage-0 start (~40 s); CI runs it (`make test-slow`)
def test_one_ctrl_c_stops_the_run_and_names_the_last_checkpoint(tmp_path):
    run = tmp_path / "smoke"
    proc = _start("pretrain", SMOKE, f"output_dir={tmp_path}", "pretrain.steps=100000")
    deadline = time.monotonic() + 300
    while not list((run / "pretrain").glob("checkpoint_0*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - started < 30
    newest = max((run / "pretrain").glob("checkpoint_0*"), key=lambda p: p.stat().st_mtime)
    assert f"fluxir: interrupted; the last checkpoint is {newest} (the same command resumes from it)" in err
    assert not (run / LOCK_FILE).exists()
