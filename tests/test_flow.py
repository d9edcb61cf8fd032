"""Flow: path identities, ODE vs stochastic step, exact log-probability, marginal preservation, schedules."""
import math

import pytest
import torch

from fluxir import flow


def _path(seed=0, shape=(4, 16, 12), sigma=0.3, lq_mean=True):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    mu = torch.rand(shape, generator=g) * 2 - 1 if lq_mean else torch.zeros(shape)
    eps = torch.randn(shape, generator=g)
    return x0, mu, eps, mu + sigma * eps


def test_x0_and_x1_hat_recover_the_endpoints():
    x0, _, _, x1 = _path()
    for t in (0.1, 0.5, 0.9):
        xt = flow.interpolate(x0, x1, t)
        v = flow.velocity_target(x0, x1)
        torch.testing.assert_close(flow.x0_hat(xt, v, t), x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(flow.x1_hat(xt, v, t), x1, rtol=0, atol=1e-6)
        torch.testing.assert_close(flow.velocity_from_x0(xt, x0, t), v, rtol=0, atol=1e-5)


def test_per_sample_times_broadcast():
    x0, _, _, x1 = _path()
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    xt = flow.interpolate(x0, x1, t)
    for i in range(4):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * x1[i])


def test_rho_zero_is_the_ode_step():
    x0, mu, _, x1 = _path()
    xt = flow.interpolate(x0, x1, 0.7)
    v = torch.randn_like(xt)  # any velocity, not only the true one
    x_s, lp = flow.stochastic_step(xt, v, 0.7, 0.4, mu, 0.3, rho=0.0)
    torch.testing.assert_close(x_s, flow.ode_step(xt, v, 0.7, 0.4), rtol=0, atol=1e-6)
    assert torch.all(lp == 0)


def test_log_prob_matches_torch_normal():
    x0, mu, _, x1 = _path()
    xt = flow.interpolate(x0, x1, 0.8)
    v = torch.randn_like(xt)
    g = torch.Generator().manual_seed(3)
    x_s, lp = flow.stochastic_step(xt, v, 0.8, 0.5, mu, 0.3, rho=0.6, generator=g)
    mean, std = flow.stochastic_step_moments(xt, v, 0.8, 0.5, mu, 0.3, 0.6)
    assert std == pytest.approx(0.5 * 0.3 * 0.6)
    ref = torch.distributions.Normal(mean, torch.full_like(mean, std)).log_prob(x_s).flatten(1).mean(1)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)


def test_log_ratio_is_per_dimension_and_does_not_grow_with_the_crop():
    """Moving every dimension's mean by the same δ moves log r by the same amount at any crop size."""
    std, delta = 0.025, 2e-3
    shifts = []
    for n in (16, 3072):
        x = torch.zeros(1, n)
        shifts.append(float(flow.gaussian_log_prob(x, x + delta, std) - flow.gaussian_log_prob(x, x, std)))
    assert shifts[0] == pytest.approx(shifts[1], rel=1e-4)
    assert shifts[1] == pytest.approx(-delta ** 2 / (2 * std ** 2), rel=1e-4)  # −0.0032: inside any PPO clip


@pytest.mark.parametrize("rho", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("lq_mean", [True, False])
def test_stochastic_step_preserves_the_path_marginal(rho, lq_mean):
    """With the exact velocity of a known x0, x_s must be distributed as (1−s)x0 + s(μ + σ·N(0, I))."""
    sigma, t, s = 0.3, 0.8, 0.35
    x0, mu, eps, x1 = _path(seed=1, shape=(8, 64, 64), sigma=sigma, lq_mean=lq_mean)
    xt = flow.interpolate(x0, x1, t)
    v = flow.velocity_from_x0(xt, x0, t)  # perfect model
    g = torch.Generator().manual_seed(5)
    x_s, _ = flow.stochastic_step(xt, v, t, s, mu, sigma, rho, generator=g)
    z = (x_s - (1 - s) * x0 - s * mu) / (s * sigma)  # must be N(0, 1), correlated √(1−ρ²) with ε
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 0.01
    corr = (z * eps).mean().item()
    assert corr == pytest.approx(math.sqrt(1 - rho ** 2), abs=0.01)


def test_ode_step_with_true_velocity_stays_on_the_path():
    x0, _, _, x1 = _path()
    xt = flow.interpolate(x0, x1, 0.9)
    x_s = flow.ode_step(xt, flow.velocity_target(x0, x1), 0.9, 0.3)
    torch.testing.assert_close(x_s, flow.interpolate(x0, x1, 0.3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "shifted"])
@pytest.mark.parametrize("nfe", [1, 2, 4, 10])
@pytest.mark.parametrize("t_start", [1.0, 0.6])
def test_schedule_contract(kind, nfe, t_start):
    sched = flow.make_schedule(kind, nfe, t_start, shift=3.0)
    assert len(sched) == nfe + 1 and sched[0] == pytest.approx(t_start) and sched[-1] == 0.0
    assert flow.check_schedule(sched) == sched


def test_uniform_and_shifted_values():
    assert flow.uniform_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    sched = flow.shifted_schedule(2, 1.0, shift=3.0)
    assert sched[1] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # 0.75: a shift > 1 spends steps near t = 1
    assert flow.flux_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.flux_shift(4096) == pytest.approx(math.exp(1.15))


def test_bad_schedules_are_refused():
    for bad in ([1.0], [1.0, 0.5], [0.5, 0.7, 0.0], [1.2, 0.0]):
        with pytest.raises(ValueError, match="schedule"):
            flow.check_schedule(bad)
    with pytest.raises(ValueError, match="unknown schedule"):
        flow.make_schedule("cosine", 4)
