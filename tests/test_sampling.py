"""Samplers: schedule handling, stochastic steps and their log-probs, tiled restore that blends exactly."""
import pytest
import torch
import torch.nn.functional as F

from fluxir import flow
from fluxir.codec import PixelCodec, image_ids, pack, unpack
from fluxir.config import load_config
from fluxir.policy import Prediction, build_policy
from fluxir.flow import initial_state
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
    thin = restore_tiled(policy, PixelCodec(), torch.rand(1, 3, 8, 40), torch.tensor([0]), [1.0, 0.0], cfg.flow,
                         tile=16, overlap=4)  # a side shorter than the tile: tiles of that side's length
    assert thin.shape == (1, 3, 8, 40) and torch.isfinite(thin).all()
    with pytest.raises(ValueError, match="overlap"):
        restore_tiled(policy, PixelCodec(), lq, torch.tensor([0]), [1.0, 0.0], cfg.flow, tile=16, overlap=16)
    out = restore_tiled(policy, PixelCodec(), lq, torch.tensor([0]), [1.0, 0.0], cfg.flow, tile=16, overlap=4)
    assert out.shape == lq.shape and torch.isfinite(out).all()


class _EchoStart(torch.nn.Module):
    """A one-step stand-in policy whose clean estimate is its input: restore returns decode(x_start)."""

    def forward(self, x, lq, t, task, ids):
        return Prediction(torch.zeros_like(x), x)


class _PoolCodec(torch.nn.Module):
    """A ÷2 stand-in codec: 2×2 mean-pooled pixels in [-1, 1], decoded by nearest upsampling (no clamp)."""
    latent_channels, downsample = 3, 2

    def encode(self, images):
        return F.avg_pool2d(images * 2 - 1, 2)

    def decode(self, latents):
        return (F.interpolate(latents, scale_factor=2) + 1) / 2


@pytest.mark.parametrize("codec,overlap", [(PixelCodec(), 4), (PixelCodec(), 9), (_PoolCodec(), 4), (_PoolCodec(), 8)],
                         ids=["pixel-4", "pixel-9", "pool2-4", "pool2-8"])  # pixel-9: an odd stride
def test_tiles_share_one_noise_field(codec, overlap):
    """Overlapping tiles start from crops of one seeded latent noise field, so an echo policy's tiled
    output is decode(x_start) of the whole image: the same for every overlap and equal to untiled restore."""
    flow_cfg = load_config(None, ["flow.source=lq", "flow.sigma_src=0.5", "flow.t_start=0.8"]).flow
    lq, task = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])
    ds = codec.downsample
    eps = torch.randn(2, 3, 40 // ds, 56 // ds, generator=torch.Generator().manual_seed(7))
    mu = codec.encode(lq)
    expected = codec.decode(flow.interpolate(mu, mu + 0.5 * eps, 0.8))
    out = restore_tiled(_EchoStart(), codec, lq, task, [0.8, 0.0], flow_cfg, tile=16, overlap=overlap, seed=7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    whole = restore(_EchoStart(), codec, lq, task, [0.8, 0.0], flow_cfg, eps=eps)
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)


def test_tile_starts_must_sit_on_the_latent_grid():
    flow_cfg = load_config(None, []).flow
    lq, task = torch.rand(1, 3, 40, 40), torch.tensor([0])
    with pytest.raises(ValueError, match="tile 16.*overlap 5"):  # stride 11 is off the ÷2 grid
        restore_tiled(_EchoStart(), _PoolCodec(), lq, task, [1.0, 0.0], flow_cfg, tile=16, overlap=5)
    with pytest.raises(ValueError, match="tile 16.*overlap 4"):  # the last start 41 − 16 = 25 is odd
        restore_tiled(_EchoStart(), _PoolCodec(), torch.rand(1, 3, 41, 40), task, [1.0, 0.0], flow_cfg,
                      tile=16, overlap=4)


def test_untiled_restore_keeps_its_seeded_draw(cfg, policy):
    """Without `eps`, restore draws ε over the packed tokens from a CPU generator seeded with `seed`, as before;
    `initial_state` given that same draw as `eps` starts from the same state."""
    lq, task, sched = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 4]), \
        flow.uniform_schedule(2)
    tok = pack(lq * 2 - 1)
    draw = torch.randn(tok.shape, generator=torch.Generator().manual_seed(5))
    mu, sigma = tok, cfg.flow.sigma_src
    x_start = flow.interpolate(mu, mu + sigma * draw, cfg.flow.t_start)
    torch.testing.assert_close(initial_state(tok, cfg.flow, eps=draw), x_start, rtol=0, atol=0)
    torch.testing.assert_close(initial_state(tok, cfg.flow, torch.Generator().manual_seed(5)), x_start,
                               rtol=0, atol=0)
    with torch.no_grad():
        old = sample_trajectory(policy, tok, task, image_ids(8, 8), sched, cfg.flow, x_start=x_start).final
    expected = PixelCodec().decode(unpack(old, 8, 8))
    assert torch.equal(restore(policy, PixelCodec(), lq, task, sched, cfg.flow, seed=5), expected)
    assert torch.equal(restore(_EchoStart(), PixelCodec(), lq, task, [1.0, 0.0], cfg.flow, seed=5),
                       PixelCodec().decode(unpack(x_start, 8, 8)))


def test_pad_to_multiple():
    x = torch.rand(1, 3, 37, 45)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape[-2:] == (40, 48) and size == (37, 45)
    assert torch.equal(padded[..., :37, :45], x)
