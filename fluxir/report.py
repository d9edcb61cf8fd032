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


def without(mapping: dict, *keys: str) -> dict:
    """`mapping` less `keys` (a shallow copy)."""
    return {k: v for k, v in mapping.items() if k not in keys}


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


STAGE_LABELS = {"base": "stage-0 base", "rl": "RL", "rl-fm": "control: flow matching",
                "rl-shuffled": "control: shuffled rewards", "rl-k1": "control: K=1",
                "rl-backprop": "control: reward backprop"}


def paired_table(evals: dict[str, dict], arm: str, metrics: list[str]) -> str:
    """`arm` minus each other evaluation per metric and NFE: mean over tasks and the 95 % paired,
    task-stratified bootstrap interval over the test crops (fluxir.stats)."""
    from fluxir.stats import compare, interval_cell

    first = evals[arm]
    lines = ["| " + arm + " minus | " + " | ".join(f"{m.upper()} NFE {n}" for m in metrics for n in first["nfe"]) + " |",
             "|---|" + "---:|" * (len(metrics) * len(first["nfe"]))]
    for other, result in evals.items():
        if other == arm:
            continue
        cells = [interval_cell(compare(first, result, n, m)) for m in metrics for n in first["nfe"]]
        lines.append(f"| {STAGE_LABELS.get(other, other)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rl_section(evals: dict[str, dict], runs: dict[str, dict], command: str, plot: str | None) -> str:
    """Stage 1 against the base and each equal-time control, per NFE and metric, with paired intervals."""
    parts = ["## Stage 1: RL trajectory optimisation", f"Reproduce: `{command}`"]
    lines = []
    for stage, run in runs.items():
        lines.append(f"- {STAGE_LABELS.get(stage, stage)}: {run['iterations']} iterations, "
                     f"{run['loop_seconds']:.0f} s loop wall-clock (+{run['startup_seconds']:.0f} s start-up), "
                     f"policy v{run['version']}")
    parts.append("\n".join(lines))
    first = next(iter(evals.values()))
    metrics = _metrics_present(first)
    parts.append("### RL minus each arm, paired over the test crops\n\nMean over tasks and its 95 % bootstrap "
                 "interval (crops resampled within each task); ✓: RL better, ✗: RL worse, otherwise no difference "
                 "shown.\n\n" + paired_table(evals, "rl", metrics))
    labelled = {STAGE_LABELS.get(k, k): v for k, v in evals.items()}
    for metric in metrics:
        for nfe in first["nfe"]:
            parts.append(f"### {metric.upper()} at NFE {nfe}\n\n" + comparison_table(labelled, metric, nfe))
    if plot:
        parts.append(f"![reward gap]({plot})")
    return "\n\n".join(parts)


# --- stage 2: distillation and the sweep ----------------------------------------------------------

def mean_metrics(result: dict, nfe: int) -> dict[str, float]:
    """Means over tasks at `nfe` of every metric present (and seconds per image)."""
    keys = [*_metrics_present(result), "sec_per_image"]
    tasks = list(result["tasks"].values())
    return {k: sum(e["nfe"][nfe][k] for e in tasks) / len(tasks) for k in keys}


def summary_scalars(evals: dict[str, dict]) -> dict[str, float]:
    """{"<name>/<metric>@nfe<n>": mean over tasks} for every evaluation in `evals` ({name: result})."""
    return {f"{name}/{metric}@nfe{n}": value for name, result in evals.items() for n in result["nfe"]
            for metric, value in mean_metrics(result, n).items()}


def _fmt(m: dict | None, key: str) -> str:
    return METRIC_FORMAT[key].format(m[key]) if m and key in m else "–"


def _cells(m: dict | None, metrics: list[str]) -> list[str]:
    return [_fmt(m, k) for k in metrics]


def teacher_curve_table(teacher: dict) -> str:
    """The teacher's uniform-ODE quality at each NFE (means over tasks)."""
    metrics = _metrics_present(teacher)
    lines = ["| NFE | " + " | ".join(k.upper() for k in metrics) + " | s/image |",
             "|---:|" + "---:|" * (len(metrics) + 1)]
    for n in teacher["nfe"]:
        m = mean_metrics(teacher, n)
        lines.append(f"| {n} | " + " | ".join(_cells(m, metrics)) + f" | {m['sec_per_image']:.4f} |")
    return "\n".join(lines)


def _times(schedule: list[float]) -> str:
    return "[" + ", ".join(f"{t:.3g}" for t in schedule) + "]"


# Stage 2's arms at budget K (name in the stage-2 evaluations -> label); the student is compared with each.
DISTILL_ARMS = {"teacher": "teacher, uniform K", "shifted": "teacher, shifted K", "searched": "teacher, searched K",
                "uniform-student": "control: uniform-schedule student", "gt-only": "control: GT-only fine-tune"}


def distill_arm(evals: dict, name: str, k: int) -> dict | None:
    """Stage 2's evaluation of arm `name` at budget `k` (None when it did not run)."""
    if name == "student":
        return evals["students"].get(k)
    if name in ("uniform-student", "gt-only"):
        return evals["controls"].get(k, {}).get(name)
    result = evals[name]
    return result if k in result["nfe"] else None


def budget_table(evals: dict, budgets: list[int], teacher_nfe: int) -> str:
    """Per budget K, means over tasks: the teacher on uniform, shifted and searched times (no distillation),
    the student and its controls; and the teacher on its own N steps."""
    metrics = _metrics_present(evals["teacher"])
    names = ["teacher", "shifted", "searched", "student", "uniform-student", "gt-only"]
    labels = {**DISTILL_ARMS, "student": "student"}
    lines = ["| K | arm | " + " | ".join(m.upper() for m in metrics) + " | s/image |",
             "|---:|---|" + "---:|" * (len(metrics) + 1)]
    for k in budgets:
        for name in names:
            res = distill_arm(evals, name, k)
            if res is not None:
                m = mean_metrics(res, k)
                lines.append(f"| {k} | {labels[name]} | " + " | ".join(_cells(m, metrics))
                             + f" | {m['sec_per_image']:.4f} |")
    t = mean_metrics(evals["teacher"], teacher_nfe)
    lines.append(f"| {teacher_nfe} | teacher N={teacher_nfe} | " + " | ".join(_cells(t, metrics))
                 + f" | {t['sec_per_image']:.4f} |")
    return "\n".join(lines)


def distill_comparisons(evals: dict, budgets: list[int], teacher_nfe: int, metrics: list[str]) -> list[dict]:
    """The student at each budget minus every other arm at that budget and the N-step teacher: per metric
    the paired, task-stratified bootstrap result (fluxir.stats.compare)."""
    from fluxir.stats import compare

    rows = []
    for k in budgets:
        student = distill_arm(evals, "student", k)
        if student is None:
            continue
        others = [(DISTILL_ARMS[n], distill_arm(evals, n, k), k) for n in DISTILL_ARMS]
        others.append((f"teacher N={teacher_nfe}", evals["teacher"], teacher_nfe))
        for label, other, nfe_b in others:
            if other is not None:
                rows.append({"budget": k, "other": label,
                             **{m: compare(student, other, k, m, nfe_b) for m in metrics}})
    return rows


def comparisons_table(rows: list[dict]) -> str:
    """`distill_comparisons`' rows as a Markdown section."""
    from fluxir.stats import interval_cell

    metrics = [m for m in rows[0] if m in METRIC_FORMAT] if rows else []
    table = ["| K | student minus | " + " | ".join(m.upper() for m in metrics) + " |",
             "|---:|---|" + "---:|" * len(metrics)]
    table += [f"| {r['budget']} | {r['other']} | " + " | ".join(interval_cell(r[m]) for m in metrics) + " |"
              for r in rows]
    return ("### The student minus each arm, paired over the test crops\n\nMean over tasks and its 95 % bootstrap "
            "interval (crops resampled within each task); ✓: student better, ✗: student worse.\n\n" + "\n".join(table))


def distillation_verdict(rows: list[dict], metric: str) -> dict[int, list[str]]:
    """Per budget, the K-step arms (not the N-step teacher) the student did not beat on `metric`."""
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(r["budget"], [])
        if not r["other"].startswith("teacher N=") and r[metric]["verdict"] != "A better":
            out[r["budget"]].append(r["other"])
    return out


def distill_section(evals: dict, out: dict, cfg, command: str) -> str:
    """Stage 2: teacher curve, each budget's arms, the student minus each with paired intervals, whether
    distillation paid, the schedules, and what the export picks."""
    d, shared = cfg.distill, out["shared"]
    st = d.student
    metrics = _metrics_present(evals["teacher"])
    judged = out["metric"]
    rows = distill_comparisons(evals, list(d.budgets), d.teacher_nfe, [m for m in ("psnr", "lpips") if m in metrics])
    parts = ["## Stage 2: trajectory distillation",
             f"Reproduce: `{command}`",
             f"Teacher: `{shared['teacher_dir']}` on its {d.teacher_nfe}-step {d.teacher_schedule} ODE; "
             f"{d.calibration_size} calibration and {d.validation_size} validation crops of the training photos. "
             f"Schedule search: {judged.upper()} of the K-step sampler on the calibration crops, times on multiples "
             f"of 1/{d.search_grid}. Students: {st.steps} steps, schedule `{st.schedule}`, lr {st.lr:g}, teacher "
             f"weight {st.teacher_weight:g}, GT weight {st.gt_weight:g} ({st.loss}); controls with the same settings "
             f"and seed: a uniform-schedule student and a GT-only fine-tune. Best trial per budget by validation "
             f"{judged.upper()}. Test set: the frozen one; {evals['teacher']['convention']}.",
             "### Teacher curve (mean over tasks)\n\n" + teacher_curve_table(evals["teacher"]),
             "### Step budgets (mean over tasks)\n\n" + budget_table(evals, list(d.budgets), d.teacher_nfe)]
    if rows:
        parts.append(comparisons_table(rows))
        verdict = distillation_verdict(rows, judged)
        parts.append("Did distillation pay (judged on " + judged.upper() + ")?\n\n" + "\n".join(
            f"- K={k}: " + ("yes: the student beats every K-step arm." if not lost else
                            "no: not better than " + "; ".join(lost) + ".") for k, lost in verdict.items()))
    same = "; the uniform-schedule control is the student itself (its schedule is uniform), not trained twice"
    lines = [f"- K={k}: searched {_times(shared['schedules']['searched'][k])}"
             + (f"; student {_times(out['best'][k]['schedule'])}" if k in out["best"] else "; student: none (trial failed)")
             + (same if d.controls and k in out["best"] and "uniform-student" not in out["controls"].get(k, {})
                and out["best"][k]["schedule"] == shared["schedules"]["uniform"][k] else "")
             for k in d.budgets]
    parts.append("Schedules (times from t_start to 0):\n\n" + "\n".join(lines))
    choice = out.get("choice")
    if choice:
        m = choice["metric"]
        parts.append(f"Export default (`fluxir export`): {choice['name']} at K={choice['budget']} "
                     f"({_times(choice['schedule'])}), the fewest steps whose validation {m.upper()} "
                     f"({choice['validation'][m]:.4f}) is not shown worse than the N-step teacher's "
                     f"({choice['teacher_validation'][m]:.4f}; paired 95 % interval over the validation crops).")
    return "\n\n".join(parts)


def quality_key(metric: str) -> tuple[str, int]:
    """The absolute metric behind a sweep metric (gains are per-budget, so fronts use the absolute one)
    and its sign (+1: higher is better)."""
    key = metric.removesuffix("_gain")
    return key, -1 if key == "lpips" else 1


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) no other point beats: lower-or-equal cost and higher quality."""
    front = []
    for i, (c, q) in enumerate(points):
        if not any((c2 <= c and q2 > q) or (c2 < c and q2 >= q) for j, (c2, q2) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_pareto_plot(path: Path, rows: list[dict], title: str = "sweep: quality vs NFE per trial") -> Path:
    """Validation PSNR (and LPIPS when measured) against NFE for every trial, by schedule kind, each
    panel with its Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("psnr", "lpips") if all(k in r["metrics"] for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    kinds = sorted({r["params"]["schedule"] for r in rows})
    budgets = sorted({r["params"]["budget"] for r in rows})
    for ax, key in zip(axes[0], keys):
        sign = quality_key(key)[1]
        for i, kind in enumerate(kinds):
            sel = [r for r in rows if r["params"]["schedule"] == kind]
            ax.scatter([r["params"]["budget"] * (1 + 0.04 * (i - 1)) for r in sel], [r["metrics"][key] for r in sel],
                       label=kind, s=18, alpha=0.8)
        pts = [(r["params"]["budget"], r["metrics"][key]) for r in rows]
        front = sorted((pts[i] for i in pareto_front([(c, sign * q) for c, q in pts])), key=lambda p: p[0])
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set(xlabel="NFE (step budget)", ylabel=f"validation {key.upper()} ({'higher' if sign > 0 else 'lower'} "
                                                      "is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_section(out: dict, evals: dict, sweep, command: str, plot: str, teacher_nfe: int) -> str:
    """The sweep's trials (validation), its Pareto front, and each budget's best student on the test set."""
    rows, metric = out["rows"], sweep.metric
    stopped = sum(r["stopped_early"] for r in rows)
    key, sign = quality_key(metric)
    front = set(pareto_front([(r["params"]["budget"], sign * r["metrics"][key]) for r in rows]))
    lines = ["| # | K | arm | schedule | lr | teacher w | GT w | steps | val PSNR | val LPIPS | val " + metric
             + f" | front (NFE vs val {key}) |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["params"]["budget"], -rows[i]["metrics"][metric]))
    for i in order:
        r, p = rows[i], rows[i]["params"]
        lines.append(f"| {i} | {p['budget']} | {p['arm']} | {p.get('schedule', '')} | {p.get('lr', float('nan')):.2g} | "
                     f"{p.get('teacher_weight', '')} | {p.get('gt_weight', '')} | {r['step']}"
                     f"{' (ASHA stop)' if r['stopped_early'] else ''} | {_fmt(r['metrics'], 'psnr')} | "
                     f"{_fmt(r['metrics'], 'lpips')} | {r['metrics'][metric]:.3f} | {'✓' if i in front else ''} |")
    test = ["| K | arm | schedule | PSNR | SSIM | LPIPS | s/image (test set, sequential) |",
            "|---:|---|---|---:|---:|---:|---:|"]
    labels = {**DISTILL_ARMS, "student": "best student"}
    for k in sorted(out["best"]):
        for name in ("student", "uniform-student", "gt-only", "teacher", "searched", "shifted"):
            res = distill_arm(evals, name, k)
            if res is not None:
                m = mean_metrics(res, k)
                test.append(f"| {k} | {labels[name]} | {_times(res['schedules'][k])} | {_fmt(m, 'psnr')} | "
                            f"{_fmt(m, 'ssim')} | {_fmt(m, 'lpips')} | {m['sec_per_image']:.4f} |")
    return "\n\n".join([
        "## Stage 2 sweep: step budget, schedule, loss weights, learning rate (Ray Tune + ASHA)",
        f"Reproduce: `{command}`",
        f"{len(rows)} trials reported ({out['errored']} errored), {stopped} stopped early by ASHA; "
        f"{out['seconds']:.0f} s wall-clock{' for this resumed command alone' if out.get('resumed') else ''}. "
        f"Metric `{metric}` ({sweep.mode}) on the validation crops.",
        "### Trials (validation)\n\n" + "\n".join(lines),
        f"![Pareto]({plot})",
        "### Best student per budget, its controls and the undistilled teacher on the frozen test set (the Pareto "
        "table)\n\n" + "\n".join(test),
        comparisons_table(distill_comparisons(evals, sorted(out["best"]), teacher_nfe,
                                              [m for m in ("psnr", "lpips") if m in _metrics_present(evals["teacher"])]))])


def win_line(result: dict, nfe: int) -> str:
    won = wins(result, nfe)
    lost = [t for t in result["tasks"] if t not in won]
    return (f"- NFE {nfe}: beats the LQ input in PSNR on {len(won)}/{len(result['tasks'])} tasks"
            + (f" (not on {', '.join(lost)})" if lost else ""))


def run_summary(cfg, pretrain_seconds: float, run_seconds: float, final: dict) -> str:
    """The report's opening: the run, its stage-0 budget, and where the final policy beats its input."""
    from fluxir.config import zero_stage

    return "\n\n".join([
        f"# fluxir run `{cfg.name}`",
        f"Stage 0: {cfg.pretrain.steps} steps, {pretrain_seconds:.0f} s on {cfg.pretrain.num_workers} Ray Train workers "
        f"(DeepSpeed ZeRO-{zero_stage(cfg.pretrain.deepspeed, 'pretrain.deepspeed')}). Whole run: {run_seconds:.0f} s.",
        "Final (RL) policy:\n" + "\n".join(win_line(final, n) for n in final["nfe"]),
        "(`sr`'s LQ input is bicubic ×4 upsampling, so its column is the bicubic baseline.)"])


def heldout_section(evals: dict[str, dict], command: str) -> str:
    """The policies on the held-out photo at `eval.nfe`: PSNR per task against the LQ input, and every
    (policy, task, NFE) where the output is worse than its input."""
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
    return "\n\n".join(parts)


def grids_section(grids: dict[str, str]) -> str:
    return "## Before / after (final policy)\n\n" + "\n\n".join(f"### {t}\n\n![{t}]({p})" for t, p in grids.items())
