"""Stage 2's trials and their results, apart from the scheduler that runs them.

A trial trains one student, or one of its controls (`fluxir.distill.ARMS`), for one step budget. Its
checkpoint is a policy folder (the card holds the schedule) plus `trainer.pt` (step, schedule logits,
optimizer state). A trial row is {"params", "step", "stopped_early", "metrics", "checkpoint"}; from the
rows, `best_per_budget` keeps each budget's best student under `<stage>/best/K<k>/` (their times in
`<stage>/schedules.json`), `keep_controls` the controls under `<stage>/controls/K<k>/<arm>/`, and
`export_choice` picks `fluxir export`'s default among the teacher's schedules and the kept students.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fluxir import distill as D
from fluxir.config import Config
from fluxir.policy import load_trained, save_policy
from fluxir.report import write_json
from fluxir.teacher import validation_lpips

TRAINER_STATE = "trainer.pt"  # step, schedule logits and optimizer state (torch.load with weights_only)


def save_trial_state(directory: Path, policy, cfg: Config, step: int, schedule: D.LearnedSchedule, opt,
                     trial: dict) -> None:
    """A trial's checkpoint in `directory`: the policy folder (card: budget, arm, schedule, step) and
    `TRAINER_STATE`."""
    save_policy(policy, directory, cfg, extra={"stage": "distill", "budget": trial["budget"], "arm": trial["arm"],
                                               "schedule_kind": trial["schedule"], "schedule": schedule.as_list(),
                                               "step": step})
    torch.save({"step": step, "schedule": schedule.state_dict(), "optimizer": opt.state_dict()},
               directory / TRAINER_STATE)


def load_trial_state(directory: Path, policy) -> dict:
    """Load a checkpoint's trainable tensors into `policy`; returns its `TRAINER_STATE`
    ({"step", "schedule", "optimizer"})."""
    from safetensors.torch import load_file

    policy.load_trainable_state_dict(load_file(str(directory / "policy.safetensors")))
    return torch.load(directory / TRAINER_STATE, weights_only=True)


def trial_params(cfg: Config, params: dict) -> dict:
    """A trial's budget, arm and full student settings from its trial config: `distill.student`, then
    the config's own keys, then the arm's overrides. Keys under "spec" count as the config's own (the
    form a grid of fixed trials takes)."""
    params = {**params.get("spec", {}), **{k: v for k, v in params.items() if k != "spec"}}
    arm = params.get("arm", "student")
    settings = D.arm_settings(cfg.distill.student, arm, params)
    return {"budget": int(params["budget"]), "arm": arm, **settings.model_dump()}


def trial_arms(cfg: Config) -> list[str]:
    """The arms each budget trains: the student, and its controls when `distill.controls` is on."""
    return list(D.ARMS) if cfg.distill.controls else ["student"]


def distinct_trial(cfg: Config, shared: dict, spec: dict) -> bool:
    """False only for a uniform-schedule control whose student trains on a fixed schedule equal to the
    uniform one (a searched schedule that came out uniform): that control would repeat the student."""
    if spec["arm"] != "uniform-student":
        return True
    student = D.arm_settings(cfg.distill.student, "student", spec)
    k = int(spec["budget"])
    return student.schedule == "learned" or shared["schedules"][student.schedule][k] != shared["schedules"]["uniform"][k]


def selection_metric(cfg: Config) -> tuple[str, str]:
    """(metric, mode) the best student per budget is chosen on: the judged metric `distill.metric`. The
    schedule search refuses an LPIPS-judged stage 2 when LPIPS is unavailable."""
    return ("lpips", "min") if cfg.distill.metric == "lpips" else ("psnr", "max")


def keep_checkpoint(row: dict, target: Path) -> None:
    """Copy a trial row's checkpoint to `target` as a plain policy folder (no `TRAINER_STATE`); the row
    gains "model_dir" and the "schedule" from the folder's card."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(row["checkpoint"], target)
    (target / TRAINER_STATE).unlink(missing_ok=True)
    row["model_dir"] = str(target)
    row["schedule"] = json.loads((target / "policy.json").read_text())["schedule"]


def best_per_budget(rows: list[dict], metric: str, mode: str, stage_dir: Path) -> dict[int, dict]:
    """{budget: row} of each budget's best student (arm "student", by its last reported `metric`), kept
    in `<stage_dir>/best/K<k>/`; their schedules go to `<stage_dir>/schedules.json`."""
    sign = 1 if mode == "max" else -1
    best: dict[int, dict] = {}
    for row in rows:
        k = int(row["params"]["budget"])
        if row["params"]["arm"] == "student" and row["checkpoint"] and (
                k not in best or sign * row["metrics"][metric] > sign * best[k]["metrics"][metric]):
            best[k] = row
    for k, row in best.items():
        keep_checkpoint(row, stage_dir / "best" / f"K{k}")
    write_json(stage_dir / "schedules.json", {str(k): best[k]["schedule"] for k in sorted(best)})
    return dict(sorted(best.items()))


def keep_controls(rows: list[dict], stage_dir: Path) -> dict[int, dict[str, dict]]:
    """{budget: {arm: row}} of the control trials with a checkpoint, each kept in
    `<stage_dir>/controls/K<k>/<arm>/`."""
    out: dict[int, dict[str, dict]] = {}
    for row in rows:
        k, arm = int(row["params"]["budget"]), row["params"]["arm"]
        if arm != "student" and row["checkpoint"]:
            keep_checkpoint(row, stage_dir / "controls" / f"K{k}" / arm)
            out.setdefault(k, {})[arm] = row
    return dict(sorted(out.items()))


def student_validation(cfg: Config, shared: dict, row: dict) -> dict:
    """A kept student's scores on the validation crops, per image included."""
    from fluxir.accel import module_device

    policy, codec = load_trained(Path(row["model_dir"]), cfg, place_on_device=True)  # the task's GPU, if any
    return D.validate(policy, codec, shared["validation"], row["schedule"], cfg.flow,
                      validation_lpips(cfg, module_device(policy)), per_image=True)


def _means(scores: dict) -> dict:
    """Scores without their per-image values."""
    return {k: v for k, v in scores.items() if k != "per_image"}


def export_choice(cfg: Config, shared: dict, best: dict[int, dict], metric: str, stage_dir: Path) -> dict:
    """`fluxir export`'s default (the caller writes it to `<stage_dir>/choice.json`).

    The candidates are the teacher on each budget's uniform, shifted and searched schedules, the teacher
    on its own N steps, and each budget's best student; `fluxir.distill.choose_export` picks among them
    on the validation crops against the teacher on its own N steps. Policy folders are given relative
    to the run folder so that the run folder can move.
    """
    teacher = shared["teacher_validation"]
    candidates = [{"name": f"teacher, {kind} K", "eval": "teacher" if kind == "uniform" else kind,
                   "policy_dir": shared["teacher_dir"], "budget": k, "schedule": shared["schedules"][kind][k],
                   "validation": shared["baselines"][kind][k]}
                  for kind in ("uniform", "shifted", "searched") for k in shared["schedules"][kind]]
    candidates.append({"name": "teacher, own N steps", "eval": "teacher", "policy_dir": shared["teacher_dir"],
                       "budget": len(shared["validation"].schedule) - 1, "schedule": shared["validation"].schedule,
                       "validation": teacher})
    candidates += [{"name": "student", "eval": "students", "policy_dir": row["model_dir"], "budget": k,
                    "schedule": row["schedule"], "validation": student_validation(cfg, shared, row)}
                   for k, row in best.items()]
    for c in candidates:
        c["policy_dir"] = os.path.relpath(Path(c["policy_dir"]).resolve(), stage_dir.parent.resolve())
    choice = D.choose_export(candidates, teacher, metric, shared["validation"].task.tolist())
    return {**choice, "validation": _means(choice["validation"]), "metric": metric,
            "teacher_validation": _means(teacher),
            "candidates": [{**c, "validation": _means(c["validation"])} for c in candidates]}
