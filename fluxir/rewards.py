"""Plug-in reward terms (`rl.reward.terms`): the user's own scorers beside PSNR, SSIM and LPIPS.

A term is a function named "package.module:function" that maps a batch (restored, lq, gt: (B, 3, H, W)
in [0, 1] on the scorer's device; task: (B,) ids) to B scores, higher is better. The reward workers
import the terms (inside their own `rl.reward_runtime_env`), and a term that raises, returns a wrong
shape or non-finite scores does not stop the run: the rows it failed on get a NaN reward, which skips
their inputs in the learner batch, and the row records which term failed (`failed_term`) so the
iteration counts skips per term.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


class RewardTermError(ValueError):
    """A plug-in reward term cannot be imported; the message names the term and its function."""


def load_function(name: str, spec: str) -> Callable:
    """The callable "package.module:function" of term `name`."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardTermError(f"rl.reward.terms.{name}: cannot load {spec} ({type(err).__name__}: {err}); "
                              f"is its package in rl.reward_runtime_env (pip or py_modules)?") from err
    if not callable(fn):
        raise RewardTermError(f"rl.reward.terms.{name}: {spec} is not callable")
    return fn


@dataclass
class Term:
    name: str
    function: Callable
    weight: float


def load_terms(weights) -> list[Term]:
    """The plug-in terms of a `RewardConfig`, imported, in their configured order."""
    return [Term(name, load_function(name, t.function), t.weight) for name, t in weights.terms.items()]


def term_scores(term: Term, restored, lq, gt, task) -> tuple[torch.Tensor, str | None]:
    """(B,) float32 scores of one term on the CPU, NaN where it failed, and why it failed (None if it did not)."""
    n = len(restored)
    try:
        out = torch.as_tensor(term.function(restored, lq, gt, task)).detach().to("cpu", torch.float32)
    except Exception as err:  # a user's scorer: any failure is reported, its rows skipped
        return torch.full((n,), float("nan")), f"raised {type(err).__name__}: {err}"
    if out.shape != (n,):
        return torch.full((n,), float("nan")), f"returned shape {tuple(out.shape)}, expected ({n},)"
    bad = ~torch.isfinite(out)
    return out.masked_fill(bad, float("nan")), (f"returned {int(bad.sum())} non-finite score(s)" if bad.any() else None)


def add_terms(reward: torch.Tensor, terms: list[Term], restored, lq, gt, task) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward + Σ weight·score, failed_term (B,) int64: 1 + index of the first term that failed on the row,
    0 where none did). A failure is logged once per call, naming the term."""
    failed = torch.zeros(len(reward), dtype=torch.long)
    for index, term in enumerate(terms):
        scores, why = term_scores(term, restored, lq, gt, task)
        if why is not None:
            log.warning("reward term %r %s; %d row(s) skipped", term.name, why, int(scores.isnan().sum()))
        failed = torch.where((failed == 0) & scores.isnan(), index + 1, failed)
        reward = reward + term.weight * scores.to(reward.device)
    return reward, failed


def failures_by_term(failed: torch.Tensor, names: list[str]) -> dict[str, int]:
    """Rows each term failed on, keyed `reward_failed/<term>` (terms with none left out)."""
    counts = torch.bincount(failed.long(), minlength=len(names) + 1)[1:]
    return {f"reward_failed/{name}": int(c) for name, c in zip(names, counts.tolist()) if c}
