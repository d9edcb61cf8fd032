"""Stage 2 math: exact-K DP against brute force, the cost matrix against a direct loop, teacher
interpolation, learned schedules, resumable student training, sweep-file validation."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from fluxir import distill as D
from fluxir import flow
from fluxir.config import ConfigError, load_config, load_sweep
from fluxir.report import pareto_front

ROOT = Path(__file__).resolve().parent.parent


def _random_cost(n: int, gen: torch.Generator) -> torch.Tensor:
    c = torch.rand(n + 1, n + 1, generator=gen, dtype=torch.float64)
    return torch.where(torch.ones_like(c).triu(1).bool(), c, torch.full_like(c, math.inf))


@pytest.mark.parametrize("n", [2, 3, 5, 7, 8])
def test_dp_matches_brute_force(n):
    gen = torch.Generator().manual_seed(n)
    for trial in range(5):
        cost = _random_cost(n, gen)
        for k in range(1, n + 1):
            nodes, total = D.min_cost_path(cost, k)
            bf_nodes, bf_total = D.brute_force_path(cost, k)
            assert total == pytest.approx(bf_total, abs=1e-12)
            assert len(nodes) == k + 1 and nodes[0] == 0 and nodes[-1] == n
            assert all(a < b for a, b in zip(nodes, nodes[1:]))
            assert total == pytest.approx(sum(float(cost[a, b]) for a, b in zip(nodes, nodes[1:])))


def test_dp_finds_a_planted_cheap_path():
    cost = _random_cost(6, torch.Generator().manual_seed(0)) + 1.0
    for a, b in [(0, 2), (2, 5), (5, 6)]:
        cost[a, b] = 0.01
    assert D.min_cost_path(cost, 3) == ([0, 2, 5, 6], pytest.approx(0.03))
    with pytest.raises(ValueError, match="step budget 7"):
        D.min_cost_path(cost, 7)


def _teacher(m=3, n=5, tokens=4, channels=3, seed=0) -> D.TeacherSet:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(m, n + 1, tokens, channels, generator=gen)
    lq = torch.randn(m, tokens, channels, generator=gen)
    return D.TeacherSet(flow.uniform_schedule(n), states, lq, lq.clone(), torch.zeros(m, dtype=torch.long), 2, 4)


def test_cost_matrix_matches_a_direct_loop():
    teacher = _teacher()
    t = teacher.schedule
    n = len(t) - 1
    cost = D.cost_matrix(teacher)
    for a in range(n + 1):
        for b in range(n + 1):
            if a >= b:
                assert math.isinf(cost[a, b])
                continue
            per_input = []
            for i in range(len(teacher)):
                x = teacher.states[i].double()
                v_a = (x[a + 1] - x[a]) / (t[a + 1] - t[a])     # the Euler teacher's velocity at a
                jump = x[a] + (t[b] - t[a]) * v_a
                per_input.append(float((x[b] - jump).pow(2).mean().sqrt()) / (t[a] - t[b]))
            assert float(cost[a, b]) == pytest.approx(sum(per_input) / len(per_input), rel=1e-9)
    assert torch.allclose(torch.diagonal(cost, 1), torch.zeros(n, dtype=torch.float64), atol=1e-6)


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
    teacher = _teacher(n=6)
    cost = D.cost_matrix(teacher)
    assert D.budget_schedule("uniform", 2, teacher.schedule, cost) == [1.0, 0.5, 0.0]
    assert D.budget_schedule("cost_dp", 6, teacher.schedule, cost) == teacher.schedule
    nodes, _ = D.min_cost_path(cost, 3)
    assert D.budget_schedule("learned", 3, teacher.schedule, cost) == [teacher.schedule[i] for i in nodes]
    with pytest.raises(ValueError, match="unknown schedule kind"):
        D.budget_schedule("cosine", 2, teacher.schedule, cost)


@pytest.fixture(scope="module")
def smoke_teacher():
    from fluxir.codec import build_codec
    from fluxir.policy import build_policy
    from fluxir.pretrain import token_channels

    cfg = load_config(ROOT / "configs/smoke.yaml")
    codec = build_codec(cfg)
    policy = build_policy(cfg, token_channels(codec))
    with torch.no_grad():  # a non-trivial random policy (the fresh x0-residual one returns the LQ exactly)
        policy.transformer.proj_out.weight.normal_(0, 0.05)
    inputs = D.calibration_inputs(cfg, 8, D.SALT_CALIBRATION)
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


def _distil(cfg, codec, policy, teacher, steps, kind="learned", **resume):
    """Train a copy of `policy` (or resume `resume['student']`); returns it and every report's states."""
    student = resume.pop("student", None) or copy.deepcopy(policy)
    hp = D.DistillHParams(budget=2, schedule=kind, lr=3e-4, teacher_weight=1.0, gt_weight=0.5, steps=steps,
                          batch_size=8, eval_every=5)
    reports = []
    D.distill(student, codec, cfg, teacher, teacher, D.cost_matrix(teacher), hp,
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
    student, reports = _distil(cfg, codec, policy, teacher, steps=20, kind="cost_dp")
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
    assert sweep.metric == "psnr_gain" and sweep.asha.grace_period == 40 and "budget" in sweep.space
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
