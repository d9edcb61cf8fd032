"""Stage 2 math (docs/ARCHITECTURE.md, "Stage 2"): cost-aware trajectory distillation. Pure torch; Ray
Tune runs it (actors/distill.py).

1. Teacher trajectories: the teacher's N-step Euler ODE on calibration inputs, every state kept.
   Between grid times an Euler trajectory is exactly linear in t, so `teacher_at` gives the teacher's
   state at any time (and its derivative in t, which a learned schedule needs).
2. Cost of merging the teacher segment a → b into one jump taken with the teacher's velocity at a:
   C(a, b) = mean_i ‖x_b − (x_a + (t_b − t_a)·v_a)‖_rms / (t_a − t_b); single steps cost 0.
3. Budget K: the exactly-K-edge path 0 → N of least summed cost (dynamic programming, O(K·N²)).
4. Students: K-step samplers on a schedule (uniform, cost-DP, or learned: monotone times from softmax
   increments) trained through the sampler so each jump lands on the teacher's state at its end time,
   plus an end-to-GT term.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fluxir import flow
from fluxir.codec import image_ids, pack, unpack
from fluxir.config import Config
from fluxir.data import mix_seed, train_stream
from fluxir.objectives import per_sample_regression
from fluxir.sampling import initial_state, sample_trajectory

SCHEDULE_KINDS = ("uniform", "cost_dp", "learned")
SALT_CALIBRATION, SALT_VALIDATION, SALT_START, SALT_BATCH = 11, 12, 13, 14


# ---------------------------------------------------------------------------------------------
# Teacher trajectories
# ---------------------------------------------------------------------------------------------

@dataclass
class TeacherSet:
    """Teacher ODE trajectories on (LQ, GT, task) inputs, in tokens of an h×w latent.

    schedule: the N+1 teacher times; states (M, N+1, T, C); lq, gt (M, T, C); task (M,).
    """
    schedule: list[float]
    states: torch.Tensor
    lq: torch.Tensor
    gt: torch.Tensor
    task: torch.Tensor
    height: int
    width: int

    def __len__(self) -> int:
        return self.states.shape[0]

    def subset(self, index: torch.Tensor) -> "TeacherSet":
        return TeacherSet(self.schedule, self.states[index], self.lq[index], self.gt[index], self.task[index],
                          self.height, self.width)


def calibration_inputs(cfg: Config, count: int, salt: int) -> dict[str, torch.Tensor]:
    """`count` degraded training crops from the stage-0 stream under a seed of their own (`salt`)."""
    return train_stream(cfg, batch_size=count, seed=mix_seed(cfg.seed, salt)).batch(0)


@torch.no_grad()
def teacher_trajectories(policy, codec, inputs: dict[str, torch.Tensor], cfg: Config, nfe: int,
                         batch_size: int = 32) -> TeacherSet:
    """The teacher's `nfe`-step uniform ODE from a seeded start per input (the students share the start)."""
    policy.eval()
    schedule = flow.make_schedule("uniform", nfe, cfg.flow.t_start)
    z_lq, z_gt = codec.encode(inputs["lq"]), codec.encode(inputs["gt"])
    h, w = z_lq.shape[-2:]
    lq, gt, ids = pack(z_lq), pack(z_gt), image_ids(h, w)
    starts = torch.cat([initial_state(lq[i:i + 1], cfg.flow, torch.Generator().manual_seed(mix_seed(cfg.seed, i,
                                                                                                     SALT_START)))
                        for i in range(len(lq))])
    states = []
    for i in range(0, len(lq), batch_size):
        sl = slice(i, i + batch_size)
        traj = sample_trajectory(policy, lq[sl], inputs["task"][sl], ids, schedule, cfg.flow, x_start=starts[sl])
        states.append(torch.stack(traj.states, 1))
    return TeacherSet(schedule, torch.cat(states), lq, gt, inputs["task"].clone(), h, w)


def teacher_at(teacher: TeacherSet, times: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The teacher's (piecewise-linear) state at `times` (K,) for rows `index`: (len(index), K, T, C).

    Differentiable in `times`; at a grid time it is the stored state exactly.
    """
    grid = torch.tensor(teacher.schedule, dtype=times.dtype)
    n = len(grid) - 1
    # segment j holds t in [grid[j+1], grid[j]]; grid is decreasing, so search on −grid
    j = torch.searchsorted(-grid, -times.detach(), right=True).sub(1).clamp(0, n - 1)
    w = (grid[j] - times) / (grid[j] - grid[j + 1])
    xs = teacher.states[index]
    a, b = xs[:, j], xs[:, j + 1]
    w = w.view(1, -1, 1, 1)
    return (1 - w) * a + w * b


# ---------------------------------------------------------------------------------------------
# Cost matrix and the exact-K shortest path
# ---------------------------------------------------------------------------------------------

def teacher_velocities(states: torch.Tensor, schedule: list[float]) -> torch.Tensor:
    """v_a (M, N, T, C) of an Euler teacher, recovered exactly from its consecutive states (M, N+1, T, C)."""
    t = torch.tensor(schedule, dtype=states.dtype)
    dt = (t[1:] - t[:-1]).view(1, -1, 1, 1)
    return (states[:, 1:] - states[:, :-1]) / dt


def cost_matrix(teacher: TeacherSet, per_unit_time: bool = True) -> torch.Tensor:
    """C (N+1, N+1): C[a, b] for a < b (the module docstring, 2.), +inf elsewhere. Batched over b and inputs per a.

    `per_unit_time=False` leaves out the division by t_a − t_b (the merged jump's error in state units).
    """
    t = torch.tensor(teacher.schedule, dtype=torch.float64)
    n = len(t) - 1
    x = teacher.states.double()
    v = teacher_velocities(x, teacher.schedule)
    cost = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    for a in range(n):
        dt = (t[a + 1:] - t[a]).view(-1, 1, 1, 1)                     # (n − a, 1, 1, 1)
        jump = x[:, a].unsqueeze(0) + dt * v[:, a].unsqueeze(0)        # (n − a, M, T, C)
        err = (x[:, a + 1:].transpose(0, 1) - jump).pow(2).flatten(2).mean(2).sqrt()  # (n − a, M)
        cost[a, a + 1:] = err.mean(1) / ((t[a] - t[a + 1:]) if per_unit_time else 1.0)
    return cost


def min_cost_path(cost: torch.Tensor, budget: int) -> tuple[list[int], float]:
    """The path 0 → N with exactly `budget` edges of least summed cost: (nodes, cost). O(K·N²)."""
    n = cost.shape[0] - 1
    if not 1 <= budget <= n:
        raise ValueError(f"step budget {budget} must be in [1, {n}] (the teacher's NFE)")
    c = cost.double()
    best = torch.full((budget + 1, n + 1), math.inf, dtype=torch.float64)
    parent = torch.zeros((budget + 1, n + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, budget + 1):
        total = best[k - 1].unsqueeze(1) + c          # total[i, j] = best[k−1, i] + C[i, j]
        best[k], parent[k] = total.min(0)
    nodes = [n]
    for k in range(budget, 0, -1):
        nodes.append(int(parent[k, nodes[-1]]))
    return nodes[::-1], float(best[budget, n])


def brute_force_path(cost: torch.Tensor, budget: int) -> tuple[list[int], float]:
    """Exhaustive search over all exactly-K-edge paths (for testing `min_cost_path`)."""
    n = cost.shape[0] - 1
    best = (None, math.inf)
    for inner in itertools.combinations(range(1, n), budget - 1):
        nodes = [0, *inner, n]
        total = sum(float(cost[a, b]) for a, b in zip(nodes, nodes[1:]))
        if total < best[1]:
            best = (nodes, total)
    return best


def budget_schedule(kind: str, budget: int, teacher_schedule: list[float], cost: torch.Tensor | None) -> list[float]:
    """The K-step schedule a student starts from: uniform times, or the cost-DP path on the teacher grid.

    `learned` starts from the cost-DP path and is refined in training (`LearnedSchedule`).
    """
    if kind == "uniform":
        return flow.uniform_schedule(budget, teacher_schedule[0])
    if kind in ("cost_dp", "learned"):
        if cost is None:
            raise ValueError(f"schedule {kind!r} needs the cost matrix")
        nodes, _ = min_cost_path(cost, budget)
        return [teacher_schedule[i] for i in nodes]
    raise ValueError(f"unknown schedule kind {kind!r}; known: {', '.join(SCHEDULE_KINDS)}")


class LearnedSchedule(nn.Module):
    """Monotone times t_0 = t_start > t_1 > … > t_K = 0 from softmax increments of K logits."""

    def __init__(self, init: list[float], learn: bool = True):
        super().__init__()
        init = flow.check_schedule(init)
        steps = torch.tensor([a - b for a, b in zip(init, init[1:])], dtype=torch.float64)
        self.t_start = init[0]
        self.register_buffer("init_times", torch.tensor(init, dtype=torch.float64))  # exact, and checkpointed
        self.logits = nn.Parameter(torch.log(steps / steps.sum()).float(), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        """(K+1,) times; the last is exactly 0."""
        inc = torch.softmax(self.logits, 0) * self.t_start
        rest = self.t_start - torch.cumsum(inc, 0)[:-1]
        return torch.cat([torch.tensor([self.t_start]), rest, torch.zeros(1)])

    def as_list(self) -> list[float]:
        """The times as floats; a fixed schedule returns its init exactly (no float32 round trip)."""
        if not self.logits.requires_grad:
            return self.init_times.tolist()
        return flow.check_schedule([float(t) for t in self().detach()])


# ---------------------------------------------------------------------------------------------
# The student objective and its training loop
# ---------------------------------------------------------------------------------------------

def student_rollout(policy, x: torch.Tensor, lq: torch.Tensor, task: torch.Tensor, ids: torch.Tensor,
                    times: torch.Tensor) -> list[torch.Tensor]:
    """The K-step sampler with gradients: the state after each jump. Learned times get their gradient
    through the step sizes (and the teacher targets at those times); the network sees them detached."""
    ends = []
    for k in range(len(times) - 1):
        t, s = times[k], times[k + 1]
        pred = policy(x, lq, t.detach().expand(x.shape[0]), task, ids)
        x = pred.x0_hat if k == len(times) - 2 else flow.ode_step(x, pred.velocity, t, s)
        ends.append(x)
    return ends


def student_loss(policy, schedule: LearnedSchedule, teacher: TeacherSet, index: torch.Tensor,
                 teacher_weight: float, gt_weight: float, kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    """teacher_weight · mean_k reg(jump k end, teacher at t_{k+1}) + gt_weight · reg(final, GT)."""
    times = schedule()
    ids = image_ids(teacher.height, teacher.width)
    x = teacher.states[index, 0]
    ends = student_rollout(policy, x, teacher.lq[index], teacher.task[index], ids, times)
    targets = teacher_at(teacher, times[1:], index)
    match = torch.stack([per_sample_regression(e, targets[:, k], kind) for k, e in enumerate(ends)]).mean()
    to_gt = per_sample_regression(ends[-1], teacher.gt[index], kind).mean()
    loss = teacher_weight * match + gt_weight * to_gt
    return loss, {"loss": loss.item(), "teacher_term": match.item(), "gt_term": to_gt.item()}


@torch.no_grad()
def restore_tokens(policy, teacher: TeacherSet, schedule: list[float], flow_cfg, batch_size: int = 64) -> torch.Tensor:
    """Final tokens of the K-step ODE on `schedule` from the teacher set's starts."""
    ids = image_ids(teacher.height, teacher.width)
    outs = []
    for i in range(0, len(teacher), batch_size):
        sl = slice(i, i + batch_size)
        traj = sample_trajectory(policy, teacher.lq[sl], teacher.task[sl], ids, schedule, flow_cfg,
                                 x_start=teacher.states[sl, 0])
        outs.append(traj.final)
    return torch.cat(outs)


def validate(policy, codec, teacher: TeacherSet, schedule: list[float], flow_cfg, lpips_net=None) -> dict[str, float]:
    """PSNR/SSIM(/LPIPS) against GT of the K-step sampler on the validation set, and seconds per image."""
    from fluxir.evaluate import score
    from fluxir.metrics import MetricConvention

    policy.eval()
    start = time.perf_counter()
    final = restore_tokens(policy, teacher, schedule, flow_cfg)
    seconds = (time.perf_counter() - start) / len(teacher)
    decode = lambda tok: codec.decode(unpack(tok, teacher.height, teacher.width)).clamp(0, 1)  # noqa: E731
    return {**score(decode(final), decode(teacher.gt), MetricConvention(), lpips_net), "sec_per_image": seconds}


@dataclass
class DistillHParams:
    budget: int
    schedule: str
    lr: float
    teacher_weight: float
    gt_weight: float
    steps: int
    batch_size: int
    loss: str = "log_mse"
    schedule_lr: float = 0.02
    eval_every: int = 50


def distill(policy, codec, cfg: Config, teacher: TeacherSet, val: TeacherSet, cost: torch.Tensor | None, hp: DistillHParams,
            report: Callable[[int, dict, LearnedSchedule, torch.optim.Optimizer], None], lpips_net=None, seed: int = 0,
            start_step: int = 0, schedule_state: dict | None = None, optimizer_state: dict | None = None):
    """Train `policy` (in place) as the K-step student on `teacher`; every `eval_every` steps (and at
    step 0 of a fresh start) validate on `val` and call `report(step, metrics, schedule, optimizer)`,
    which may checkpoint. Resume with `start_step` and the saved schedule/optimizer states.
    """
    schedule = LearnedSchedule(budget_schedule(hp.schedule, hp.budget, teacher.schedule, cost),
                               learn=hp.schedule == "learned")
    if schedule_state:
        schedule.load_state_dict(schedule_state)
    params = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": hp.lr}]
    if hp.schedule == "learned":
        params.append({"params": [schedule.logits], "lr": hp.schedule_lr})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    if start_step == 0:
        report(0, validate(policy, codec, val, schedule.as_list(), cfg.flow, lpips_net), schedule, opt)
    for step in range(start_step + 1, hp.steps + 1):
        policy.train()
        gen = torch.Generator().manual_seed(mix_seed(seed, step, SALT_BATCH))
        index = torch.randint(len(teacher), (hp.batch_size,), generator=gen)
        loss, _ = student_loss(policy, schedule, teacher, index, hp.teacher_weight, hp.gt_weight, hp.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {float(loss)} at step {step} (budget {hp.budget}, "
                                     f"schedule {hp.schedule}, lr {hp.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        if step % hp.eval_every == 0 or step == hp.steps:
            metrics = validate(policy, codec, val, schedule.as_list(), cfg.flow, lpips_net)
            metrics["loss"] = loss.item()
            report(step, metrics, schedule, opt)
