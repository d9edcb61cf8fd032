"""Timing model of overlapped stage 1 (`rl.async`) on one 8-GPU node, from the time model of
benchmarks/results/scaling_plan.json (its H100 rows use the forward and learner times gpu_smoke.json
measured; its H200 rows an assumed rate).

    python benchmarks/async_model.py [--plan benchmarks/results/scaling_plan.json] [--sync-gbps 10]

Per (GPU, px, NFE) of the plan, with R and L the rollout and learner seconds of one iteration on all 8 GPUs
(the plan's colocated layout) and S the weight sync (the bf16 LoRA set per rollout actor at `--sync-gbps`,
an assumed object-store rate, since it has not been measured on a GPU node):
- colocated, synchronous (what configs/flux-dev-7task.yaml runs): R + L + S;
- r rollout GPUs + (8 − r) learner GPUs, synchronous: 8R/r + 8L/(8 − r) + S;
- the same split, overlapped: max(8R/r, 8L/(8 − r)) + S (the sync is not hidden: the actors load the new
  weights between two rollouts), at the r that minimises it.
Work that scales perfectly over GPUs gains nothing from overlap against the colocated layout (both keep
every GPU busy); the model says by how much a split layout needs overlap to match it. Writes
benchmarks/results/async_model.json and prints the Markdown table docs/SCALING.md quotes.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, command, write_result  # noqa: E402

GPUS = 8
LORA_R64_BF16_GIB = 0.98 / 2  # the fp32 set is 0.98 GiB at r = 64 (scaling_plan.json); bf16 ships half


def layouts(rollout_s: float, learner_s: float, sync_s: float) -> dict:
    split = {r: (GPUS * rollout_s / r, GPUS * learner_s / (GPUS - r)) for r in range(1, GPUS)}
    best_sync = min(split, key=lambda r: sum(split[r]))
    best_async = min(split, key=lambda r: max(split[r]))
    return {"colocated_sync_s": rollout_s + learner_s + sync_s,
            "split_sync_s": sum(split[best_sync]) + sync_s, "split_sync_rollout_gpus": best_sync,
            "split_async_s": max(split[best_async]) + sync_s, "split_async_rollout_gpus": best_async}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default=str(RESULTS / "scaling_plan.json"))
    p.add_argument("--sync-gbps", type=float, default=10.0, help="assumed object-store rate, GB/s")
    p.add_argument("--out", default=str(RESULTS / "async_model.json"))
    args = p.parse_args()
    plan = json.loads(open(args.plan).read())
    sync_s = LORA_R64_BF16_GIB * 2 ** 30 / (args.sync_gbps * 1e9)
    rows = {key: {**layouts(t["rollout_s"], t["learner_s"], sync_s), "rollout_s": t["rollout_s"],
                  "learner_s": t["learner_s"], "measured": bool(t["measured"])} for key, t in plan["time"].items()}
    write_result(args.out, {"command": command(__file__), "sync_s": sync_s, "sync_gbps_assumed": args.sync_gbps,
                            "rows": rows})
    print("| GPU, px, NFE | R s | L s | colocated sync s | best split sync s (rollout GPUs) | "
          "best split async s (rollout GPUs) | throughput, async split ÷ colocated sync |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        print(f"| {key.replace('_', ', ')} | {r['rollout_s']:.2f} | {r['learner_s']:.2f} | {r['colocated_sync_s']:.2f} "
              f"| {r['split_sync_s']:.2f} ({r['split_sync_rollout_gpus']}) | {r['split_async_s']:.2f} "
              f"({r['split_async_rollout_gpus']}) | {r['colocated_sync_s'] / r['split_async_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
