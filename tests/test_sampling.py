"""Samplers: schedule handling, stochastic steps and their log-probs, tiled restore that blends exactly."""
import pytest
import torch

from fluxir import flow
from fluxir.codec import PixelCodec, image_ids, pack
from fluxir.config import load_config
from fluxir.policy import build_policy
from fluxir.sampling import pad_to_multiple, restore, restore_tiled, sample_trajectory


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["model.parametrization=velocity", "model.num_layers=1", "model.num_single_layers=1"])


@pytest.fixture(scope="module")
def policy(cfg):
    return build_policy(cfg, 12).eval()


def _lq(b=2, hw=8):
    return pack(torch.rand(b, 3, hw, hw, generator=torch.Generator().manual_seed(0)) * 2 - 1)


@pytest.mark.parametrize("nfe", [1, 3])
def test_ode_trajectory_matches_a_hand_written_euler_loop(cfg, policy, nfe):
    lq, task, ids = _lq(), torch.tensor([1, 2]), image_ids(8, 8)
    sched = flow.uniform_schedule(nfe)
    x_start = lq + 0.1 * torch.randn(lq.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traj = sample_trajectory(policy, lq, task, ids, sched, cfg.flow, x_start=x_start)
        x = x_start
        for t, s in zip(sched, sched[1:]):
            v = policy(x, lq, torch.full((2,), t), task, ids).velocity
            x = x + (s - t) * v
    assert len(traj.states) == nfe + 1 and all(torch.all(lp == 0) for lp in traj.log_probs)
    torch.testing.assert_close(traj.final, x, rtol=1e-5, atol=1e-5)


def test_stochastic_steps_only_where_asked(cfg, policy):
    lq, task, ids = _lq(), torch.tensor([0, 0]), image_ids(8, 8)
    sched = flow.uniform_schedule(4)
    with torch.no_grad():
        a = sample_trajectory(policy, lq, task, ids, sched, cfg.flow, rho=0.7, stochastic_steps={1, 2},
                              generator=torch.Generator().manual_seed(3))
        b = sample_trajectory(policy, lq, task, ids, sched, cfg.flow, rho=0.7, stochastic_steps={1, 2},
                              generator=torch.Generator().manual_seed(3))
        ode = sample_trajectory(policy, lq, task, ids, sched, cfg.flow, generator=torch.Generator().manual_seed(3))
    assert [bool(torch.any(lp != 0)) for lp in a.log_probs] == [False, True, True, False]
    assert torch.equal(a.final, b.final)  # seeded: reproducible
    torch.testing.assert_close(a.states[1], ode.states[1])  # before the first stochastic step: identical
    assert not torch.allclose(a.final, ode.final)


def test_fresh_x0_residual_policy_restores_to_the_lq_at_any_size():
    """A zero-initialised x0-residual policy returns its input, so tiling + blending must give it back exactly."""
    cfg = load_config(None, ["model.num_layers=1", "model.num_single_layers=1"])
    policy = build_policy(cfg, 12).eval()
    lq = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    task = torch.tensor([0, 5])
    for nfe, overlap in ((1, 4), (3, 4), (1, 9)):  # an odd stride interleaves the tiles' token grids
        sched = flow.uniform_schedule(nfe)
        out = restore_tiled(policy, PixelCodec(), lq, task, sched, cfg.flow, tile=16, overlap=overlap)
        torch.testing.assert_close(out, lq, rtol=0, atol=1e-6)
    torch.testing.assert_close(restore(policy, PixelCodec(), lq[:, :, :16, :16], task, sched, cfg.flow),
                               lq[:, :, :16, :16], rtol=0, atol=1e-6)


def test_tiles_cover_and_weights_blend(cfg, policy):
    lq = torch.rand(1, 3, 24, 24)
    with pytest.raises(ValueError, match="smaller than the tile"):
        restore_tiled(policy, PixelCodec(), torch.rand(1, 3, 8, 40), torch.tensor([0]), [1.0, 0.0], cfg.flow,
                      tile=16, overlap=4)
    with pytest.raises(ValueError, match="overlap"):
        restore_tiled(policy, PixelCodec(), lq, torch.tensor([0]), [1.0, 0.0], cfg.flow, tile=16, overlap=16)
    out = restore_tiled(policy, PixelCodec(), lq, torch.tensor([0]), [1.0, 0.0], cfg.flow, tile=16, overlap=4)
    assert out.shape == lq.shape and torch.isfinite(out).all()


def test_pad_to_multiple():
    x = torch.rand(1, 3, 37, 45)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape[-2:] == (40, 48) and size == (37, 45)
    assert torch.equal(padded[..., :37, :45], x)
