"""Training objectives on packed tokens: flow matching (stage 0, and the RL anchor). RL losses: fluxir.rl."""
from __future__ import annotations

import torch

from fluxir import flow
from fluxir.codec import image_ids, pack
from fluxir.policy import Prediction

LOG_MSE_EPS = 1e-6  # in [-1, 1] units: a 66 dB PSNR floor, far below anything reached


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over all non-batch dims. (B,)"""
    return (a - b).pow(2).flatten(1).mean(1)


def per_sample_regression(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """`mse`: per-sample MSE; `log_mse`: its log, i.e. −PSNR up to constants. (B,)

    log-MSE weighs each sample by its own error, so mild tasks (sr, deblur) are not drowned by
    large-error ones (lowlight, underwater) (docs/ARCHITECTURE.md, "The flow").
    """
    mse = per_sample_mse(pred.float(), target.float())
    if kind == "mse":
        return mse
    if kind == "log_mse":
        return torch.log(mse + LOG_MSE_EPS)
    raise ValueError(f"unknown loss {kind!r}; known: mse, log_mse")


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Batch mean of `per_sample_regression`."""
    return per_sample_regression(pred, target, kind).mean()


def flow_matching_reading(pred: Prediction, x0: torch.Tensor, x1: torch.Tensor,
                          parametrization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, target) a flow-matching loss compares: (x0̂, x0) for x0 readings, (v, x1 − x0) for velocity."""
    if parametrization != "velocity":
        return pred.x0_hat, x0
    return pred.velocity, x1 - x0


def flow_matching_per_sample(pred: Prediction, x0: torch.Tensor, x1: torch.Tensor, parametrization: str,
                             kind: str) -> torch.Tensor:
    """Regress the network's reading onto its target (`flow_matching_reading`). (B,)"""
    return per_sample_regression(*flow_matching_reading(pred, x0, x1, parametrization), kind)


def flow_matching_loss(pred: Prediction, x0: torch.Tensor, x1: torch.Tensor, parametrization: str,
                       kind: str) -> torch.Tensor:
    return flow_matching_per_sample(pred, x0, x1, parametrization, kind).mean()


def psnr_from_mse(mse: torch.Tensor, value_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of an MSE measured on a signal spanning `value_range` (2 for [-1, 1])."""
    return 10 * torch.log10(value_range ** 2 / mse.clamp_min(1e-12))


def sample_times(batch: int, t_start: float, at_start_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Training times: a share at t_start (the state a 1-NFE sampler sees), the rest uniform in (0, t_start]."""
    u = torch.rand(batch, generator=generator)
    at_start = torch.rand(batch, generator=generator) < at_start_fraction
    t = t_start * (1 - u * (1 - 1e-3))
    return torch.where(at_start, torch.full_like(t, t_start), t)


def flow_matching_prediction(model, codec, cfg, batch: dict):
    """The policy's prediction at x_t on the path from GT to the source: (pred, x0, x1) in tokens.

    batch: lq, gt (B, 3, H, W) images, task (B,), t (B,) times, noise (B, C, h, w) latent-shaped ε.
    """
    return flow_matching_from_latents(model, cfg, codec.encode(batch["gt"]), codec.encode(batch["lq"]), batch)


def flow_matching_from_latents(model, cfg, z_gt: torch.Tensor, z_lq: torch.Tensor, batch: dict):
    """`flow_matching_prediction` from latents the caller encoded once: z_gt, z_lq (B, C, h, w); batch
    gives task, t and noise."""
    h, w = z_gt.shape[-2:]
    x0, lq = pack(z_gt), pack(z_lq)
    x1 = flow.source_mean(lq, cfg.flow.source) + flow.source_sigma(cfg.flow) * pack(batch["noise"])
    x_t = flow.interpolate(x0, x1, batch["t"])
    return model(x_t, lq, batch["t"], batch["task"], image_ids(h, w, device=x0.device)), x0, x1
