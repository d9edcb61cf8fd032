"""Stage 2 and the evaluation on GPU workers, checked on CPU: a flux-dev-shaped config (the smoke model, GPU
resources declared as configs/flux-dev-7task.yaml declares them) puts the Tune trials, the teacher-trajectory
tasks and the evaluation on Ray workers that hold a GPU. The session's Ray declares 2 logical GPUs
(tests/conftest.py): Ray schedules those workers as on a GPU node, and torch, finding no CUDA device there,
computes on the CPU, so the numbers can be compared with the same work done in this process."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fluxir.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ON_A_GPU = "{CPU: 1, GPU: 1}"
# The settings configs/flux-dev-7task.yaml gives a GPU, on the smoke model with stage 2 cut to one short trial.
GPU_SETTINGS = [f"distill.trial_resources={ON_A_GPU}", f"distill.teacher_resources={ON_A_GPU}",
                f"eval.resources={ON_A_GPU}", "distill.teacher_shards=2"]
SMALL_STAGE2 = ["distill.teacher_batch=4", "distill.calibration_size=8", "distill.validation_size=6",
                "distill.budgets=[1]", "distill.controls=false", "distill.student.steps=2",
                "distill.student.eval_every=2", "eval.nfe=[1]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A smoke-sized teacher folder whose output layer is not zero (a fresh one returns its input)."""
    from fluxir.codec import build_codec, token_channels
    from fluxir.policy import build_policy, save_policy

    cfg = load_config(ROOT / "configs/smoke.yaml")
    policy = build_policy(cfg, token_channels(build_codec(cfg)))
    with torch.no_grad():
        policy.transformer.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return save_policy(policy, tmp_path_factory.mktemp("teacher") / "model", cfg)


def _config(out: Path, teacher: Path, *overrides: str):
    return load_config(ROOT / "configs/smoke.yaml", [f"output_dir={out}", f"distill.teacher={teacher}",
                                                     *SMALL_STAGE2, *overrides])


def _task_records(names: set[str], timeout: float = 30.0) -> dict:
    """{name: the State API's record} of the Ray tasks named `names` (records arrive a moment after the work)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while True:
        found = {t.name: t for t in list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
                 if t.name in names}
        if set(found) == names or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _gpus(resources: dict[str, float]) -> float:
    """GPUs a request holds: {"GPU": n} for a task; an actor in a placement group holds its bundle's
    {"GPU_group_<bundle>_<group id>": n, ...}."""
    return max((v for k, v in resources.items() if k == "GPU" or k.startswith("GPU_group_")), default=0.0)


def _without_timing(value):
    """`value` with every `sec_per_image` and `seconds` left out (wall-clock, not results)."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("sec_per_image", "seconds")}
    return value


def test_stage2_and_the_evaluation_ask_for_gpus_and_give_the_numbers_of_this_process(ray_session, teacher, tmp_path):
    from ray.util.state import get_actor

    from actors.distill import run_distill
    from actors.pipeline import on_eval_worker
    from fluxir.evaluate import evaluate_folder
    from fluxir.teacher import prepare

    cfg = _config(tmp_path / "gpu", teacher, *GPU_SETTINGS)
    out = run_distill(cfg)
    evaluated, _ = on_eval_worker(cfg, evaluate_folder, teacher)

    tasks = {"trajectory_shard-0", "trajectory_shard-1", "teacher_scores-0", "export_choice-0", "evaluate_folder-0"}
    records = _task_records(tasks | {"distill_trial.train"})
    assert set(records) == tasks | {"distill_trial.train"}
    asked = {name: records[name].required_resources for name in tasks}
    asked["the Tune trial"] = get_actor(records["distill_trial.train"].actor_id).required_resources
    assert all(_gpus(resources) == 1 for resources in asked.values()), asked
    assert [row["step"] for row in out["rows"]] == [2]  # the trial trained and reported from its GPU worker

    # The same work in this process, unsharded and on the workers' one thread: the same trajectories,
    # schedules, baselines and test scores.
    here = _config(tmp_path / "here", teacher)
    (stage := here.run_dir / "distill").mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = prepare(here, stage)
        local_eval = evaluate_folder(here, teacher, show_progress=False)[0]
    finally:
        torch.set_num_threads(threads)
    for name in ("calibration", "validation"):
        for key in ("states", "lq", "gt", "task"):
            assert torch.equal(getattr(out["shared"][name], key), getattr(local[name], key)), (name, key)
    assert out["shared"]["searched"] == local["searched"]
    assert _without_timing(out["shared"]["baselines"]) == _without_timing(local["baselines"])
    assert _without_timing(evaluated["tasks"]) == _without_timing(local_eval["tasks"])


def test_shards_are_whole_sampling_batches():
    from fluxir.teacher import shard_bounds

    assert shard_bounds(8, 4, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(10, 4, 2) == [(0, 4), (4, 10)]  # three batches: the last shard takes two, one short
    assert shard_bounds(8, 4, 5) == [(0, 4), (4, 8)]  # no shard without a batch
    assert shard_bounds(512, 32, 8) == [(i * 64, i * 64 + 64) for i in range(8)]
    assert shard_bounds(7, 32, 3) == [(0, 7)]


def test_a_bf16_student_trains_on_float32_teacher_sets():
    """The dtypes of a trial on a GPU (`model.dtype: bfloat16`), on the CPU: the teacher's states stay
    float32, the student computes in bf16, trains and validates."""
    from fluxir import distill as D
    from fluxir.accel import place
    from fluxir.codec import build_codec, token_channels
    from fluxir.config import StudentConfig
    from fluxir.policy import build_policy
    from fluxir.seeds import Salt

    bf16 = ROOT / "configs/deepspeed/zero2_bf16.json"  # what a bf16 model needs of stages 0 and 1
    cfg = load_config(ROOT / "configs/smoke.yaml", ["model.dtype=bfloat16", f"pretrain.deepspeed={bf16}",
                                                    f"rl.deepspeed={bf16}"])
    codec = build_codec(cfg)
    policy = build_policy(cfg, token_channels(codec))
    with torch.no_grad():
        policy.transformer.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    place(codec, cfg.model.dtype, place(policy, cfg.model.dtype))
    teacher = D.teacher_trajectories(policy, codec, D.calibration_inputs(cfg, 8, Salt.DISTILL_CALIBRATION), cfg, 4)
    assert teacher.states.dtype == torch.float32 and teacher.states.device.type == "cpu"
    reports = []
    D.distill(policy, codec, cfg, teacher, teacher, [1.0, 0.5, 0.0], StudentConfig(steps=2, batch_size=4, eval_every=1),
              lambda step, metrics, schedule, opt: reports.append(metrics))
    assert policy.compute_dtype == torch.bfloat16 and len(reports) == 3
    assert all(torch.isfinite(torch.tensor(m["psnr"])) for m in reports) and "loss" in reports[-1]
