"""Stage-1 objectives against their controls: several seeds each, equal wall-clock, paired intervals.

    python benchmarks/rl_compare.py configs/tiny.yaml [--seeds 0 1 2] [--budget-s 45] [--arms A ...]
                                    [--splits val test] [key=value ...]
    python benchmarks/rl_compare.py --table benchmarks/results/rl_compare.json   # the docs' tables

Every arm starts from the same stage-0 policy (`rl.init`, default <run>/pretrain/model: run `make run`
first), reads the same input stream and seeds (`seed=s`), and runs in one process (fluxir.rl_loop: the
Ray system's math with a plain AdamW) for the same wall-clock: each arm's seconds per iteration are
measured once (the fastest of `--calibrate` iterations after one warm-up, alone on the machine), and every seed of it
then runs budget / that many iterations, so later runs are not timed under whatever else the machine
does. A shuffled-reward control does exactly its objective's work and runs its iteration count. Each final policy is evaluated on the validation crops (where settings are chosen) and on the
frozen test set at `eval.nfe`. Writes benchmarks/results/rl_compare.json: per arm and seed the means,
per arm the mean ± spread over seeds, and for each objective the paired, task-stratified bootstrap
interval of objective − control on each split, metric and NFE, with the per-seed evaluations pooled
(crop i of seed s against crop i of the same seed).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from common import command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from fluxir.config import config_from_dict, load_config  # noqa: E402

# arm -> rl overrides. Objectives first, then the controls each is judged against.
ARMS = {
    "base": {},  # the stage-0 policy itself (no iteration)
    "rsr": {"objective": "rsr"},
    "grpo": {"objective": "grpo"},
    "grpo-window": {"objective": "grpo", "window": 1},  # Flow-GRPO-Fast-style branching, one explored step
    "nft": {"objective": "nft"},
    "fm": {"objective": "fm"},
    "backprop": {"objective": "reward_backprop"},
    "rsr-random": {"objective": "rsr", "shuffle_rewards": True},
    "rsr-k1": {"objective": "rsr", "candidates": 1},
    "grpo-shuffled": {"objective": "grpo", "shuffle_rewards": True},
    "nft-shuffled": {"objective": "nft", "shuffle_rewards": True},
}
SAME_COMPUTE = {"rsr-random": "rsr", "grpo-shuffled": "grpo", "nft-shuffled": "nft"}  # identical work per iteration
CONTROLS = {  # objective -> the controls that isolate its claim (and the base it started from)
    "rsr": ["base", "fm", "backprop", "rsr-random", "rsr-k1"],
    "grpo": ["base", "fm", "backprop", "grpo-shuffled"],
    "grpo-window": ["base", "fm", "backprop", "grpo-shuffled"],
    "nft": ["base", "fm", "backprop", "nft-shuffled"],
}
METRICS = ("psnr", "ssim", "lpips")


def arm_config(base, arm: str, seed: int, iterations: int):
    tree = base.model_dump(mode="json")
    tree["seed"] = seed
    tree["rl"].update(ARMS[arm], iterations=max(iterations, 1), max_seconds=None)
    tree["wandb"]["mode"] = "disabled"
    return config_from_dict(tree, f"rl_compare arm {arm}")


def seconds_per_iteration(cfg, iterations: int) -> float:
    from fluxir.rl_loop import LocalRL

    loop = LocalRL(cfg)
    loop.iteration(0)  # warm-up
    return min(loop.iteration(i)["iteration_s"] for i in range(1, iterations + 1))  # robust to a busy moment


def train_and_evaluate(cfg, iterations: int, sets: dict, lpips_net) -> tuple[dict, dict]:
    from fluxir.evaluate import evaluate
    from fluxir.rl_loop import LocalRL

    loop, history = LocalRL(cfg), []
    for it in range(iterations):
        history.append(loop.iteration(it))
    evals = {split: evaluate(loop.policy, loop.codec, s, cfg, cfg.eval.nfe, lpips_net) for split, s in sets.items()}
    for e in evals.values():
        e.pop("images", None)
    keep = ("gap", "improved_fraction", "reward_mean", "ode_reward", "loss")
    last = history[-min(10, len(history)):]
    return evals, {k: statistics.mean(h[k] for h in last) for k in keep if last and k in last[0]}


def mean_over_tasks(result: dict, metric: str, nfe: int) -> float:
    return statistics.mean(e["nfe"][nfe][metric] for e in result["tasks"].values())


def pooled(evals_a: list[dict], evals_b: list[dict], nfe: int, metric: str) -> dict:
    """A − B over all seeds' crops paired (seed s of A against seed s of B), task-stratified bootstrap."""
    from fluxir.stats import bootstrap, paired_diffs, verdict

    diffs: dict[str, list] = {}
    for a, b in zip(evals_a, evals_b):
        for task, d in paired_diffs(a, b, nfe, metric).items():
            diffs.setdefault(task, []).append(d)
    mean, lo, hi = bootstrap({t: np.concatenate(v) for t, v in diffs.items()})
    return {"mean": mean, "lo": lo, "hi": hi, "verdict": verdict(lo, hi, metric)}


def summarise(runs: dict, nfes: list[int]) -> dict:
    """Per arm and split: mean ± spread over seeds of each metric's mean over tasks; per objective and
    control: the pooled paired interval."""
    out = {"arms": {}, "versus": {}}
    for arm, seeds in runs.items():
        out["arms"][arm] = {split: {f"{m}@{n}": {"mean": statistics.mean(v), "sd": statistics.pstdev(v)}
                                    for m in METRICS for n in nfes
                                    for v in [[mean_over_tasks(r["evals"][split], m, n) for r in seeds.values()]]}
                            for split in next(iter(seeds.values()))["evals"]}
    for objective, controls in CONTROLS.items():
        for control in controls:
            if objective not in runs or control not in runs:
                continue
            seeds = sorted(set(runs[objective]) & set(runs[control]))
            splits = runs[objective][seeds[0]]["evals"]
            out["versus"][f"{objective} - {control}"] = {
                split: {f"{m}@{n}": pooled([runs[objective][s]["evals"][split] for s in seeds],
                                           [runs[control][s]["evals"][split] for s in seeds], n, m)
                        for m in METRICS for n in nfes} for split in splits}
    return out


def markdown(result: dict, split: str = "test") -> str:
    """The tables docs/BENCHMARKS.md quotes: every arm's mean ± spread over seeds, then each objective
    minus each of its controls (pooled paired 95 % intervals) on the reward's metric and on PSNR."""
    from fluxir.stats import interval_cell

    summary, nfes = result["summary"], sorted({int(k.split("@")[1]) for k in
                                                next(iter(result["summary"]["arms"].values()))[split]})
    cols = [(m, n) for m in METRICS for n in nfes]
    lines = ["| arm | iterations | " + " | ".join(f"{m.upper()}@{n}" for m, n in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for arm, by_split in summary["arms"].items():
        cells = [f"{v['mean']:.4f} ± {v['sd']:.4f}" if m != "psnr" else f"{v['mean']:.2f} ± {v['sd']:.2f}"
                 for m, n in cols for v in [by_split[split][f"{m}@{n}"]]]
        lines.append(f"| {arm} | {result['calibration'][arm]['iterations']} | " + " | ".join(cells) + " |")
    pairs = [("lpips", n) for n in nfes] + [("psnr", n) for n in nfes]
    lines += ["", "| objective − control | " + " | ".join(f"{m.upper()}@{n}" for m, n in pairs) + " |",
              "|---|" + "---:|" * len(pairs)]
    for name, by_split in summary["versus"].items():
        cells = [interval_cell(by_split[split][f"{m}@{n}"]) for m, n in pairs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown(json.loads(open(sys.argv[2]).read())))
        return 0
    parser = config_parser(__doc__, out="rl_compare.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=45.0)
    parser.add_argument("--calibrate", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test", "heldout"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from fluxir.data import evaluation_set
    from fluxir.evaluate import lpips_or_reason

    torch.set_num_threads(args.threads)
    base = load_config(args.config, args.overrides)
    sets = {split: evaluation_set(base, split) for split in args.splits}
    lpips_net, _ = lpips_or_reason(True)
    result = {"command": command(__file__), "machine": machine(),
              "budget_s": args.budget_s, "threads": args.threads, "reward": base.rl.reward.model_dump(),
              "rl": {k: v for k, v in base.rl.model_dump().items() if k in ("candidates", "nfe", "rho", "batch_size",
                                                                            "lr", "updates_per_rollout")},
              "calibration": {}, "runs": {}}
    for arm in args.arms:
        if arm == "base":
            result["calibration"][arm] = {"seconds_per_iteration": 0.0, "iterations": 0}
            continue
        if SAME_COMPUTE.get(arm) in result["calibration"]:  # shuffling rewards changes no work: its objective's count
            result["calibration"][arm] = {**result["calibration"][SAME_COMPUTE[arm]], "same_as": SAME_COMPUTE[arm]}
            continue
        sec = seconds_per_iteration(arm_config(base, arm, args.seeds[0], 1), args.calibrate)
        result["calibration"][arm] = {"seconds_per_iteration": sec, "iterations": max(1, round(args.budget_s / sec))}
        print(f"{arm:14s} {sec:.3f} s/iteration -> {result['calibration'][arm]['iterations']} iterations", flush=True)
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            if arm == "base" and result["runs"].get("base"):  # the start policy does not depend on the seed
                result["runs"]["base"][seed] = next(iter(result["runs"]["base"].values()))
                continue
            iterations = result["calibration"][arm]["iterations"]
            evals, train = train_and_evaluate(arm_config(base, arm, seed, iterations), iterations, sets, lpips_net)
            result["runs"].setdefault(arm, {})[seed] = {"evals": evals, "train": train,
                                                        "seconds": time.perf_counter() - t0}
            line = "  ".join(f"{split} LPIPS@{n} {mean_over_tasks(e, 'lpips', n):.4f} PSNR@{n} "
                             f"{mean_over_tasks(e, 'psnr', n):.2f}" for split, e in evals.items() for n in (1, 4)
                             if n in e["nfe"])
            print(f"seed {seed} {arm:14s} {time.perf_counter() - t0:5.0f} s  {line}", flush=True)
            # after every run, so that a crash keeps the runs before it
            write_result(args.out, {**result, "summary": summarise(result["runs"], base.eval.nfe)}, quiet=True)
    write_result(args.out, {**result, "summary": summarise(result["runs"], base.eval.nfe)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
