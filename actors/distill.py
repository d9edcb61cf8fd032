"""Stage 2 on Ray Tune: every student and every control is a Tune trial.

`fluxir distill` runs, per step budget, the student with `distill.student`'s settings and (with
`distill.controls`) its controls as a grid of trials; `fluxir sweep` runs a search space
(configs/sweeps/distill.yaml) with ASHA pruning on a validation metric, then the controls of each budget's
best student. What the trials share comes from `fluxir.teacher.prepare`, whose model work runs as Ray
tasks holding `distill.teacher_resources` (`teacher_side`; the trajectories in `distill.teacher_shards`
tasks at once), and reaches them through the object store (`tune.with_parameters`). Each trial
(`distill_trial`, holding `distill.trial_resources`) places the student on its accelerator (its GPU on a
GPU cluster, in `model.dtype`), trains with `fluxir.distill.distill` and reports validation metrics with a
checkpoint every `eval_every` steps, so a stopped experiment resumes with `Tuner.restore`. The trial rows
read from Tune's results go to `fluxir.students`, which keeps the best students and the controls and picks
the export default.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from fluxir import distill as D
from fluxir.accel import place
from fluxir.codec import build_codec, token_channels
from fluxir.config import Config, StudentConfig, config_from_dict
from fluxir.policy import build_policy
from fluxir.students import (best_per_budget, distinct_trial, export_choice, keep_controls, load_trial_state,
                             save_trial_state, selection_metric, trial_arms, trial_params)
from fluxir.teacher import prepare, validation_lpips

from actors.placement import join_ray, ray_tasks
from actors.runtime import threads_for
from actors.tracking import DISTILL_GAUGES, StageMetrics

log = logging.getLogger(__name__)


def distill_trial(params: dict, shared: dict) -> None:
    """One Tune trial: a student (or a control) for one budget trained from the teacher, resumable."""
    cfg = config_from_dict(shared["cfg"], "distill trial")
    torch.set_num_threads(threads_for(cfg.distill.trial_resources))
    trial = trial_params(cfg, params)
    settings = StudentConfig.model_validate({k: trial[k] for k in StudentConfig.model_fields})
    k = trial["budget"]
    init = shared["schedules"]["searched" if settings.schedule == "learned" else settings.schedule][k]
    codec = build_codec(cfg)
    policy = build_policy(cfg, token_channels(codec))
    policy.load_trainable_state_dict(shared["teacher_state"])
    device = place(codec, cfg.model.dtype, place(policy, cfg.model.dtype))  # the trial's GPU, if Ray gave it one
    resume, checkpoint = {}, tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_trial_state(Path(folder), policy)
        resume = {"start_step": state["step"], "schedule_state": state["schedule"],
                  "optimizer_state": state["optimizer"]}
    baseline = shared["baselines"]["uniform"][k]
    gauges = StageMetrics(shared["stage"], DISTILL_GAUGES, budget=k, trial=tune.get_context().get_trial_id())

    def report(step, metrics, schedule, opt):
        metrics = {**metrics, "step": step, "nfe": k, "psnr_gain": metrics["psnr"] - baseline["psnr"]}
        if "lpips" in metrics and "lpips" in baseline:
            metrics["lpips_gain"] = baseline["lpips"] - metrics["lpips"]
        gauges.record(metrics)
        with tempfile.TemporaryDirectory() as folder:
            save_trial_state(Path(folder), policy, cfg, step, schedule, opt, trial)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    with gauges:
        D.distill(policy, codec, cfg, shared["calibration"], shared["validation"], init, settings, report,
                  lpips_net=validation_lpips(cfg, device), seed=cfg.seed, **resume)


def search_space(spec: dict) -> dict:
    """YAML search space -> Tune: `{grid: [...]}`, `{choice: [...]}`, `{loguniform|uniform: [lo, hi]}`, or a value."""
    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v)}
    space = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in makers:
                raise ValueError(f"sweep space.{key}: use one of {sorted(makers)} (got {value})")
            kind, arg = next(iter(value.items()))
            space[key] = makers[kind](arg)
        else:
            space[key] = value
    return space


def run_trials(cfg: Config, shared: dict, stage_dir: Path, param_space: dict, scheduler=None, metric: str = "psnr",
               mode: str = "max", num_samples: int = 1, resume: bool = False, max_concurrent: int | None = None,
               name: str = "trials"):
    """Fit (or, with `resume`, restore and finish) the Tune experiment `<stage_dir>/<name>`."""
    # Every report carries a checkpoint and every checkpoint forces an experiment snapshot (that is what
    # makes `--resume` exact); Tune warns about that frequency, which is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    join_ray(cfg, "stage 2", [("distill.trial_resources", cfg.distill.trial_resources, 1)])
    trainable = tune.with_resources(tune.with_parameters(distill_trial, shared=shared),
                                    tune.PlacementGroupFactory([dict(cfg.distill.trial_resources)]))
    path = (stage_dir / name).resolve()
    if resume and tune.Tuner.can_restore(str(path)):
        log.info("resuming the sweep at %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        if path.exists():
            shutil.rmtree(path)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent or cfg.distill.max_concurrent),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if len(errors) == len(grid):
        raise RuntimeError(f"every distillation trial failed; first error: {errors[0]}")
    for err in errors:
        log.warning("a distillation trial failed: %s", err)
    return grid


def trial_rows(grid, cfg: Config, metric: str) -> list[dict]:
    """One row per trial that reported: its parameters, last metrics, steps reached, checkpoint folder."""
    rows = []
    for result in grid:
        if not result.metrics or metric not in result.metrics:
            continue
        m, trial = result.metrics, trial_params(cfg, result.config)
        rows.append({"params": trial, "step": int(m["step"]), "stopped_early": int(m["step"]) < trial["steps"],
                     "metrics": {k: m[k] for k in ("psnr", "ssim", "lpips", "psnr_gain", "lpips_gain", "sec_per_image")
                                 if k in m},
                     "checkpoint": result.checkpoint.path if result.checkpoint else None})
    return rows


def teacher_side(cfg: Config, stage_dir: Path, resume: bool) -> dict:
    """`fluxir.teacher.prepare` with its model work as Ray tasks, each holding `distill.teacher_resources`."""
    join_ray(cfg, "stage 2", [("distill.teacher_resources", cfg.distill.teacher_resources, 1)])
    return prepare(cfg, stage_dir, resume, tasks=ray_tasks(cfg.distill.teacher_resources))


def run_distill(cfg: Config, stage: str = "distill", resume: bool = False) -> dict:
    """Per budget a student with `distill.student`'s settings, and (`distill.controls`) its controls."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = teacher_side(cfg, stage_dir, resume)
    specs = [spec for k in cfg.distill.budgets for arm in trial_arms(cfg)
             if distinct_trial(cfg, shared, spec := {"budget": k, "arm": arm})]
    metric, mode = selection_metric(cfg)
    grid = run_trials(cfg, shared, stage_dir, {"spec": tune.grid_search(specs)}, metric=metric, mode=mode,
                      resume=resume)
    rows = trial_rows(grid, cfg, metric)
    best = best_per_budget(rows, metric, mode, stage_dir)
    # export_choice scores each best student on the validation crops: one more task with the teacher's resources
    choice = ray_tasks(cfg.distill.teacher_resources)(export_choice, [(cfg, shared, best, metric, stage_dir)])[0]
    return {"shared": shared, "rows": rows, "best": best, "controls": keep_controls(rows, stage_dir),
            "stage_dir": str(stage_dir), "metric": metric, "choice": choice}


def run_sweep(cfg: Config, sweep, stage: str = "sweep", resume: bool = False) -> dict:
    """The search of `sweep` (a `SweepConfig`) with ASHA on its metric, the best student per budget saved;
    then (`distill.controls`) each best student's controls with its exact settings and seed."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = teacher_side(cfg, stage_dir, resume)
    space = {**search_space(sweep.space), "steps": sweep.steps, "eval_every": sweep.eval_every}
    scheduler = None
    if sweep.asha:
        scheduler = ASHAScheduler(time_attr="step", max_t=sweep.steps, grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor)
    grid = run_trials(cfg, shared, stage_dir, space, scheduler, sweep.metric, sweep.mode, sweep.num_samples,
                      resume=resume, max_concurrent=sweep.max_concurrent)
    rows = trial_rows(grid, cfg, sweep.metric)
    best = best_per_budget(rows, sweep.metric, sweep.mode, stage_dir)
    controls, trials, errored = {}, len(grid), sum(1 for r in grid if r.error)
    specs = [spec for row in best.values() for arm in D.ARMS
             if arm != "student" and distinct_trial(cfg, shared, spec := {**row["params"], "arm": arm})]
    if cfg.distill.controls and specs:
        control_grid = run_trials(cfg, shared, stage_dir, {"spec": tune.grid_search(specs)}, metric=sweep.metric,
                                  mode=sweep.mode, resume=resume, max_concurrent=sweep.max_concurrent,
                                  name="controls-trials")
        control_rows = trial_rows(control_grid, cfg, sweep.metric)
        controls, rows = keep_controls(control_rows, stage_dir), rows + control_rows
        trials, errored = trials + len(control_grid), errored + sum(1 for r in control_grid if r.error)
    return {"shared": shared, "rows": rows, "best": best, "controls": controls, "stage_dir": str(stage_dir),
            "trials": trials, "errored": errored, "metric": sweep.metric}
