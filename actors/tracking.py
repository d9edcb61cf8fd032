"""What a run reports while it runs: Ray metrics (dashboard / Prometheus) and wandb (offline by default).

Ray metric names (Prometheus adds Ray's `ray_` prefix), each tagged with `stage`:
  stage 1 (rl and its controls rl-fm, rl-shuffled, rl-k1, rl-backprop), from the RL controller:
    fluxir_rollouts_total            candidate trajectories sampled (counter)
    fluxir_skipped_inputs_total      inputs dropped for a non-finite reward (counter)
    fluxir_actor_restarts_total      work re-issued after an actor died (counter)
    fluxir_reward_mean, fluxir_reward_max, fluxir_ode_best_gap   reward of the last iteration (gauges)
    fluxir_policy_version            learner policy version (gauge)
    fluxir_iteration_seconds, fluxir_rollout_seconds, fluxir_reward_seconds,
    fluxir_learn_seconds, fluxir_sync_seconds                    last iteration's time split (gauges)
  stage 0 (pretrain), from Ray Train rank 0 every `pretrain.log_every` steps:
    fluxir_train_loss, fluxir_train_steps_per_second, fluxir_train_step (gauges)
  stage 2 (distill, sweep), from each Tune trial at each validation (also tagged `budget`, `trial`):
    fluxir_distill_val_psnr, fluxir_distill_val_lpips, fluxir_distill_loss, fluxir_distill_step (gauges)
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

RL_GAUGES = {"reward_mean": "fluxir_reward_mean", "reward_max": "fluxir_reward_max", "gap": "fluxir_ode_best_gap",
             "version": "fluxir_policy_version", "iteration_s": "fluxir_iteration_seconds",
             "rollout_s": "fluxir_rollout_seconds", "reward_s": "fluxir_reward_seconds",
             "learn_s": "fluxir_learn_seconds", "sync_s": "fluxir_sync_seconds"}
RL_COUNTERS = {"rollouts": "fluxir_rollouts_total", "skipped": "fluxir_skipped_inputs_total",
               "reissued": "fluxir_actor_restarts_total"}
TRAIN_GAUGES = {"loss": "fluxir_train_loss", "steps_per_s": "fluxir_train_steps_per_second",
                "step": "fluxir_train_step"}
DISTILL_GAUGES = {"psnr": "fluxir_distill_val_psnr", "lpips": "fluxir_distill_val_lpips",
                  "loss": "fluxir_distill_loss", "step": "fluxir_distill_step"}


# Ray's metrics agent drops a gauge that was not set within two report intervals (>= 1 s each), even
# while the process that set it lives; a stage's latest values are set again this often until it closes.
GAUGE_REFRESH_S = 0.5


class StageMetrics:
    """ray.util.metrics gauges and counters fed from a stage's records (dicts of numbers).

    The gauges keep their latest values on the dashboard until `close()` (a context manager closes on exit);
    after that Ray ages them out, so a finished stage's gauges leave Prometheus."""

    def __init__(self, stage: str, gauges: dict[str, str], counters: dict[str, str] | None = None,
                 **tags: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"stage": stage, **{k: str(v) for k, v in tags.items()}}
        keys = tuple(self.tags)
        self.gauges = {k: Gauge(n, description=f"fluxir {k} (latest)", tag_keys=keys) for k, n in gauges.items()}
        self.counters = {k: Counter(n, description=f"fluxir {k}", tag_keys=keys)
                         for k, n in (counters or {}).items()}
        self.latest: dict[str, float] = {}
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._refresher = threading.Thread(target=self._refresh, name=f"fluxir-metrics-{stage}", daemon=True)
        self._refresher.start()

    def record(self, record: dict) -> None:
        with self._lock:
            self.latest.update({k: float(record[k]) for k in self.gauges if isinstance(record.get(k), (int, float))})
            self._set_gauges()
        for key, counter in self.counters.items():
            if record.get(key):
                counter.inc(float(record[key]), tags=self.tags)

    def _set_gauges(self) -> None:
        for key, value in self.latest.items():
            self.gauges[key].set(value, tags=self.tags)

    def _refresh(self) -> None:
        while not self._closed.wait(GAUGE_REFRESH_S):
            with self._lock:
                self._set_gauges()

    def close(self) -> None:
        self._closed.set()
        self._refresher.join()

    def __enter__(self) -> "StageMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rl_metrics(stage: str) -> StageMetrics:
    return StageMetrics(stage, RL_GAUGES, RL_COUNTERS)


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
                              group=cfg.name, config=cfg.model_dump(mode="json"), job_type=stage,
                              reinit="create_new")

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def publish(self, scalars: dict[str, float], images: dict[str, Path], tables: dict[str, list[dict]] | None = None):
        """Final figures of a stage: scalars into the run summary, images (PNG files) and tables as media."""
        if self.run is None:
            return
        import wandb

        self.run.summary.update({k: v for k, v in scalars.items() if isinstance(v, (int, float))})
        media = {k: wandb.Image(str(p)) for k, p in images.items()}
        for name, rows in (tables or {}).items():
            if rows:
                media[name] = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        if media:
            self.run.log(media)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
