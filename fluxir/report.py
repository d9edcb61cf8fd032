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
