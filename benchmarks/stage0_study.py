"""Stage-0 settings chosen on validation crops of the training photos (never the test set).

    python benchmarks/stage0_study.py [--only NAME ...] [--config configs/tiny.yaml]

Each variant is `fluxir pretrain CONFIG <overrides>` (Ray Train + DeepSpeed, the product path) followed by
`fluxir eval --split val --nfe 1 2 4 8 20` of its model (and of `model-raw` when a weight average was
kept). Results accumulate in benchmarks/results/stage0_study.json (a variant already there is skipped
unless named with --only); the table printed at the end is what docs/BENCHMARKS.md quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import RESULTS, ROOT, machine, write_result  # noqa: E402  (puts the repo on sys.path)

NFES = (1, 2, 4, 8, 20)
RAW_NFES = (1, 4)  # the last raw weights against their average: two points of the curve suffice
OUT = RESULTS / "stage0_study.json"
RUNS = ROOT / "runs" / "stage0_study"

# name -> overrides of the config; every variant trains the same steps unless it says otherwise.
VARIANTS = {
    "residual": ["model.parametrization=x0_residual"],
    "precond": ["model.parametrization=x0_precond"],
    "sigma0.3": ["flow.sigma_src=0.3"],
    "sigma0.5": ["flow.sigma_src=0.5"],
    # FLUX's own source; its many-step sampler needs the whole path, so most samples are below t = 1
    "gaussian": ["flow.source=gaussian", "pretrain.t_start_fraction=0.2"],
    # capacity at equal wall-clock: no double block (its text stream serves 4 task tokens), 5 single blocks;
    # 0.158 s against 0.134 s per step in one process here, so 1,700 steps for the base's 2,000
    "single5": ["model.num_layers=0", "model.num_single_layers=5", "pretrain.steps=1700"],
    # twice the share of batches for the mild tasks that barely move (sr, deblur, raindrop)
    "mildx2": ["data.task_weights={sr: 2, deblur: 2, raindrop: 2}"],
    # sr alone, 600 steps (twice the sr samples of a 2,000-step seven-task run): is sr's share the limit?
    "sronly": ["data.tasks=[sr]", "pretrain.steps=600"],
    # the five colour photographs only (no greyscale camera and grass)
    "colour5": ["data.train_images=[astronaut, chelsea, coffee, rocket, motorcycle]"],
    "seed1": ["seed=1"],
}


def fluxir(*args: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    subprocess.run([sys.executable, "-m", "actors", *args], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def summary(result: dict) -> dict:
    tasks = result["tasks"]
    out = {"lq_psnr": {t: e["lq"]["psnr"] for t, e in tasks.items()}}
    for n in result["nfe"]:
        key = str(n)
        out[f"nfe{n}"] = {
            "psnr": sum(e["nfe"][key]["psnr"] for e in tasks.values()) / len(tasks),
            "lpips": sum(e["nfe"][key].get("lpips", float("nan")) for e in tasks.values()) / len(tasks),
            "gain": {t: e["nfe"][key]["psnr"] - e["lq"]["psnr"] for t, e in tasks.items()},
        }
    return out


def run_variant(config: str, name: str, overrides: list[str], raw: bool) -> dict:
    common = [f"output_dir={RUNS}", f"name={name}", "wandb.mode=disabled", *overrides]
    train_s = fluxir("pretrain", config, *common)
    entry = {"overrides": overrides, "train_s": train_s}
    run = RUNS / name / "pretrain"
    for label, folder in (("model", run / "model"), ("raw", run / "model-raw")):
        if not folder.is_dir() or (label == "raw" and not raw):
            continue
        out = RUNS / name / f"val-{label}.json"
        fluxir("eval", config, *common, "--policy", str(folder), "--split", "val",
               "--nfe", *map(str, NFES if label == "model" else RAW_NFES), "--out", str(out))
        entry[label] = summary(json.loads(out.read_text()))
    return entry


def table(results: dict) -> str:
    lines = ["| variant | weights | train s | " + " | ".join(f"NFE {n} PSNR / LPIPS" for n in NFES) + " |",
             "|---|---|---:|" + "---:|" * len(NFES)]
    for name, e in results["variants"].items():
        for label in ("model", "raw"):
            if label in e:
                cells = [f"{e[label][f'nfe{n}']['psnr']:.2f} / {e[label][f'nfe{n}']['lpips']:.4f}"
                         if f"nfe{n}" in e[label] else "" for n in NFES]
                lines.append(f"| {name} | {label} | {e['train_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant")
    parser.add_argument("--raw", action="store_true", help="also score the last raw weights (model-raw)")
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"variants": {}}
    results.update(config=args.config, extra=args.extra, nfe=list(NFES), machine=machine())
    for name in args.only or list(VARIANTS):
        if name in results["variants"] and not args.only:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {VARIANTS[name] + args.extra}", flush=True)
        results["variants"][name] = run_variant(args.config, name, VARIANTS[name] + args.extra, args.raw)
        write_result(OUT, results)
        print(table({"variants": {name: results["variants"][name]}}), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
