"""How much better than the ODE trajectory is the best of K explored candidates? The reward headroom
stage 1's selection works with, on the stage-0 policy, for each K and ρ (no training).

    python benchmarks/rl_exploration.py configs/tiny.yaml [--k 2 4 8 16] [--rho 0.5 1 2] [--batches 4]
                                        [key=value ...]

Candidates are sampled exactly as stage 1 samples them (fluxir.rl.sample_candidates) on the first
`--batches` batches of stage 1's input stream, scored with the configured reward (fluxir.rl.score).
Per (K, ρ): the mean reward of the ODE candidate, of the explored ones, of the best, and the best − ODE
gap with its 95 % bootstrap interval over inputs. Writes benchmarks/results/rl_exploration.json.
"""
from __future__ import annotations

import sys

import torch

from common import command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from fluxir.config import config_from_dict, load_config  # noqa: E402


def candidates_rewards(cfg, policy, codec, lpips, batches: int) -> torch.Tensor:
    """(inputs, K) rewards of every candidate on the first `batches` batches of stage 1's stream."""
    from fluxir import rl
    from fluxir.rl_loop import rl_stream
    from fluxir.rollouts import candidate_rows

    stream, out = rl_stream(cfg), []
    for it in range(batches):
        inputs = stream.batch(it)
        cand = rl.sample_candidates(policy, codec, inputs["lq"], inputs["task"], inputs["seed"], cfg)
        rows = candidate_rows(inputs, cand, cfg.rl.candidates, 0, it * cfg.rl.batch_size)
        reward = rl.score_columns(rows, cfg.rl.reward, lpips)["reward"]
        out.append(reward.view(-1, cfg.rl.candidates))
    return torch.cat(out).double()


def main() -> int:
    parser = config_parser(__doc__, out="rl_exploration.json")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    from fluxir.codec import build_codec
    from fluxir.metrics import load_lpips
    from fluxir.policy import load_policy
    from fluxir.codec import token_channels
    from fluxir.rl import init_dir
    from fluxir.stats import bootstrap

    base = load_config(args.config, args.overrides)
    codec = build_codec(base)
    policy = load_policy(init_dir(base), base, token_channels(codec)).eval()
    lpips = load_lpips() if base.rl.reward.lpips > 0 else None
    rows = []
    for rho in args.rho:
        for k in args.k:
            tree = base.model_dump(mode="json")
            tree["rl"].update(candidates=k, rho=rho)
            rewards = candidates_rewards(config_from_dict(tree), policy, codec, lpips, args.batches)
            gap = (rewards.max(1).values - rewards[:, 0]).numpy()
            row = {"k": k, "rho": rho, "inputs": len(rewards), "ode": float(rewards[:, 0].mean()),
                   "explored": float(rewards[:, 1:].mean()), "best": float(rewards.max(1).values.mean()),
                   "gap": float(gap.mean()), "gap_interval": bootstrap({"all": gap})[1:],
                   "ode_is_best": float((rewards.argmax(1) == 0).double().mean())}
            rows.append(row)
            print(f"rho {rho:<4} K {k:<3} ODE {row['ode']:+.4f} explored {row['explored']:+.4f} best {row['best']:+.4f} "
                  f"gap {row['gap']:+.4f} [{row['gap_interval'][0]:+.4f}, {row['gap_interval'][1]:+.4f}] "
                  f"ODE best in {100 * row['ode_is_best']:.0f} %", flush=True)
    write_result(args.out, {"command": command(__file__), "machine": machine(), "reward": base.rl.reward.model_dump(),
                            "nfe": base.rl.nfe, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
