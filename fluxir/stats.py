"""Is A better than B? Paired, task-stratified bootstrap intervals over the images two evaluations share.

Evaluations are `fluxir.evaluate` results with per-image values (`fluxir eval --out`): image i of task t
is the same crop in both, so the comparison is paired.
"""
from __future__ import annotations

import numpy as np

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


def per_image(result: dict, nfe: int | None, metric: str) -> dict[str, np.ndarray]:
    """{task: per-image values} at `nfe` (None: the LQ input); NFE keys may be ints or strings (JSON)."""
    out = {}
    for task, e in result["tasks"].items():
        entry = e["lq"] if nfe is None else e["nfe"][str(nfe)] if str(nfe) in e["nfe"] else e["nfe"][nfe]
        if "per_image" not in entry:
            raise ValueError(f"no per-image values for {task} at NFE {nfe}: evaluate again with this version")
        out[task] = np.asarray(entry["per_image"][metric], dtype=np.float64)
    return out


def by_task(values, tasks) -> dict[int, np.ndarray]:
    """Per-image `values` grouped by their task ids `tasks` (same length): {task: values}."""
    values, tasks = np.asarray(values, dtype=np.float64), np.asarray(tasks)
    return {int(t): values[tasks == t] for t in np.unique(tasks)}


def bootstrap(diffs: dict[str, np.ndarray], samples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of the per-task mean difference, and its 95 % interval from resampling each task's
    pairs with replacement (stratified: every resample keeps each task's count, so the mean over tasks
    stays the unweighted one the tables report)."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs.values()]))
    draws = np.zeros(samples)
    for d in diffs.values():
        idx = rng.integers(0, len(d), size=(samples, len(d)))
        draws += d[idx].mean(axis=1)
    draws /= len(diffs)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def paired_diffs(a: dict, b: dict, nfe: int | None, metric: str, nfe_b: int | None = None) -> dict[str, np.ndarray]:
    """{task: A − B per image}; raises ValueError when the two are not evaluations of the same set."""
    va, vb = per_image(a, nfe, metric), per_image(b, nfe if nfe_b is None else nfe_b, metric)
    if va.keys() != vb.keys() or any(len(va[t]) != len(vb[t]) for t in va):
        raise ValueError("the two evaluations are not of the same set (tasks or image counts differ)")
    return {t: va[t] - vb[t] for t in va}


def compare(a: dict, b: dict, nfe: int | None, metric: str, nfe_b: int | None = None, samples: int = 10000) -> dict:
    """{"mean", "lo", "hi", "verdict", "tasks": {task: {"mean", "lo", "hi"}}} for A − B."""
    diffs = paired_diffs(a, b, nfe, metric, nfe_b)
    mean, lo, hi = bootstrap(diffs, samples)
    tasks = {t: dict(zip(("mean", "lo", "hi"), bootstrap({t: d}, samples))) for t, d in diffs.items()}
    return {"mean": mean, "lo": lo, "hi": hi, "verdict": verdict(lo, hi, metric), "tasks": tasks}


def interval_cell(r: dict) -> str:
    """"+0.0012 [+0.0003, +0.0021] ✓" for a `compare` result of A − B: ✓ A better, ✗ B better."""
    mark = {"A better": " ✓", "B better": " ✗"}.get(r["verdict"], "")
    return f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{mark}"


def verdict(lo: float, hi: float, metric: str) -> str:
    """"A better", "B better" or "no difference shown" for an interval of A − B."""
    if lo <= 0 <= hi:
        return "no difference shown"
    return "A better" if (lo > 0) == HIGHER_IS_BETTER[metric] else "B better"
