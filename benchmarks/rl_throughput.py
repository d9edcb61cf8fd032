"""RL throughput: the Ray system (rollout actors, reward worker, DeepSpeed learner group, weight sync)
against a single process doing the same work (same inputs, candidates, rewards, objective and optimizer
settings) with all the machine's cores, on the same machine.

    python benchmarks/rl_throughput.py configs/tiny.yaml [--iterations 30] [--warmup 3] [--bf16-iterations 3]
                                       [key=value ...]

Needs a stage-0 policy (`rl.init`, default <run>/pretrain/model, i.e. after `make run`). Writes
benchmarks/results/rl_throughput.json: trajectories/s and the mean iteration split
(rollout / reward / learn / sync seconds; the single process counts scoring in rollout_s) for both, plus the machine;
and `weight_sync`: the bytes of the weight set each rollout actor receives per iteration, for the config's
`model.dtype` and, from `--bf16-iterations` more Ray iterations, for a bf16 policy (`model.dtype=bfloat16`
under configs/deepspeed/zero2_bf16.json: the set ships in the actors' dtype).
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

from common import command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from fluxir.config import load_config, zero_stage  # noqa: E402

SPLIT = ("rollout_s", "reward_s", "learn_s", "sync_s", "iteration_s")


def summarise(history: list[dict], warmup: int) -> dict:
    rows = history[warmup:]
    out = {k: statistics.mean(h[k] for h in rows) for k in SPLIT}
    out["trajectories_per_s"] = sum(h["rollouts"] for h in rows) / sum(h["iteration_s"] for h in rows)
    out["sync_fraction"] = out["sync_s"] / out["iteration_s"]
    out["iterations_measured"] = len(rows)
    if "sync_bytes" in rows[0]:
        out["sync_bytes"] = statistics.mean(h["sync_bytes"] for h in rows)
    return out


def single_process(cfg, iterations: int) -> list[dict]:
    """The same loop in one process (fluxir.rl_loop.LocalRL) with all the machine's cores."""
    from fluxir.rl_loop import LocalRL

    torch.set_num_threads(os.cpu_count())
    loop = LocalRL(cfg)
    return [{**loop.iteration(it), "reward_s": 0.0, "sync_s": 0.0} for it in range(iterations)]


def ray_system(cfg, iterations: int, **model) -> list[dict]:
    """The Ray system's history over `iterations`; `model`: model settings to change (and then the bf16 JSON)."""
    from actors.rl import run_rl
    from fluxir.config import CONFIGS, config_from_dict

    tree = cfg.model_dump(mode="json")
    tree["rl"].update(iterations=iterations, checkpoint_every=10 ** 9, max_seconds=None)
    if model:
        tree["model"].update(model)
        tree["rl"]["deepspeed"] = str(CONFIGS / "deepspeed/zero2_bf16.json")
    tree["wandb"]["mode"] = "disabled"
    bench_cfg = config_from_dict(tree)
    stage_dir = bench_cfg.run_dir / "bench-rl-throughput"
    import shutil
    shutil.rmtree(stage_dir, ignore_errors=True)  # a fresh run, never a resume
    return run_rl(bench_cfg, stage="bench-rl-throughput", show_progress=False)["history"]


def main() -> int:
    parser = config_parser(__doc__, out="rl_throughput.json")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16-iterations", type=int, default=3, help="Ray iterations of the bf16 policy (0: skip)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    single = summarise(single_process(cfg, args.iterations), args.warmup)
    ray_ = summarise(ray_system(cfg, args.iterations), args.warmup)
    weight_sync = {cfg.model.dtype: ray_["sync_bytes"]}
    if args.bf16_iterations and cfg.model.dtype != "bfloat16":
        bf16 = ray_system(cfg, args.bf16_iterations, dtype="bfloat16")
        weight_sync["bfloat16"] = statistics.mean(h["sync_bytes"] for h in bf16)
        weight_sync["bfloat16_over_" + cfg.model.dtype] = weight_sync["bfloat16"] / weight_sync[cfg.model.dtype]
    result = {"command": command(__file__), "machine": machine(),
              "config": {"name": cfg.name, "batch_size": cfg.rl.batch_size, "candidates": cfg.rl.candidates,
                         "nfe": cfg.rl.nfe, "rollout_actors": cfg.rl.num_rollout_actors,
                         "reward_workers": cfg.rl.num_reward_workers, "learners": cfg.rl.num_learners,
                         "zero_stage": zero_stage(cfg.rl.deepspeed), "updates_per_rollout": cfg.rl.updates_per_rollout},
              "single_process": single, "ray": ray_, "weight_sync": weight_sync,
              "ray_over_single": ray_["trajectories_per_s"] / single["trajectories_per_s"]}
    write_result(args.out, result, indent=2)
    print(f"{'':16}{'traj/s':>9}" + "".join(f"{k:>13}" for k in SPLIT))
    for name in ("single_process", "ray"):
        r = result[name]
        print(f"{name:16}{r['trajectories_per_s']:9.1f}" + "".join(f"{r[k]:13.3f}" for k in SPLIT))
    print(f"ray / single = {result['ray_over_single']:.2f}; sync = {100 * ray_['sync_fraction']:.1f}% of an iteration")
    print("weight set per rollout actor per iteration: " + ", ".join(f"{k} {v:,.0f}" if "_over_" not in k else
                                                                     f"{k} {v:.3f}" for k, v in weight_sync.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
