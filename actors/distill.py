"""Stage 2 on Ray Tune (docs/ARCHITECTURE.md, "Stage 2"): every student and every control is a Tune trial.

`fluxir distill` runs, per step budget, the student with `distill.student`'s settings and (with
`distill.controls`) its controls; `fluxir sweep` runs a search space (configs/sweeps/distill.yaml) with
ASHA pruning on a validation metric, then the controls of each budget's best student. Both:
1. the driver computes the teacher's N-step trajectories on calibration and validation crops, the
   searched schedule per budget and the undistilled validation baselines, and writes them (Parquet,
   `teacher.json`) under the stage folder; `--resume` reads them back when they match;
2. trials get them through the object store (`tune.with_parameters`), train a student with
   `fluxir.distill.distill`, and report validation metrics with a checkpoint (policy + schedule +
   optimizer) every `eval_every` steps, so a stopped sweep resumes with `Tuner.restore`;
3. the best student per budget is copied to `<stage>/best/K<k>/` (a policy folder whose card holds the
   schedule), its times to `<stage>/schedules.json`, the controls to `<stage>/controls/K<k>/<arm>/`, and
   `fluxir distill` writes the export default to `<stage>/choice.json`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from fluxir import distill as D
from fluxir.codec import build_codec, pack
from fluxir.config import Config, StudentConfig, config_from_dict
from fluxir.policy import build_policy, load_policy, save_policy
from fluxir.pretrain import token_channels
from fluxir.report import write_json
from fluxir.export import sha256_file
from fluxir.rollouts import column_tensor, read_parquet, schedule_of, to_record_batch, write_parquet

from actors.runtime import check_resources, init_ray, threads_for
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


def _read_teacher(path: Path, codec) -> D.TeacherSet:
    """A teacher set back from the Parquet `_write_teacher` wrote (images re-encoded to tokens)."""
    table = read_parquet(path)
    z_lq, z_gt = codec.encode(column_tensor(table, "lq")), codec.encode(column_tensor(table, "gt"))
    return D.TeacherSet(schedule_of(table)[0], column_tensor(table, "states"), pack(z_lq), pack(z_gt),
                        column_tensor(table, "task").long(), *z_lq.shape[-2:])


def _identity(cfg: Config, source: Path) -> dict:
    """What the stored teacher sets and searched schedules depend on; `--resume` reuses them when it matches."""
    d = cfg.distill
    return {"teacher": str(source), "weights_sha256": sha256_file(source / "policy.safetensors"), "seed": cfg.seed,
            **{k: getattr(d, k) for k in ("teacher_nfe", "teacher_schedule", "shift", "calibration_size",
                                          "validation_size", "budgets", "metric", "search_grid")}}


def _teacher_sets(cfg: Config, policy, codec, stage_dir: Path, reuse: bool) -> dict[str, D.TeacherSet]:
    d, sets = cfg.distill, {}
    for name, count, salt in (("calibration", d.calibration_size, D.SALT_CALIBRATION),
                              ("validation", d.validation_size, D.SALT_VALIDATION)):
        path = stage_dir / f"teacher_{name}.parquet"
        if reuse and path.is_file():
            sets[name] = _read_teacher(path, codec)
            continue
        inputs = D.calibration_inputs(cfg, count, salt)
        sets[name] = D.teacher_trajectories(policy, codec, inputs, cfg, d.teacher_nfe, d.teacher_schedule)
        _write_teacher(sets[name], inputs, path)
    return sets


def _search(cfg: Config, policy, codec, calibration: D.TeacherSet, lpips_net) -> dict[int, dict]:
    """The searched schedule per budget (cost on the calibration crops), with its search's record."""
    d, t_start = cfg.distill, cfg.flow.t_start
    cost = D.sampler_cost(policy, codec, calibration, cfg.flow, d.metric, lpips_net)
    out = {}
    for k in d.budgets:
        starts = {kind: D.budget_schedule(kind, k, t_start, d.shift) for kind in ("uniform", "shifted")}
        found = D.search_schedule(cost, k, t_start, d.search_grid, starts)
        log.info("budget %d: searched schedule %s (cost %.4f; from %s at %.4f; %d schedules tried)", k,
                 [round(t, 3) for t in found.schedule], found.cost, found.start, found.start_cost, found.evaluations)
        out[k] = {"schedule": found.schedule, "cost": found.cost, "start": found.start,
                  "start_cost": found.start_cost, "evaluations": found.evaluations}
    return out


def prepare(cfg: Config, stage_dir: Path, resume: bool = False) -> dict:
    """Teacher trajectories, the searched schedules and the undistilled validation baselines per budget.

    With `resume`, a stage folder whose `teacher.json` records the same teacher weights and settings is read
    back (Parquet trajectories, schedules, baselines) instead of computed again.
    """
    d = cfg.distill
    source = teacher_dir(cfg)
    codec = build_codec(cfg)
    teacher_policy = load_policy(source, cfg, token_channels(codec))
    identity, record = _identity(cfg, source), stage_dir / "teacher.json"
    stored = json.loads(record.read_text()) if resume and record.is_file() else None
    reuse = stored is not None and stored.get("identity") == identity
    if resume and not reuse:
        log.info("stage 2: no matching teacher record in %s; computing the teacher sets and schedules", stage_dir)
    sets = _teacher_sets(cfg, teacher_policy, codec, stage_dir, reuse)
    lpips_net = _lpips(cfg)
    searched = ({int(k): v for k, v in stored["searched"].items()} if reuse
                else _search(cfg, teacher_policy, codec, sets["calibration"], lpips_net))
    schedules = {kind: {k: D.budget_schedule(kind, k, cfg.flow.t_start, d.shift,
                                             {b: s["schedule"] for b, s in searched.items()}) for k in d.budgets}
                 for kind in ("uniform", "shifted", "searched")}
    if reuse:
        baselines = {kind: {int(k): v for k, v in b.items()} for kind, b in stored["validation_baselines"].items()}
        teacher_val = stored["teacher_validation"]
    else:
        baselines = {kind: {k: D.validate(teacher_policy, codec, sets["validation"], times, cfg.flow, lpips_net,
                                          per_image=True) for k, times in by_budget.items()}
                     for kind, by_budget in schedules.items()}
        teacher_val = D.validate(teacher_policy, codec, sets["validation"], sets["validation"].schedule, cfg.flow,
                                 lpips_net, per_image=True)
        write_json(record, {"identity": identity, "teacher_schedule": sets["validation"].schedule,
                            "searched": searched, "validation_baselines": baselines,
                            "teacher_validation": teacher_val})
    return {"cfg": cfg.model_dump(mode="json"), "teacher_state": teacher_policy.trainable_state_dict(),
            "calibration": sets["calibration"], "validation": sets["validation"], "schedules": schedules,
            "searched": searched, "baselines": baselines, "teacher_validation": teacher_val,
            "teacher_dir": str(source), "stage": stage_dir.name, "reused": reuse}


def _lpips(cfg: Config):
    """LPIPS for the validation crops (scored on >= 64 px upsamplings) when enabled and available."""
    from fluxir.evaluate import lpips_or_reason

    return lpips_or_reason(cfg.eval.lpips)[0]


def _save_trial_state(directory: Path, policy, cfg: Config, step: int, schedule: D.LearnedSchedule, opt,
                      trial: dict) -> None:
    save_policy(policy, directory, cfg, extra={"stage": "distill", "budget": trial["budget"], "arm": trial["arm"],
                                               "schedule_kind": trial["schedule"], "schedule": schedule.as_list(),
                                               "step": step})
    torch.save({"step": step, "schedule": schedule.state_dict(), "optimizer": opt.state_dict()},
               directory / TRAINER_STATE)


def _load_trial_state(directory: Path, policy) -> dict:
    from safetensors.torch import load_file

    policy.load_trainable_state_dict(load_file(str(directory / "policy.safetensors")))
    return torch.load(directory / TRAINER_STATE, weights_only=True)


def trial_params(cfg: Config, params: dict) -> dict:
    """A trial's full description from its Tune config: budget, arm and the student's settings
    (`distill.student`, then the sweep's sampled keys, then the arm's overrides). A config may hold its
    fixed keys under "spec" (the controls of a sweep's best trials)."""
    params = {**params.get("spec", {}), **{k: v for k, v in params.items() if k != "spec"}}
    arm = params.get("arm", "student")
    settings = D.arm_settings(cfg.distill.student, arm, params)
    return {"budget": int(params["budget"]), "arm": arm, **settings.model_dump()}


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
    resume, checkpoint = {}, tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = _load_trial_state(Path(folder), policy)
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
            _save_trial_state(Path(folder), policy, cfg, step, schedule, opt, trial)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    with gauges:
        D.distill(policy, codec, cfg, shared["calibration"], shared["validation"], init, settings, report,
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
               mode: str = "max", num_samples: int = 1, resume: bool = False, max_concurrent: int | None = None,
               name: str = "trials"):
    """Fit (or, with `resume`, restore and finish) the Tune experiment `<stage_dir>/<name>`."""
    # Every report carries a checkpoint and every checkpoint forces an experiment snapshot (that is what
    # makes `--resume` exact); Tune warns about that frequency, which is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    check_resources("stage 2", [("distill.trial_resources", cfg.distill.trial_resources, 1)],
                    autoscaling=cfg.ray.autoscaling)
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


def _keep_model(row: dict, target: Path) -> None:
    """Copy a trial's last checkpoint to `target` as a policy folder (its card holds the schedule)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(row["checkpoint"], target)
    (target / TRAINER_STATE).unlink(missing_ok=True)
    row["model_dir"] = str(target)
    row["schedule"] = json.loads((target / "policy.json").read_text())["schedule"]


def best_per_budget(rows: list[dict], metric: str, mode: str, stage_dir: Path) -> dict[int, dict]:
    """Copy each budget's best student (arm "student", by its last reported `metric`) to `<stage_dir>/best/K<k>/`."""
    sign = 1 if mode == "max" else -1
    best: dict[int, dict] = {}
    for row in rows:
        k = int(row["params"]["budget"])
        if row["params"]["arm"] == "student" and row["checkpoint"] and (
                k not in best or sign * row["metrics"][metric] > sign * best[k]["metrics"][metric]):
            best[k] = row
    for k, row in best.items():
        _keep_model(row, stage_dir / "best" / f"K{k}")
    write_json(stage_dir / "schedules.json", {str(k): best[k]["schedule"] for k in sorted(best)})
    return dict(sorted(best.items()))


def keep_controls(rows: list[dict], stage_dir: Path) -> dict[int, dict[str, dict]]:
    """Copy each control trial to `<stage_dir>/controls/K<k>/<arm>/`: {budget: {arm: row}}."""
    out: dict[int, dict[str, dict]] = {}
    for row in rows:
        k, arm = int(row["params"]["budget"]), row["params"]["arm"]
        if arm != "student" and row["checkpoint"]:
            _keep_model(row, stage_dir / "controls" / f"K{k}" / arm)
            out.setdefault(k, {})[arm] = row
    return dict(sorted(out.items()))


def _arms(cfg: Config) -> list[str]:
    return list(D.ARMS) if cfg.distill.controls else ["student"]


def _distinct(cfg: Config, shared: dict, spec: dict) -> bool:
    """False for a uniform-schedule control whose student already trains on that schedule (a fixed
    searched schedule that came out uniform): the same trial twice, so it is not run."""
    if spec["arm"] != "uniform-student":
        return True
    student = D.arm_settings(cfg.distill.student, "student", spec)
    k = int(spec["budget"])
    return student.schedule == "learned" or shared["schedules"][student.schedule][k] != shared["schedules"]["uniform"][k]


def _selection_metric(cfg: Config) -> tuple[str, str]:
    """The validation metric the best trial per budget is chosen on: the judged one (`prepare` has
    already refused an LPIPS-judged stage 2 without LPIPS)."""
    return ("lpips", "min") if cfg.distill.metric == "lpips" else ("psnr", "max")


def run_distill(cfg: Config, stage: str = "distill", resume: bool = False) -> dict:
    """Per budget a student with `distill.student`'s settings, and (`distill.controls`) its controls."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = prepare(cfg, stage_dir, resume)
    specs = [spec for k in cfg.distill.budgets for arm in _arms(cfg)
             if _distinct(cfg, shared, spec := {"budget": k, "arm": arm})]
    metric, mode = _selection_metric(cfg)
    grid = run_trials(cfg, shared, stage_dir, {"spec": tune.grid_search(specs)}, metric=metric, mode=mode,
                      resume=resume)
    rows = trial_rows(grid, cfg, metric)
    best = best_per_budget(rows, metric, mode, stage_dir)
    choice = export_choice(cfg, shared, best, metric, stage_dir)
    return {"shared": shared, "rows": rows, "best": best, "controls": keep_controls(rows, stage_dir),
            "stage_dir": str(stage_dir), "metric": metric, "choice": choice}


def _student_validation(cfg: Config, shared: dict, row: dict) -> dict:
    """A kept student on the validation crops, with per-image values."""
    codec = build_codec(cfg)
    policy = load_policy(Path(row["model_dir"]), cfg, token_channels(codec))
    return D.validate(policy, codec, shared["validation"], row["schedule"], cfg.flow, _lpips(cfg), per_image=True)


def export_choice(cfg: Config, shared: dict, best: dict[int, dict], metric: str, stage_dir: Path) -> dict:
    """`fluxir export`'s default (the caller writes it to `<stage_dir>/choice.json`): the teacher policy on each budget's
    uniform, shifted and searched schedules, and each budget's best student, judged on the validation
    crops against the teacher on its own N-step schedule (`fluxir.distill.choose_export`)."""
    teacher = shared["teacher_validation"]
    candidates = [{"name": f"teacher, {kind} K", "eval": "teacher" if kind == "uniform" else kind, "policy_dir": shared["teacher_dir"], "budget": k,
                   "schedule": shared["schedules"][kind][k], "validation": shared["baselines"][kind][k]}
                  for kind in ("uniform", "shifted", "searched") for k in shared["schedules"][kind]]
    candidates.append({"name": "teacher, own N steps", "eval": "teacher", "policy_dir": shared["teacher_dir"],
                       "budget": len(shared["validation"].schedule) - 1, "schedule": shared["validation"].schedule,
                       "validation": teacher})
    candidates += [{"name": "student", "eval": "students", "policy_dir": row["model_dir"], "budget": k,
                    "schedule": row["schedule"], "validation": _student_validation(cfg, shared, row)} for k, row in best.items()]
    for c in candidates:  # relative to the run folder, so the run folder can move
        c["policy_dir"] = os.path.relpath(Path(c["policy_dir"]).resolve(), stage_dir.parent.resolve())
    choice = D.choose_export(candidates, teacher, metric, shared["validation"].task.tolist())
    means = lambda m: {k: v for k, v in m.items() if k != "per_image"}  # noqa: E731
    return {**choice, "validation": means(choice["validation"]), "metric": metric,
            "teacher_validation": means(teacher), "candidates": [{**c, "validation": means(c["validation"])}
                                                                 for c in candidates]}


def run_sweep(cfg: Config, sweep, stage: str = "sweep", resume: bool = False) -> dict:
    """The search of `sweep` (a `SweepConfig`) with ASHA on its metric, the best student per budget saved;
    then (`distill.controls`) each best student's controls with its exact settings and seed."""
    stage_dir = cfg.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    shared = prepare(cfg, stage_dir, resume)
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
             if arm != "student" and _distinct(cfg, shared, spec := {**row["params"], "arm": arm})]
    if cfg.distill.controls and specs:
        control_grid = run_trials(cfg, shared, stage_dir, {"spec": tune.grid_search(specs)}, metric=sweep.metric,
                                  mode=sweep.mode, resume=resume, max_concurrent=sweep.max_concurrent,
                                  name="controls-trials")
        control_rows = trial_rows(control_grid, cfg, sweep.metric)
        controls, rows = keep_controls(control_rows, stage_dir), rows + control_rows
        trials, errored = trials + len(control_grid), errored + sum(1 for r in control_grid if r.error)
    return {"shared": shared, "rows": rows, "best": best, "controls": controls, "stage_dir": str(stage_dir),
            "trials": trials, "errored": errored, "metric": sweep.metric}
