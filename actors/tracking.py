"""What a run reports while it runs: Ray metrics (dashboard / Prometheus) and wandb (offline by default).

Ray metric names (Prometheus adds Ray's `ray_` prefix), tagged with `stage`:
  fluxir_rollouts_total            candidate trajectories sampled (counter)
  fluxir_skipped_inputs_total      inputs dropped for a non-finite reward (counter)
  fluxir_actor_restarts_total      work re-issued after an actor died (counter)
  fluxir_reward_mean, fluxir_reward_max, fluxir_ode_best_gap   reward of the last iteration (gauges)
  fluxir_policy_version            learner policy version (gauge)
  fluxir_iteration_seconds, fluxir_rollout_seconds, fluxir_reward_seconds,
  fluxir_learn_seconds, fluxir_sync_seconds                    last iteration's time split (gauges)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_GAUGES = {"reward_mean": "fluxir_reward_mean", "reward_max": "fluxir_reward_max", "gap": "fluxir_ode_best_gap",
           "version": "fluxir_policy_version", "iteration_s": "fluxir_iteration_seconds",
           "rollout_s": "fluxir_rollout_seconds", "reward_s": "fluxir_reward_seconds",
           "learn_s": "fluxir_learn_seconds", "sync_s": "fluxir_sync_seconds"}
_COUNTERS = {"rollouts": "fluxir_rollouts_total", "skipped": "fluxir_skipped_inputs_total",
             "reissued": "fluxir_actor_restarts_total"}


class RLMetrics:
    """ray.util.metrics gauges and counters fed from each iteration's record."""

    def __init__(self, stage: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"stage": stage}
        self.gauges = {k: Gauge(n, description=f"fluxir {k} (last iteration)", tag_keys=("stage",))
                       for k, n in _GAUGES.items()}
        self.counters = {k: Counter(n, description=f"fluxir {k}", tag_keys=("stage",)) for k, n in _COUNTERS.items()}

    def record(self, record: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in record:
                gauge.set(float(record[key]), tags=self.tags)
        for key, counter in self.counters.items():
            if record.get(key):
                counter.inc(float(record[key]), tags=self.tags)


class Tracker:
    """wandb run under `<stage_dir>/wandb` (mode from config: offline by default; WANDB_MODE wins)."""

    def __init__(self, cfg, stage: str, stage_dir: Path):
        self.run = None
        mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        stage_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb.project, name=f"{cfg.name}-{stage}", dir=str(stage_dir), mode=mode,
                              config=cfg.model_dump(mode="json"), job_type=stage, reinit="create_new")

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
