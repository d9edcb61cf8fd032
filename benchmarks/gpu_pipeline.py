"""The paper's mechanisms on a mid-size model: fluxir's three stages in one process on one GPU.

    python benchmarks/gpu_pipeline.py [key=value ...] [--pretrain-s 240] [--rl-s 90] [--distill-s 60]
                                      [--out benchmarks/results/gpu_pipeline.json]
    python benchmarks/gpu_pipeline.py --toy --device cpu --out /tmp/toy.json output_dir=/tmp/toy   # checks the code

A mid-size FLUX-architecture policy (`MID`: 39.9 M parameters, 64 px crops, batches of 64, the seven tasks)
on configs/tiny.yaml's recipe, no Ray and no DeepSpeed:
- stage 0: `fluxir.pretrain.FlowMatchingRecipe` (batches, loss) in a plain AdamW loop with the Ray stage's
  warm-up + cosine schedule (`WarmupCosine`) for `--pretrain-s` seconds;
- stage 1: `fluxir.rl_loop.LocalRL` from that base, the paper's objective `rsr` (reward −LPIPS, K = 4 candidates
  on 4-step trajectories, the settings of configs/tiny.yaml) against its flow-matching control `fm`, each for
  `--rl-s` seconds of wall-clock from the same base and seed;
- stage 2: `fluxir.teacher.prepare` (the rsr policy's 10-step trajectories, the searched K = 2 schedule) and
  `fluxir.distill.distill` training a K = 2 student for `--distill-s` seconds;
- every policy on the frozen test set (`fluxir.evaluate.evaluate`), the paired, task-stratified intervals of
  rsr − fm, rsr − base and the student − the teacher's uniform 2-step sampling (`fluxir.stats.compare`).
The transformer and LPIPS compute on the GPU (the transformer in bf16 autocast, fp32 weights); the rest of
fluxir's tensors stay where the library makes them (`OnDevice`). Writes benchmarks/results/gpu_pipeline.json
(after every stage, so a crash keeps what ran) with the card named. Without a GPU it exits 2 at once;
`--toy --device cpu` runs the same code on the tiny model for a couple of seconds a stage (the test suite).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from common import RESULTS, ROOT, command, machine, write_result  # puts the repo on sys.path
from fluxir.config import config_from_dict, load_config

# configs/tiny.yaml's recipe at a size that learns in minutes on one GPU: width 384 (6 heads of 64), 4
# double-stream and 8 single-stream blocks; 64 px crops (1,024 pixel tokens, the frozen test crop), batches
# of 64; a peak lr for this width (not tuned), stage 1's and the students' at tiny.yaml's ratios to it.
MID = ("model.num_layers=4", "model.num_single_layers=8", "model.attention_head_dim=64",
       "model.num_attention_heads=6", "model.axes_dims_rope=[8,28,28]", "model.joint_attention_dim=256",
       "model.pooled_projection_dim=256", "data.crop=64", "data.batch_size=64", "pretrain.lr=0.0003",
       "pretrain.warmup_steps=200", "rl.batch_size=32", "rl.lr=0.000015", "distill.student.batch_size=32",
       "distill.student.lr=0.00001", "distill.student.eval_every=25")
# The same code on the tiny default, a few steps a stage, and a small test set of 32 px crops.
TOY = ("data.batch_size=8", "data.test_crop=32", "data.test_crops_per_image=2", "pretrain.warmup_steps=4",
       "eval.nfe=[1,2]", "rl.batch_size=4", "distill.teacher_nfe=4", "distill.calibration_size=8",
       "distill.validation_size=8", "distill.search_grid=8", "distill.student.batch_size=4",
       "distill.student.eval_every=2")
BOTH = ("name=gpu_pipeline", "wandb.mode=disabled", "distill.budgets=[2]")
SECONDS = {"mid": {"pretrain": 240.0, "rl": 90.0, "distill": 60.0}, "toy": {"pretrain": 2.0, "rl": 1.0, "distill": 1.0}}
OBJECTIVE, CONTROL = "rsr", "fm"
BUDGET = 2  # K: the student's sampling steps
METRICS = ("psnr", "ssim", "lpips")
MAX_STEPS = 10 ** 9  # the loops below stop on time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings over the size's (e.g. seed=1 output_dir=DIR)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the recipe (default tiny.yaml)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only together with --toy")
    p.add_argument("--toy", action="store_true", help="the tiny model, seconds a stage: checks the script, not the mechanisms")
    p.add_argument("--pretrain-s", type=float, help="stage 0's seconds (default 240; toy 2)")
    p.add_argument("--rl-s", type=float, help="stage 1's seconds for each of rsr and fm (default 90; toy 1)")
    p.add_argument("--distill-s", type=float, help="the K = 2 student's training seconds (default 60; toy 1)")
    p.add_argument("--workers", type=int, help="stage 0's batch-making processes (default: min(8, CPUs − 1); toy 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; toy 1, its operators are too "
                                               "small to gain from threads)")
    p.add_argument("--log-s", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--out", default=str(RESULTS / "gpu_pipeline.json"), help="result JSON")
    return p.parse_args(argv)


def refuse(why: str) -> None:
    """Exit 2 with one plain line on stderr."""
    print(f"gpu_pipeline: {why}", file=sys.stderr)
    sys.exit(2)


def require_device(name: str, toy: bool) -> torch.device:
    """The torch device, or exit 2 with a plain message when no GPU is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        refuse("no CUDA GPU is visible to torch (torch.cuda.is_available() is False). This benchmark trains a "
               "40 M-parameter FLUX-architecture model through stages 0-2 and needs one GPU; run it on a GPU "
               "machine (`--toy --device cpu` only checks the script).")
    if name == "cpu" and not toy:
        refuse("--device cpu is only for --toy (the mid-size stages would take hours on a CPU)")
    return torch.device(name)


def require_lpips() -> None:
    """Exit 2 with the reason when LPIPS (stage 1's reward, stage 2's judged metric) cannot be loaded."""
    from fluxir.metrics import lpips_available

    ok, reason = lpips_available()
    if not ok:
        refuse(reason)


def stage_config(args):
    """configs/tiny.yaml with the size's settings (`MID` or `TOY`), then the command line's."""
    return load_config(args.config, [*(TOY if args.toy else MID), *BOTH, *args.overrides])


def with_teacher(cfg, folder: str):
    """`cfg` with `distill.teacher` set to the policy folder `folder`."""
    tree = cfg.model_dump(mode="json")
    tree["distill"]["teacher"] = folder
    return config_from_dict(tree, "gpu_pipeline stage 2")


# --------------------------------------------------------------------------------- placement

class OnDevice(torch.nn.Module):
    """`module` computing on `device` for callers whose tensors are elsewhere: tensor arguments go to `device`,
    tensor results (a tensor or a named tuple of them) come back in float32 to the first argument's device.
    fluxir's one-process stage-1 loop makes its tensors on the CPU; with `bf16` (the policy) the module runs
    under bf16 autocast on a GPU, its weights staying fp32."""

    def __init__(self, module: torch.nn.Module, device: torch.device, bf16: bool = False):
        super().__init__()
        self.module, self.device = module.to(device), device
        self.autocast = bf16 and device.type == "cuda"

    def forward(self, *args):
        home = args[0].device
        moved = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return returned(self.module(*moved), home)


def returned(out, home: torch.device):
    """A tensor, or a named tuple of tensors, in float32 on `home`."""
    if isinstance(out, torch.Tensor):
        return out.float().to(home)
    return type(out)(*(returned(o, home) for o in out))


def set_up(device: torch.device, threads: int | None) -> None:
    """CPU threads, TF32 for the fp32 matmuls left outside autocast, and fluxir's attention choice for training."""
    from fluxir.accel import training_attention

    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        training_attention()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Ticker:
    """Progress lines at most every `every` seconds (or when forced), with the seconds since the run began."""

    def __init__(self, every: float):
        self.every, self.started, self.last = every, time.perf_counter(), -math.inf

    def say(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            print(f"[{now - self.started:6.0f} s] {text}", flush=True)
            self.last = now


# --------------------------------------------------------------------------------- stage 0

class WarmupCosine:
    """Stage 0's learning-rate factor as the Ray stage's DeepSpeed WarmupCosineLR has it (linear from 0 over
    `warmup` steps, then a cosine to `floor`), for a run of `seconds`: the number of steps is set at the end
    of the warm-up from the speed of its second half."""

    def __init__(self, warmup: int, floor: float, seconds: float):
        self.warmup, self.floor, self.seconds = max(2, warmup), floor, seconds
        self.total: int | None = None
        self.half_s = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup + 1) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * (1 + math.cos(math.pi * progress)) / 2

    def done(self, step: int, elapsed: float) -> bool:
        """Whether `step` steps, `elapsed` seconds in, end the run; fixes the step count at the warm-up's end."""
        half = self.warmup // 2
        if step == half:
            self.half_s = elapsed
        if step == self.warmup:
            per_step = (elapsed - self.half_s) / (self.warmup - half)
            self.total = self.warmup + max(0, int((self.seconds - elapsed) / per_step))
        return self.total is not None and step >= self.total


def stage0_optimizer(cfg, params, device: torch.device):
    """AdamW with the stage-0 DeepSpeed JSON's betas and eps at `pretrain.lr` and `pretrain.weight_decay` (what
    actors/pretrain.py hands the engine), and the JSON's gradient clipping."""
    from fluxir.config import read_deepspeed

    ds = read_deepspeed(cfg.pretrain.deepspeed, "pretrain.deepspeed")
    p = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain.lr, betas=tuple(p["betas"]), eps=p["eps"],
                            weight_decay=cfg.pretrain.weight_decay, fused=device.type == "cuda")
    return opt, float(ds.get("gradient_clipping", 0.0))


class StepBatches(torch.utils.data.Dataset):
    """The recipe's batch of each step (the step is the data cursor), for a DataLoader's worker processes."""

    def __init__(self, recipe):
        self.recipe = recipe

    def __len__(self) -> int:
        return MAX_STEPS

    def __getitem__(self, step: int) -> dict:
        return self.recipe.batch(step, 0, 1)


def step_batches(recipe, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The recipe's batches in step order, made ahead by `workers` processes (none: in this one)."""
    ahead = {"prefetch_factor": 4} if workers else {}
    return torch.utils.data.DataLoader(StepBatches(recipe), batch_size=None, num_workers=workers,
                                       pin_memory=device.type == "cuda", **ahead)


def parameter_counts(policy) -> dict:
    params = list(policy.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def pretrain(cfg, device: torch.device, seconds: float, workers: int, ticker: Ticker):
    """Stage 0 from scratch for `seconds`; returns (the policy on `device`, its record). The policy goes to
    <run>/pretrain/model, where the Ray stage writes it."""
    from fluxir.accel import to_device
    from fluxir.pretrain import FlowMatchingRecipe

    recipe = FlowMatchingRecipe(cfg)
    model = OnDevice(recipe.build_model(), device, bf16=True).train()
    recipe.place(device)  # the codec beside the model, as a Ray Train worker places it
    params = recipe.trainable_parameters(model.module)
    opt, clip = stage0_optimizer(cfg, params, device)
    schedule = WarmupCosine(cfg.pretrain.warmup_steps, cfg.pretrain.min_lr_ratio, seconds)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ticker.say(f"stage 0: {parameter_counts(model)['total'] / 1e6:.1f} M parameters, {seconds:g} s", force=True)
    started, losses = time.perf_counter(), []
    for step, batch in enumerate(step_batches(recipe, workers, device), start=1):
        loss, logs = recipe.loss(model, to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage 0: non-finite loss at step {step} ({logs})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - started
        ticker.say(f"stage 0: step {step}/{schedule.total or '?'}  loss {losses[-1]:.3f}  x0 PSNR "
                   f"{logs['x0_psnr']:.2f} dB  {step / elapsed:.2f} steps/s")
        if schedule.done(step, elapsed):
            break
        lr.step()
    sync(device)
    run_s = time.perf_counter() - started
    recipe.save_model(model.module, str(cfg.run_dir / "pretrain" / "model"))
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"steps": len(losses), "seconds": run_s, "steps_per_s": len(losses) / run_s,
                   "warmup_steps": schedule.warmup, "samples": len(losses) * cfg.data.batch_size,
                   "loss_first": losses[0], "loss_last_tenth": sum(tail) / len(tail), "workers": workers,
                   "parameters": parameter_counts(model)}


# --------------------------------------------------------------------------------- stage 1

def rl_arm(cfg, arm: str, device: torch.device, seconds: float, ticker: Ticker):
    """`arm` (one of benchmarks/rl_compare.py's) from the stage-0 policy for `seconds` of iterations; returns
    (the policy on `device`, its record). The policy goes to <run>/rl-<arm>/model."""
    from rl_compare import arm_config

    from fluxir.policy import save_policy
    from fluxir.rl_loop import LocalRL

    arm_cfg = arm_config(cfg, arm, cfg.seed, iterations=1)  # the loop below stops on time
    loop = LocalRL(arm_cfg)
    loop.policy = OnDevice(loop.policy, device, bf16=True)
    if loop.lpips is not None:
        loop.lpips = OnDevice(loop.lpips, device)
    ticker.say(f"stage 1: {arm} for {seconds:g} s", force=True)
    history, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        history.append(loop.iteration(len(history)))
        ticker.say(f"stage 1 {arm}: iteration {len(history)}  loss {history[-1]['loss']:.3f}  "
                   f"{history[-1]['iteration_s']:.2f} s/iteration")
    sync(device)
    folder = save_policy(loop.policy.module, arm_cfg.run_dir / f"rl-{arm}" / "model", arm_cfg,
                         extra={"stage": "rl", "objective": arm})
    return loop.policy, {"iterations": len(history), "seconds": time.perf_counter() - started,
                         "seconds_per_iteration": sum(h["iteration_s"] for h in history) / len(history),
                         "last": {k: v for k, v in history[-1].items() if isinstance(v, (int, float))},
                         "model_dir": str(folder)}


# --------------------------------------------------------------------------------- stage 2

class TimeUp(Exception):
    """Raised from a stage-2 report to end the student's training when its seconds are spent."""


def means(scores: dict) -> dict:
    """Validation scores without their per-image values."""
    return {k: v for k, v in scores.items() if k != "per_image"}


def distill_student(cfg, device: torch.device, seconds: float, lpips_net, ticker: Ticker):
    """A K = `BUDGET` student of `distill.teacher` with `distill.student`'s settings, trained for `seconds` after
    `fluxir.teacher.prepare`, as a stage-2 trial trains it; returns (the student on `device`, the stage's shared
    pieces, its record). The student goes to <run>/distill/K<k>."""
    from fluxir import distill as D
    from fluxir.policy import load_trained, save_policy
    from fluxir.teacher import prepare

    ticker.say(f"stage 2: teacher trajectories and the schedule search, then a K = {BUDGET} student for {seconds:g} s",
               force=True)
    started = time.perf_counter()
    stage_dir = cfg.run_dir / "distill"
    shared = prepare(cfg, stage_dir)
    prepare_s = time.perf_counter() - started
    settings = D.arm_settings(cfg.distill.student, "student", {"steps": MAX_STEPS})  # stopped on time
    init = shared["schedules"]["searched" if settings.schedule == "learned" else settings.schedule][BUDGET]
    policy, codec = load_trained(shared["teacher_dir"], cfg)
    student = OnDevice(policy, device, bf16=True)
    reports, deadline = [], time.perf_counter() + seconds

    def report(step, metrics, schedule, _opt):
        reports.append({"step": step, "schedule": schedule.as_list(),
                        **{k: v for k, v in metrics.items() if isinstance(v, float)}})
        ticker.say(f"stage 2: student step {step}  validation LPIPS {metrics.get('lpips', math.nan):.4f}  "
                   f"PSNR {metrics['psnr']:.2f} dB", force=step == 0)
        if step and time.perf_counter() >= deadline:
            raise TimeUp

    trained = time.perf_counter()
    try:
        D.distill(student, codec, cfg, shared["calibration"], shared["validation"], init, settings, report,
                  lpips_net=lpips_net, seed=cfg.seed)
    except TimeUp:
        pass
    sync(device)
    last = reports[-1]
    folder = save_policy(policy, stage_dir / f"K{BUDGET}", cfg,
                         extra={"stage": "distill", "budget": BUDGET, "arm": "student",
                                "schedule_kind": settings.schedule, "schedule": last["schedule"], "step": last["step"]})
    return student, shared, {
        "budget": BUDGET, "prepare_s": prepare_s, "seconds": time.perf_counter() - trained, "steps": last["step"],
        "settings": settings.model_dump(exclude={"steps"}), "schedule": last["schedule"], "model_dir": str(folder),
        "schedules": {kind: s[BUDGET] for kind, s in shared["schedules"].items()},
        "teacher_schedule": shared["validation"].schedule, "search": shared["searched"][BUDGET],
        "validation": {"student": reports,
                       "teacher": {kind: means(b[BUDGET]) for kind, b in shared["baselines"].items()},
                       "teacher_own_steps": means(shared["teacher_validation"])}}


# --------------------------------------------------------------------------------- the test set

def test_scores(policy, codec, testset: dict, cfg, lpips_net, schedules: dict | None = None) -> dict:
    """The policy on the frozen test set (per-image values kept) at `eval.nfe`, or at `schedules` ({nfe: times})."""
    from fluxir.evaluate import evaluate

    result = evaluate(policy, codec, testset, cfg, lpips_net=lpips_net, schedules=schedules)
    result.pop("images")
    return result


def table(evals: dict) -> dict:
    """{row: {"metric@nfe": mean over tasks}}: the LQ input, then every evaluated policy."""
    from fluxir.evaluate import mean_over_tasks

    first = next(iter(evals.values()))
    rows = {"LQ input": {m: mean_over_tasks(first, m, None) for m in METRICS}}
    for name, e in evals.items():
        rows[name] = {f"{m}@{n}": mean_over_tasks(e, m, n) for n in e["nfe"] for m in METRICS}
    return rows


def comparisons(cfg, teacher_nfe: int) -> list[tuple[str, int, str, int]]:
    """(policy A, its NFE, policy B, its NFE) of every A − B the result reports: stage 1's objective against
    its control and both against the base at each `eval.nfe`; the student against its teacher's uniform and
    searched K-step sampling and its own N steps."""
    rl = [(a, n, b, n) for a, b in ((OBJECTIVE, CONTROL), (OBJECTIVE, "base"), (CONTROL, "base")) for n in cfg.eval.nfe]
    teachers = [(f"teacher uniform K={BUDGET}", BUDGET), (f"teacher searched K={BUDGET}", BUDGET),
                (f"teacher N={teacher_nfe}", teacher_nfe)]
    return rl + [(f"student K={BUDGET}", BUDGET, t, n) for t, n in teachers]


def versus(evals: dict, pairs: list[tuple[str, int, str, int]]) -> dict:
    """{"A@n - B@m": {metric: A − B}}: paired, task-stratified bootstrap intervals (`fluxir.stats.compare`)."""
    from fluxir.stats import compare

    return {f"{a}@{na} - {b}@{nb}": {m: compare(evals[a], evals[b], na, m, nb) for m in METRICS}
            for a, na, b, nb in pairs}


def markdown(report: dict) -> str:
    """The test set's means over tasks, and each comparison's interval, as tables."""
    from fluxir.stats import interval_cell

    lines = [f"{report['device']}: {report['model']['total'] / 1e6:.1f} M parameters, "
             f"{report['config']['data']['crop']} px crops", "",
             "| policy | NFE | PSNR | SSIM | LPIPS |", "|---|---:|---:|---:|---:|"]
    for name, row in report["test"]["table"].items():
        for n in sorted({k.split("@")[1] for k in row if "@" in k}, key=int) or ["–"]:
            at = "" if n == "–" else f"@{n}"
            lines.append(f"| {name} | {n} | {row['psnr' + at]:.2f} | {row['ssim' + at]:.4f} | {row['lpips' + at]:.4f} |")
    lines += ["", "| A − B | PSNR | SSIM | LPIPS |", "|---|---:|---:|---:|"]
    for label, cells in report["test"]["versus"].items():
        lines.append(f"| {label} | " + " | ".join(interval_cell(cells[m]) for m in METRICS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- the run

def budgets(args) -> dict[str, float]:
    size = SECONDS["toy" if args.toy else "mid"]
    return {stage: getattr(args, f"{stage}_s") if getattr(args, f"{stage}_s") is not None else s
            for stage, s in size.items()}


def workers_for(args) -> int:
    if args.workers is not None:
        return args.workers
    return 0 if args.toy else max(0, min(8, (os.cpu_count() or 1) - 1))


def run(args, cfg, device: torch.device, report: dict, save) -> None:
    """The three stages and every policy on the test set, into `report`; `save()` after each stage."""
    from fluxir.codec import build_codec
    from fluxir.data import evaluation_set
    from fluxir.metrics import load_lpips

    seconds = budgets(args)
    set_up(device, args.threads or (1 if args.toy else None))
    ticker = Ticker(args.log_s)
    lpips_net, codec = OnDevice(load_lpips(), device), build_codec(cfg)
    testset = evaluation_set(cfg, "test")
    evals = report["test"]["evals"]
    base, report["pretrain"] = pretrain(cfg, device, seconds["pretrain"], workers_for(args), ticker)
    report["model"] = {**report["pretrain"]["parameters"], "crop": cfg.data.crop, "batch_size": cfg.data.batch_size}
    evals["base"] = test_scores(base, codec, testset, cfg, lpips_net)
    save()
    policies = {}
    for arm in (OBJECTIVE, CONTROL):
        policies[arm], report["rl"][arm] = rl_arm(cfg, arm, device, seconds["rl"], ticker)
        evals[arm] = test_scores(policies[arm], codec, testset, cfg, lpips_net)
        save()
    student, shared, report["distill"] = distill_student(with_teacher(cfg, report["rl"][OBJECTIVE]["model_dir"]),
                                                         device, seconds["distill"], lpips_net, ticker)
    teacher, n = policies[OBJECTIVE], len(shared["validation"].schedule) - 1
    for kind in ("uniform", "searched"):
        evals[f"teacher {kind} K={BUDGET}"] = test_scores(teacher, codec, testset, cfg, lpips_net,
                                                          {BUDGET: shared["schedules"][kind][BUDGET]})
    evals[f"teacher N={n}"] = test_scores(teacher, codec, testset, cfg, lpips_net, {n: shared["validation"].schedule})
    evals[f"student K={BUDGET}"] = test_scores(student, codec, testset, cfg, lpips_net,
                                               {BUDGET: report["distill"]["schedule"]})
    report["test"]["versus"] = versus(evals, comparisons(cfg, n))
    ticker.say("done", force=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_device(args.device, args.toy)
    require_lpips()
    started, cfg = time.perf_counter(), stage_config(args)
    report = {"command": command(__file__), "date": time.strftime("%Y-%m-%d"), "device": card(device),
              "machine": machine(), "cuda": torch.version.cuda, "size": "toy" if args.toy else "mid",
              "seconds_budget": budgets(args), "config": cfg.model_dump(mode="json"),
              "rl": {}, "test": {"evals": {}, "table": {}, "versus": {}}}

    def save() -> None:
        report["test"]["table"] = table(report["test"]["evals"]) if report["test"]["evals"] else {}
        report["seconds"] = time.perf_counter() - started
        write_result(args.out, report, quiet=True)

    run(args, cfg, device, report, save)
    save()
    print(markdown(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
