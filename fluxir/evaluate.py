"""Scoring on the frozen test set: per task, the untouched LQ input and the policy at each NFE."""
from __future__ import annotations

import logging
import time

import torch

from fluxir.degradations import TASKS
from fluxir.flow import make_schedule
from fluxir.metrics import LPIPSUnavailable, MetricConvention, compute_metrics, load_lpips
from fluxir.sampling import restore_tiled

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


def score(pred, gt, convention, lpips_net) -> dict[str, float]:
    m = compute_metrics(pred, gt, convention, lpips=lpips_net)
    return {k: float(v.double().mean()) for k, v in m.items()}


def restore_set(policy, codec, lq, task_name, cfg, nfe: int, seed: int) -> torch.Tensor:
    schedule = make_schedule(cfg.eval.schedule, nfe, cfg.flow.t_start, cfg.eval.shift)
    task = torch.full((lq.shape[0],), TASKS.index(task_name), dtype=torch.long)
    tile = cfg.eval.tile or cfg.data.crop
    outs = [restore_tiled(policy, codec, lq[i:i + cfg.eval.batch_size], task[i:i + cfg.eval.batch_size],
                          schedule, cfg.flow, tile=tile, overlap=cfg.eval.overlap, seed=seed + i)
            for i in range(0, lq.shape[0], cfg.eval.batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def evaluate(policy, codec, testset: dict, cfg, nfes: list[int] | None = None, lpips_net=None,
             keep_images: bool = False, progress=None) -> dict:
    """Returns {"convention": str, "tasks": {task: {"lq": metrics, "nfe": {n: metrics}}}, "seconds": ...}.

    testset: {task: {"lq": (N, 3, H, W), "gt": (N, 3, H, W), "names": [...]}} in [0, 1].
    """
    policy.eval()
    convention = MetricConvention(crop_border=cfg.eval.crop_border, test_y_channel=cfg.eval.test_y_channel)
    nfes = nfes or cfg.eval.nfe
    result = {"convention": convention.describe(), "nfe": list(nfes), "tasks": {}, "images": {}}
    start = time.perf_counter()
    for task_name, pairs in testset.items():
        lq, gt = pairs["lq"], pairs["gt"]
        entry = {"lq": score(lq, gt, convention, lpips_net), "nfe": {}, "count": int(lq.shape[0])}
        for n in nfes:
            t0 = time.perf_counter()
            out = restore_set(policy, codec, lq, task_name, cfg, n, seed=cfg.seed)
            entry["nfe"][n] = score(out, gt, convention, lpips_net)
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
