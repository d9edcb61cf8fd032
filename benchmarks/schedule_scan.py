"""Every K-step schedule on the teacher grid against the uniform one and the cost-DP one, on the
validation crops stage 2 uses: how much any schedule search could gain before distillation.

    python benchmarks/schedule_scan.py configs/tiny-gauss.yaml [--budget 2] [key=value ...]

Needs the teacher (`distill.teacher`, default: <run>/rl/model, else <run>/pretrain/model). Budget 2 is
an exhaustive scan of the N−1 split points; larger budgets scan all C(N−1, K−1) interior sets, so keep
K·N small. Writes benchmarks/results/schedule_scan_<name>_K<k>.json and prints the best and the uniform.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxir.config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--budget", type=int, default=2)
    args = parser.parse_args()

    from actors.distill import teacher_dir
    from fluxir import distill as D
    from fluxir.codec import build_codec
    from fluxir.evaluate import lpips_or_reason
    from fluxir.policy import load_policy
    from fluxir.pretrain import token_channels

    cfg = load_config(args.config, args.overrides)
    codec = build_codec(cfg)
    policy = load_policy(teacher_dir(cfg), cfg, token_channels(codec))
    lpips_net = lpips_or_reason(cfg.eval.lpips)[0]
    start = time.perf_counter()
    cal = D.teacher_trajectories(policy, codec, D.calibration_inputs(cfg, cfg.distill.calibration_size,
                                                                     D.SALT_CALIBRATION), cfg, cfg.distill.teacher_nfe)
    val = D.teacher_trajectories(policy, codec, D.calibration_inputs(cfg, cfg.distill.validation_size,
                                                                     D.SALT_VALIDATION), cfg, cfg.distill.teacher_nfe)
    grid, n = val.schedule, len(val.schedule) - 1
    rows = []
    for inner in itertools.combinations(range(1, n), args.budget - 1):
        schedule = [grid[0], *(grid[i] for i in inner), 0.0]
        rows.append({"schedule": schedule, **D.validate(policy, codec, val, schedule, cfg.flow, lpips_net)})
    scanned = {tuple(r["schedule"]): r for r in rows}
    uniform = D.validate(policy, codec, val, D.budget_schedule("uniform", args.budget, grid, None), cfg.flow,
                         lpips_net)
    result = {"config": args.config, "overrides": args.overrides, "budget": args.budget, "teacher_nfe": n,
              "validation_size": len(val), "uniform": uniform,
              "teacher": D.validate(policy, codec, val, grid, cfg.flow, lpips_net),
              "best_psnr": max(rows, key=lambda r: r["psnr"]), "scan": rows}
    for key, per_unit_time in (("cost_dp", True), ("cost_dp_state_units", False)):
        schedule = D.budget_schedule("cost_dp", args.budget, cal.schedule, D.cost_matrix(cal, per_unit_time))
        result[key] = scanned[tuple(schedule)]
    result["seconds"] = time.perf_counter() - start
    if "lpips" in uniform:
        result["best_lpips"] = min(rows, key=lambda r: r["lpips"])
    out = ROOT / "benchmarks" / "results" / f"schedule_scan_{cfg.name}_K{args.budget}.json"
    out.write_text(json.dumps(result, indent=2))
    for key in ("uniform", "cost_dp", "cost_dp_state_units", "best_psnr", "best_lpips", "teacher"):
        if key in result:
            r = result[key]
            print(f"{key:10s} {r.get('schedule', '')} PSNR {r['psnr']:.3f}" + (f" LPIPS {r['lpips']:.4f}" if "lpips" in r else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
