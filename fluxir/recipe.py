"""The contract between a training stage's pure-torch code and the Ray layer that runs it.

A recipe is named by ``"module:ClassName"`` and built in each worker from ``(path, config)``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Recipe(Protocol):
    """A training stage's pure-torch pieces; the Ray layer only runs them.

    The class is constructed as ``RecipeClass(config: dict)`` inside every worker, so only the
    import path and a plain config dict ever cross process boundaries. Implementations must be
    deterministic: ``build_model`` gives the same init on every rank for a given config seed, and
    ``batch`` is a pure function of ``(step, rank, world_size)`` -- the step *is* the data cursor,
    which is what makes resuming from a checkpoint exact.
    """

    def build_model(self) -> torch.nn.Module: ...  # fresh model (same init on every rank given the config's seed)

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]: ...

    def batch(self, step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]: ...  # deterministic in (step, rank, world_size): the data cursor is the step

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...  # scalar loss, logged scalars

    def save_model(self, model, directory: str) -> None: ...  # final weights for later stages (safetensors)

    # Optional: ``place(device)`` moves the recipe's own modules (e.g. a frozen VAE codec) to the
    # device DeepSpeed put the engine on; batches are moved by the Ray layer.


def load_recipe(recipe_path: str, config: dict[str, Any]) -> Recipe:
    """Build the recipe named ``"package.module:ClassName"`` from its config."""
    module_name, sep, attr = recipe_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"recipe path must look like 'module:ClassName', got {recipe_path!r}")
    recipe_cls = getattr(importlib.import_module(module_name), attr)
    return recipe_cls(config)
