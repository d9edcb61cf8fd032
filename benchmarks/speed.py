"""Where the time goes: restore speed per NFE, the RL iteration split, the sweep's wall-clock, memory.

    python benchmarks/speed.py [configs/tiny.yaml] [--run runs/tiny] [--repeats 3] [key=value ...]

Restore speed: every policy of the run (stage-0 base at the evaluation NFEs, each distilled student at its
own budget) restores the whole frozen test set `--repeats` times; the median and the min–max spread of
seconds per image are reported (the ODE sampler with the tiling `fluxir restore` uses, in this process,
`torch` threads = the machine's cores). The RL split and the sweep wall-clock are read from the results
their own commands wrote (benchmarks/rl_throughput.py, `fluxir sweep`). Writes benchmarks/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, machine  # noqa: E402  (benchmarks/common.py: puts the repo on sys.path)
from fluxir.config import load_config  # noqa: E402


def time_restore(policy, codec, testset: dict, cfg, schedule: list[float], repeats: int) -> dict:
    """Seconds per image over the whole test set (all tasks), `repeats` times: median, min, max."""
    from fluxir.evaluate import restore_set

    images = sum(d["lq"].shape[0] for d in testset.values())
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for task, d in testset.items():
                restore_set(policy, codec, d["lq"], task, cfg, schedule, seed=cfg.seed)
        runs.append((time.perf_counter() - start) / images)
    median = statistics.median(runs)
    return {"sec_per_image": median, "images_per_s": 1 / median, "min": min(runs), "max": max(runs),
            "repeats": repeats, "images": images}


def restore_speeds(run_dir: Path, cfg, testset: dict, repeats: int) -> dict[str, dict]:
    from fluxir.codec import build_codec
    from fluxir.evaluate import eval_schedule
    from fluxir.policy import load_policy
    from fluxir.pretrain import token_channels

    codec = build_codec(cfg)
    out = {}
    base = load_policy(run_dir / "pretrain" / "model", cfg, token_channels(codec))
    for n in cfg.eval.nfe:
        out[f"base NFE {n}"] = {"nfe": n, **time_restore(base, codec, testset, cfg, eval_schedule(cfg, n), repeats)}
    for folder in sorted((run_dir / "distill" / "best").glob("K*")):
        card = json.loads((folder / "policy.json").read_text())
        student = load_policy(folder, cfg, token_channels(codec))
        out[f"student K{card['budget']}"] = {"nfe": card["budget"], **time_restore(
            student, codec, testset, cfg, card["schedule"], repeats)}
    return out


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="configs/tiny.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run", help="run folder (default: the config's run_dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-run", default="runs/tiny-gauss", help="run folder of a `fluxir sweep` (for its time)")
    p.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = p.parse_args(argv)
    from fluxir.data import frozen_testset

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run) if args.run else cfg.run_dir
    if not (run_dir / "pretrain" / "model" / "policy.json").is_file():
        raise SystemExit(f"no stage-0 policy under {run_dir}: run `make run` (or `fluxir run CONFIG`) first")
    torch.set_num_threads(machine()["cpus"])
    testset = frozen_testset(cfg)
    restore = restore_speeds(run_dir, cfg, testset, args.repeats)
    rl = _read(RESULTS / "rl_throughput.json")
    sweep = _read(Path(args.sweep_run) / "sweep.json")
    result = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "restore": restore,
        "rl_iteration": ({"source": "benchmarks/results/rl_throughput.json", "ray": rl["ray"],
                          "single_process": rl["single_process"]} if rl else None),
        "sweep": ({"source": f"{args.sweep_run}/sweep.json", "seconds": sweep["seconds"], "trials": sweep["trials"]}
                  if sweep else None),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| policy | NFE | s / image (median) | spread (min–max) | images / s |\n|---|---:|---:|---:|---:|")
    for label, r in restore.items():
        print(f"| {label} | {r['nfe']} | {r['sec_per_image']:.4f} | {r['min']:.4f}–{r['max']:.4f} | "
              f"{r['images_per_s']:.1f} |")
    if rl:
        for side in ("ray", "single_process"):
            s = rl[side]
            print(f"- RL iteration ({side}): {s['iteration_s']:.2f} s = rollout {s['rollout_s']:.2f} + reward "
                  f"{s['reward_s']:.2f} + learn {s['learn_s']:.2f} + sync {s['sync_s']:.2f}; "
                  f"{s['trajectories_per_s']:.1f} trajectories/s")
    if sweep:
        print(f"- sweep ({args.sweep_run}): {sweep['trials']} trials in {sweep['seconds'] / 60:.1f} min")
    print(f"- peak RSS of this process: {result['peak_rss_mib']:.0f} MiB\n\n{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
