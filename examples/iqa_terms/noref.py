"""A no-reference reward term for `rl.reward.terms`: needs no weights and never looks at GT.

    rl:
      reward:
        terms: {detail: {function: "iqa_terms.noref:detail", weight: 0.5}}

The reward workers must be able to import `iqa_terms`: on a cluster, ship the folder with the job
(`ray job submit --runtime-env-json '{"py_modules": ["examples/iqa_terms"]}' ...`); on one machine,
`rl.reward_runtime_env: {env_vars: {PYTHONPATH: /abs/path/to/examples}}` gives it to the reward workers alone.

`detail` scores how much edge energy a restoration recovers over its degraded input, net of the noise it
leaves: log(E(restored) / E(lq)) − noise_weight · σ̂(restored), where E is the mean squared Sobel gradient of
the luma and σ̂ Immerkær's fast noise estimate (a Laplacian-difference mask, robust to edges).
Higher is better. It is an example of the plug-in contract, not a tuned reward: alone it can be gamed
by ringing, so weigh it beside a full-reference term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W)."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def edge_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared Sobel gradient magnitude of the luma, per image. (B,)"""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype,
                      device=images.device)
    kernels = torch.stack([kx, kx.T])[:, None] / 8
    grad = F.conv2d(luma(images), kernels)
    return grad.pow(2).sum(1).flatten(1).mean(1)


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Immerkær's estimate of additive Gaussian noise σ of the luma, per image (in [0, 1] units). (B,)"""
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=images.dtype,
                        device=images.device)
    response = F.conv2d(luma(images), mask[None, None]).abs().flatten(1)
    return math.sqrt(math.pi / 2) * response.mean(1) / 6


def detail(restored: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor, task: torch.Tensor,
           noise_weight: float = 20.0) -> torch.Tensor:
    """log(edge energy of restored / of lq) − noise_weight · σ̂(restored). (B,); `gt` and `task` are unused."""
    eps = 1e-8
    gain = torch.log((edge_energy(restored.float()) + eps) / (edge_energy(lq.float()) + eps))
    return gain - noise_weight * noise_sigma(restored.float())
