"""Stage 2's teacher side: what every student and control of a stage is trained and judged against.

`prepare` runs the teacher policy's (`teacher_dir`) N-step trajectories on the calibration and validation
crops (`trajectory_shard`, `fluxir.distill.teacher_trajectories`), then searches a schedule per step budget
on the calibration crops and scores the teacher on each budget's uniform, shifted and searched schedules
and on its own N steps on the validation crops (`teacher_scores`). It stores the trajectories as Parquet
(`teacher_<set>.parquet`) and the rest in `teacher.json` with an identity record (teacher weights' hash,
seed, settings); with `resume`, a stage folder whose identity matches is read back instead of computed
again.

The model work runs through `tasks(fn, calls)`: in this process by default (`in_process`); actors/distill.py
passes one that runs each call as a Ray task (`distill.teacher_resources`, a GPU on a GPU cluster), the
trajectories in `distill.teacher_shards` calls at once. Each call loads the teacher onto the accelerator of
the process it runs in.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from fluxir import distill as D
from fluxir.accel import module_device
from fluxir.codec import build_codec, pack
from fluxir.config import Config
from fluxir.export import sha256_file
from fluxir.policy import load_trained
from fluxir.report import write_json
from fluxir.rollouts import column_tensor, read_parquet, schedule_of, to_record_batch, write_parquet
from fluxir.seeds import Salt

log = logging.getLogger(__name__)

# run(fn, calls) -> [fn(*args) for args in calls], wherever the caller runs them
Tasks = Callable[[Callable[..., Any], list[tuple]], list]

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


def in_process(fn: Callable[..., Any], calls: list[tuple]) -> list:
    """`fn(*args)` for each argument tuple of `calls`, one after another in this process."""
    return [fn(*args) for args in calls]


def validation_lpips(cfg: Config, device=None):
    """The LPIPS network for scoring validation crops (on >= 64 px upsamplings), on `device` when given, or
    None when `eval.lpips` is off or LPIPS cannot be loaded."""
    from fluxir.evaluate import lpips_or_reason

    net = lpips_or_reason(cfg.eval.lpips)[0]
    return net.to(device) if net is not None and device is not None else net


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


def shard_bounds(count: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges that split `count` rows into at most `shards` contiguous shards of whole
    sampling batches of `batch` rows (the last batch may be short), as even as whole batches allow."""
    batches = -(-count // batch)
    n = min(shards, batches)
    edges = [min(i * batches // n * batch, count) for i in range(n + 1)]
    return list(zip(edges, edges[1:]))


def trajectory_shard(cfg: Config, source: Path, shard: dict[str, tuple[dict, int]]) -> dict[str, D.TeacherSet]:
    """The teacher's trajectories on one shard of each set ({set: (its inputs, the index of its first row)}),
    computed on this process's accelerator in `model.dtype`; returned on the CPU."""
    d = cfg.distill
    policy, codec = load_trained(source, cfg, place_on_device=True)
    return {name: D.teacher_trajectories(policy, codec, inputs, cfg, d.teacher_nfe, d.teacher_schedule,
                                         batch_size=d.teacher_batch, first=first)
            for name, (inputs, first) in shard.items()}


def sharded_trajectories(cfg: Config, source: Path, inputs: dict[str, dict], tasks: Tasks) -> dict[str, D.TeacherSet]:
    """The teacher's trajectories on each set of `inputs` ({set: inputs}): shard i of every set in call i
    (`shard_bounds`, `distill.teacher_shards`), the shards joined in row order."""
    d, shards = cfg.distill, []
    for name, x in inputs.items():
        for i, (a, b) in enumerate(shard_bounds(len(x["task"]), d.teacher_batch, d.teacher_shards)):
            if i == len(shards):
                shards.append({})
            shards[i][name] = ({k: v[a:b] for k, v in x.items()}, a)
    parts = tasks(trajectory_shard, [(cfg, source, shard) for shard in shards])
    return {name: D.TeacherSet.concat([part[name] for part in parts if name in part]) for name in inputs}


def teacher_sets(cfg: Config, source: Path, stage_dir: Path, reuse: bool, tasks: Tasks) -> dict[str, D.TeacherSet]:
    """{"calibration", "validation"}: the teacher's trajectories on each set of crops, read from
    `<stage_dir>/teacher_<set>.parquet` when `reuse` and the file exists, else computed and written there."""
    d, sets, todo = cfg.distill, {}, {}
    for name, count, salt in (("calibration", d.calibration_size, Salt.DISTILL_CALIBRATION),
                              ("validation", d.validation_size, Salt.DISTILL_VALIDATION)):
        path = stage_dir / f"teacher_{name}.parquet"
        if reuse and path.is_file():
            sets[name] = read_teacher_set(path, build_codec(cfg))
        else:
            todo[name] = D.calibration_inputs(cfg, count, salt)
    for name, teacher in sharded_trajectories(cfg, source, todo, tasks).items():
        sets[name] = teacher
        write_teacher_set(teacher, todo[name], stage_dir / f"teacher_{name}.parquet")
    return sets


def budget_schedules(cfg: Config, searched: dict[int, dict]) -> dict[str, dict[int, list[float]]]:
    """{kind: {budget: times}} of the uniform, shifted and searched schedules of every budget."""
    d, found = cfg.distill, {k: s["schedule"] for k, s in searched.items()}
    return {kind: {k: D.budget_schedule(kind, k, cfg.flow.t_start, d.shift, found) for k in d.budgets}
            for kind in ("uniform", "shifted", "searched")}


def teacher_scores(cfg: Config, source: Path, sets: dict[str, D.TeacherSet]) -> dict:
    """{"searched": per budget the schedule found on the calibration set (`search_budgets`),
    "validation_baselines": {kind: {budget: the teacher's validation scores on that schedule}},
    "teacher_validation": its scores on its own N steps}, computed on this process's accelerator."""
    policy, codec = load_trained(source, cfg, place_on_device=True)
    device = module_device(policy)
    lpips_net = validation_lpips(cfg, device)
    calibration, validation = sets["calibration"].to(device), sets["validation"].to(device)
    searched = search_budgets(cfg, policy, codec, calibration, lpips_net)

    def scores(times: list[float]) -> dict:
        return D.validate(policy, codec, validation, times, cfg.flow, lpips_net, per_image=True)

    return {"searched": searched,
            "validation_baselines": {kind: {k: scores(times) for k, times in by_budget.items()}
                                     for kind, by_budget in budget_schedules(cfg, searched).items()},
            "teacher_validation": scores(validation.schedule)}


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


def prepare(cfg: Config, stage_dir: Path, resume: bool = False, tasks: Tasks = in_process) -> dict:
    """Everything a stage-2 trial shares: the teacher's trainable tensors and trajectories, each budget's
    uniform, shifted and searched schedules, and the validation scores of the teacher on those schedules
    ("baselines") and on its own N steps. `tasks` runs the model work (`trajectory_shard`, `teacher_scores`);
    this process only reads and writes the stage folder.

    With `resume`, a `teacher.json` in `stage_dir` whose identity matches is read back with the Parquet
    trajectories instead of computed again ("reused" in the result says which happened).
    """
    from safetensors.torch import load_file

    source = teacher_dir(cfg)
    identity, record = teacher_identity(cfg, source), stage_dir / TEACHER_RECORD
    stored = json.loads(record.read_text()) if resume and record.is_file() else None
    reuse = stored is not None and stored.get("identity") == identity
    if resume and not reuse:
        log.info("stage 2: no matching teacher record in %s; computing the teacher sets and schedules", stage_dir)
    sets = teacher_sets(cfg, source, stage_dir, reuse, tasks)
    if reuse:
        scores = {"searched": {int(k): v for k, v in stored["searched"].items()},
                  "validation_baselines": {kind: {int(k): v for k, v in b.items()}
                                           for kind, b in stored["validation_baselines"].items()},
                  "teacher_validation": stored["teacher_validation"]}
    else:
        scores = tasks(teacher_scores, [(cfg, source, sets)])[0]
        write_json(record, {"identity": identity, "teacher_schedule": sets["validation"].schedule, **scores})
    return {"cfg": cfg.model_dump(mode="json"), "teacher_state": load_file(str(source / "policy.safetensors")),
            "calibration": sets["calibration"], "validation": sets["validation"],
            "schedules": budget_schedules(cfg, scores["searched"]), "searched": scores["searched"],
            "baselines": scores["validation_baselines"], "teacher_validation": scores["teacher_validation"],
            "teacher_dir": str(source), "stage": stage_dir.name, "reused": reuse}
