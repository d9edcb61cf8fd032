"""Stage 0 on Ray: the flow-matching recipe in Ray Train workers, each running a DeepSpeed engine."""
from __future__ import annotations

import sys
import time

from actors.runtime import check_resources, init_ray
from actors.tracking import TRAIN_GAUGES, StageMetrics, Tracker
from actors.train import load_ds_config, run_training
from fluxir.pretrain import per_rank_batch

RECIPE = "fluxir.pretrain:FlowMatchingRecipe"


def deepspeed_config(cfg) -> dict:
    """The JSON named by pretrain.deepspeed with the per-worker batch, lr, weight decay and the warm-up +
    cosine schedule of `pretrain` (the JSON's own ZeRO stage, precision and optimizer betas stay)."""
    p = cfg.pretrain
    micro = per_rank_batch(cfg)
    return load_ds_config(p.deepspeed, {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * p.num_workers,
        "gradient_accumulation_steps": 1,
        "optimizer": {"params": {"lr": p.lr, "weight_decay": p.weight_decay}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": p.steps, "warmup_num_steps": min(p.warmup_steps, p.steps - 1),
            "warmup_min_ratio": 0.0, "cos_min_ratio": p.min_lr_ratio, "warmup_type": "linear"}},
    })


def run_pretrain(cfg, show_progress: bool = True, resume: bool = True, on_metrics=None) -> dict:
    """Train (or resume) the stage-0 policy; returns {"model_dir", "seconds", "metrics"}.

    `on_metrics(dict)`, if given, sees every metrics report of rank 0 (step, loss, steps_per_s, ...)."""
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    check_resources("stage 0", [("pretrain.worker_resources", cfg.pretrain.worker_resources,
                                 cfg.pretrain.num_workers)], autoscaling=cfg.ray.autoscaling)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.pretrain.steps, desc="pretrain", unit="step", file=sys.stdout)

    gauges = StageMetrics("pretrain", TRAIN_GAUGES)
    tracker = Tracker(cfg, "pretrain", cfg.run_dir / "pretrain")

    def progress(metrics: dict) -> None:
        gauges.record(metrics)
        if on_metrics is not None:
            on_metrics(metrics)
        if "step" in metrics:
            tracker.log(metrics, step=int(metrics["step"]))
        if bar is not None and "step" in metrics:
            bar.n = int(metrics["step"])
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}",
                            x0_psnr=f"{metrics.get('x0_psnr', float('nan')):.1f}")
            bar.refresh()

    start = time.perf_counter()
    try:
        out = run_training(RECIPE, cfg.model_dump(mode="json"), run_dir=str(cfg.run_dir), name="pretrain",
                           steps=cfg.pretrain.steps, num_workers=cfg.pretrain.num_workers,
                           ds_config=deepspeed_config(cfg), checkpoint_every=cfg.pretrain.checkpoint_every,
                           keep_checkpoints=cfg.pretrain.keep_checkpoints, resume=resume,
                           log_every=cfg.pretrain.log_every, progress=progress,
                           resources_per_worker=cfg.pretrain.worker_resources, ema_decay=cfg.pretrain.ema_decay)
    finally:
        gauges.close()
        tracker.finish()
        if bar is not None:
            bar.close()
    return {"model_dir": out["model_dir"], "seconds": time.perf_counter() - start, "metrics": out["metrics"]}
