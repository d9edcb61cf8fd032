"""Stage 1 as `fluxir run` runs it: the configured RL run and, with `rl.controls`, its honest controls.

Every control starts from the same policy, reads the same input stream and seeds, and trains for the
same loop wall-clock as the RL run (`control_configs`):
- rl-fm: plain flow matching (`rl.objective=fm`), what the same time buys without any rollout;
- rl-shuffled: the same objective with rewards permuted within each input's candidates
  (`rl.shuffle_rewards`): same compute, no reward information. For rsr this is random selection;
- rl-k1 (rsr only): the same loss on the ODE trajectory alone (`rl.candidates=1`);
- rl-backprop: the reward's gradient through the sampler (`rl.objective=reward_backprop`), the strongest
  baseline when the reward is differentiable (PSNR, SSIM and LPIPS all are).
The RL gain that counts is over every control; the reward selection's own share is the gain over rl-shuffled.
"""
from __future__ import annotations

from fluxir.config import Config, config_from_dict
from fluxir.rl import REWARD_OBJECTIVES

from actors.rl import run_rl

UNBOUNDED = 10 ** 9


def with_rl(cfg: Config, **rl) -> Config:
    tree = cfg.model_dump(mode="json")
    tree["rl"].update(rl)
    return config_from_dict(tree, "stage-1 variant")


def control_configs(cfg: Config, seconds: float) -> dict[str, Config]:
    """The equal-wall-clock controls of `cfg`'s RL run, by stage name."""
    budget = {"iterations": UNBOUNDED, "max_seconds": max(seconds, 1e-3)}
    controls = {"rl-fm": with_rl(cfg, objective="fm", **budget)}
    if cfg.rl.objective in REWARD_OBJECTIVES:
        controls["rl-shuffled"] = with_rl(cfg, shuffle_rewards=True, **budget)
    if cfg.rl.objective == "rsr":
        controls["rl-k1"] = with_rl(cfg, candidates=1, **budget)
    controls["rl-backprop"] = with_rl(cfg, objective="reward_backprop", **budget)
    return controls


def run_rl_stage(cfg: Config, show_progress: bool = True) -> dict[str, dict]:
    """{stage name: run_rl result}: "rl", plus its controls (`control_configs`) when `rl.controls`."""
    runs = {"rl": run_rl(cfg, "rl", show_progress=show_progress)}
    if cfg.rl.controls:
        for stage, variant in control_configs(cfg, runs["rl"]["loop_seconds"]).items():
            runs[stage] = run_rl(variant, stage, show_progress=show_progress)
    return runs
