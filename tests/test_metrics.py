"""Tests for fluxir.metrics: PSNR/SSIM against scikit-image, Y channel by hand, LPIPS loading offline.

Tolerances: PSNR within 1e-12 dB and SSIM within 1e-13 of scikit-image on the same float64 arrays
(observed max errors on this machine: 3.6e-15 dB and 7.8e-16).
"""
from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from fluxir import metrics
from fluxir.metrics import (ALEXNET_FEATURE_KEYS, LPIPS, LPIPSUnavailable, LPIPSWeightsError,
                            MetricConvention, compute_metrics, lpips_available, lpips_weights_path,
                            psnr, rgb_to_y, ssim)

PSNR_ATOL = 1e-12  # dB
SSIM_ATOL = 1e-13


class NetworkAccess(AssertionError):
    """Raised by the guards below: a test tried to reach the network."""


def _refuse(*args, **kwargs):
    raise NetworkAccess(f"network access attempted: {args!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with sockets and torch-hub/torchvision downloads disabled."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _refuse)


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target): (3, 3, 48, 40) float32 in [0, 1]; smooth target, noisy prediction."""
    g = torch.Generator().manual_seed(0)
    target = F.interpolate(torch.rand(3, 3, 12, 10, generator=g), size=(48, 40), mode="bilinear",
                           align_corners=False)
    noise = torch.tensor([0.03, 0.08, 0.2]).view(3, 1, 1, 1) * torch.randn(3, 3, 48, 40, generator=g)
    return (target + noise).clamp(0, 1), target


def _numpy_image(img: torch.Tensor, crop: int, y: bool) -> np.ndarray:
    """One (3, H, W) image as skimage sees it: float64, 0–255, cropped, (H, W, 3) or (H, W) for Y."""
    a = img.double().permute(1, 2, 0).numpy()
    if crop:
        a = a[crop:-crop, crop:-crop]
    return rgb2ycbcr(a)[..., 0] if y else a * 255.0


@pytest.mark.parametrize("crop", [0, 4])
@pytest.mark.parametrize("y", [False, True])
def test_psnr_matches_skimage(pair, crop, y):
    pred, target = pair
    got = psnr(pred, target, crop_border=crop, test_y_channel=y)
    assert got.shape == (3,) and got.dtype == torch.float64
    for i in range(3):
        ref = sk_psnr(_numpy_image(target[i], crop, y), _numpy_image(pred[i], crop, y), data_range=255)
        assert abs(got[i].item() - ref) <= PSNR_ATOL, (i, got[i].item(), ref)


@pytest.mark.parametrize("crop", [0, 4])
@pytest.mark.parametrize("y", [False, True])
def test_ssim_matches_skimage(pair, crop, y):
    """skimage filters with reflect padding but then drops (11-1)//2 = 5 px per side before
    averaging, so its mean runs over exactly our 'valid' region; its truncate=3.5 at sigma 1.5
    gives the same 11-tap normalised Gaussian. The conventions agree exactly, hence the tight atol."""
    pred, target = pair
    got = ssim(pred, target, crop_border=crop, test_y_channel=y)
    assert got.shape == (3,) and got.dtype == torch.float64
    for i in range(3):
        kw = {} if y else {"channel_axis": -1}
        ref = sk_ssim(_numpy_image(target[i], crop, y), _numpy_image(pred[i], crop, y), data_range=255,
                      gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw)
        assert abs(got[i].item() - ref) <= SSIM_ATOL, (i, got[i].item(), ref)
    assert got[0] > got[1] > got[2]  # more noise, lower SSIM


def test_rgb_to_y_by_hand():
    rgb = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.7]],
                       dtype=torch.float64)
    img = rgb.T.reshape(1, 3, 1, 6)
    # 16 + 65.481 R + 128.553 G + 24.966 B, worked out by hand
    expected = [16.0, 235.0, 81.481, 144.553, 40.966, 16 + 13.0962 + 64.2765 + 17.4762]
    got = rgb_to_y(img)
    assert got.shape == (1, 1, 1, 6)
    np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=0, atol=1e-12)


def test_rgb_to_y_matches_skimage(pair):
    pred, _ = pair
    ref = rgb2ycbcr(pred[0].double().permute(1, 2, 0).numpy())[..., 0]
    np.testing.assert_allclose(rgb_to_y(pred[:1])[0, 0].numpy(), ref, rtol=0, atol=1e-12)


def test_psnr_y_channel_by_hand(pair):
    pred, target = pair
    coeffs = np.array([65.481, 128.553, 24.966])
    for i in range(3):
        yp = 16 + np.einsum("chw,c->hw", pred[i].double().numpy(), coeffs)
        yt = 16 + np.einsum("chw,c->hw", target[i].double().numpy(), coeffs)
        ref = 10 * math.log10(255.0 ** 2 / np.mean((yp - yt) ** 2))
        assert abs(psnr(pred, target, test_y_channel=True)[i].item() - ref) <= PSNR_ATOL


def test_psnr_known_values():
    target = torch.full((1, 3, 16, 16), 0.5)
    # |diff| 0.1 -> 25.5 on 0–255 -> PSNR = 20·log10(255/25.5) = 20 dB
    assert psnr(target + 0.1, target).item() == pytest.approx(20.0, abs=1e-5)  # float32 0.1 offset
    # no uint8 quantising: a 1e-4 difference (0.0255 on 0–255) gives 80 dB, not inf
    t64 = target.double()
    assert psnr(t64 + 1e-4, t64).item() == pytest.approx(80.0, abs=1e-8)


def test_identical_images(pair):
    _, target = pair
    assert torch.isinf(psnr(target, target)).all() and (psnr(target, target) > 0).all()
    assert torch.isinf(psnr(target, target, 4, True)).all()
    torch.testing.assert_close(ssim(target, target), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ssim(target, target, 4, True), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_batch_equals_per_image(pair, fn):
    pred, target = pair
    for crop, y in [(0, False), (4, True)]:
        batched = fn(pred, target, crop, y)
        single = torch.cat([fn(pred[i:i + 1], target[i:i + 1], crop, y) for i in range(3)])
        torch.testing.assert_close(batched, single, rtol=0, atol=1e-13)


def test_crop_border_ignores_border(pair):
    pred, target = pair
    spoiled = pred.clone()
    spoiled[..., :4, :] = 1 - spoiled[..., :4, :]
    spoiled[..., :, -4:] = 0
    for fn in (psnr, ssim):
        torch.testing.assert_close(fn(spoiled, target, crop_border=4), fn(pred, target, crop_border=4),
                                   rtol=0, atol=0)
        assert (fn(spoiled, target) < fn(pred, target)).all()


@pytest.mark.parametrize("fn", [psnr, ssim, compute_metrics])
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*\(2, 3, 32, 30\)"):
        fn(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 30))


def test_bad_sizes():
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=5)  # 10x10 left
    with pytest.raises(ValueError, match="crop_border 10"):
        psnr(x, x, crop_border=10)
    with pytest.raises(ValueError, match="RGB"):
        psnr(x[:, :1], x[:, :1], test_y_channel=True)


def test_metric_convention_describe():
    assert (MetricConvention().describe()
            == "PSNR/SSIM on RGB, 0–255 scale, crop border 0 (BasicSR convention)")
    assert (MetricConvention(crop_border=4, test_y_channel=True).describe()
            == "PSNR/SSIM on Y (ITU-R BT.601), 0–255 scale, crop border 4 (BasicSR convention)")
    with pytest.raises(ValueError, match="crop_border"):
        MetricConvention(crop_border=-1)


def test_compute_metrics_without_lpips(pair):
    pred, target = pair
    conv = MetricConvention(crop_border=4, test_y_channel=True)
    out = compute_metrics(pred, target, conv)
    assert set(out) == {"psnr", "ssim"}
    torch.testing.assert_close(out["psnr"], psnr(pred, target, 4, True), rtol=0, atol=0)
    torch.testing.assert_close(out["ssim"], ssim(pred, target, 4, True), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alexnet_state() -> dict[str, torch.Tensor]:
    """A random-init torchvision AlexNet state_dict (features.* and classifier.*), seeded."""
    torch.manual_seed(1234)
    return torchvision.models.alexnet(weights=None).state_dict()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, alexnet_state) -> Path:
    """A torch-hub dir holding `alexnet_state` as checkpoints/alexnet-owt-7be5be79.pth."""
    root = tmp_path_factory.mktemp("hub")
    (root / "checkpoints").mkdir()
    torch.save(alexnet_state, root / "checkpoints" / metrics.ALEXNET_HUB_FILENAME)
    return root


@pytest.fixture
def dirs(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty torch-hub dir and FLUXIR_CACHE for this test; restores torch hub's dir afterwards."""
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    hub.mkdir(), cache.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored on teardown
    torch.hub.set_dir(str(hub))
    monkeypatch.setenv("FLUXIR_CACHE", str(cache))
    return {"hub": hub, "cache": cache}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _features(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("features.")}


def test_network_guard_is_effective(dirs):
    """The guards really fire on a torchvision download (so the LPIPS tests below prove 'no download')."""
    with pytest.raises(NetworkAccess):
        torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.DEFAULT)


def test_lpips_weights_path_default(monkeypatch, tmp_path):
    monkeypatch.delenv("FLUXIR_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lpips_weights_path() == tmp_path / ".cache" / "fluxir" / "lpips" / "alexnet.safetensors"
    monkeypatch.setenv("FLUXIR_CACHE", str(tmp_path / "c"))
    assert lpips_weights_path() == tmp_path / "c" / "lpips" / "alexnet.safetensors"


def test_lpips_unavailable_names_paths(dirs):
    hub_file = dirs["hub"] / "checkpoints" / "alexnet-owt-7be5be79.pth"
    st_file = dirs["cache"] / "lpips" / "alexnet.safetensors"
    with pytest.raises(LPIPSUnavailable) as err:
        LPIPS()
    msg = str(err.value)
    assert str(hub_file) in msg and str(st_file) in msg
    assert "random weights" in msg and "AlexNet checkpoint" in msg and "`fluxir weights lpips`" in msg
    assert lpips_available() == (False, msg)


def _reference_lpips(monkeypatch, alexnet_state):
    """The lpips package's own construction path, fed `alexnet_state` where it would download."""
    import lpips

    model = torchvision.models.alexnet(weights=None)
    model.load_state_dict(alexnet_state)
    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", lambda *a, **k: model)
    return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False).eval()


@pytest.mark.parametrize("source", ["hub", "safetensors"])
def test_lpips_loads_backbone(dirs, hub_dir, alexnet_state, monkeypatch, source):
    if source == "hub":
        torch.hub.set_dir(str(hub_dir))
        expected_path = hub_dir / "checkpoints" / metrics.ALEXNET_HUB_FILENAME
    else:
        expected_path = _write_safetensors(lpips_weights_path(), _features(alexnet_state))
    assert lpips_available() == (True, f"AlexNet backbone from {expected_path}")

    m = LPIPS()
    assert m.source == expected_path and not m.training
    loaded = m.backbone_state_dict()
    assert sorted(loaded) == sorted(ALEXNET_FEATURE_KEYS)
    for key in ALEXNET_FEATURE_KEYS:
        assert torch.equal(loaded[key], alexnet_state[key]), key

    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 64, 64, generator=g)
    noise = torch.randn(2, 3, 64, 64, generator=g)
    assert torch.equal(m(x, x), torch.zeros(2))
    dists = [m(x, (x + s * noise).clamp(0, 1)) for s in (0.02, 0.1, 0.3)]
    assert dists[0].shape == (2,)
    assert (0 < dists[0]).all() and (dists[0] < dists[1]).all() and (dists[1] < dists[2]).all()

    ref = _reference_lpips(monkeypatch, alexnet_state)
    y = (x + 0.1 * noise).clamp(0, 1)
    with torch.no_grad():
        expected = ref(x, y, normalize=True).flatten()
    torch.testing.assert_close(m(x, y), expected, rtol=0, atol=1e-7)  # observed: bitwise equal


def test_hub_checkpoint_takes_precedence(dirs, hub_dir, alexnet_state):
    torch.hub.set_dir(str(hub_dir))
    _write_safetensors(lpips_weights_path(), {k: v * 2 for k, v in _features(alexnet_state).items()})
    m = LPIPS()
    assert m.source == hub_dir / "checkpoints" / metrics.ALEXNET_HUB_FILENAME
    assert torch.equal(m.backbone_state_dict()["features.0.weight"], alexnet_state["features.0.weight"])


def test_lpips_rejects_malformed_backbone(dirs, alexnet_state):
    feats = _features(alexnet_state)
    path = lpips_weights_path()

    _write_safetensors(path, {k: v for k, v in feats.items() if k != "features.10.bias"})
    with pytest.raises(LPIPSWeightsError, match=r"missing keys \['features.10.bias'\]"):
        LPIPS()
    _write_safetensors(path, {**feats, "classifier.1.weight": alexnet_state["classifier.1.weight"]})
    with pytest.raises(LPIPSWeightsError, match=r"unexpected keys \['classifier.1.weight'\]"):
        LPIPS()  # classifier.* is only tolerated in torchvision's .pth
    _write_safetensors(path, {**feats, "features.0.weight": torch.zeros(64, 3, 5, 5)})
    with pytest.raises(LPIPSWeightsError, match="size mismatch"):
        LPIPS()


def test_lpips_explicit_missing_path(dirs):
    with pytest.raises(LPIPSUnavailable, match="nowhere.safetensors"):
        LPIPS(dirs["cache"] / "nowhere.safetensors")


def test_lpips_grad_modes(dirs, alexnet_state):
    path = _write_safetensors(lpips_weights_path(), _features(alexnet_state))
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 64, 64, generator=g)
    y = (x + 0.1 * torch.randn(1, 3, 64, 64, generator=g)).clamp(0, 1)

    frozen = LPIPS(path)
    assert not frozen(x.clone().requires_grad_(True), y).requires_grad

    reward = LPIPS(path, requires_grad=True)
    reward.train()  # stays in eval: dropout in the heads would make the metric random
    assert not any(mod.training for mod in reward.modules())
    pred = x.clone().requires_grad_(True)
    d = reward(pred, y)
    d.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    torch.testing.assert_close(d.detach(), frozen(x, y), rtol=0, atol=0)


def test_compute_metrics_with_lpips(dirs, alexnet_state, pair):
    pred, target = pair
    m = LPIPS(_write_safetensors(lpips_weights_path(), _features(alexnet_state)))
    out = compute_metrics(pred, target, MetricConvention(), lpips=m)
    assert set(out) == {"psnr", "ssim", "lpips"}
    torch.testing.assert_close(out["lpips"], m(pred, target), rtol=0, atol=0)
    assert out["lpips"].shape == (3,)
