"""Stage 2 across seeds: per budget, the student against every K-step arm (the teacher on uniform,
shifted and searched times without distillation, the uniform-schedule student, the GT-only fine-tune)
and the N-step teacher, on the frozen test set; paired intervals pooled over seeds, and each seed's
difference (the seed spread).

    python benchmarks/distill_compare.py configs/tiny.yaml distill.teacher=runs/tiny/rl/model --seeds 0 1 2

Each seed is one `fluxir distill CONFIG ... seed=S output_dir=runs/distill-compare-sS` (the seed moves the
calibration and validation crops, the starting noise and the students' batches); `--reuse` reads runs
already there instead of running them. Writes benchmarks/results/distill_compare_<name>.json.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)

from fluxir.config import load_config  # noqa: E402


def _run(config: str, overrides: list[str], seed: int, reuse: bool) -> Path:
    cfg = load_config(config, [*overrides, f"seed={seed}", f"output_dir=runs/distill-compare-s{seed}"])
    result = ROOT / cfg.run_dir / "distill.json"
    if not (reuse and result.is_file()):
        testset = ROOT / "runs" / f"testset-{cfg.data.test_crop}-{cfg.data.test_scale}"
        target = ROOT / cfg.output_dir / testset.name
        if testset.is_dir() and not target.exists():  # the frozen test set, not built again
            shutil.copytree(testset, target)
        subprocess.run([sys.executable, "-m", "actors", "distill", config, *overrides, f"seed={seed}",
                        f"output_dir={cfg.output_dir}"], cwd=ROOT, check=True)
    return result


def pooled(runs: list[dict], budgets: list[int], teacher_nfe: int, metrics: list[str]) -> list[dict]:
    """Per budget and arm: the student minus it, pooled over seeds (paired, task-stratified), and per seed."""
    from fluxir.report import DISTILL_ARMS, distill_arm
    from fluxir.stats import bootstrap, paired_diffs, verdict

    rows = []
    for k in budgets:
        names = [*DISTILL_ARMS, "teacher-N"]
        for name in names:
            row = {"budget": k, "other": DISTILL_ARMS.get(name, f"teacher N={teacher_nfe}")}
            for m in metrics:
                pooled_diffs, per_seed = {}, []
                for evals in runs:
                    student = distill_arm(evals, "student", k)
                    other, nfe_b = ((evals["teacher"], teacher_nfe) if name == "teacher-N"
                                    else (distill_arm(evals, name, k), k))
                    if student is None or other is None:
                        continue
                    diffs = paired_diffs(student, other, k, m, nfe_b)
                    per_seed.append(float(np.mean([d.mean() for d in diffs.values()])))
                    for task, d in diffs.items():
                        pooled_diffs[task] = np.concatenate([pooled_diffs.get(task, np.zeros(0)), d])
                if pooled_diffs:
                    mean, lo, hi = bootstrap(pooled_diffs)
                    row[m] = {"mean": mean, "lo": lo, "hi": hi, "verdict": verdict(lo, hi, m), "per_seed": per_seed}
            rows.append(row)
    return rows


def _with_int_nfe(result: dict) -> dict:
    result["nfe"] = [int(n) for n in result["nfe"]]
    for e in result["tasks"].values():
        e["nfe"] = {int(n): v for n, v in e["nfe"].items()}
    return result


def load_evals(path: Path) -> dict:
    evals = json.loads(path.read_text())["evals"]
    out = {name: _with_int_nfe(evals[name]) for name in ("teacher", "shifted", "searched")}
    out["students"] = {int(k): _with_int_nfe(v) for k, v in evals["students"].items()}
    out["controls"] = {int(k): {arm: _with_int_nfe(v) for arm, v in arms.items()} for k, arms in evals["controls"].items()}
    return out


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of running them again")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    paths = [_run(args.config, args.overrides, s, args.reuse) for s in args.seeds]
    runs = [load_evals(p) for p in paths]
    metrics = [m for m in ("psnr", "lpips") if m in next(iter(runs[0]["teacher"]["tasks"].values()))["lq"]]
    rows = pooled(runs, list(cfg.distill.budgets), cfg.distill.teacher_nfe, metrics)
    means = {f"seed {s}": {f"K{k} {name}": {m: float(np.mean([e["nfe"][k][m] for e in arm["tasks"].values()]))
                                            for m in metrics}
                           for k in cfg.distill.budgets for name in ("student", "teacher", "searched")
                           if (arm := (r["students"].get(k) if name == "student" else r[name])) and k in arm["nfe"]}
             for s, r in zip(args.seeds, runs)}
    write_result(RESULTS / f"distill_compare_{cfg.name}.json",
                 {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
                  "runs": [str(p.relative_to(ROOT)) for p in paths], "comparisons": rows,
                  "means": means, "machine": machine()})
    for r in rows:
        cells = [f"{m.upper()} {r[m]['mean']:+.4f} [{r[m]['lo']:+.4f}, {r[m]['hi']:+.4f}] {r[m]['verdict']} (seeds "
                 + ", ".join(f"{x:+.4f}" for x in r[m]["per_seed"]) + ")" for m in metrics if m in r]
        print(f"K={r['budget']} student minus {r['other']}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
