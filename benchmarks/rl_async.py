"""Overlapped stage 1 (`rl.async`) against the synchronous loop, on the Ray system, same seeds and iterations.

    python benchmarks/rl_async.py configs/tiny.yaml rl.init=runs/tiny/pretrain/model [--seeds 0 1 2]
                                  [--iterations 20] [key=value ...]

For each seed, stage 1 runs twice on the Ray system (actors/rl.py) from the same stage-0 policy, reading the
same input stream and seeds: synchronously and with `rl.async=true` (`rl.max_staleness=1`). Each final
policy is scored on the frozen test set. Writes benchmarks/results/rl_async.json:
- quality: per mode and seed the mean over tasks of each metric at each NFE, mean ± spread over seeds, and
  the paired, task-stratified bootstrap interval of async − sync (seeds pooled, crop i of seed s against
  crop i of the same seed);
- time: per mode the mean iteration split after `--warmup` iterations, and the overlap bound the
  overlapped loop is held to: iteration_s(async) <= max(rollout_s + reward_s, learn_s) + sync_s of the
  synchronous loop, + 10 %. Where rollout actors and learners share the same cores (a laptop) the two
  phases cannot both run at full speed and the bound is not expected to hold; the file records the cores.
"""
from __future__ import annotations

import shutil
import statistics
import sys

from common import command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from rl_compare import METRICS, mean_over_tasks, pooled  # noqa: E402
from fluxir.config import config_from_dict, load_config  # noqa: E402

MODES = {"sync": {}, "async": {"async": True, "max_staleness": 1}}
SPLIT = ("rollout_s", "reward_s", "learn_s", "sync_s", "iteration_s")


def mode_config(base, mode: str, seed: int, iterations: int):
    tree = base.model_dump(mode="json")
    tree["seed"] = seed
    tree["rl"].update(MODES[mode], iterations=iterations, max_seconds=None, checkpoint_every=10 ** 6)
    tree["wandb"]["mode"] = "disabled"
    return config_from_dict(tree, f"rl_async {mode}")


def timing(history: list[dict], warmup: int) -> dict:
    rows = history[warmup:] or history
    return {k: statistics.mean(h[k] for h in rows) for k in SPLIT} | {"iterations_measured": len(rows)}


def overlap_bound(sync: dict) -> float:
    """The overlapped loop's ideal iteration time from the synchronous loop's phases."""
    return max(sync["rollout_s"] + sync["reward_s"], sync["learn_s"]) + sync["sync_s"]


def run_mode(base, mode: str, seed: int, iterations: int, warmup: int) -> dict:
    from actors.rl import run_rl
    from fluxir.evaluate import evaluate_folder

    cfg = mode_config(base, mode, seed, iterations)
    stage = f"bench-rl-{mode}-{seed}"
    shutil.rmtree(cfg.run_dir / stage, ignore_errors=True)  # a fresh run, never a resume
    out = run_rl(cfg, stage=stage, show_progress=False)
    evals, _ = evaluate_folder(cfg, out["model_dir"], show_progress=False)
    evals.pop("images", None)
    return {"evals": evals, "timing": timing(out["history"], warmup),
            "staleness": [h.get("staleness", 0) for h in out["history"]], "loop_seconds": out["loop_seconds"]}


def summarise(runs: dict, nfes: list[int]) -> dict:
    seeds = sorted(set(runs["sync"]) & set(runs["async"]))
    out = {"modes": {}, "async - sync": {}}
    for mode, by_seed in runs.items():
        out["modes"][mode] = {f"{m}@{n}": {"mean": statistics.mean(v), "sd": statistics.pstdev(v)}
                              for m in METRICS for n in nfes
                              for v in [[mean_over_tasks(r["evals"], m, n) for r in by_seed.values()]]}
        out["modes"][mode]["timing"] = {k: statistics.mean(r["timing"][k] for r in by_seed.values()) for k in SPLIT}
    out["async - sync"] = {f"{m}@{n}": pooled([runs["async"][s]["evals"] for s in seeds],
                                              [runs["sync"][s]["evals"] for s in seeds], n, m)
                           for m in METRICS for n in nfes}
    sync_t, async_t = out["modes"]["sync"]["timing"], out["modes"]["async"]["timing"]
    bound = overlap_bound(sync_t)
    out["overlap"] = {"bound_s": bound, "async_iteration_s": async_t["iteration_s"],
                      "sync_iteration_s": sync_t["iteration_s"], "within_bound_plus_10pct": async_t["iteration_s"]
                      <= 1.1 * bound, "speedup": sync_t["iteration_s"] / async_t["iteration_s"]}
    return out


def main() -> int:
    parser = config_parser(__doc__, out="rl_async.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    result = {"command": command(__file__), "machine": machine(), "iterations": args.iterations,
              "rl": {k: base.rl.model_dump()[k] for k in ("objective", "batch_size", "candidates", "nfe",
                                                          "num_rollout_actors", "num_learners", "rollout_resources",
                                                          "learner_resources", "updates_per_rollout")},
              "runs": {mode: {} for mode in MODES}}
    for seed in args.seeds:
        for mode in MODES:
            run = run_mode(base, mode, seed, args.iterations, args.warmup)
            result["runs"][mode][seed] = run
            print(f"seed {seed} {mode:5s} iteration {run['timing']['iteration_s']:.2f} s  " + "  ".join(
                f"{m.upper()}@{n} {mean_over_tasks(run['evals'], m, n):.4f}" for m in ("psnr", "lpips")
                for n in base.eval.nfe[:2]), flush=True)
            write_result(args.out, result, quiet=True)  # a crash keeps the runs before it
    result["summary"] = summarise(result["runs"], base.eval.nfe)
    write_result(args.out, result)
    o = result["summary"]["overlap"]
    print(f"iteration: sync {o['sync_iteration_s']:.2f} s, async {o['async_iteration_s']:.2f} s "
          f"(bound {o['bound_s']:.2f} s; speed-up {o['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
