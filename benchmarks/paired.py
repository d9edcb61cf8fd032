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

from common import ROOT  # noqa: F401,E402  (benchmarks/common.py: puts the repo on sys.path)
from fluxir.stats import compare  # noqa: E402


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
        try:
            r = compare(a, b, n, args.metric, args.nfe_b or n, args.samples)
        except ValueError as err:
            raise SystemExit(str(err)) from err
        print(f"NFE {n} vs {args.nfe_b or n}: {args.metric} A − B = {r['mean']:+.4f} "
              f"[{r['lo']:+.4f}, {r['hi']:+.4f}] ({r['verdict']})")
        for t, v in r["tasks"].items():
            print(f"  {t:11s} {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
