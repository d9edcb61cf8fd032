"""Stage 2's teacher side: what every student and control of a stage is trained and judged against.

`prepare` loads the teacher policy (`teacher_dir`), runs its N-step trajectories on the calibration and
validation crops (`fluxir.distill.teacher_trajectories`), searches a schedule per step budget on the
calibration crops, and scores the teacher on each budget's uniform, shifted and searched schedules and on
its own N steps on the validation crops. It stores the trajectories as Parquet (`teacher_<set>.parquet`)
and the rest in `teacher.json` with an identity record (teacher weights' hash, seed, settings); with
`resume`, a stage folder whose identity matches is read back instead of computed again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from fluxir import distill as D
from fluxir.codec import pack
from fluxir.config import Config
from fluxir.export import sha256_file
from fluxir.policy import load_trained
from fluxir.report import write_json
from fluxir.rollouts import column_tensor, read_parquet, schedule_of, to_record_batch, write_parquet
from fluxir.seeds import Salt

log = logging.getLogger(__name__)

# The distill settings the stored teacher sets and searched schedules depend on.
IDENTITY_KEYS = ("teacher_nfe", "teacher_schedule", "shift", "calibration_size", "validation_size", "budgets",
                 "metric", "search_grid")
TEACHER_RECORD = "teacher.json"


def teacher_dir(cfg: Config) -> Path:
    """The teacher policy folder: `distill.teacher`, else the RL-tuned policy, else the stage-0 base."""
    if cfg.distill.teacher:
        return Path(cfg.distill.teacher)
    rl = cfg.run_dir / "rl" / "model"
    return rl if (rl / "policy.safetensors").is_file() else cfg.run_dir / "pretrain" / "model"


def validation_lpips(cfg: Config):
    """The LPIPS network for scoring validation crops (on >= 64 px upsamplings), or None when
    `eval.lpips` is off or LPIPS cannot be loaded."""
    from fluxir.evaluate import lpips_or_reason

    return lpips_or_reason(cfg.eval.lpips)[0]


def write_teacher_set(teacher: D.TeacherSet, inputs: dict, path: Path) -> Path:
    """One Parquet row per input: its LQ and GT images, every teacher state, task and seed; the teacher
    times are the file's schedule."""
    columns = {"lq": inputs["lq"], "gt": inputs["gt"], "states": teacher.states, "task": teacher.task,
               "seed": inputs["seed"]}
    batch = to_record_batch(columns, teacher.schedule, list(range(len(teacher.schedule))))
    return write_parquet([batch], path)


def read_teacher_set(path: Path, codec) -> D.TeacherSet:
    """The teacher set in a file `write_teacher_set` wrote, its images encoded to tokens again."""
    table = read_parquet(path)
    z_lq, z_gt = codec.encode(column_tensor(table, "lq")), codec.encode(column_tensor(table, "gt"))
    return D.TeacherSet(schedule_of(table)[0], column_tensor(table, "states"), pack(z_lq), pack(z_gt),
                        column_tensor(table, "task").long(), *z_lq.shape[-2:])


def teacher_identity(cfg: Config, source: Path) -> dict:
    """The teacher folder, the hash of its weights, the seed and the distill settings in `IDENTITY_KEYS`:
    stored teacher sets and schedules are reused only when this matches."""
    d = cfg.distill
    return {"teacher": str(source), "weights_sha256": sha256_file(source / "policy.safetensors"), "seed": cfg.seed,
            **{k: getattr(d, k) for k in IDENTITY_KEYS}}


def teacher_sets(cfg: Config, policy, codec, stage_dir: Path, reuse: bool) -> dict[str, D.TeacherSet]:
    """{"calibration", "validation"}: the teacher's trajectories on each set of crops, read from
    `<stage_dir>/teacher_<set>.parquet` when `reuse` and the file exists, else computed and written there."""
    d, sets = cfg.distill, {}
    for name, count, salt in (("calibration", d.calibration_size, Salt.DISTILL_CALIBRATION),
                              ("validation", d.validation_size, Salt.DISTILL_VALIDATION)):
        path = stage_dir / f"teacher_{name}.parquet"
        if reuse and path.is_file():
            sets[name] = read_teacher_set(path, codec)
            continue
        inputs = D.calibration_inputs(cfg, count, salt)
        sets[name] = D.teacher_trajectories(policy, codec, inputs, cfg, d.teacher_nfe, d.teacher_schedule)
        write_teacher_set(sets[name], inputs, path)
    return sets


def search_budgets(cfg: Config, policy, codec, calibration: D.TeacherSet, lpips_net) -> dict[int, dict]:
    """Per budget the schedule the pattern search finds from the uniform and shifted starts, with its cost
    on the calibration crops, the start it came from, that start's cost and the schedules tried."""
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
    """Everything a stage-2 trial shares: the teacher's trainable tensors and trajectories, each budget's
    uniform, shifted and searched schedules, and the validation scores of the teacher on those schedules
    ("baselines") and on its own N steps.

    With `resume`, a `teacher.json` in `stage_dir` whose identity matches is read back with the Parquet
    trajectories instead of computed again ("reused" in the result says which happened).
    """
    d = cfg.distill
    source = teacher_dir(cfg)
    teacher_policy, codec = load_trained(source, cfg)
    identity, record = teacher_identity(cfg, source), stage_dir / TEACHER_RECORD
    stored = json.loads(record.read_text()) if resume and record.is_file() else None
    reuse = stored is not None and stored.get("identity") == identity
    if resume and not reuse:
        log.info("stage 2: no matching teacher record in %s; computing the teacher sets and schedules", stage_dir)
    sets = teacher_sets(cfg, teacher_policy, codec, stage_dir, reuse)
    lpips_net = validation_lpips(cfg)
    searched = ({int(k): v for k, v in stored["searched"].items()} if reuse
                else search_budgets(cfg, teacher_policy, codec, sets["calibration"], lpips_net))
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
