"""An exponential moving average of a model's trainable weights (stage 0's evaluated and exported weights)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """θ̄ ← d·θ̄ + (1 − d)·θ after each optimizer step, with d = min(decay, (1 + n)/(10 + n)) at update n,
    so early updates (random init) are forgotten quickly. Shadows are fp32 copies on the weights' device.
    """

    def __init__(self, named_parameters, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in named_parameters if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": {n: v.cpu() for n, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the model's trainable weights "
                             f"({sorted(set(state['shadow']) ^ set(self.shadow))[:5]})")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Within the block the model holds the averaged weights; its own come back afterwards."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(saved[name])
