"""Is A better than B? A paired bootstrap over the images two evaluations share.

    python benchmarks/paired.py A.json B.json [--nfe 1 4] [--nfe-b 1] [--metric psnr] [--samples 10000]

A and B are `fluxir eval ... --out` JSONs of the same set (same tasks and images, so image i of A and of B
is the same crop). For each NFE, the mean over all (task, image) pairs of A − B and its 95 % interval
from resampling the pairs with replacement (tasks stratified: each resample keeps every task's count, so
the mean over tasks stays the unweighted one the tables report). `--nfe-b` compares against another NFE
of B (e.g. NFE 4 against NFE 1 of the same model). Prints one line per NFE and per task.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def per_image(result: dict, nfe: int | None, metric: str) -> dict[str, np.ndarray]:
    """{task: per-image values} at `nfe` (None: the LQ input)."""
    out = {}
    for task, e in result["tasks"].items():
        entry = e["lq"] if nfe is None else e["nfe"][str(nfe)] if str(nfe) in e["nfe"] else e["nfe"][nfe]
        if "per_image" not in entry:
            raise SystemExit(f"no per-image values for {task} at NFE {nfe}: evaluate again with this version")
        out[task] = np.asarray(entry["per_image"][metric], dtype=np.float64)
    return out


def bootstrap(diffs: dict[str, np.ndarray], samples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of the per-task mean difference, and its 95 % stratified bootstrap interval."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs.values()]))
    draws = np.zeros(samples)
    for d in diffs.values():
        idx = rng.integers(0, len(d), size=(samples, len(d)))
        draws += d[idx].mean(axis=1)
    draws /= len(diffs)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def compare(a: dict, b: dict, nfe: int | None, nfe_b: int | None, metric: str, samples: int) -> dict:
    va, vb = per_image(a, nfe, metric), per_image(b, nfe_b, metric)
    if va.keys() != vb.keys() or any(len(va[t]) != len(vb[t]) for t in va):
        raise SystemExit("the two evaluations are not of the same set (tasks or image counts differ)")
    diffs = {t: va[t] - vb[t] for t in va}
    mean, lo, hi = bootstrap(diffs, samples)
    tasks = {t: dict(zip(("mean", "lo", "hi"), bootstrap({t: d}, samples))) for t, d in diffs.items()}
    return {"mean": mean, "lo": lo, "hi": hi, "tasks": tasks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1])
    parser.add_argument("--nfe-b", type=int, help="B's NFE (default: the same as A's)")
    parser.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "lpips"])
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    a, b = json.loads(open(args.a).read()), json.loads(open(args.b).read())
    for n in args.nfe:
        r = compare(a, b, n, args.nfe_b or n, args.metric, args.samples)
        sure = "A better" if (r["lo"] > 0) == (args.metric != "lpips") and r["lo"] * r["hi"] > 0 else \
            "B better" if r["lo"] * r["hi"] > 0 else "no difference shown"
        print(f"NFE {n} vs {args.nfe_b or n}: {args.metric} A − B = {r['mean']:+.4f} "
              f"[{r['lo']:+.4f}, {r['hi']:+.4f}] ({sure})")
        for t, v in r["tasks"].items():
            print(f"  {t:11s} {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
