"""Scoring on the frozen test set: per task, the untouched LQ input and the policy at each NFE."""
from __future__ import annotations

import logging
import time

import torch

from fluxir.degradations import TASKS
from fluxir.flow import make_schedule
from fluxir.metrics import LPIPSUnavailable, MetricConvention, compute_metrics, load_lpips
from fluxir.sampling import pad_to_multiple, restore_tiled

log = logging.getLogger(__name__)


def lpips_or_reason(enabled: bool):
    """The LPIPS network, or (None, why it is unavailable) — never random weights."""
    if not enabled:
        return None, "disabled in config"
    try:
        return load_lpips(), ""
    except LPIPSUnavailable as err:
        log.warning("LPIPS unavailable: %s", err)
        return None, str(err)


def score(pred, gt, convention, lpips_net, per_image: bool = False) -> dict:
    """Mean of each metric over the batch; with `per_image` also {"per_image": {metric: [value per image]}}
    (what paired comparisons and bootstrap intervals need)."""
    m = compute_metrics(pred, gt, convention, lpips=lpips_net)
    out = {k: float(v.double().mean()) for k, v in m.items()}
    if per_image:
        out["per_image"] = {k: [float(x) for x in v.double().flatten()] for k, v in m.items()}
    return out


def eval_schedule(cfg, nfe: int) -> list[float]:
    """The configured evaluation schedule (`eval.schedule`) with `nfe` steps."""
    return make_schedule(cfg.eval.schedule, nfe, cfg.flow.t_start, cfg.eval.shift)


def eval_tiling(cfg) -> dict:
    """The tile size and overlap that evaluation restores images larger than one tile with."""
    return {"tile": cfg.eval.tile or cfg.data.crop, "overlap": cfg.eval.overlap}


FAST_MAX_OVERLAP = 1 / 8  # of a tile: the ratio of configs/flux-dev-7task.yaml (512 px tiles, 64 px overlap)


def fast_tiling(cfg, codec) -> dict:
    """`fluxir restore --fast`: the evaluation's tile with the overlap cut to at most FAST_MAX_OVERLAP of
    it, keeping its remainder modulo 2·downsample, so that tiles stay on the latent grid and the stride
    keeps its parity (odd for the tiny default: neighbouring tiles' 2×2 token grids interleave in the
    overlap). The evaluation's larger overlap covers every pixel with several tiles, an ensemble worth
    0.15 dB on whole validation photos for 3.6 times the tiles (docs/BENCHMARKS.md, "Speed")."""
    t = eval_tiling(cfg)
    cap, step = int(t["tile"] * FAST_MAX_OVERLAP), 2 * codec.downsample
    rest = t["overlap"] % step
    overlap = rest if cap < rest else rest + (cap - rest) // step * step
    return {"tile": t["tile"], "overlap": min(t["overlap"], overlap)}


def restore_set(policy, codec, lq, task_name, cfg, schedule: list[float], seed: int) -> torch.Tensor:
    task = torch.full((lq.shape[0],), TASKS.index(task_name), dtype=torch.long)
    outs = [restore_tiled(policy, codec, lq[i:i + cfg.eval.batch_size], task[i:i + cfg.eval.batch_size],
                          schedule, cfg.flow, **eval_tiling(cfg), seed=seed + i)
            for i in range(0, lq.shape[0], cfg.eval.batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def restore_image(policy, codec, image: torch.Tensor, task_name: str, cfg, schedule: list[float],
                  progress=None, tiling: dict | None = None) -> torch.Tensor:
    """One image (3, H, W) in [0, 1] of any size: reflect-padded to the codec's multiple, restored (tiled
    beyond the tile size, with `tiling` or by default the evaluation's, so that the figures measured on the
    test set describe it) with seed `cfg.seed`, cropped back.
    `progress(done, total)` is called with the tiles restored so far."""
    padded, (h, w) = pad_to_multiple(image[None], max(4, 2 * codec.downsample))
    task = torch.tensor([TASKS.index(task_name)])
    return restore_tiled(policy, codec, padded, task, schedule, cfg.flow, **(tiling or eval_tiling(cfg)),
                         seed=cfg.seed, progress=progress)[0, :, :h, :w]


@torch.no_grad()
def evaluate(policy, codec, testset: dict, cfg, nfes: list[int] | None = None, lpips_net=None,
             keep_images: bool = False, progress=None, schedules: dict[int, list[float]] | None = None) -> dict:
    """Returns {"convention": str, "tasks": {task: {"lq": metrics, "nfe": {n: metrics}}}, "seconds": ...}.

    testset: {task: {"lq": (N, 3, H, W), "gt": (N, 3, H, W), "names": [...]}} in [0, 1].
    `schedules` ({nfe: times}) replaces the configured schedule kind (searched or learned schedules).
    """
    policy.eval()
    convention = MetricConvention(crop_border=cfg.eval.crop_border, test_y_channel=cfg.eval.test_y_channel)
    nfes = list(schedules) if schedules else (nfes or cfg.eval.nfe)
    schedules = schedules or {n: eval_schedule(cfg, n) for n in nfes}
    result = {"convention": convention.describe(), "nfe": list(nfes), "tasks": {}, "images": {},
              "schedules": {n: schedules[n] for n in nfes}}
    start = time.perf_counter()
    for task_name, pairs in testset.items():
        lq, gt = pairs["lq"], pairs["gt"]
        entry = {"lq": score(lq, gt, convention, lpips_net, per_image=True), "nfe": {}, "count": int(lq.shape[0])}
        for n in nfes:
            t0 = time.perf_counter()
            out = restore_set(policy, codec, lq, task_name, cfg, schedules[n], seed=cfg.seed)
            entry["nfe"][n] = score(out, gt, convention, lpips_net, per_image=True)
            entry["nfe"][n]["sec_per_image"] = (time.perf_counter() - t0) / lq.shape[0]
            if keep_images:
                result["images"].setdefault(task_name, {})[n] = out
            if progress:
                progress(task_name, n)
        result["tasks"][task_name] = entry
    result["seconds"] = time.perf_counter() - start
    return result


def mean_over_tasks(result: dict, metric: str, nfe: int | None) -> float:
    """The unweighted mean over tasks of a metric, at an NFE (None: the LQ input)."""
    vals = [e["lq"][metric] if nfe is None else e["nfe"][nfe][metric] for e in result["tasks"].values()]
    return sum(vals) / len(vals)


def merge_evals(*results: dict) -> dict:
    """One result holding the NFEs of several `evaluate` results of the same policy and test set
    (a later result's NFE replaces an earlier one's)."""
    merged = {"convention": results[0]["convention"], "nfe": [], "tasks": {}, "images": {}, "schedules": {},
              "seconds": 0.0}
    for res in results:
        merged["nfe"] = sorted(set(merged["nfe"]) | set(res["nfe"]))
        merged["schedules"].update({n: res["schedules"][n] for n in res["nfe"]})
        merged["seconds"] += res.get("seconds", 0.0)
        for task, entry in res["tasks"].items():
            into = merged["tasks"].setdefault(task, {"lq": entry["lq"], "nfe": {}, "count": entry["count"]})
            into["nfe"].update({n: entry["nfe"][n] for n in res["nfe"]})
    return merged


def select_nfes(result: dict, nfes: list[int]) -> dict:
    """The part of an `evaluate` result at `nfes` (each must be present)."""
    missing = [n for n in nfes if n not in result["nfe"]]
    if missing:
        raise KeyError(f"NFE {missing} not in this evaluation (has {result['nfe']})")
    return {"convention": result["convention"], "nfe": list(nfes), "images": {}, "seconds": 0.0,
            "schedules": {n: result["schedules"][n] for n in nfes},
            "tasks": {t: {"lq": e["lq"], "count": e["count"], "nfe": {n: e["nfe"][n] for n in nfes}}
                      for t, e in result["tasks"].items()}}


def evaluate_folder(cfg, policy_dir, nfes: list[int] | None = None, keep_images: bool = False,
                    schedules: dict[int, list[float]] | None = None, split: str = "test",
                    show_progress: bool = True) -> tuple[dict, dict]:
    """(result, evaluation set): the trained policy in `policy_dir` on `split` ("test": the frozen test set;
    "val", "heldout": see `fluxir.data.evaluation_set`), with LPIPS when enabled and available."""
    import sys

    from tqdm import tqdm

    from fluxir.data import evaluation_set
    from fluxir.policy import load_trained

    policy, codec = load_trained(policy_dir, cfg, place_on_device=True)
    testset = evaluation_set(cfg, split)
    lpips_net, reason = lpips_or_reason(cfg.eval.lpips)
    nfes = list(schedules) if schedules else (nfes or cfg.eval.nfe)
    with tqdm(total=len(testset) * len(nfes), desc="eval", unit="task·nfe", file=sys.stdout,
              disable=not show_progress) as bar:
        result = evaluate(policy, codec, testset, cfg, nfes, lpips_net, keep_images=keep_images,
                          progress=lambda *_: bar.update(), schedules=schedules)
    result["lpips_reason"] = reason
    return result, testset


def evaluate_reusing(cfg, policy_dir, schedules: dict[int, list[float]], known: dict | None) -> dict:
    """`policy_dir` on the test set at `schedules` ({nfe: times}); the NFEs that `known` (an evaluation of
    the same policy) already has on the same times are taken from it, not evaluated again."""
    have = [n for n, times in schedules.items() if known and n in known["nfe"] and known["schedules"][n] == times]
    todo = {n: times for n, times in schedules.items() if n not in have}
    parts = [select_nfes(known, have)] if have else []
    if todo:
        parts.append(evaluate_folder(cfg, policy_dir, schedules=todo)[0])
    return merge_evals(*parts)
