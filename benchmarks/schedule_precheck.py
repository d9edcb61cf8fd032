"""Before any distillation: can a K-step schedule beat uniform on this teacher, and does the schedule
search find it? On the validation crops of stage 2 (training photos, their own seed), per seed:

- the teacher's quality-vs-NFE curve on uniform and shifted schedules (does it need its steps?);
- per budget K: uniform, shifted, the search's schedule (its cost measured on the calibration crops,
  `fluxir.distill.sampler_cost`), and a direct search on the validation crops themselves (the best any
  schedule on the grid can do there, an optimistic bound since it selects on the set it is scored on).

    python benchmarks/schedule_precheck.py configs/tiny.yaml --teacher runs/tiny/rl/model --seeds 0 1 2

Seeds change the calibration and validation crops and the starting noise. Writes
benchmarks/results/schedule_precheck_<name>.json; `--table` prints docs/BENCHMARKS.md's tables from it.
`--test` then scores each seed's searched schedule against uniform on the frozen test set, once.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from common import RESULTS, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)

from fluxir.config import config_from_dict, load_config  # noqa: E402

ARMS = ("uniform", "shifted", "searched", "direct")


def _seed_run(cfg, teacher_dir: str, budgets: list[int], curve: list[int], lpips_net) -> dict:
    from fluxir import distill as D, flow
    from fluxir.policy import load_trained
    from fluxir.seeds import Salt

    d = cfg.distill
    policy, codec = load_trained(teacher_dir, cfg)
    sets = {name: D.teacher_trajectories(policy, codec, D.calibration_inputs(cfg, size, salt), cfg, 1)
            for name, size, salt in (("calibration", d.calibration_size, Salt.DISTILL_CALIBRATION),
                                     ("validation", d.validation_size, Salt.DISTILL_VALIDATION))}
    val = sets["validation"]
    score = lambda schedule: D.validate(policy, codec, val, schedule, cfg.flow, lpips_net, per_image=True)  # noqa: E731
    out = {"tasks": val.task.tolist(), "curve": {}, "budgets": {}}
    for kind in ("uniform", "shifted"):
        for n in curve:
            out["curve"][f"{kind}-{n}"] = score(flow.make_schedule(kind, n, cfg.flow.t_start, cfg.distill.shift))
    for k in budgets:
        starts = {kind: D.budget_schedule(kind, k, cfg.flow.t_start, cfg.distill.shift) for kind in ("uniform", "shifted")}
        row = {kind: {"schedule": s, **score(s)} for kind, s in starts.items()}
        for arm, on in (("searched", sets["calibration"]), ("direct", val)):
            t0 = time.perf_counter()
            found = D.search_schedule(D.sampler_cost(policy, codec, on, cfg.flow, d.metric, lpips_net), k,
                                      cfg.flow.t_start, d.search_grid, starts)
            row[arm] = {"schedule": found.schedule, "evaluations": found.evaluations,
                        "search_s": time.perf_counter() - t0, **score(found.schedule)}
        out["budgets"][str(k)] = row
    return out


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--teacher", help="policy folder (default: distill.teacher, else <run>/rl/model, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--curve", type=int, nargs="+", default=[1, 2, 3, 4, 6, 10, 20, 40])
    parser.add_argument("--table", action="store_true", help="print the tables of an existing result file")
    parser.add_argument("--test", action="store_true", help="also the searched schedules on the frozen test set")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    path = RESULTS / f"schedule_precheck_{base.name}.json"
    if not args.table:
        import torch

        from fluxir.teacher import teacher_dir
        from fluxir.evaluate import lpips_or_reason

        torch.set_num_threads(2)
        teacher = args.teacher or str(teacher_dir(base))
        lpips_net = lpips_or_reason(base.eval.lpips)[0]
        start = time.perf_counter()
        seeds = {}
        for seed in args.seeds:
            cfg = config_from_dict({**base.model_dump(mode="json"), "seed": seed}, "precheck")
            seeds[str(seed)] = _seed_run(cfg, teacher, args.budgets, args.curve, lpips_net)
            print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
        write_result(path, {"config": args.config, "overrides": args.overrides, "teacher": teacher,
                            "metric": base.distill.metric, "search_grid": base.distill.search_grid,
                            "calibration_size": base.distill.calibration_size,
                            "validation_size": base.distill.validation_size, "seeds": seeds,
                            "seconds": time.perf_counter() - start, "machine": machine()})
    result = json.loads(path.read_text())
    if args.test:
        result["test"] = test_check(base, result)
        write_result(path, result)
    print_tables(result)
    return 0


def test_check(cfg, result: dict) -> dict:
    """Per budget and seed: the teacher on that seed's searched schedule minus uniform on the frozen test
    set (paired, task-stratified intervals; the test set's own noise seed for both)."""
    from fluxir import distill as D
    from fluxir.data import evaluation_set
    from fluxir.evaluate import evaluate, lpips_or_reason
    from fluxir.policy import load_trained
    from fluxir.stats import compare

    policy, codec = load_trained(result["teacher"], cfg)
    lpips_net = lpips_or_reason(cfg.eval.lpips)[0]
    testset = evaluation_set(cfg, "test")
    seeds = result["seeds"]
    budgets = [int(k) for k in next(iter(seeds.values()))["budgets"]]
    uniform = evaluate(policy, codec, testset, cfg, lpips_net=lpips_net,
                       schedules={k: D.budget_schedule("uniform", k, cfg.flow.t_start) for k in budgets})
    out = {}
    for k in budgets:
        for seed, s in seeds.items():
            schedule = s["budgets"][str(k)]["searched"]["schedule"]
            searched = evaluate(policy, codec, testset, cfg, lpips_net=lpips_net, schedules={k: schedule})
            out.setdefault(str(k), {})[seed] = {"schedule": schedule, **{m: compare(searched, uniform, k, m)
                                                                          for m in ("psnr", "lpips")}}
    return out


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"


def print_tables(result: dict) -> None:
    from fluxir.stats import bootstrap, by_task

    seeds = result["seeds"]
    first = next(iter(seeds.values()))
    print("Teacher curve on validation (mean over seeds ± seed sd): NFE | uniform PSNR, LPIPS | shifted PSNR, LPIPS")
    for key in sorted({k.split("-")[1] for k in first["curve"]}, key=int):
        cells = []
        for kind in ("uniform", "shifted"):
            for m in ("psnr", "lpips"):
                vals = [s["curve"][f"{kind}-{key}"][m] for s in seeds.values() if f"{kind}-{key}" in s["curve"]]
                cells.append(_spread(vals) if vals else "—")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\nPer budget: validation mean over seeds ± seed sd, and each arm minus uniform (pooled over seeds: "
          "paired, task-stratified 95 % interval over crops; per-seed differences)")
    for k in first["budgets"]:
        for m in ("lpips", "psnr"):
            cells = []
            for arm in ARMS:
                vals = [s["budgets"][k][arm][m] for s in seeds.values()]
                diffs, per_seed = {}, []
                for s in seeds.values():
                    d = np.asarray(s["budgets"][k][arm]["per_image"][m]) - np.asarray(s["budgets"][k]["uniform"]["per_image"][m])
                    per_seed.append(float(d.mean()))
                    for task, v in by_task(d, s["tasks"]).items():
                        diffs[task] = np.concatenate([diffs.get(task, np.zeros(0)), v])
                mean, lo, hi = bootstrap(diffs)
                cells.append(f"{_spread(vals)} ({mean:+.4f} [{lo:+.4f}, {hi:+.4f}]; seeds "
                             + ", ".join(f"{x:+.4f}" for x in per_seed) + ")")
            print(f"K={k} {m.upper()}: " + " | ".join(f"{a}: {c}" for a, c in zip(ARMS, cells)))
        for arm in ("searched", "direct"):
            print(f"  {arm} schedules: " + "; ".join(str([round(t, 3) for t in s["budgets"][k][arm]["schedule"]])
                                                    for s in seeds.values()))
        for seed, r in result.get("test", {}).get(k, {}).items():
            print(f"  test set, seed {seed}'s searched minus uniform: " + "; ".join(
                f"{m.upper()} {r[m]['mean']:+.4f} [{r[m]['lo']:+.4f}, {r[m]['hi']:+.4f}]" for m in ("psnr", "lpips")))


if __name__ == "__main__":
    sys.exit(main())
