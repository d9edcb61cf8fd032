"""Quality on the frozen test set, per task: the LQ input, classical restorers, and fluxir's policies.

    python benchmarks/quality.py [configs/tiny.yaml] [--run runs/tiny] [key=value ...]

Needs a finished `make run` (or `fluxir run CONFIG`): the stage-0 base (`<run>/pretrain/model`), the RL
policy (`<run>/rl/model`) and the distilled students (`<run>/distill/best/K<k>/`, each on its own
schedule). Classical restorers (benchmarks/classical.py) get what a non-blind method is given: the true
noise σ (denoise) and the true blur kernel (deblur). PSNR/SSIM follow fluxir's stated convention; LPIPS
where the AlexNet weights exist locally. Writes benchmarks/results/quality.json and prints Markdown tables.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import command, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from classical import RESTORERS, degradation_info  # noqa: E402
from fluxir.config import load_config  # noqa: E402

METRICS = ("psnr", "ssim", "lpips")


def classical_scores(testset: dict, convention, lpips_net) -> dict[str, dict[str, dict]]:
    """{task: {method: metrics + seconds per image}} for every classical restorer of each task."""
    from fluxir.evaluate import score

    out = {}
    for task, data in testset.items():
        lq = data["lq"].permute(0, 2, 3, 1).double().numpy()
        info = degradation_info(task, data["seeds"])
        out[task] = {}
        for name, restore in RESTORERS[task].items():
            start = time.perf_counter()
            pred = np.stack([np.clip(restore(img, facts), 0, 1) for img, facts in zip(lq, info)])
            seconds = (time.perf_counter() - start) / len(lq)
            pred = torch.from_numpy(pred).permute(0, 3, 1, 2).float()
            out[task][name] = {**score(pred, data["gt"], convention, lpips_net), "sec_per_image": seconds}
    return out


def fluxir_policies(run_dir: Path, cfg) -> dict[str, tuple[Path, dict[int, list[float]]]]:
    """{label: (policy folder, {nfe: times})}: the base and RL policy at the evaluation NFEs, each student
    at its own budget and schedule."""
    from fluxir.evaluate import eval_schedule

    uniform = {n: eval_schedule(cfg, n) for n in cfg.eval.nfe}
    found = {}
    for label, folder in (("base", run_dir / "pretrain" / "model"), ("RL", run_dir / "rl" / "model")):
        if (folder / "policy.json").is_file():
            found[label] = (folder, uniform)
    for folder in sorted((run_dir / "distill" / "best").glob("K*")):
        card = json.loads((folder / "policy.json").read_text())
        found[f"student K{card['budget']}"] = (folder, {int(card["budget"]): card["schedule"]})
    if not found:
        raise SystemExit(f"no trained policy under {run_dir}: run `make run` (or `fluxir run CONFIG`) first")
    return found


def fluxir_scores(run_dir: Path, cfg, testset: dict, lpips_net) -> dict[str, dict]:
    """{label: {task: {nfe: metrics}}} for every policy `fluxir_policies` finds."""
    from fluxir.codec import build_codec
    from fluxir.evaluate import evaluate
    from fluxir.policy import load_policy
    from fluxir.codec import token_channels

    codec = build_codec(cfg)
    out = {}
    for label, (folder, schedules) in fluxir_policies(run_dir, cfg).items():
        policy = load_policy(folder, cfg, token_channels(codec))
        result = evaluate(policy, codec, testset, cfg, lpips_net=lpips_net, schedules=schedules)
        out[label] = {"policy": str(folder), "schedules": {str(n): s for n, s in schedules.items()},
                      "tasks": {t: {str(n): m for n, m in e["nfe"].items()} for t, e in result["tasks"].items()}}
    return out


def best_classical(scores: dict[str, dict]) -> tuple[str, dict]:
    name = max(scores, key=lambda k: scores[k]["psnr"])
    return name, scores[name]


def table(result: dict, metric: str) -> str:
    """Rows: tasks + mean. Columns: LQ, best classical, then each fluxir policy at each of its NFEs."""
    cols = [(label, nfe) for label, r in result["fluxir"].items() for nfe in r["schedules"]]
    head = ["task", "LQ input", "best classical"] + [f"{label} NFE {n}" if not label.startswith("student")
                                                      else label for label, n in cols]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    fmt = "{:.4f}" if metric != "psnr" else "{:.2f}"
    sums = [0.0] * (len(head) - 1)
    tasks = result["tasks"]
    for task, t in tasks.items():
        name, best = best_classical(t["classical"])
        values = [t["lq"].get(metric), best.get(metric)] + [result["fluxir"][label]["tasks"][task][n].get(metric)
                                                          for label, n in cols]
        cells = [fmt.format(v) if v is not None else "–" for v in values]
        cells[1] += f" ({name})"
        sums = [s + (v or 0.0) for s, v in zip(sums, values)]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(fmt.format(s / len(tasks)) for s in sums) + " |")
    return "\n".join(lines)


def wins(result: dict, label: str, nfe: str) -> list[str]:
    """Tasks where `label` at `nfe` beats the best classical restorer in PSNR."""
    return [task for task, t in result["tasks"].items()
            if result["fluxir"][label]["tasks"][task][nfe]["psnr"] > best_classical(t["classical"])[1]["psnr"]]


def main(argv=None) -> int:
    p = config_parser(__doc__, out="quality.json", config="configs/tiny.yaml")
    p.add_argument("--run", help="run folder (default: the config's run_dir)")
    args = p.parse_args(argv)
    from fluxir.data import frozen_testset
    from fluxir.evaluate import lpips_or_reason
    from fluxir.metrics import MetricConvention

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run) if args.run else cfg.run_dir
    testset = frozen_testset(cfg)
    lpips_net, reason = lpips_or_reason(cfg.eval.lpips)
    convention = MetricConvention(crop_border=cfg.eval.crop_border, test_y_channel=cfg.eval.test_y_channel)
    start = time.perf_counter()
    from fluxir.evaluate import score

    classical = classical_scores(testset, convention, lpips_net)
    result = {
        "command": command(__file__), "machine": machine(),
        "convention": convention.describe(), "lpips": reason or "AlexNet (local weights)",
        "testset": {t: int(d["lq"].shape[0]) for t, d in testset.items()},
        "tasks": {t: {"lq": score(d["lq"], d["gt"], convention, lpips_net), "classical": classical[t]}
                  for t, d in testset.items()},
        "fluxir": fluxir_scores(run_dir, cfg, testset, lpips_net)}
    result["seconds"] = time.perf_counter() - start
    students = [label for label in result["fluxir"] if label.startswith("student")]
    result["student_wins_over_best_classical"] = {
        label: wins(result, label, next(iter(result["fluxir"][label]["schedules"]))) for label in students}
    write_result(args.out, result)
    print(f"## PSNR (dB; {result['convention']})\n\n{table(result, 'psnr')}\n")
    print(f"## SSIM\n\n{table(result, 'ssim')}\n")
    if lpips_net is not None:
        print(f"## LPIPS (AlexNet, lower is better)\n\n{table(result, 'lpips')}\n")
    for label, won in result["student_wins_over_best_classical"].items():
        print(f"- {label} beats the best classical restorer in PSNR on {len(won)}/7 tasks: {', '.join(won)}")
    print(f"\n{result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
