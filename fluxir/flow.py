"""Rectified flow: the path, Euler ODE step, modulated stochastic step, schedules.

Time runs from t = 1 (source x1) to t = 0 (clean x0): x_t = (1−t)·x0 + t·x1, velocity v = x1 − x0.
Tensors are token batches (B, N, C) or images (B, C, H, W); `t` is a float or a (B,) tensor.
"""
from __future__ import annotations

import math

import torch


def _bcast(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1−t)·x0 + t·x1."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def x0_hat(x_t: torch.Tensor, velocity: torch.Tensor, t) -> torch.Tensor:
    """Clean estimate x0̂ = x_t − t·v."""
    return x_t - _bcast(t, x_t) * velocity


def x1_hat(x_t: torch.Tensor, velocity: torch.Tensor, t) -> torch.Tensor:
    """Source estimate x1̂ = x_t + (1−t)·v."""
    return x_t + (1 - _bcast(t, x_t)) * velocity


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """The velocity whose clean estimate at (x_t, t) is x0: v = (x_t − x0)/t (t > 0)."""
    return (x_t - x0) / _bcast(t, x_t)


def precondition(t, sigma_src: float, sigma_data: float):
    """EDM-style coefficients (c_skip, c_out) of the x0_precond reading x0̂ = LQ + c_skip·y + c_out·F.

    y = x_t − E[x_t | LQ] = (1−t)·(x0 − LQ) + t·σ_src·ε, with x0 − LQ of per-pixel spread σ_data:
    c_skip = (1−t)·σ_data² / D is the least-squares estimate of x0 − LQ from y, and c_out = t·σ_src / √D
    (D = (1−t)²σ_data² + t²σ_src²) scales F to that estimate's error, normalised so that c_out(1) = 1 and
    c_skip(1) = 0: at t = 1 the reading is the plain x0 residual; at t = 0 it returns x_t.
    """
    t = torch.as_tensor(t)
    d = ((1 - t) * sigma_data) ** 2 + (t * sigma_src) ** 2
    return (1 - t) * sigma_data**2 / d, t * sigma_src / d.sqrt()


def ode_step(x_t: torch.Tensor, velocity: torch.Tensor, t, s) -> torch.Tensor:
    """Euler step from t to s < t: x_s = x_t + (s − t)·v."""
    return x_t + (_bcast(s, x_t) - _bcast(t, x_t)) * velocity


def stochastic_step_moments(x_t, velocity, t, s, mu, sigma: float, rho: float):
    """Mean and std of the modulated step t → s.

    Source x1 = μ + σ·ε; ε̂ = (x1̂ − μ)/σ; x_s = (1−s)·x0̂ + s·(μ + σ·(√(1−ρ²)·ε̂ + ρ·z)).
    For ρ ≤ 1 only the noise part of the source is refreshed, so the path's marginal is kept; ρ > 1
    drops ε̂ and adds ρ times the source's noise (wider exploration, off the path's marginal).
    """
    s_b = _bcast(s, x_t)
    eps_hat = (x1_hat(x_t, velocity, t) - mu) / sigma
    keep = math.sqrt(max(0.0, 1 - rho ** 2))
    mean = (1 - s_b) * x0_hat(x_t, velocity, t) + s_b * (mu + sigma * keep * eps_hat)
    std = s_b * sigma * rho
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; mean, std²) per dimension: the mean over all but the batch dim, in fp32. (B,)

    The mean, not the sum: a PPO ratio exp(Δ log p) built from a sum over the thousands of dimensions of
    an image moves by several units when each pixel's mean moves by a fraction of a grey level, so a
    second update on the same rollout would fall almost entirely outside the clip. Per dimension, the
    ratio of a crop does not depend on its size.
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).expand_as(x)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def stochastic_step(x_t, velocity, t, s, mu, sigma: float, rho: float, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None):
    """One modulated step; returns (x_s, log_prob (B,)). ρ = 0 is exactly the ODE step (log_prob 0)."""
    mean, std = stochastic_step_moments(x_t, velocity, t, s, mu, sigma, rho)
    if rho == 0:
        return mean, torch.zeros(x_t.shape[0], device=x_t.device)
    if noise is None:
        # drawn on the generator's device (CPU by default), so a seed gives the same path on any device
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype,
                            device=generator.device if generator is not None else x_t.device)
    x_s = mean + std * noise.to(x_t.device)
    return x_s, gaussian_log_prob(x_s, mean, std)


# --- schedules: strictly decreasing lists from t_start to 0; NFE = len(schedule) − 1 -------------

def uniform_schedule(nfe: int, t_start: float = 1.0) -> list[float]:
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return [t_start * (1 - i / nfe) for i in range(nfe)] + [0.0]


def shift_time(t: float, shift: float) -> float:
    """FLUX/SD3 time shift: t' = shift·t / (1 + (shift − 1)·t); shift > 1 spends more steps near t = 1."""
    return shift * t / (1 + (shift - 1) * t)


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FluxPipeline's resolution-dependent shift exp(μ), μ linear in the token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(image_seq_len * m + base_shift - m * base_seq_len)


def shifted_schedule(nfe: int, t_start: float = 1.0, shift: float = 3.0) -> list[float]:
    return [t_start * shift_time(t, shift) if t > 0 else 0.0 for t in uniform_schedule(nfe, 1.0)]


def check_schedule(schedule: list[float]) -> list[float]:
    """Validate a schedule: at least two times, strictly decreasing, ending at 0, within (0, 1]."""
    if len(schedule) < 2 or schedule[-1] != 0.0 or schedule[0] > 1.0:
        raise ValueError(f"a schedule runs from t_start <= 1 down to 0 with >= 2 entries, got {schedule}")
    if any(a <= b for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"schedule must be strictly decreasing, got {schedule}")
    return [float(t) for t in schedule]


def make_schedule(kind: str, nfe: int, t_start: float = 1.0, shift: float = 3.0) -> list[float]:
    if kind == "uniform":
        return uniform_schedule(nfe, t_start)
    if kind == "shifted":
        return shifted_schedule(nfe, t_start, shift)
    raise ValueError(f"unknown schedule kind {kind!r}; known: uniform, shifted")


def source_mean(lq_tokens: torch.Tensor, source: str) -> torch.Tensor:
    """μ of the source x1 = μ + σ·ε: the LQ latent (`lq`) or zero (`gaussian`)."""
    return lq_tokens if source == "lq" else torch.zeros_like(lq_tokens)


def source_sigma(flow_cfg) -> float:
    """σ of the source x1 = μ + σ·ε: σ_src around the LQ (`lq`) or 1 (`gaussian`)."""
    return flow_cfg.sigma_src if flow_cfg.source == "lq" else 1.0


def initial_state(lq_tokens, flow_cfg, generator=None, eps=None) -> torch.Tensor:
    """x at t_start: μ + σ·ε at t = 1; part-way (t_start < 1, lq source) the LQ stands in for x0.

    `eps` (B, N, C), if given, is ε (e.g. tokens cropped from a noise field tiles share); otherwise ε is
    drawn on the CPU from `generator`.
    """
    mu, sigma = source_mean(lq_tokens, flow_cfg.source), source_sigma(flow_cfg)
    if eps is None:
        eps = torch.randn(lq_tokens.shape, generator=generator, dtype=lq_tokens.dtype)
    return interpolate(mu, mu + sigma * eps.to(lq_tokens.device, lq_tokens.dtype), flow_cfg.t_start)
