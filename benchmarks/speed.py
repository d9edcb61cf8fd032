"""Where the time goes: restore speed, the RL iteration split, the sweep, memory, large-image tiling.

    python benchmarks/speed.py [configs/tiny.yaml] [--run runs/tiny] [--repeats 3] [--only SECTION ...] [key=value ...]

Sections (`--only` runs some of them and keeps the others' entries of the JSON as they were):
- restore: every policy of the run (stage-0 base at the evaluation NFEs, each distilled student at its own
  budget) restores the whole frozen test set `--repeats` times; the median and the min–max spread of
  seconds per image are reported (the ODE sampler with the evaluation's tiling, in this process, `torch`
  threads = the machine's cores). The RL split and the sweep wall-clock are read from the results their
  own commands wrote (benchmarks/rl_throughput.py, `fluxir sweep`).
- tiling: the tilings of `--tilings` (always with the evaluation's and the one `fluxir restore` uses) restore
  whole validation photos (the training photos at the test scale, every task's degradation at a fixed
  seed) with `--policy` at `--tiling-nfe`: PSNR/SSIM/LPIPS and paired bootstrap intervals against the
  evaluation's tiling, the tile count and in-process seconds for a 1024×768 photo; then the evaluation's
  and the restore tiling once on the whole test photos.
- cli: `fluxir restore` of a 1024×768 photo in a fresh process, `--repeats` times each: with `--policy` at
  NFE 2 and with the export (`--model`) at its default budget; wall seconds, peak RSS, the 1-minute load
  before each run (another job on the machine shows there). `--checkout DIR` times DIR's code instead
  (e.g. a clone at an earlier commit), stored as `restore_cli_checkout`.
Writes benchmarks/results/speed.json.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from fluxir.config import load_config  # noqa: E402


def time_restore(policy, codec, testset: dict, cfg, schedule: list[float], repeats: int) -> dict:
    """Seconds per image over the whole test set (all tasks), `repeats` times: median, min, max."""
    from fluxir.evaluate import restore_set

    images = sum(d["lq"].shape[0] for d in testset.values())
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for task, d in testset.items():
                restore_set(policy, codec, d["lq"], task, cfg, schedule, seed=cfg.seed)
        runs.append((time.perf_counter() - start) / images)
    median = statistics.median(runs)
    return {"sec_per_image": median, "images_per_s": 1 / median, "min": min(runs), "max": max(runs),
            "repeats": repeats, "images": images}


def restore_speeds(run_dir: Path, cfg, testset: dict, repeats: int) -> dict[str, dict]:
    from fluxir.codec import build_codec
    from fluxir.evaluate import eval_schedule
    from fluxir.policy import load_policy
    from fluxir.codec import token_channels

    codec = build_codec(cfg)
    out = {}
    base = load_policy(run_dir / "pretrain" / "model", cfg, token_channels(codec))
    for n in cfg.eval.nfe:
        out[f"base NFE {n}"] = {"nfe": n, **time_restore(base, codec, testset, cfg, eval_schedule(cfg, n), repeats)}
    for folder in sorted((run_dir / "distill" / "best").glob("K*")):
        card = json.loads((folder / "policy.json").read_text())
        student = load_policy(folder, cfg, token_channels(codec))
        out[f"student K{card['budget']}"] = {"nfe": card["budget"], **time_restore(
            student, codec, testset, cfg, card["schedule"], repeats)}
    return out


PHOTO_SEEDS = {"val": 4321, "test": 1234}  # degradation seeds of the whole photos (those of the crop sets)
TILINGS = ["32/13", "32/9", "32/5", "32/3", "32/1", "24/5", "16/3", "48/17", "64/17"]


def whole_photos(cfg, split: str) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(name, task, LQ, GT) for every whole photo of `split` ("val": the training photos, "test": the test
    photos) at the test scale, cut to a multiple of 4 px, 8-bit, each task's degradation at a fixed seed."""
    from fluxir.data import bundled_images, quantise, training_images
    from fluxir.seeds import mix_seed
    from fluxir.degradations import degrade, task_id

    scale = cfg.data.test_scale
    images = training_images(cfg, scale=scale) if split == "val" else bundled_images("test", scale=scale)
    photos = []
    for i, (name, image) in enumerate(images):
        h, w = image.shape[-2:]
        gt = quantise(image[None, :, :h // 4 * 4, :w // 4 * 4])
        for task in cfg.data.tasks:
            lq = degrade(task, gt, torch.tensor([mix_seed(PHOTO_SEEDS[split], task_id(task), i)]))
            photos.append((name, task, quantise(lq)[0], gt[0]))
    return photos


def score_tiling(policy, codec, cfg, photos, tiling: dict, nfe: int, lpips_net) -> dict:
    """An `evaluate`-shaped result (per task: means and per-image values at `nfe`) of the whole photos
    restored with `tiling` ({"tile", "overlap"})."""
    from fluxir.data import quantise
    from fluxir.evaluate import eval_schedule, restore_image
    from fluxir.metrics import compute_metrics

    values: dict[str, dict[str, list[float]]] = {}
    for _, task, lq, gt in photos:
        out = restore_image(policy, codec, lq, task, cfg, eval_schedule(cfg, nfe), tiling=tiling)
        for metric, v in compute_metrics(quantise(out)[None], gt[None], lpips=lpips_net).items():
            values.setdefault(task, {}).setdefault(metric, []).append(float(v))
    return {"nfe": [nfe], "tasks": {task: {"nfe": {nfe: {**{m: statistics.fmean(v) for m, v in per.items()},
                                                          "per_image": per}}}
                                    for task, per in values.items()}}


def _tiling(label: str) -> dict:
    tile, overlap = map(int, label.split("/"))
    return {"tile": tile, "overlap": overlap}


def _label(tiling: dict) -> str:
    return f"{tiling['tile']}/{tiling['overlap']}"


def timing_photo(folder: Path) -> Path:
    """A 1024×768 photo (the left motorcycle view, resized) to time restores on."""
    from fluxir.data import bundled_images, resize_to, save_image

    path = folder / "photo_1024x768.png"
    if not path.is_file():
        save_image(resize_to(dict(bundled_images("train"))["motorcycle"], (768, 1024)), path)
    return path


def _metric_means(result: dict, nfe: int, metrics: list[str]) -> dict:
    return {m: statistics.fmean(t["nfe"][nfe][m] for t in result["tasks"].values()) for m in metrics}


def tiling_candidate(policy, codec, cfg, photos, image, tiling: dict, nfes, lpips_net, baseline: dict) -> dict:
    """One tiling: its tiles and in-process seconds on the 1024×768 `image` at NFE 2, its means on the
    whole validation `photos` and paired intervals against `baseline` ({nfe: result}; empty: this is it)."""
    from fluxir.evaluate import eval_schedule, restore_image
    from fluxir.sampling import tile_boxes
    from fluxir.stats import compare

    metrics = ["psnr", "ssim"] + (["lpips"] if lpips_net is not None else [])
    load, start = os.getloadavg()[0], time.perf_counter()
    restore_image(policy, codec, image, "denoise", cfg, eval_schedule(cfg, 2), tiling=tiling)
    entry = {**tiling, "tiles_1024x768": len(tile_boxes(768, 1024, **tiling)[2]),
             "in_process_s_1024x768_nfe2": time.perf_counter() - start, "load_1min": load}
    for n in nfes:
        result = score_tiling(policy, codec, cfg, photos, tiling, n, lpips_net)
        baseline.setdefault(n, result)
        entry[f"val_nfe{n}"] = {**_metric_means(result, n, metrics), "minus_evaluation_tiling": {
            m: {k: v for k, v in compare(result, baseline[n], n, m).items() if k != "tasks"} for m in metrics}}
        print(f"tiling {_label(tiling)} NFE {n}: " + ", ".join(f"{m} {entry[f'val_nfe{n}'][m]:.4f}" for m in metrics)
              + f"; {entry['tiles_1024x768']} tiles, {entry['in_process_s_1024x768_nfe2']:.1f} s (load {load:.1f})",
              flush=True)
    return entry


def tiling_study(cfg, policy_dir: Path, labels: list[str], nfes: list[int], photo: Path) -> dict:
    """Each tiling on the whole validation photos (means, bootstrap intervals against the evaluation's
    tiling) and on the 1024×768 photo (tiles, seconds); the evaluation's and the restore tiling once on
    the whole test photos."""
    from fluxir.data import load_image
    from fluxir.evaluate import eval_tiling, fast_tiling, lpips_or_reason
    from fluxir.policy import load_trained

    policy, codec = load_trained(policy_dir, cfg, place_on_device=True)
    lpips_net, _ = lpips_or_reason(cfg.eval.lpips)
    old, new = eval_tiling(cfg), fast_tiling(cfg, codec)
    photos, image, baseline = whole_photos(cfg, "val"), load_image(photo), {}
    candidates = {label: tiling_candidate(policy, codec, cfg, photos, image, _tiling(label), nfes, lpips_net, baseline)
                  for label in dict.fromkeys([_label(old), _label(new), *labels])}
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips_net is not None else [])
    test = whole_photos(cfg, "test")
    on_test = {_label(t): {f"nfe{n}": _metric_means(score_tiling(policy, codec, cfg, test, t, n, lpips_net), n, metrics)
                           for n in nfes} for t in (old, new)}
    return {"policy": str(policy_dir), "nfe": nfes, "evaluation_tiling": _label(old), "restore_tiling": _label(new),
            "val_photos": sorted({(n, tuple(gt.shape[-2:])) for n, _, _, gt in photos}), "candidates": candidates,
            "test_photos": on_test}


def time_command(argv: list[str], repeats: int, cwd: Path) -> dict:
    """Wall seconds and peak RSS of `argv` in a fresh process, `repeats` times (GNU time measures the RSS:
    a child forked from this large process would otherwise count its pages until exec)."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            load, start = os.getloadavg()[0], time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f"{tmp}/rss", *argv], cwd=cwd,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
            rss_kib = int(Path(f"{tmp}/rss").read_text().split()[-1])
            runs.append({"seconds": seconds, "peak_rss_mib": rss_kib / 1024, "load_1min": load})
    seconds = [r["seconds"] for r in runs]
    return {"command": " ".join(argv), "runs": runs, "median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def cli_timings(policy_dir: Path, export_dir: Path, photo: Path, repeats: int, cwd: Path,
                flags: tuple[str, ...] = ()) -> dict:
    """`fluxir restore [flags]` of `photo` end to end: `--policy` at NFE 2, the export at its default budget."""
    budget = json.loads((export_dir / "manifest.json").read_text())["default_budget"]
    out = Path(tempfile.mkdtemp()) / "restored.png"
    # `python -m actors` (actors/__main__.py); a `--checkout` from before the command line moved out of
    # the library has only `python -m fluxir`.
    module = "actors" if (cwd / "actors" / "__main__.py").is_file() else "fluxir"
    restore = [sys.executable, "-m", module, "restore", "--task", "denoise", *flags]
    commands = {"policy NFE 2": [*restore, "--policy", str(policy_dir), "--nfe", "2"],
                f"export default (NFE {budget})": [*restore, "--model", str(export_dir)]}
    result = {}
    for label, argv in commands.items():
        result[label] = time_command([*argv, str(photo), str(out)], repeats, cwd)
        r = result[label]
        print(f"fluxir restore, {label}: median {r['median_s']:.1f} s ({r['min_s']:.1f}–{r['max_s']:.1f}), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def restore_section(args, cfg, run_dir: Path) -> dict:
    """The "restore" section: test-set restore speed per policy, the RL split, the sweep time, peak RSS."""
    from fluxir.data import frozen_testset

    if not (run_dir / "pretrain" / "model" / "policy.json").is_file():
        raise SystemExit(f"no stage-0 policy under {run_dir}: run `make run` (or `fluxir run CONFIG`) first")
    restore = restore_speeds(run_dir, cfg, frozen_testset(cfg), args.repeats)
    rl = _read(RESULTS / "rl_throughput.json")
    sweep = _read(Path(args.sweep_run) / "sweep.json")
    result = {
        "command": command(__file__), "machine": machine(),
        "restore": restore,
        "rl_iteration": ({"source": "benchmarks/results/rl_throughput.json", "ray": rl["ray"],
                          "single_process": rl["single_process"]} if rl else None),
        "sweep": ({"source": f"{args.sweep_run}/sweep.json", "seconds": sweep["seconds"], "trials": sweep["trials"]}
                  if sweep else None),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("| policy | NFE | s / image (median) | spread (min–max) | images / s |\n|---|---:|---:|---:|---:|")
    for label, r in restore.items():
        print(f"| {label} | {r['nfe']} | {r['sec_per_image']:.4f} | {r['min']:.4f}–{r['max']:.4f} | "
              f"{r['images_per_s']:.1f} |")
    if rl:
        for side in ("ray", "single_process"):
            s = rl[side]
            print(f"- RL iteration ({side}): {s['iteration_s']:.2f} s = rollout {s['rollout_s']:.2f} + reward "
                  f"{s['reward_s']:.2f} + learn {s['learn_s']:.2f} + sync {s['sync_s']:.2f}; "
                  f"{s['trajectories_per_s']:.1f} trajectories/s")
    if sweep:
        print(f"- sweep ({args.sweep_run}): {sweep['trials']} trials in {sweep['seconds'] / 60:.1f} min")
    print(f"- peak RSS of this process: {result['peak_rss_mib']:.0f} MiB")
    return result


def main(argv=None) -> int:
    p = config_parser(__doc__, out="speed.json", config="configs/tiny.yaml")
    p.add_argument("--run", help="run folder (default: the config's run_dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-run", default="runs/tiny-gauss", help="run folder of a `fluxir sweep` (for its time)")
    p.add_argument("--only", nargs="+", choices=["restore", "tiling", "cli"], default=["restore", "tiling", "cli"],
                   help="sections to measure; the JSON keeps the others' entries")
    p.add_argument("--policy", help="policy folder for the tiling and cli sections (default: <run>/rl/model)")
    p.add_argument("--export", help="export folder for the cli section (default: <run>/export)")
    p.add_argument("--tilings", nargs="+", default=TILINGS, metavar="TILE/OVERLAP")
    p.add_argument("--tiling-nfe", type=int, nargs="+", default=[1, 2])
    p.add_argument("--checkout", help="cli section: time this checkout's `fluxir restore` (stored apart)")
    p.add_argument("--fast", action="store_true", help="cli section: time `fluxir restore --fast`")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run) if args.run else cfg.run_dir
    policy_dir = Path(args.policy) if args.policy else run_dir / "rl" / "model"
    torch.set_num_threads(machine()["cpus"])
    result = _read(Path(args.out)) or {}
    line = command(__file__)
    photo = timing_photo(Path(tempfile.gettempdir()))
    if "restore" in args.only:
        result.update(restore_section(args, cfg, run_dir))
    if "tiling" in args.only:
        from fluxir.config import Config

        policy_cfg = Config.model_validate(json.loads((policy_dir / "policy.json").read_text())["config"])
        result["restore_tiling"] = {"command": line, "date": time.strftime("%Y-%m-%d"),
                                    **tiling_study(policy_cfg, policy_dir, args.tilings, args.tiling_nfe, photo)}
    if "cli" in args.only:
        cwd = Path(args.checkout).resolve() if args.checkout else ROOT
        key = "restore_cli_checkout" if args.checkout else "restore_cli_fast" if args.fast else "restore_cli"
        export_dir = (Path(args.export) if args.export else run_dir / "export").resolve()
        result[key] = {"command": line, "date": time.strftime("%Y-%m-%d"), "cwd": str(cwd),
                       "commit": _commit(cwd), "photo": "the left motorcycle view resized to 1024x768 (timing_photo)",
                       **cli_timings(policy_dir.resolve(), export_dir, photo, args.repeats, cwd,
                                     ("--fast",) if args.fast else ())}
    write_result(args.out, result)
    return 0


def _commit(folder: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
