"""The figures of docs/BENCHMARKS.md, from the benchmarks' JSON and a run's RL history.

    python benchmarks/plots.py [--quality benchmarks/results/quality.json] [--run runs/tiny]

docs/psnr_vs_nfe.png: PSNR against NFE per task, base and RL curves, students as points, with the LQ
input and the best classical restorer as horizontal lines. docs/rl_reward.png: the RL run's mean reward,
its ODE candidate's reward and the best-minus-ODE gap per iteration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, ROOT  # noqa: E402

DOCS = ROOT / "docs"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def psnr_vs_nfe(quality: dict, path: Path) -> Path:
    plt = _plt()
    tasks = list(quality["tasks"])
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    for ax, task in zip(axes.flat, tasks):
        t = quality["tasks"][task]
        for label, r in quality["fluxir"].items():
            nfes = sorted(int(n) for n in r["schedules"])
            ys = [r["tasks"][task][str(n)]["psnr"] for n in nfes]
            style = dict(marker="s", linestyle="none", markersize=7) if label.startswith("student") else \
                dict(marker="o")
            ax.plot(nfes, ys, label=label, **style)
        ax.axhline(t["lq"]["psnr"], color="gray", linestyle=":", label="LQ input")
        best = max(t["classical"], key=lambda k: t["classical"][k]["psnr"])
        ax.axhline(t["classical"][best]["psnr"], color="black", linestyle="--", label="best classical")
        ax.set_title(f"{task} (classical: {best})", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=8)
    fig.suptitle("fluxir tiny: PSNR vs NFE per task on the frozen test set", fontsize=10)
    return _save(fig, path)


def rl_reward(history: list[dict], path: Path) -> Path:
    plt = _plt()
    it = [h["iteration"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(it, [h["reward_mean"] for h in history], label="mean over candidates")
    a.plot(it, [h["ode_reward"] for h in history], label="ODE candidate")
    a.plot(it, [h["reward_max"] for h in history], label="best candidate", alpha=0.6)
    a.set(xlabel="RL iteration", ylabel="reward (PSNR, dB)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(it, [h["gap"] for h in history])
    b.set(xlabel="RL iteration", ylabel="best − ODE reward")
    b.grid(alpha=0.3)
    return _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quality", default=str(RESULTS / "quality.json"))
    p.add_argument("--run", default="runs/tiny")
    args = p.parse_args(argv)
    print(psnr_vs_nfe(json.loads(Path(args.quality).read_text()), DOCS / "psnr_vs_nfe.png"))
    history = Path(args.run) / "rl" / "history.json"
    if history.is_file():
        print(rl_reward(json.loads(history.read_text()), DOCS / "rl_reward.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
