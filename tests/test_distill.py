"""Stage 2 math: the schedule search on a flow of known curvature, teacher interpolation, learned
schedules, the arms and the export choice, resumable student training, sweep-file validation."""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from fluxir import distill as D
from fluxir import flow
from fluxir.config import ConfigError, load_config, load_sweep
from fluxir.report import pareto_front
from fluxir.seeds import Salt

ROOT = Path(__file__).resolve().parent.parent


# A 1-D rectified flow with a closed-form velocity: x0 from two narrow modes at ±1 (σ 0.05), x1 ~ N(0, 1).
# Its paths bend late (small t), where the posterior picks a mode, so uniform steps waste the budget.
GMM_MEANS, GMM_SIGMA = torch.tensor([-1.0, 1.0], dtype=torch.float64), 0.05


def _gmm_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x1 − x0 | x_t = x]: per mode, Gaussian conditioning; modes weighted by their posterior."""
    var = (1 - t) ** 2 * GMM_SIGMA ** 2 + t ** 2
    d = x[:, None] - (1 - t) * GMM_MEANS[None]
    weight = torch.softmax(-0.5 * d ** 2 / var, 1)
    x0 = GMM_MEANS[None] + (1 - t) * GMM_SIGMA ** 2 / var * d
    x1 = t / var * d
    return (weight * (x1 - x0)).sum(1)


def _euler(x: torch.Tensor, schedule: list[float]) -> torch.Tensor:
    for t, s in zip(schedule, schedule[1:]):
        x = x + (s - t) * _gmm_velocity(x, t)
    return x


@pytest.fixture(scope="module")
def gmm_cost():
    x1 = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _euler(x1, [1 - i / 4000 for i in range(4001)])
    return lambda schedule: float((_euler(x1, schedule) - exact).pow(2).mean())


@pytest.mark.parametrize("budget", [2, 3, 4])
def test_search_finds_the_best_schedule_of_a_curved_flow(gmm_cost, budget):
    """On the two-mode flow the search reaches the exhaustive optimum on its grid, which beats uniform steps
    by at least 4x in endpoint error (measured: 4.2x, 12.8x, 12.5x at K = 2, 3, 4)."""
    grid = D.search_grid(1.0, 20)
    uniform = gmm_cost(D.budget_schedule("uniform", budget, 1.0))
    optimum = min(gmm_cost([1.0, *(grid[i] for i in inner), 0.0])
                  for inner in itertools.combinations(range(1, 20), budget - 1))
    starts = {kind: D.budget_schedule(kind, budget, 1.0, 3.0) for kind in ("uniform", "shifted")}
    found = D.search_schedule(gmm_cost, budget, 1.0, 20, starts)
    assert found.cost == pytest.approx(optimum, rel=1e-9) and gmm_cost(found.schedule) == found.cost
    assert found.cost < uniform / 4
    assert found.evaluations < math.comb(19, budget - 1) or budget == 2  # fewer tries than the exhaustive scan
    assert flow.check_schedule(found.schedule) and len(found.schedule) == budget + 1
    assert min(found.schedule[1:-1]) < 0.5  # the late bend gets the steps


def test_search_respects_order_and_memoises():
    calls = []

    def cost(schedule):
        calls.append(tuple(schedule))
        return sum((t - 0.5) ** 2 for t in schedule[1:-1])  # every interior time wants 0.5: only one can have it

    found = D.search_schedule(cost, 3, 1.0, 10, {"uniform": [1.0, 2 / 3, 1 / 3, 0.0]})
    assert len(calls) == len(set(calls)) == found.evaluations
    assert found.schedule in ([1.0, 0.6, 0.5, 0.0], [1.0, 0.5, 0.4, 0.0])
    assert D.search_schedule(cost, 1, 1.0, 10, {"uniform": [1.0, 0.0]}).schedule == [1.0, 0.0]
    with pytest.raises(ValueError, match="budget 12"):
        D.search_schedule(cost, 12, 1.0, 10, {})


def test_choose_export_takes_the_fewest_steps_not_shown_worse_than_the_teacher():
    gen = torch.Generator().manual_seed(0)
    tasks = [0] * 50 + [1] * 50
    noise = lambda: (0.002 * torch.randn(100, generator=gen, dtype=torch.float64)).tolist()  # noqa: E731

    def metrics(lpips_shift: float, psnr: float) -> dict:
        lp = [0.2 + lpips_shift + e for e in noise()]
        ps = [psnr + 10 * e for e in noise()]
        return {"lpips": sum(lp) / 100, "psnr": sum(ps) / 100, "per_image": {"lpips": lp, "psnr": ps}}

    teacher = metrics(0.0, 24.0)
    cands = [{"name": "clearly worse", "budget": 1, "validation": metrics(0.01, 25.0)},
             {"name": "tied", "budget": 2, "validation": metrics(0.0001, 23.0)},
             {"name": "better", "budget": 2, "validation": metrics(-0.005, 23.5)},
             {"name": "best", "budget": 4, "validation": metrics(-0.01, 24.1)}]
    assert D.choose_export(cands, teacher, "lpips", tasks)["name"] == "better"  # fewest steps, then better mean
    assert D.choose_export(cands, teacher, "psnr", tasks)["name"] == "clearly worse"  # 25 dB: best on PSNR
    assert D.choose_export(cands[:1], teacher, "lpips", tasks)["name"] == "clearly worse"  # none within: the best
    assert D.not_worse(cands[1]["validation"], teacher, tasks, "lpips")
    assert not D.not_worse(cands[0]["validation"], teacher, tasks, "lpips")


def test_arm_settings_override_the_student_and_the_sweep():
    from fluxir.config import StudentConfig

    student = StudentConfig(lr=1e-4, gt_weight=0.5, schedule="learned")
    assert D.arm_settings(student, "student", {"lr": 3e-5, "budget": 2}).lr == 3e-5
    uniform = D.arm_settings(student, "uniform-student", {"lr": 3e-5})
    assert (uniform.schedule, uniform.lr, uniform.teacher_weight) == ("uniform", 3e-5, 1.0)
    gt_only = D.arm_settings(student, "gt-only")
    assert (gt_only.schedule, gt_only.teacher_weight, gt_only.gt_weight) == ("learned", 0.0, 0.5)
    with pytest.raises(ValueError, match="unknown distillation arm"):
        D.arm_settings(student, "ema")
    with pytest.raises(ValueError, match="cannot both be 0"):
        D.arm_settings(StudentConfig(gt_weight=0.0), "gt-only")


def _teacher(m=3, n=5, tokens=4, channels=3, seed=0) -> D.TeacherSet:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(m, n + 1, tokens, channels, generator=gen)
    lq = torch.randn(m, tokens, channels, generator=gen)
    return D.TeacherSet(flow.uniform_schedule(n), states, lq, lq.clone(), torch.zeros(m, dtype=torch.long), 2, 4)


def test_teacher_at_is_exact_on_the_grid_linear_between_and_differentiable():
    teacher = _teacher()
    index = torch.tensor([2, 0])
    grid = torch.tensor(teacher.schedule)
    assert torch.equal(D.teacher_at(teacher, grid, index), teacher.states[index])
    mid = torch.tensor([0.9], requires_grad=True)  # halfway between 1.0 and 0.8
    x = D.teacher_at(teacher, mid, index)
    expected = 0.5 * (teacher.states[index, 0] + teacher.states[index, 1])
    assert torch.allclose(x[:, 0], expected, atol=1e-6)
    x.sum().backward()
    assert mid.grad is not None and torch.isfinite(mid.grad).all() and mid.grad.abs().item() > 0


def test_learned_schedule_starts_at_its_init_and_stays_monotone():
    init = [1.0, 0.35, 0.1, 0.0]
    sched = D.LearnedSchedule(init)
    assert sched.as_list() == pytest.approx(init, abs=1e-6)
    with torch.no_grad():
        sched.logits.copy_(torch.tensor([5.0, -3.0, 0.5]))
    times = sched.as_list()
    assert times[0] == 1.0 and times[-1] == 0.0 and flow.check_schedule(times)
    assert not D.LearnedSchedule(init, learn=False).logits.requires_grad


def test_budget_schedules():
    searched = {3: [1.0, 0.6, 0.2, 0.0]}
    assert D.budget_schedule("uniform", 2, 1.0) == [1.0, 0.5, 0.0]
    assert D.budget_schedule("shifted", 2, 1.0, 3.0) == [1.0, 0.75, 0.0]
    assert D.budget_schedule("searched", 3, 1.0, searched=searched) == searched[3]
    assert D.budget_schedule("learned", 3, 1.0, searched=searched) == searched[3]
    with pytest.raises(ValueError, match="needs the searched schedule"):
        D.budget_schedule("searched", 2, 1.0, searched=searched)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        D.budget_schedule("cosine", 2, 1.0)


@pytest.fixture(scope="module")
def smoke_teacher():
    from fluxir.codec import build_codec
    from fluxir.policy import build_policy
    from fluxir.codec import token_channels

    cfg = load_config(ROOT / "configs/smoke.yaml")
    codec = build_codec(cfg)
    policy = build_policy(cfg, token_channels(codec))
    with torch.no_grad():  # a non-trivial random policy (the fresh x0-residual one returns the LQ exactly)
        policy.transformer.proj_out.weight.normal_(0, 0.05)
    inputs = D.calibration_inputs(cfg, 8, Salt.DISTILL_CALIBRATION)
    return cfg, codec, policy, D.teacher_trajectories(policy, codec, inputs, cfg, 4)


def test_student_sampler_matches_the_ode_sampler(smoke_teacher):
    """The differentiable K-step student rollout equals the plain ODE sampler on the same schedule."""
    cfg, _, policy, teacher = smoke_teacher
    from fluxir.codec import image_ids

    schedule = [1.0, 0.4, 0.0]
    index = torch.arange(len(teacher))
    with torch.no_grad():
        ends = D.student_rollout(policy, teacher.states[:, 0], teacher.lq, teacher.task,
                                 image_ids(teacher.height, teacher.width), torch.tensor(schedule))
    assert torch.allclose(ends[-1], D.restore_tokens(policy, teacher, schedule, cfg.flow), atol=1e-6)
    # the teacher's own N-step schedule reproduces its stored final state
    assert torch.allclose(D.restore_tokens(policy, teacher, teacher.schedule, cfg.flow), teacher.states[index, -1],
                          atol=1e-6)


def test_sampler_cost_reuses_a_shared_prefix_exactly(smoke_teacher):
    """The search's cost restarts from the previous schedule's states where the two schedules agree, and
    gives the same value as sampling from the start."""
    cfg, codec, policy, teacher = smoke_teacher
    schedules = [[1.0, 0.6, 0.3, 0.0], [1.0, 0.6, 0.2, 0.0], [1.0, 0.5, 0.2, 0.0], [1.0, 0.5, 0.2, 0.0], [1.0, 0.0]]
    cached = D.sampler_cost(policy, codec, teacher, cfg.flow, "psnr")
    for schedule in schedules:
        fresh = D.sampler_cost(policy, codec, teacher, cfg.flow, "psnr")(schedule)
        assert cached(schedule) == fresh
        assert fresh == -D.validate(policy, codec, teacher, schedule, cfg.flow)["psnr"]


def _distil(cfg, codec, policy, teacher, steps, kind="learned", **resume):
    """Train a copy of `policy` (or resume `resume['student']`); returns it and every report's states."""
    from fluxir.config import StudentConfig

    student = resume.pop("student", None) or copy.deepcopy(policy)
    hp = StudentConfig(schedule=kind, lr=3e-4, teacher_weight=1.0, gt_weight=0.5, steps=steps, batch_size=8,
                       eval_every=5)
    reports = []
    D.distill(student, codec, cfg, teacher, teacher, [1.0, 0.4, 0.0], hp,
              lambda step, m, sched, opt: reports.append((step, copy.deepcopy(sched.state_dict()),
                                                          copy.deepcopy(opt.state_dict()))),
              seed=3, **resume)
    return student, reports


def _loss(policy, teacher, schedule_state) -> float:
    schedule = D.LearnedSchedule([1.0, 0.5, 0.0])
    schedule.load_state_dict(schedule_state)
    with torch.no_grad():
        return D.student_loss(policy, schedule, teacher, torch.arange(len(teacher)), 1.0, 0.5, "log_mse")[0].item()


def test_distillation_lowers_the_loss(smoke_teacher):
    cfg, codec, policy, teacher = smoke_teacher
    student, reports = _distil(cfg, codec, policy, teacher, steps=20, kind="searched")
    assert [r[0] for r in reports] == [0, 5, 10, 15, 20]
    assert _loss(student, teacher, reports[-1][1]) < _loss(policy, teacher, reports[0][1]) - 0.5


def test_distillation_resumes_exactly(smoke_teacher):
    """Stopped after step 5 and resumed from its states, a learned-schedule student ends where a straight run does."""
    cfg, codec, policy, teacher = smoke_teacher
    straight, reports = _distil(cfg, codec, policy, teacher, steps=10)
    half, half_reports = _distil(cfg, codec, policy, teacher, steps=5)
    resumed, resumed_reports = _distil(cfg, codec, policy, teacher, steps=10, student=half, start_step=5,
                                       schedule_state=half_reports[-1][1], optimizer_state=half_reports[-1][2])
    assert [r[0] for r in resumed_reports] == [10]
    for (name, a), b in zip(straight.trainable_state_dict().items(), resumed.trainable_state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.allclose(reports[-1][1]["logits"], resumed_reports[-1][1]["logits"], atol=1e-6)
    assert not torch.allclose(reports[-1][1]["logits"], reports[0][1]["logits"])  # the schedule did move


def test_sweep_file_is_validated(tmp_path):
    sweep = load_sweep(ROOT / "configs/sweeps/distill.yaml")
    assert sweep.metric == "lpips_gain" and sweep.asha.grace_period == 40 and sweep.space["budget"] == {"grid": [2, 4]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {budget: {grid: [1]}, momentum: 0.9}\n")
    with pytest.raises(ConfigError, match="momentum"):
        load_sweep(bad)
    bad.write_text("metric: lpips\nmode: max\nspace: {budget: 1}\n")
    with pytest.raises(ConfigError, match="lpips is optimised with mode min"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="budgets"):
        load_config(ROOT / "configs/smoke.yaml", ["distill.budgets=[8]"])


def test_search_space_from_yaml():
    from actors.distill import search_space

    space = search_space({"budget": {"grid": [1, 2]}, "lr": {"loguniform": [1e-4, 1e-3]}, "schedule": "learned"})
    assert space["budget"] == {"grid_search": [1, 2]} and space["schedule"] == "learned"
    assert 1e-4 <= space["lr"].sample() <= 1e-3
    with pytest.raises(ValueError, match="space.lr"):
        search_space({"lr": {"normal": [0, 1]}})


def test_pareto_front():
    points = [(1, 20.0), (2, 21.0), (2, 20.5), (4, 21.0), (4, 22.0), (1, 19.0)]
    assert pareto_front(points) == [0, 1, 4]


def test_prepare_reads_its_record_back_on_resume(tmp_path, smoke_teacher):
    """`--resume` reuses the stored teacher sets (Parquet), searched schedules and baselines when the
    teacher weights and settings match, and computes them again when they do not."""
    from fluxir.teacher import prepare
    from fluxir.policy import save_policy

    cfg, _, policy, _ = smoke_teacher
    save_policy(policy, tmp_path / "teacher", cfg)
    overrides = [f"output_dir={tmp_path}", f"distill.teacher={tmp_path / 'teacher'}"]
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides)
    stage = tmp_path / "stage"
    stage.mkdir()
    first = prepare(cfg, stage)
    again = prepare(cfg, stage, resume=True)
    assert not first["reused"] and again["reused"]
    for name in ("calibration", "validation"):
        a, b = first[name], again[name]
        assert a.schedule == b.schedule and (a.height, a.width) == (b.height, b.width)
        for key in ("states", "lq", "gt", "task"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key))
    assert again["schedules"] == first["schedules"] and again["baselines"] == first["baselines"]
    assert sorted(first["searched"]) == [1, 2] and len(first["schedules"]["searched"][2]) == 3
    other = load_config(ROOT / "configs/smoke.yaml", [*overrides, "seed=1"])
    assert not prepare(other, stage, resume=True)["reused"]


def test_trial_results_keep_the_best_students_and_the_controls(tmp_path):
    """Trial rows -> each budget's best student (by the selection metric) under best/K<k>/ with its
    schedule in schedules.json, every control under controls/K<k>/<arm>/, both without the trainer state."""
    from fluxir.students import TRAINER_STATE, best_per_budget, keep_controls, selection_metric, trial_params

    cfg = load_config(ROOT / "configs/smoke.yaml")
    assert selection_metric(cfg) == ("psnr", "max")
    assert selection_metric(load_config(ROOT / "configs/smoke.yaml", ["distill.metric=lpips"])) == ("lpips", "min")
    params = trial_params(cfg, {"spec": {"budget": 2, "arm": "gt-only"}, "lr": 1e-3})
    assert params["budget"] == 2 and params["arm"] == "gt-only" and params["teacher_weight"] == 0.0
    assert params["lr"] == 1e-3 and params["schedule"] == cfg.distill.student.schedule

    def row(budget: int, arm: str, psnr: float, name: str | None) -> dict:
        folder = None
        if name:
            folder = tmp_path / "trials" / name
            folder.mkdir(parents=True)
            (folder / "policy.json").write_text(json.dumps({"schedule": [0.9, psnr / 100, 0.0]}))
            (folder / TRAINER_STATE).write_bytes(b"state")
        return {"params": trial_params(cfg, {"budget": budget, "arm": arm}), "metrics": {"psnr": psnr},
                "checkpoint": str(folder) if folder else None}

    rows = [row(2, "student", 20.0, "a"), row(2, "student", 21.0, "b"), row(1, "student", 18.0, "c"),
            row(2, "student", 30.0, None), row(2, "gt-only", 25.0, "d"), row(1, "uniform-student", 17.0, "e")]
    stage = tmp_path / "stage"
    best = best_per_budget(rows, "psnr", "max", stage)
    assert list(best) == [1, 2] and best[2] is rows[1] and best[1] is rows[2]
    assert best[2]["model_dir"] == str(stage / "best" / "K2") and best[2]["schedule"] == [0.9, 0.21, 0.0]
    assert (stage / "best" / "K2" / "policy.json").is_file() and not (stage / "best" / "K2" / TRAINER_STATE).exists()
    assert json.loads((stage / "schedules.json").read_text()) == {"1": [0.9, 0.18, 0.0], "2": [0.9, 0.21, 0.0]}
    controls = keep_controls(rows, stage)
    assert {k: sorted(v) for k, v in controls.items()} == {1: ["uniform-student"], 2: ["gt-only"]}
    assert controls[2]["gt-only"]["model_dir"] == str(stage / "controls" / "K2" / "gt-only")
    assert not (stage / "controls" / "K1" / "uniform-student" / TRAINER_STATE).exists()


def _fake_eval(nfe: int, lpips: list[float], psnr: list[float]) -> dict:
    per = {"lpips": lpips, "psnr": psnr}
    entry = {"per_image": per, **{m: sum(v) / len(v) for m, v in per.items()}}
    return {"nfe": [nfe], "tasks": {"denoise": {"lq": entry, "nfe": {nfe: entry}}}}


def test_distill_compare_pools_paired_differences_over_seeds():
    """benchmarks/distill_compare.py: per seed the student minus an arm on the same crops; pooled over
    seeds; the per-seed differences kept as the seed spread."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from distill_compare import pooled

    runs = []
    for shift in (0.010, 0.012):  # the student is worse than uniform sampling by `shift` LPIPS in each seed
        base = [0.2 + 0.001 * i for i in range(20)]
        teacher = _fake_eval(2, base, [24.0] * 20)
        teacher["nfe"].append(4)
        teacher["tasks"]["denoise"]["nfe"][4] = teacher["tasks"]["denoise"]["nfe"][2]
        student = _fake_eval(2, [b + shift for b in base], [24.0] * 20)
        runs.append({"teacher": teacher, "shifted": _fake_eval(1, base, base), "searched": teacher,
                     "students": {2: student}, "controls": {}})
    rows = pooled(runs, [2], 4, ["lpips"])
    uniform = next(r for r in rows if r["other"] == "teacher, uniform K")
    assert uniform["lpips"]["per_seed"] == pytest.approx([0.010, 0.012])
    assert uniform["lpips"]["mean"] == pytest.approx(0.011) and uniform["lpips"]["verdict"] == "B better"
    assert "lpips" not in next(r for r in rows if r["other"] == "teacher, shifted K")  # not run at K = 2
    assert "lpips" not in next(r for r in rows if r["other"] == "control: GT-only fine-tune")
    assert next(r for r in rows if r["other"] == "teacher N=4")["lpips"]["per_seed"] == pytest.approx([0.010, 0.012])


def test_master_weights_keep_updates_smaller_than_bf16_resolution():
    """A bf16 student steps through fp32 copies: 100 updates of 1e-4 move a weight of 1.0 to 0.99, where
    stepping the bf16 weight itself rounds every update away (bf16 resolves 2^-7 at 1.0)."""
    from fluxir.distill import MasterWeights

    def train(weight, weights=None):
        opt = torch.optim.SGD(weights.master if weights else [weight], lr=1e-4)
        for _ in range(100):
            opt.zero_grad(set_to_none=True)
            weight.grad = None
            weight.float().sum().backward()
            if weights:
                weights.grads_to_master()
            opt.step()
            if weights:
                weights.master_to_model()

    bf16 = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    weights = MasterWeights([bf16])
    train(bf16, weights)
    torch.testing.assert_close(weights.master[0], torch.full((4,), 0.99), rtol=0, atol=1e-5)
    assert bf16.dtype == torch.bfloat16 and (bf16 == torch.tensor(0.99).bfloat16()).all()
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    train(plain)
    assert (plain == 1).all()  # the update the master copy keeps
    fp32 = torch.nn.Parameter(torch.ones(2))
    assert MasterWeights([fp32]).master[0] is fp32  # fp32 weights are stepped in place, as before
