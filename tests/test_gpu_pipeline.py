"""benchmarks/gpu_pipeline.py: refuses at once without a GPU; the toy size runs stages 0-2 and the test set."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_pipeline.py"
POLICIES = ["base", "rsr", "fm", "teacher uniform K=2", "teacher searched K=2", "teacher N=4", "student K=2"]


def numbers(tree):
    """Every int and float in a JSON tree."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_without_a_gpu_it_exits_2_with_a_plain_message(tmp_path):
    out = tmp_path / "gpu_pipeline.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "needs one GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_toy_size_runs_every_stage_and_writes_finite_tables(tmp_path):
    out = tmp_path / "toy.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--device", "cpu", "--out", str(out),
                           f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["size"] == "toy"
    assert report["pretrain"]["steps"] > report["pretrain"]["warmup_steps"]  # the cosine part ran
    assert report["model"]["total"] == report["model"]["trainable"] > 0
    assert all(report["rl"][arm]["iterations"] >= 1 for arm in ("rsr", "fm"))
    distill = report["distill"]
    assert distill["budget"] == 2 and len(distill["schedule"]) == 3 and distill["steps"] >= 1
    assert list(report["test"]["evals"]) == POLICIES
    table = report["test"]["table"]
    assert set(table) == {"LQ input", *POLICIES}
    assert set(table["rsr"]) == {f"{m}@{n}" for m in ("psnr", "ssim", "lpips") for n in (1, 2)}
    assert set(table["student K=2"]) == {"psnr@2", "ssim@2", "lpips@2"}
    versus = report["test"]["versus"]
    assert {"rsr@1 - fm@1", "rsr@2 - base@2", "student K=2@2 - teacher uniform K=2@2",
            "student K=2@2 - teacher N=4@4"} <= set(versus)
    assert all(c["lo"] <= c["mean"] <= c["hi"] for cells in versus.values() for c in cells.values())
    values = numbers(report)
    assert values and all(math.isfinite(x) for x in values)
    assert "| student K=2@2 - teacher uniform K=2@2 |" in proc.stdout
