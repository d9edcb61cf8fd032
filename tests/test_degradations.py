"""Contract and physics checks of the seven synthetic degradations in fluxir.degradations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from fluxir.degradations import (
    DEGRADATIONS, TASKS, Denoise, degradation_sheet, degrade, motion_kernels, task_id,
)

# per-sample mean |LQ - GT| each task must exceed on textured crops (observed minima are ~2x these)
MIN_CHANGE = {"sr": 0.004, "deblur": 0.004, "lowlight": 0.1, "underwater": 0.05,
              "denoise": 0.02, "raindrop": 0.0015, "desnow": 0.005}


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Four textured 64x64 astronaut crops `(4, 3, 64, 64)` in [0, 1]."""
    img = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1).float() / 255
    boxes = [(100, 100), (200, 300), (300, 150), (40, 400)]
    return torch.stack([img[:, t : t + 64, l : l + 64] for t, l in boxes]).contiguous()


def test_registry_matches_tasks():
    assert tuple(DEGRADATIONS) == TASKS
    assert [task_id(t) for t in TASKS] == list(range(7))
    assert all(DEGRADATIONS[t].name == t for t in TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_degradation_contract(task, crops):
    deg = DEGRADATIONS[task]
    seeds = torch.tensor([0, 1, 2, 3], dtype=torch.int64)
    out = deg(crops, seeds)
    assert out.shape == crops.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, deg(crops, seeds.clone())), "same seeds must give identical output"
    for i in range(len(seeds)):
        alone = deg(crops[i : i + 1], seeds[i : i + 1])
        torch.testing.assert_close(alone[0], out[i], atol=1e-5, rtol=0, msg=f"{task}: sample {i} depends on batch")
    change = (out - crops).abs().mean(dim=(1, 2, 3))
    assert (change > MIN_CHANGE[task]).all(), f"{task}: too little change {change.tolist()}"
    other = deg(crops, seeds + 100)
    per_sample_diff = (other - out).abs().amax(dim=(1, 2, 3))
    if deg.uses_seed:
        assert (per_sample_diff > 1e-3).all(), f"{task}: output ignores the seed"
    else:
        assert float(per_sample_diff.max()) == 0.0


def test_sr_equals_torch_bicubic_down_up(crops):
    down = F.interpolate(crops, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False)
    expected = F.interpolate(down.clamp(0, 1), scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    out = degrade("sr", crops, torch.zeros(4, dtype=torch.int64))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 32, 48), 0.3)
    torch.testing.assert_close(degrade("sr", flat, torch.zeros(1, dtype=torch.int64)), flat, atol=1e-6, rtol=0)


def test_sr_rejects_sizes_not_multiple_of_4():
    with pytest.raises(ValueError, match=r"sr: image size 30x32 must be a multiple of 4"):
        degrade("sr", torch.rand(1, 3, 30, 32), torch.zeros(1, dtype=torch.int64))


def test_unknown_task_message():
    with pytest.raises(ValueError, match=r"unknown task 'dehaze'.*sr, deblur, lowlight"):
        degrade("dehaze", torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown task 'dehaze'"):
        task_id("dehaze")


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="seeds must be int64"):
        degrade("denoise", torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="gt must be float32"):
        degrade("denoise", torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("sigma", [15, 25])
def test_denoise_fixed_sigma_std(sigma):
    grey = torch.full((4, 3, 64, 64), 0.5)
    noise = Denoise(sigma=sigma)(grey, torch.arange(4)) - 0.5
    assert abs(float(noise.mean())) < 2e-3
    assert float(noise.std()) == pytest.approx(sigma / 255, rel=0.03)


def test_denoise_random_sigma_is_one_of_the_three():
    grey = torch.full((48, 3, 64, 64), 0.5)
    std = (degrade("denoise", grey, torch.arange(48)) - 0.5).std(dim=(1, 2, 3)) * 255
    nearest = torch.tensor([15.0, 25.0, 50.0])[(std[:, None] - torch.tensor([15.0, 25.0, 50.0])).abs().argmin(1)]
    # 50/255 noise on 0.5 grey clips ~1% of values, lowering the measured std by ~3%
    assert ((std - nearest).abs() / nearest < 0.06).all(), std.tolist()
    assert set(nearest.tolist()) == {15.0, 25.0, 50.0}


@pytest.mark.parametrize("length,angle", [(5.0, 0.0), (9.0, 0.7), (13.0, math.pi / 2), (7.0, 2.5)])
def test_motion_kernel_moments(length, angle):
    k = motion_kernels(torch.tensor([length]), torch.tensor([angle]))[0].double()
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    c = torch.arange(15, dtype=torch.float64) - 7
    y, x = torch.meshgrid(c, c, indexing="ij")
    mx, my = float((k * x).sum()), float((k * y).sum())
    assert abs(mx) < 1e-6 and abs(my) < 1e-6
    cov = torch.tensor([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    evals, evecs = torch.linalg.eigh(cov)
    n = 64  # points along the segment: variance of their evenly spaced positions is L^2/12 * (n+1)/(n-1)
    expected_major = length**2 / 12 * (n + 1) / (n - 1) + 1 / 6  # + mean variance of the bilinear splat
    assert float(evals[1]) == pytest.approx(expected_major, abs=0.3)
    assert float(evals[0]) < 0.3
    vx, vy = evecs[:, 1].tolist()
    got = math.atan2(-vy, vx) % math.pi  # image y points down
    assert min(abs(got - angle % math.pi), math.pi - abs(got - angle % math.pi)) < 0.05


def test_deblur_keeps_flat_image_with_faint_noise():
    grey = torch.full((4, 3, 48, 48), 0.5)
    out = degrade("deblur", grey, torch.arange(4))
    assert abs(float(out.mean()) - 0.5) < 1e-3
    assert float((out - 0.5).std()) == pytest.approx(1 / 255, rel=0.1)


def test_lowlight_darkening_within_documented_ranges():
    c = 0.8
    grey = torch.full((32, 3, 16, 16), c)
    mean = degrade("lowlight", grey, torch.arange(32)).mean(dim=(1, 2, 3))
    lo, hi = 0.15 * c**2.5, 0.45 * c**1.5  # s in [0.15, 0.45], gamma in [1.5, 2.5]
    assert (mean > lo - 0.01).all() and (mean < hi + 0.01).all(), mean.tolist()
    assert float(mean.max() - mean.min()) > 0.1, "darkening should vary with the seed"


def test_underwater_follows_image_formation_model():
    seeds = torch.arange(8)
    black, white = torch.zeros(8, 3, 32, 32), torch.ones(8, 3, 32, 32)
    backscatter_part = degrade("underwater", black, seeds)  # B_c (1 - t_c)
    t = degrade("underwater", white, seeds) - backscatter_part  # transmission t_c
    assert (t > 0).all() and (t < 1).all()
    assert (t[:, 0] < t[:, 1]).all() and (t[:, 0] < t[:, 2]).all(), "red must be attenuated most"
    assert (t[:, :, 0] <= t[:, :, -1] + 1e-6).all(), "the top of the image is farther away"
    backscatter = backscatter_part / (1 - t)
    assert (backscatter[:, 2] > backscatter[:, 0]).all() and (backscatter[:, 1] > backscatter[:, 0]).all()
    scene = torch.rand(8, 3, 32, 32)
    torch.testing.assert_close(degrade("underwater", scene, seeds), scene * t + backscatter_part, atol=1e-5, rtol=0)


def test_raindrops_are_local(crops):
    out = degrade("raindrop", crops, torch.arange(4))
    changed = ((out - crops).abs().amax(dim=1) > 1e-6).float().mean(dim=(1, 2))
    assert (changed > 0.02).all() and (changed < 0.9).all(), changed.tolist()


def test_snow_only_brightens_dark_image():
    dark = torch.full((4, 3, 64, 64), 0.1)
    out = degrade("desnow", dark, torch.arange(4))
    assert (out >= dark - 1e-6).all()
    bright_fraction = ((out - dark).amax(dim=1) > 0.4).float().mean(dim=(1, 2))
    assert (bright_fraction > 0.005).all() and (bright_fraction < 0.5).all(), bright_fraction.tolist()


def test_degradation_sheet_writes_labelled_grid(tmp_path, crops):
    path = degradation_sheet(crops[0], tmp_path / "sheet.png", seed=1)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10
