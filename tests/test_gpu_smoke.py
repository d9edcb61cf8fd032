"""benchmarks/gpu_smoke.py: refuses at once without a GPU; its code runs end to end on a few-block model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def test_without_a_gpu_it_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "needs one GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.slow  # 35 s: CI runs it in `make test-slow`
def test_small_cpu_run_measures_every_phase(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    phases = [r["phase"] for r in report["records"]]
    assert phases.count("rollout") == 2 and {"vae", "rollout_input"} <= set(phases)
    learner = [r for r in report["records"] if r["phase"] == "learner"]
    assert [r["gradient_checkpointing"] for r in learner] == [False, True]
    assert not any("error" in r or "oom" in r or "skipped" in r for r in report["records"])
    assert all(r["finite"] for r in report["records"] if r["phase"] == "rollout")
    # the learner really steps: the same batch's loss falls from the first measurement to the second
    assert learner[1]["loss"] < learner[0]["loss"]
    assert report["params"]["lora"] > 0 and report["params"]["trainable"] > report["params"]["lora"]
    assert "| learner | 64 | 1 | on |" in proc.stdout
