"""The stages of `fluxir run`, one function each, read top to bottom: train on Ray, evaluate, report.

- `pretrain_stage`: stage 0, flow matching in Ray Train workers (actors/pretrain.py).
- `rl_stage`: stage 1, the RL run (actors/rl.py) and, with `rl.controls`, its equal-wall-clock controls
  (`control_configs`); every policy on the frozen test set; the RL report section.
- `distill_stage`: stage 2, per step budget a student and its controls as Ray Tune trials
  (actors/distill.py); the teacher's curve, the undistilled schedules, students and controls on the
  test set; `choice.json` (what `fluxir export` takes by default); the stage-2 section.
- `sweep_stage`: stage 2's search (ASHA over a sweep YAML) with the same test-set evaluation.
- `run_pipeline`: all of it, then the held-out photo, the report, wandb and the export.

The command line (actors/cli.py) parses arguments and calls these; the math and the report text live in
`fluxir/` (evaluate, report, export), which never imports Ray. Every evaluation runs as a Ray task holding
`eval.resources` (`on_eval_worker`), not in the driver.
"""
from __future__ import annotations

import time
from pathlib import Path

from actors.distill import run_distill, run_sweep
from actors.placement import join_ray, ray_tasks
from actors.pretrain import run_pretrain
from actors.rl import run_rl
from actors.tracking import Tracker
from fluxir import report
from fluxir.config import Config, config_from_dict, dump_config
from fluxir.evaluate import evaluate_folder, evaluate_reusing
from fluxir.export import export_summary, replace_run_export
from fluxir.flow import uniform_schedule
from fluxir.rl import REWARD_OBJECTIVES, init_dir


def on_eval_worker(cfg: Config, evaluation, *args, **kwargs):
    """`evaluation(cfg, *args, **kwargs)` (`fluxir.evaluate.evaluate_folder` or `evaluate_reusing`) as a Ray
    task holding `eval.resources`: a GPU worker on a GPU cluster. Its noise comes from seeded CPU generators,
    so where it runs does not change the numbers."""
    join_ray(cfg, "evaluation", [("eval.resources", cfg.eval.resources, 1)])
    return ray_tasks(cfg.eval.resources)(evaluation, [(cfg, *args)], **kwargs)[0]


# ---------------------------------------------------------------------------------------------
# Stage 0
# ---------------------------------------------------------------------------------------------

def pretrain_stage(cfg: Config) -> dict:
    """Train (or resume) the stage-0 policy: {"model_dir", "seconds", "metrics"}."""
    return run_pretrain(cfg)


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------

def with_rl(cfg: Config, **rl) -> Config:
    tree = cfg.model_dump(mode="json")
    tree["rl"].update(rl)
    return config_from_dict(tree, "stage-1 variant")


def control_configs(cfg: Config, seconds: float) -> dict[str, Config]:
    """The controls of `cfg`'s RL run, by stage name. Each starts from the same policy, reads the same
    input stream and seeds, and trains for the RL run's loop wall-clock `seconds`:
    - rl-fm: plain flow matching, what the same time buys without any rollout;
    - rl-shuffled: the same objective with rewards permuted within each input's candidates (same compute,
      no reward information; for rsr, random selection);
    - rl-k1 (rsr only): the same loss on the ODE trajectory alone;
    - rl-backprop: the reward's gradient through the sampler, the strongest baseline for a
      differentiable reward.
    """
    budget = {"iterations": None, "max_seconds": max(seconds, 1e-3)}
    controls = {"rl-fm": with_rl(cfg, objective="fm", **budget)}
    if cfg.rl.objective in REWARD_OBJECTIVES:
        controls["rl-shuffled"] = with_rl(cfg, shuffle_rewards=True, **budget)
    if cfg.rl.objective == "rsr":
        controls["rl-k1"] = with_rl(cfg, candidates=1, **budget)
    controls["rl-backprop"] = with_rl(cfg, objective="reward_backprop", **budget)
    return controls


def rl_stage(cfg: Config, command: str, base_eval: dict | None = None) -> tuple[str, dict]:
    """Stage 1 and its controls, each evaluated against the base: (report section, evals by stage name);
    evals["rl"] keeps its restored images (for the before/after grids)."""
    runs = {"rl": run_rl(cfg, "rl")}
    if cfg.rl.controls:
        for stage, variant in control_configs(cfg, runs["rl"]["loop_seconds"]).items():
            runs[stage] = run_rl(variant, stage)
    evals = {"base": base_eval or on_eval_worker(cfg, evaluate_folder, init_dir(cfg))[0]}
    for stage, run in runs.items():
        evals[stage] = on_eval_worker(cfg, evaluate_folder, Path(run["model_dir"]), keep_images=stage == "rl")[0]
    plot = report.write_gap_plot(cfg.run_dir / "rl_gap.png", {s: r["history"] for s, r in runs.items()})
    slim = {stage: report.without(e, "images") for stage, e in evals.items()}
    report.write_json(cfg.run_dir / "rl_eval.json",
                      {"evals": slim, "runs": {s: report.without(r, "history") for s, r in runs.items()}})
    return report.rl_section(slim, runs, command, plot.name), evals


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------

def stage2_evals(cfg: Config, out: dict, known: dict | None) -> dict:
    """Stage 2 on the test set: the teacher's uniform curve (with its own N-step schedule), the teacher on
    the shifted and searched schedules without distillation, each budget's best student and its controls.
    `known`: an evaluation of the teacher policy to reuse (stage 1's)."""
    d, shared = cfg.distill, out["shared"]
    teacher = Path(shared["teacher_dir"])
    schedules = {n: uniform_schedule(n, cfg.flow.t_start) for n in sorted(set(d.curve_nfe) | set(d.budgets))}
    schedules[d.teacher_nfe] = shared["validation"].schedule
    curve = on_eval_worker(cfg, evaluate_reusing, teacher, schedules, known)
    evals = {"teacher": curve}
    for kind in ("shifted", "searched"):
        evals[kind] = on_eval_worker(cfg, evaluate_reusing, teacher, dict(shared["schedules"][kind]), curve)

    def trained(row: dict) -> dict:
        return on_eval_worker(cfg, evaluate_folder, Path(row["model_dir"]),
                              schedules={row["params"]["budget"]: row["schedule"]})[0]

    evals["students"] = {k: trained(row) for k, row in out["best"].items()}
    evals["controls"] = {k: {arm: trained(row) for arm, row in arms.items()} for k, arms in out["controls"].items()}
    return evals


def distill_stage(cfg: Config, command: str, known_teacher_eval: dict | None = None,
                  resume: bool = False) -> tuple[str, dict]:
    """Stage 2 (per budget a student and its controls on Ray Tune), evaluated on the test set; writes the
    Pareto plot, `distill.json` and the export default `<stage>/choice.json`."""
    out = run_distill(cfg, resume=resume)
    report.write_pareto_plot(cfg.run_dir / "distill_pareto.png", out["rows"],
                             "stage 2: students' validation quality vs NFE")
    evals = stage2_evals(cfg, out, known_teacher_eval)
    choice = out["choice"]
    chosen = evals[choice["eval"]]
    chosen = chosen[choice["budget"]] if choice["eval"] == "students" else chosen
    choice["test"] = report.without(report.mean_metrics(chosen, choice["budget"]), "sec_per_image")
    report.write_json(Path(out["stage_dir"]) / "choice.json", choice)
    report.write_json(cfg.run_dir / "distill.json", {
        "evals": evals, "schedules": out["shared"]["schedules"], "searched": out["shared"]["searched"],
        "choice": choice, "students": _without_checkpoints(out["best"]),
        "controls": {k: _without_checkpoints(arms) for k, arms in out["controls"].items()}})
    return report.distill_section(evals, out, cfg, command), evals


def _without_checkpoints(rows: dict) -> dict:
    return {k: report.without(row, "checkpoint") for k, row in rows.items()}


def sweep_stage(cfg: Config, sweep, command: str, resume: bool = False) -> str:
    """Stage 2's search (`sweep`, a `SweepConfig`) on Ray Tune with ASHA, its best students and their
    controls on the test set; writes `sweep.json`, the Pareto plot and the wandb summary. The section."""
    start = time.perf_counter()
    out = run_sweep(cfg, sweep, resume=resume)
    out["seconds"], out["resumed"] = time.perf_counter() - start, resume
    evals = stage2_evals(cfg, out, None)
    plot = report.write_pareto_plot(cfg.run_dir / "sweep_pareto.png", out["rows"])
    section = report.sweep_section(out, evals, sweep, command, plot.name, cfg.distill.teacher_nfe)
    report.write_json(cfg.run_dir / "sweep.json", {"rows": out["rows"], "evals": evals, "seconds": out["seconds"],
                                                   "trials": out["trials"], "errored": out["errored"]})
    trials = [{**r["params"], "step": r["step"], "stopped_early": r["stopped_early"], **r["metrics"]}
              for r in out["rows"]]
    publish(cfg, "sweep", {f"K{k}": e for k, e in evals["students"].items()}, {"pareto": plot}, {"trials": trials})
    return section


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------

def publish(cfg: Config, stage: str, evals: dict[str, dict], images: dict[str, Path],
            tables: dict[str, list[dict]] | None = None) -> None:
    """A stage's final figures to wandb (offline by default): test-set means, plots and grids, tables."""
    with Tracker(cfg, stage, cfg.run_dir / stage) as tracker:
        tracker.publish(report.summary_scalars(evals), images, tables)


def heldout_stage(cfg: Config, policies: dict[str, Path], command: str) -> tuple[str, dict]:
    """The policies on the held-out photo (no split trains or selects on it): (section, evals)."""
    evals = {name: on_eval_worker(cfg, evaluate_folder, folder, split="heldout")[0]
             for name, folder in policies.items()}
    return report.heldout_section(evals, command), evals


def run_pipeline(cfg: Config, command: str) -> Path:
    """Stage 0, its evaluation, stage 1 with controls, stage 2, the held-out photo, the report, wandb and
    `<run>/export`; returns the report's path."""
    start = time.perf_counter()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    print(f"[1/5] stage 0: pretraining the {cfg.model.preset} policy ({cfg.pretrain.steps} steps)")
    trained = pretrain_stage(cfg)
    base_dir = Path(trained["model_dir"])
    print(f"[2/5] evaluating the stage-0 base on the frozen test set at NFE {cfg.eval.nfe}")
    base, testset = on_eval_worker(cfg, evaluate_folder, base_dir)
    controls = " with its equal-time controls" if cfg.rl.controls else ""
    print(f"[3/5] stage 1: RL ({cfg.rl.objective}, {cfg.rl.iterations} iterations){controls}")
    rl_text, evals = rl_stage(cfg, command, base_eval=base)
    final = evals["rl"]
    print(f"[4/5] stage 2: distillation to {cfg.distill.budgets} steps from a {cfg.distill.teacher_nfe}-step teacher")
    distill_text, distilled = distill_stage(cfg, command, known_teacher_eval=final)
    print("[5/5] the held-out photo, the report and the export")
    heldout_text, heldout = heldout_stage(cfg, {"base": base_dir, "rl": run_dir / "rl" / "model"}, command)
    report.write_json(run_dir / "heldout.json", heldout)
    grids = report.write_grids(run_dir, testset, final, cfg.eval.grid_samples)
    students = {f"student_K{k}": e for k, e in distilled["students"].items()}
    publish(cfg, "report", {"base": base, "rl": final, **students},
            {**{f"before_after/{t}": run_dir / p for t, p in grids.items()},
             "rl_gap": run_dir / "rl_gap.png", "distill_pareto": run_dir / "distill_pareto.png"})
    summary = report.run_summary(cfg, trained["seconds"], time.perf_counter() - start, final)
    path = report.write_report(run_dir, [summary, rl_text, distill_text,
                                         report.eval_section("Stage-0 base on the frozen test set", base, command),
                                         heldout_text, report.grids_section(grids)])
    final.pop("images")
    report.write_json(run_dir / "eval.json", final)
    print(path.read_text().split("## Before")[0])
    print(export_summary(replace_run_export(run_dir)))
    return path
