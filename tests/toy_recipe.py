"""A toy Recipe for the Ray Train tests: a tiny MLP regressing y = W x on data drawn from (step, rank).

Lives in its own module so that Ray workers can import it as ``tests.toy_recipe:ToyRegression``.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
EVAL_FILE = "eval.json"


class ToyRegression:
    """Config keys: seed, dim, hidden, batch_size, nan_at_step (optional), nan_rank (optional)."""

    def __init__(self, config: dict):
        self.config = config
        self.seed = int(config.get("seed", 0))
        self.dim = int(config.get("dim", 8))
        self.hidden = int(config.get("hidden", 32))
        self.batch_size = int(config.get("batch_size", 32))
        target = torch.Generator().manual_seed(self.seed + 1)
        self.weight = torch.randn(self.dim, self.dim, generator=target) / self.dim**0.5

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return torch.nn.Sequential(
            torch.nn.Linear(self.dim, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, self.dim)
        )

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def batch(self, step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        cursor = torch.Generator().manual_seed(self.seed * 1_000_003 + step * world_size + rank)
        x = torch.randn(self.batch_size, self.dim, generator=cursor)
        return {"x": x, "y": x @ self.weight.T, "step": torch.tensor(step), "rank": torch.tensor(rank)}

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if int(batch["step"]) == self.config.get("nan_at_step") and int(batch["rank"]) == self.config.get("nan_rank", 0):
            loss = loss * float("nan")
        return loss, {"mse": loss.item(), "batch_step": float(batch["step"])}

    def eval_loss(self, model) -> float:
        batch = self.batch(step=10**6, rank=0, world_size=1)  # held out: training never reaches it
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]).item()

    def save_model(self, model, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS))
        with open(os.path.join(directory, EVAL_FILE), "w") as f:
            json.dump({"eval_loss": self.eval_loss(model)}, f)

    def load_model(self, directory: str) -> torch.nn.Module:
        model = self.build_model()
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS)))
        return model
