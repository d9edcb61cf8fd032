"""Stage 1 as `fluxir run` runs it: the configured RL run and, with `rl.controls`, its honest controls.

- control: the same starting policy trained further by plain flow matching (`rl.objective=fm`) on the
  same stream for the same loop wall-clock as the RL run;
- ablation: the same `rsr` loss on the ODE trajectory alone (`rl.candidates=1`: no exploration, no
  selection), also for the same loop wall-clock.
The RL gain that counts is over the control; the reward selection's own share is the gain over the ablation.
"""
from __future__ import annotations

from fluxir.config import Config, config_from_dict

from actors.rl import run_rl

UNBOUNDED = 10 ** 9


def with_rl(cfg: Config, **rl) -> Config:
    tree = cfg.model_dump(mode="json")
    tree["rl"].update(rl)
    return config_from_dict(tree, "stage-1 variant")


def control_configs(cfg: Config, seconds: float) -> dict[str, Config]:
    """The equal-wall-clock control and K=1 ablation of `cfg`'s RL run."""
    budget = {"iterations": UNBOUNDED, "max_seconds": max(seconds, 1e-3)}
    return {"rl-control": with_rl(cfg, objective="fm", **budget),
            "rl-k1": with_rl(cfg, objective="rsr", candidates=1, **budget)}


def run_rl_stage(cfg: Config, show_progress: bool = True) -> dict[str, dict]:
    """{stage name: run_rl result}: "rl", plus "rl-control" and "rl-k1" when `rl.controls`."""
    runs = {"rl": run_rl(cfg, "rl", show_progress=show_progress)}
    if cfg.rl.controls:
        for stage, variant in control_configs(cfg, runs["rl"]["loop_seconds"]).items():
            runs[stage] = run_rl(variant, stage, show_progress=show_progress)
    return runs
