"""Stage 2 math (docs/ARCHITECTURE.md, "Stage 2"): trajectory distillation into few-step students. Pure
torch; Ray Tune runs it (actors/distill.py).

1. Teacher trajectories: the teacher's N-step Euler ODE on calibration inputs, every state kept.
   Between grid times an Euler trajectory is exactly linear in t, so `teacher_at` gives the teacher's
   state at any time (and its derivative in t, which a learned schedule needs).
2. The schedule search: the cost of a K-step schedule is what the K-step sampler itself loses, the
   judged metric of its final images against GT on the calibration crops (LPIPS, or −PSNR). A pattern
   search moves one interior time at a time over a grid of multiples of t_start/G (coarse moves first),
   from the uniform and the shifted schedules; `search_schedule` is generic in the cost.
3. Students: K-step samplers on a schedule (uniform, shifted, searched, or learned: monotone times from
   softmax increments, starting from the searched one) trained through the sampler so each jump lands on
   the teacher's state at its end time, plus an end-to-GT term. Controls per budget (`ARMS`): the same
   settings on the uniform schedule, and a GT-only fine-tune (teacher weight 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fluxir import flow
from fluxir.accel import module_device
from fluxir.codec import image_ids, pack, unpack
from fluxir.config import Config, StudentConfig
from fluxir.data import train_stream
from fluxir.metrics import at_least, compute_metrics
from fluxir.objectives import per_sample_regression
from fluxir.flow import initial_state
from fluxir.sampling import sample_trajectory
from fluxir.seeds import Salt, mix_seed

SCHEDULE_KINDS = ("uniform", "shifted", "searched", "learned")
# A student and its controls: the settings each trial overrides in `distill.student`.
ARMS = {"student": {}, "uniform-student": {"schedule": "uniform"}, "gt-only": {"teacher_weight": 0.0}}


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

    def to(self, device) -> "TeacherSet":
        """The set with its tensors on `device` (itself when they are there already)."""
        return TeacherSet(self.schedule, self.states.to(device), self.lq.to(device), self.gt.to(device),
                          self.task.to(device), self.height, self.width)

    @staticmethod
    def concat(parts: list["TeacherSet"]) -> "TeacherSet":
        """Shards of one set, in row order, as one set."""
        first = parts[0]
        states, lq, gt, task = (torch.cat([getattr(p, k) for p in parts]) for k in ("states", "lq", "gt", "task"))
        return TeacherSet(first.schedule, states, lq, gt, task, first.height, first.width)


def calibration_inputs(cfg: Config, count: int, salt: int) -> dict[str, torch.Tensor]:
    """`count` degraded training crops from the stage-0 stream under a seed of their own (`salt`)."""
    return train_stream(cfg, batch_size=count, seed=mix_seed(cfg.seed, salt)).batch(0)


@torch.no_grad()
def teacher_trajectories(policy, codec, inputs: dict[str, torch.Tensor], cfg: Config, nfe: int,
                         kind: str = "uniform", batch_size: int = 32, first: int = 0) -> TeacherSet:
    """The teacher's `nfe`-step ODE on the `kind` schedule from a seeded start per input (the students
    share the start), computed on the policy's device in batches of `batch_size`; returned on the CPU.

    Row i's start is seeded by its index in the whole set, `first` + i (`first`: where a shard's rows begin),
    so shards cut at multiples of `batch_size` give exactly the rows of the whole set.
    """
    policy.eval()
    device = module_device(policy)
    schedule = flow.make_schedule(kind, nfe, cfg.flow.t_start, cfg.distill.shift)
    z_lq, z_gt = codec.encode(inputs["lq"].to(device)), codec.encode(inputs["gt"].to(device))
    h, w = z_lq.shape[-2:]
    lq, gt, ids, task = pack(z_lq), pack(z_gt), image_ids(h, w, device=device), inputs["task"].to(device)
    starts = torch.cat([initial_state(lq[i:i + 1], cfg.flow, torch.Generator().manual_seed(
        mix_seed(cfg.seed, first + i, Salt.DISTILL_START))) for i in range(len(lq))])
    states = []
    for i in range(0, len(lq), batch_size):
        sl = slice(i, i + batch_size)
        traj = sample_trajectory(policy, lq[sl], task[sl], ids, schedule, cfg.flow, x_start=starts[sl])
        states.append(torch.stack(traj.states, 1))
    return TeacherSet(schedule, torch.cat(states), lq, gt, task.clone(), h, w).to("cpu")


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
    w = w.view(1, -1, 1, 1).to(xs.device)
    return (1 - w) * a + w * b


# ---------------------------------------------------------------------------------------------
# The schedule search
# ---------------------------------------------------------------------------------------------

@dataclass
class ScheduleSearch:
    """The searched schedule, its cost, the starting schedule's name and cost, and how many were tried."""
    schedule: list[float]
    cost: float
    start: str
    start_cost: float
    evaluations: int


def search_grid(t_start: float, size: int) -> list[float]:
    """The G + 1 times t_start·(G − i)/G, i = 0…G (decreasing)."""
    return [t_start * (size - i) / size for i in range(size + 1)]


def _snap(schedule: list[float], grid: list[float]) -> tuple[int, ...]:
    """Interior times of `schedule` as strictly increasing grid indices (nearest, then pushed apart)."""
    n = len(grid) - 1
    idx = [min(range(1, n), key=lambda i: abs(grid[i] - t)) for t in schedule[1:-1]]
    for j in range(len(idx)):
        idx[j] = max(idx[j], (idx[j - 1] + 1) if j else 1)
    for j in reversed(range(len(idx))):
        idx[j] = min(idx[j], (idx[j + 1] - 1) if j + 1 < len(idx) else n - 1)
    return tuple(idx)


def search_schedule(cost: Callable[[list[float]], float], budget: int, t_start: float, grid_size: int,
                    starts: dict[str, list[float]]) -> ScheduleSearch:
    """The K-step schedule of least `cost` found by a pattern search on `search_grid(t_start, grid_size)`.

    Starts from the cheapest of `starts` (snapped to the grid); each round tries moving every interior
    time by ±step grid cells and keeps any move that lowers the cost, until none does; then the step
    halves, down to one cell. Costs are memoised, so a schedule is evaluated once.
    """
    if not 1 <= budget <= grid_size:
        raise ValueError(f"budget {budget} must be in [1, search grid {grid_size}]")
    grid = search_grid(t_start, grid_size)
    memo: dict[tuple[int, ...], float] = {}

    def times(idx: tuple[int, ...]) -> list[float]:
        return [grid[0], *(grid[i] for i in idx), 0.0]

    def value(idx: tuple[int, ...]) -> float:
        if idx not in memo:
            memo[idx] = float(cost(times(idx)))
        return memo[idx]

    snapped = {name: _snap(s, grid) for name, s in starts.items()}
    start = min(snapped, key=lambda name: value(snapped[name]))
    best = snapped[start]
    step = max(1, grid_size // (2 * budget))
    while True:
        improved = True
        while improved:
            improved = False
            for j in range(budget - 1):
                for delta in (-step, step):
                    cand = list(best)
                    cand[j] += delta
                    lo = cand[j - 1] if j else 0
                    hi = cand[j + 1] if j + 1 < len(cand) else grid_size
                    if lo < cand[j] < hi and value(tuple(cand)) < value(best):
                        best, improved = tuple(cand), True
        if step == 1:
            break
        step = max(1, step // 2)
    return ScheduleSearch(times(best), value(best), start, value(snapped[start]), len(memo))


def judged_cost(metric: str, metrics: dict[str, torch.Tensor]) -> float:
    """The search's cost from per-image metrics: mean LPIPS, or −mean PSNR."""
    return float(metrics["lpips"].mean()) if metric == "lpips" else -float(metrics["psnr"].mean())


def sampler_cost(policy, codec, teacher: "TeacherSet", flow_cfg, metric: str, lpips_net=None
                 ) -> Callable[[list[float]], float]:
    """cost(schedule): the judged metric of the K-step ODE sampler's final images against GT on `teacher`'s
    inputs from their stored starts (lower is better)."""
    if metric == "lpips" and lpips_net is None:
        raise ValueError("the schedule search's metric is lpips, but LPIPS is unavailable (distill.metric=psnr "
                         "searches on PSNR)")
    teacher = teacher.to(module_device(policy))
    decode = decoder(codec, teacher)
    gt = decode(teacher.gt)
    last: dict[str, list] = {"times": [], "states": []}  # the previous schedule's states, for a shared prefix

    def cost(schedule: list[float]) -> float:
        shared = next((i for i, (a, b) in enumerate(zip(schedule, last["times"])) if a != b),
                      min(len(schedule), len(last["times"])))
        shared = min(shared, len(schedule) - 1)  # at least the last step is taken
        if shared == 0:
            states = ode_states(policy, teacher, schedule, flow_cfg)
        else:
            rest = ode_states(policy, teacher, schedule[shared - 1:], flow_cfg, start=last["states"][shared - 1])
            states = last["states"][:shared] + rest[1:]
        last.update(times=list(schedule), states=states)
        return judged_cost(metric, image_metrics(decode(states[-1]), gt, lpips_net if metric == "lpips" else None))
    return cost


def budget_schedule(kind: str, budget: int, t_start: float, shift: float = 3.0,
                    searched: dict[int, list[float]] | None = None) -> list[float]:
    """The K-step schedule a student starts from: uniform or shifted times, or the search's (`searched`:
    {budget: times}); `learned` starts from the searched one and is refined in training."""
    if kind in ("uniform", "shifted"):
        return flow.make_schedule(kind, budget, t_start, shift)
    if kind in ("searched", "learned"):
        if not searched or budget not in searched:
            raise ValueError(f"schedule {kind!r} needs the searched schedule for budget {budget}")
        return list(searched[budget])
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
    ids = image_ids(teacher.height, teacher.width, device=teacher.states.device)
    x = teacher.states[index, 0]
    ends = student_rollout(policy, x, teacher.lq[index], teacher.task[index], ids, times)
    targets = teacher_at(teacher, times[1:], index)
    match = torch.stack([per_sample_regression(e, targets[:, k], kind) for k, e in enumerate(ends)]).mean()
    to_gt = per_sample_regression(ends[-1], teacher.gt[index], kind).mean()
    loss = teacher_weight * match + gt_weight * to_gt
    return loss, {"loss": loss.item(), "teacher_term": match.item(), "gt_term": to_gt.item()}


@torch.no_grad()
def ode_states(policy, teacher: TeacherSet, schedule: list[float], flow_cfg, start: torch.Tensor | None = None,
               batch_size: int = 64) -> list[torch.Tensor]:
    """The K-step ODE's tokens at every time of `schedule` on the teacher set's inputs, from `start` (the
    state at schedule[0]; default: the teacher set's stored starts)."""
    ids = image_ids(teacher.height, teacher.width, device=teacher.states.device)
    start = teacher.states[:, 0] if start is None else start
    parts = []
    for i in range(0, len(teacher), batch_size):
        sl = slice(i, i + batch_size)
        parts.append(sample_trajectory(policy, teacher.lq[sl], teacher.task[sl], ids, schedule, flow_cfg,
                                       x_start=start[sl]).states)
    return [torch.cat(column) for column in zip(*parts)]


def restore_tokens(policy, teacher: TeacherSet, schedule: list[float], flow_cfg, batch_size: int = 64) -> torch.Tensor:
    """Final tokens of the K-step ODE on `schedule` from the teacher set's starts."""
    return ode_states(policy, teacher, schedule, flow_cfg, batch_size=batch_size)[-1]


def decoder(codec, teacher: TeacherSet) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens of `teacher`'s latent size -> images in [0, 1]."""
    return lambda tokens: codec.decode(unpack(tokens, teacher.height, teacher.width)).clamp(0, 1)


def image_metrics(images: torch.Tensor, gt: torch.Tensor, lpips_net=None) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM (BasicSR convention) and, with `lpips_net`, LPIPS on >= 64 px upsamplings."""
    metrics = compute_metrics(images, gt)
    if lpips_net is not None:
        with torch.no_grad():
            metrics["lpips"] = lpips_net(at_least(images), at_least(gt)).flatten()
    return metrics


def validate(policy, codec, teacher: TeacherSet, schedule: list[float], flow_cfg, lpips_net=None,
             per_image: bool = False) -> dict:
    """Mean PSNR/SSIM(/LPIPS) against GT of the K-step sampler on `teacher`'s inputs and seconds per image;
    with `per_image` also {"per_image": {metric: [values]}} (for paired intervals)."""
    policy.eval()
    teacher = teacher.to(module_device(policy))
    start = time.perf_counter()
    final = restore_tokens(policy, teacher, schedule, flow_cfg)
    if final.is_cuda:
        torch.cuda.synchronize(final.device)  # the kernels are timed, not their launch
    seconds = (time.perf_counter() - start) / len(teacher)
    decode = decoder(codec, teacher)
    metrics = image_metrics(decode(final), decode(teacher.gt), lpips_net)
    out = {k: float(v.double().mean()) for k, v in metrics.items()}
    if per_image:
        out["per_image"] = {k: v.double().tolist() for k, v in metrics.items()}
    return {**out, "sec_per_image": seconds}


def arm_settings(student: StudentConfig, arm: str, params: dict | None = None) -> StudentConfig:
    """A trial's student settings: `distill.student`, then a sweep's sampled `params` (student keys), then
    the arm's overrides (`ARMS`)."""
    if arm not in ARMS:
        raise ValueError(f"unknown distillation arm {arm!r}; known: {', '.join(ARMS)}")
    picked = {k: v for k, v in (params or {}).items() if k in StudentConfig.model_fields}
    return StudentConfig.model_validate({**student.model_dump(), **picked, **ARMS[arm]})


class MasterWeights:
    """fp32 master copies of a model's low-precision (bf16) trainable weights: the optimizer steps the copies,
    which are written back, rounded, into the model after each step, so updates smaller than the model's
    precision accumulate instead of being lost. fp32 weights are their own master (stepped in place)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_() for p in params]

    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)


def distill(policy, codec, cfg: Config, teacher: TeacherSet, val: TeacherSet, init: list[float],
            hp: StudentConfig, report: Callable[[int, dict, LearnedSchedule, torch.optim.Optimizer], None],
            lpips_net=None, seed: int = 0, start_step: int = 0, schedule_state: dict | None = None,
            optimizer_state: dict | None = None):
    """Train `policy` (in place) as the student on the K-step schedule `init` (learned further when
    `hp.schedule` is "learned"; a bf16 policy is stepped through fp32 `MasterWeights`); every `eval_every` steps (and at step 0 of a fresh start) validate on
    `val` and call `report(step, metrics, schedule, optimizer)`, which may checkpoint. Resume with
    `start_step` and the saved schedule/optimizer states. The sets move to the policy's device; the
    schedule and the batch draws stay on the CPU.
    """
    device = module_device(policy)
    teacher, val = teacher.to(device), val.to(device)
    budget = len(init) - 1
    schedule = LearnedSchedule(init, learn=hp.schedule == "learned")
    if schedule_state:
        schedule.load_state_dict(schedule_state)
    weights = MasterWeights([p for p in policy.parameters() if p.requires_grad])
    params = [{"params": weights.master, "lr": hp.lr}]
    if hp.schedule == "learned":
        params.append({"params": [schedule.logits], "lr": hp.schedule_lr})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    if start_step == 0:
        report(0, validate(policy, codec, val, schedule.as_list(), cfg.flow, lpips_net), schedule, opt)
    for step in range(start_step + 1, hp.steps + 1):
        policy.train()
        gen = torch.Generator().manual_seed(mix_seed(seed, step, Salt.DISTILL_BATCH))
        index = torch.randint(len(teacher), (hp.batch_size,), generator=gen)
        loss, _ = student_loss(policy, schedule, teacher, index, hp.teacher_weight, hp.gt_weight, hp.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {float(loss)} at step {step} (budget {budget}, "
                                     f"schedule {hp.schedule}, lr {hp.lr})")
        opt.zero_grad(set_to_none=True)
        policy.zero_grad(set_to_none=True)
        loss.backward()
        weights.grads_to_master()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        weights.master_to_model()
        if step % hp.eval_every == 0 or step == hp.steps:
            metrics = validate(policy, codec, val, schedule.as_list(), cfg.flow, lpips_net)
            metrics["loss"] = loss.item()
            report(step, metrics, schedule, opt)


def not_worse(candidate: dict, reference: dict, tasks: list[int], metric: str) -> bool:
    """Whether `candidate`'s per-image validation `metric` is not shown worse than `reference`'s: the
    paired, task-stratified 95 % bootstrap interval of candidate − reference reaches the better side of 0."""
    import numpy as np

    from fluxir.stats import HIGHER_IS_BETTER, bootstrap, by_task

    diff = np.asarray(candidate["per_image"][metric]) - np.asarray(reference["per_image"][metric])
    _, lo, hi = bootstrap(by_task(diff, tasks))
    return hi >= 0 if HIGHER_IS_BETTER[metric] else lo <= 0


def choose_export(candidates: list[dict], teacher: dict, metric: str, tasks: list[int]) -> dict:
    """What to export: among the candidates ({"budget", "validation": metrics with per-image values}) whose
    validation `metric` is not shown worse than the teacher's (`not_worse`), the fewest steps, then the
    better mean; when none is, the best mean."""
    sign = -1.0 if metric == "lpips" else 1.0
    good = [c for c in candidates if not_worse(c["validation"], teacher, tasks, metric)]
    return min(good or candidates, key=lambda c: (c["budget"] if good else 0, -sign * c["validation"][metric]))
