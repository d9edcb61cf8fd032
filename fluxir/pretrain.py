"""Stage 0 (docs/ARCHITECTURE.md, "Stage 0"): supervised flow matching on (LQ, GT, task) pairs, as a `Recipe`.

The Ray layer (actors/train.py) runs this recipe in Ray Train workers with a DeepSpeed engine.
"""
from __future__ import annotations

import torch

from fluxir.codec import build_codec, token_channels
from fluxir.config import Config, config_from_dict
from fluxir.data import train_stream
from fluxir.objectives import (flow_matching_loss, flow_matching_prediction, per_sample_mse, psnr_from_mse,
                               sample_times)
from fluxir.policy import build_policy, save_policy
from fluxir.seeds import Salt, mix_seed


def per_rank_batch(cfg: Config) -> int:
    """Each worker's share of the global batch `data.batch_size` (the config checks that it divides)."""
    return cfg.data.batch_size // cfg.pretrain.num_workers


class FlowMatchingRecipe:
    """Builds the policy, yields deterministic batches (the cursor is the step), computes the loss."""

    def __init__(self, config: dict | Config):
        self.cfg = config if isinstance(config, Config) else config_from_dict(config)
        self.codec = build_codec(self.cfg)
        self.stream = train_stream(self.cfg, batch_size=per_rank_batch(self.cfg))

    def build_model(self):
        return build_policy(self.cfg, token_channels(self.codec))

    def place(self, device) -> None:
        """Put the codec (FLUX's frozen VAE) on the engine's device in `model.dtype`, as the RL learners do,
        so stage 0 and stage 1 encode their targets alike."""
        from fluxir.accel import place

        place(self.codec, self.cfg.model.dtype, device)

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def batch(self, step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        b = self.stream.batch(step, rank, world_size)
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, step, rank, Salt.PRETRAIN_BATCH))
        n = b["gt"].shape[0]
        b["t"] = sample_times(n, self.cfg.flow.t_start, self.cfg.pretrain.t_start_fraction, gen)
        lat = self.codec.latent_channels
        h, w = b["gt"].shape[-2] // self.codec.downsample, b["gt"].shape[-1] // self.codec.downsample
        b["noise"] = torch.randn(n, lat, h, w, generator=gen)
        return b

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        pred, x0, x1 = flow_matching_prediction(model, self.codec, self.cfg, batch)
        loss = flow_matching_loss(pred, x0, x1, self.cfg.model.parametrization, self.cfg.pretrain.loss)
        with torch.no_grad():
            psnr = psnr_from_mse(per_sample_mse(pred.x0_hat, x0)).mean().item()
        return loss, {"x0_psnr": psnr}

    def save_model(self, model, directory: str) -> None:
        save_policy(model, directory, self.cfg, extra={"stage": "pretrain"})
