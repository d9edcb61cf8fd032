"""The run report: Markdown tables of the evaluation and before/after PNG grids per task."""
from __future__ import annotations

import json
from pathlib import Path

import torch

METRIC_FORMAT = {"psnr": "{:.2f}", "ssim": "{:.4f}", "lpips": "{:.4f}"}


def _metrics_present(result: dict) -> list[str]:
    first = next(iter(result["tasks"].values()))
    return [m for m in ("psnr", "ssim", "lpips") if m in first["lq"]]


def metric_table(result: dict, metric: str) -> str:
    """Rows: tasks (+ mean); columns: LQ input, then each NFE. Bold marks a win over the LQ input."""
    nfes = result["nfe"]
    better = (lambda a, b: a < b) if metric == "lpips" else (lambda a, b: a > b)
    fmt = METRIC_FORMAT[metric]
    lines = ["| task | LQ input | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---:|" + "---:|" * len(nfes)]
    cols = {None: []} | {n: [] for n in nfes}
    for task, e in result["tasks"].items():
        lq = e["lq"][metric]
        cells = [fmt.format(lq)]
        cols[None].append(lq)
        for n in nfes:
            v = e["nfe"][n][metric]
            cols[n].append(v)
            cells.append(("**" + fmt.format(v) + "**") if better(v, lq) else fmt.format(v))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    mean = lambda xs: sum(xs) / len(xs)
    lines.append("| **mean** | " + " | ".join(fmt.format(mean(cols[k])) for k in cols) + " |")
    return "\n".join(lines)


def wins(result: dict, nfe: int, metric: str = "psnr") -> list[str]:
    """Tasks where the policy at `nfe` beats the LQ input on `metric`."""
    sign = -1 if metric == "lpips" else 1
    return [t for t, e in result["tasks"].items() if sign * (e["nfe"][nfe][metric] - e["lq"][metric]) > 0]


def save_grid(path: Path, rows: list[tuple[torch.Tensor, ...]], titles: tuple[str, ...]) -> None:
    """A PNG grid: one row per sample, one column per image (3, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.2 * len(titles), 2.2 * len(rows)), squeeze=False)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_grids(run_dir: Path, testset: dict, result: dict, samples: int) -> dict[str, str]:
    """Before/after grids (LQ | restored at each NFE | GT) per task; returns {task: relative path}."""
    paths = {}
    for task, pairs in testset.items():
        outs = result["images"].get(task, {})
        n = min(samples, pairs["lq"].shape[0])
        rows = [(pairs["lq"][i], *(outs[k][i] for k in outs), pairs["gt"][i]) for i in range(n)]
        titles = ("LQ", *(f"NFE {k}" for k in outs), "GT")
        rel = f"images/{task}.png"
        save_grid(run_dir / rel, rows, titles)
        paths[task] = rel
    return paths


def write_report(run_dir: Path, sections: list[str], name: str = "report.md") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(sections) + "\n")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict) -> Path:
    """Atomic JSON dump (tensors dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def eval_section(title: str, result: dict, command: str) -> str:
    parts = [f"## {title}", f"Convention: {result['convention']}. Test set: "
             + ", ".join(f"{t} ({e['count']})" for t, e in result["tasks"].items()) + " images.",
             f"Reproduce: `{command}`"]
    for metric in _metrics_present(result):
        parts.append(f"### {metric.upper()}\n\n" + metric_table(result, metric))
    if "lpips" not in _metrics_present(result):
        parts.append(f"LPIPS: unavailable ({result.get('lpips_reason', 'no AlexNet weights')}).")
    return "\n\n".join(parts)


def comparison_table(results: dict[str, dict], metric: str, nfe: int) -> str:
    """Rows: tasks (+ mean); columns: LQ input, then each named result at `nfe`. Bold: best model column."""
    names = list(results)
    first = results[names[0]]
    fmt, sign = METRIC_FORMAT[metric], (-1 if metric == "lpips" else 1)
    lines = ["| task | LQ input | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    means = {n: [] for n in [None, *names]}
    for task, e in first["tasks"].items():
        values = {n: results[n]["tasks"][task]["nfe"][nfe][metric] for n in names}
        best = max(values.values(), key=lambda v: sign * v)
        means[None].append(e["lq"][metric])
        cells = [fmt.format(e["lq"][metric])]
        for n in names:
            means[n].append(values[n])
            cells.append(("**" + fmt.format(values[n]) + "**") if values[n] == best else fmt.format(values[n]))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    avg = {n: sum(v) / len(v) for n, v in means.items()}
    lines.append("| **mean** | " + " | ".join(fmt.format(avg[n]) for n in means) + " |")
    return "\n".join(lines)


def write_gap_plot(path: Path, histories: dict[str, list[dict]]) -> Path:
    """Reward gap (best candidate − ODE candidate) and mean reward per iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, history in histories.items():
        rows = [h for h in history if "gap" in h]
        if not rows:
            continue
        its = [h["iteration"] for h in rows]
        axes[0].plot(its, [h["gap"] for h in rows], label=name, lw=1)
        axes[1].plot(its, [h["reward_mean"] for h in rows], label=name, lw=1)
    axes[0].set(title="best − ODE candidate reward", xlabel="iteration")
    axes[1].set(title="mean candidate reward", xlabel="iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGE_LABELS = {"base": "stage-0 base", "rl": "RL", "rl-control": "control (fm)", "rl-k1": "ablation (K=1)"}


def rl_section(evals: dict[str, dict], runs: dict[str, dict], command: str, plot: str | None) -> str:
    """Stage 1 against the base, the equal-time control and the K=1 ablation, per NFE and metric."""
    parts = ["## Stage 1: RL trajectory optimisation", f"Reproduce: `{command}`"]
    lines = []
    for stage, run in runs.items():
        lines.append(f"- {STAGE_LABELS.get(stage, stage)}: {run['iterations']} iterations, "
                     f"{run['loop_seconds']:.0f} s loop wall-clock (+{run['startup_seconds']:.0f} s start-up), "
                     f"policy v{run['version']}")
    parts.append("\n".join(lines))
    labelled = {STAGE_LABELS.get(k, k): v for k, v in evals.items()}
    first = next(iter(evals.values()))
    for metric in _metrics_present(first):
        for nfe in first["nfe"]:
            parts.append(f"### {metric.upper()} at NFE {nfe}\n\n" + comparison_table(labelled, metric, nfe))
    if plot:
        parts.append(f"![reward gap]({plot})")
    return "\n\n".join(parts)
