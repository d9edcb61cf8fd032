"""Stage 2 on Ray Tune (docs/ARCHITECTURE.md, "Stage 2"): every student is a Tune trial.

`fluxir distill` runs one trial per step budget with the configured hyperparameters; `fluxir sweep`
runs a search space (configs/sweeps/distill.yaml) with ASHA pruning on the validation metric. Both:
1. the driver computes the teacher's N-step trajectories on calibration and validation crops, the
   cost matrix and the cost-DP schedules, and writes them (Parquet, JSON) under the stage folder;
2. trials get them through the object store (`tune.with_parameters`), train a student with
   `fluxir.distill.distill`, and report validation metrics with a checkpoint (policy + schedule +
   optimizer) every `eval_every` steps, so a stopped sweep resumes with `Tuner.restore`;
3. the best trial per budget is copied to `<stage>/best/K<k>/` (a policy folder whose card holds the
   schedule) and its times to `<stage>/schedules.json`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from fluxir import distill as D
from fluxir.codec import build_codec
from fluxir.config import Config, config_from_dict
from fluxir.policy import build_policy, load_policy, save_policy
from fluxir.pretrain import token_channels
from fluxir.report import write_json
from fluxir.rollouts import to_record_batch, write_parquet

from actors.runtime import init_ray, threads_for
from actors.tracking import DISTILL_GAUGES, StageMetrics

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer.pt"  # step, schedule logits and optimizer state (torch.load with weights_only)


def teacher_dir(cfg: Config) -> Path:
    """The teacher policy: `distill.teacher`, else the RL-tuned policy, else the stage-0 base."""
    if cfg.distill.teacher:
        return Path(cfg.distill.teacher)
    rl = cfg.run_dir / "rl" / "model"
    return rl if (rl / "policy.safetensors").is_file() else cfg.run_dir / "pretrain" / "model"


def _write_teacher(teacher: D.TeacherSet, inputs: dict, path: Path) -> Path:
    columns = {"lq": inputs["lq"], "gt": inputs["gt"], "states": teacher.states, "task": teacher.task,
               "seed": inputs["seed"]}
    batch = to_record_batch(columns, teacher.schedule, list(range(len(teacher.schedule))))
    return write_parquet([batch], path)


def prepare(cfg: Config, stage_dir: Path) -> dict:
    """Teacher trajectories, cost matrix, schedules and the undistilled validation baselines per budget."""
    d = cfg.distill
    source = teacher_dir(cfg)
    codec = build_codec(cfg)
    teacher_policy = load_policy(source, cfg, token_channels(codec))
    sets = {}
    for name, count, salt in (("calibration", d.calibration_size, D.SALT_CALIBRATION),
                              ("validation", d.validation_size, D.SALT_VALIDATION)):
        inputs = D.calibration_inputs(cfg, count, salt)
        sets[name] = D.teacher_trajectories(teacher_policy, codec, inputs, cfg, d.teacher_nfe)
        _write_teacher(sets[name], inputs, stage_dir / f"teacher_{name}.parquet")
    cost = D.cost_matrix(sets["calibration"])
    schedules = {kind: {k: D.budget_schedule(kind, k, sets["calibration"].schedule, cost) for k in d.budgets}
                 for kind in ("uniform", "cost_dp")}
    lpips_net = _lpips(cfg)
    baselines = {k: D.validate(teacher_policy, codec, sets["validation"], schedules["uniform"][k], cfg.flow,
                               lpips_net) for k in d.budgets}
    write_json(stage_dir / "teacher.json", {"teacher": str(source), "teacher_nfe": d.teacher_nfe,
                                            "cost_matrix": [[c if math.isfinite(c) else None for c in row]
                                                            for row in cost.tolist()],  # null: a >= b
                                            "schedules": schedules,
                                            "validation_baselines": baselines})
    return {"cfg": cfg.model_dump(mode="json"), "teacher_state": teacher_policy.trainable_state_dict(),
            "calibration": sets["calibration"], "validation": sets["validation"], "cost": cost,
            "schedules": schedules, "baselines": baselines, "teacher_dir": str(source), "stage": stage_dir.name}


def _lpips(cfg: Config):
    """LPIPS for validation crops, when enabled and the crops are large enough for AlexNet (>= 32 px)."""
    from fluxir.evaluate import lpips_or_reason

    if cfg.data.crop < 32:
        log.info("validation LPIPS off: %d px crops are below AlexNet's 32 px minimum", cfg.data.crop)
        return None
    return lpips_or_reason(cfg.eval.lpips)[0]


def _save_trial_state(directory: Path, policy, cfg: Config, step: int, schedule: D.LearnedSchedule, opt,
                      hp: D.DistillHParams) -> None:
    save_policy(policy, directory, cfg, extra={"stage": "distill", "budget": hp.budget, "schedule_kind": hp.schedule,
                                               "schedule": schedule.as_list(), "step": step})
    torch.save({"step": step, "schedule": schedule.state_dict(), "optimizer": opt.state_dict()},
               directory / TRAINER_STATE)


def _load_trial_state(directory: Path, policy) -> dict:
    from safetensors.torch import load_file

    policy.load_trainable_state_dict(load_file(str(directory / "policy.safetensors")))
    return torch.load(directory / TRAINER_STATE, weights_only=True)


def hparams(cfg: Config, params: dict) -> D.DistillHParams:
    """A trial's hyperparameters: the sampled `params` over `cfg.distill`'s values."""
    d = cfg.distill
    pick = lambda key: params.get(key, getattr(d, key))  # noqa: E731
    return D.DistillHParams(budget=int(params["budget"]), schedule=pick("schedule"), lr=float(pick("lr")),
                            teacher_weight=float(pick("teacher_weight")), gt_weight=float(pick("gt_weight")),
                            steps=int(pick("steps")), batch_size=int(pick("batch_size")), loss=pick("loss"),
                            schedule_lr=float(pick("schedule_lr")), eval_every=int(pick("eval_every")))


def distill_trial(params: dict, shared: dict) -> None:
    """One Tune trial: a student for `params["budget"]` trained from the teacher, resumable from its checkpoint."""
    cfg = config_from_dict(shared["cfg"], "distill trial")
    torch.set_num_threads(threads_for(cfg.distill.trial_resources))
    hp = hparams(cfg, params)
    codec = build_codec(cfg)
    policy = build_policy(cfg, token_channels(codec))
    policy.load_trainable_state_dict(shared["teacher_state"])
    resume, checkpoint = {}, tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = _load_trial_state(Path(folder), policy)
        resume = {"start_step": state["step"], "schedule_state": state["schedule"],
                  "optimizer_state": state["optimizer"]}
    baseline = shared["baselines"][hp.budget]
    gauges = StageMetrics(shared["stage"], DISTILL_GAUGES, budget=hp.budget, trial=tune.get_context().get_trial_id())

    def report(step, metrics, schedule, opt):
        metrics = {**metrics, "step": step, "nfe": hp.budget, "psnr_gain": metrics["psnr"] - baseline["psnr"]}
        if "lpips" in metrics and "lpips" in baseline:
            metrics["lpips_gain"] = baseline["lpips"] - metrics["lpips"]
        gauges.record(metrics)
        with tempfile.TemporaryDirectory() as folder:
            _save_trial_state(Path(folder), policy, cfg, step, schedule, opt, hp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    D.distill(policy, codec, cfg, shared["calibration"], shared["validation"], shared["cost"], hp, report,
              lpips_net=_lpips(cfg), seed=cfg.seed, **resume)


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
               mode: str = "max", num_samples: int = 1, resume: bool = False, max_concurrent: int | None = None):
    """Fit (or, with `resume`, restore and finish) the Tune experiment `<stage_dir>/trials`."""
    # Every report carries a checkpoint and every checkpoint forces an experiment snapshot (that is what
    # makes `--resume` exact); Tune warns about that frequency, which is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    trainable = tune.with_resources(tune.with_parameters(distill_trial, shared=shared),
                                    tune.PlacementGroupFactory([dict(cfg.distill.trial_resources)]))
    path = (stage_dir / "trials").resolve()
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
    """One row per trial that reported: its hyperparameters, last metrics, steps reached, checkpoint folder."""
    rows = []
    for result in grid:
        if not result.metrics or metric not in result.metrics:
            continue
        m, hp = result.metrics, hparams(cfg, result.config)
        rows.append({"params": asdict(hp), "step": int(m["step"]), "stopped_early": int(m["step"]) < hp.steps,
                     "metrics": {k: m[k] for k in ("psnr", "ssim", "lpips", "psnr_gain", "lpips_gain", "sec_per_image")
                                 if k in m},
                     "checkpoint": result.checkpoint.path if result.checkpoint else None})
    return rows


def best_per_budget(rows: list[dict], metric: str, mode: str, stage_dir: Path) -> dict[int, dict]:
    """Copy each budget's best trial (by its last reported `metric`) to `<stage_dir>/best/K<k>/`."""
    sign = 1 if mode == "max" else -1
    best: dict[int, dict] = {}
    for row in rows:
        k = int(row["params"]["budget"])
        if row["checkpoint"] and (k not in best or sign * row["metrics"][metric] > sign * best[k]["metrics"][metric]):
            best[k] = row
    for k, row in best.items():
        target = stage_dir / "best" / f"K{k}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(row["checkpoint"], target)
        (target / TRAINER_STATE).unlink(missing_ok=True)
        row["model_dir"] = str(target)
        row["schedule"] = json.loads((target / "policy.json").read_text())["schedule"]
    write_json(stage_dir / "schedules.json", {str(k): best[k]["schedule"] for k in sorted(best)})
    return dict(sorted(best.items()))


def run_distill(cfg: Config, stage: str = "distill", resume: bool = False) -> dict:
    """One student per `distill.budgets` with the configured hyperparameters (a grid over budgets)."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = prepare(cfg, stage_dir)
    grid = run_trials(cfg, shared, stage_dir, {"budget": tune.grid_search(list(cfg.distill.budgets))},
                      resume=resume)
    rows = trial_rows(grid, cfg, "psnr")
    return {"shared": shared, "rows": rows, "best": best_per_budget(rows, "psnr", "max", stage_dir),
            "stage_dir": str(stage_dir)}


def run_sweep(cfg: Config, sweep, stage: str = "sweep", resume: bool = False) -> dict:
    """The search of `sweep` (a `SweepConfig`) with ASHA on its metric; best student per budget saved."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = prepare(cfg, stage_dir)
    space = {**search_space(sweep.space), "steps": sweep.steps, "eval_every": sweep.eval_every}
    scheduler = None
    if sweep.asha:
        scheduler = ASHAScheduler(time_attr="step", max_t=sweep.steps, grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor)
    grid = run_trials(cfg, shared, stage_dir, space, scheduler, sweep.metric, sweep.mode, sweep.num_samples,
                      resume=resume, max_concurrent=sweep.max_concurrent)
    rows = trial_rows(grid, cfg, sweep.metric)
    return {"shared": shared, "rows": rows, "best": best_per_budget(rows, sweep.metric, sweep.mode, stage_dir),
            "stage_dir": str(stage_dir), "trials": len(grid), "errored": sum(1 for r in grid if r.error)}
