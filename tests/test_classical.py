"""The classical baselines of benchmarks/quality.py: each non-trivial one really restores its task, and
the degradation facts they are given (true σ, true kernel) are the ones the test set was made with."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxir.data import bundled_images, quantise, textured_crops
from fluxir.seeds import mix_seed
from fluxir.degradations import DEGRADATIONS, degrade, filter_per_sample, task_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from classical import RESTORERS, degradation_info  # noqa: E402


@pytest.fixture(scope="module")
def crops():
    (_, image), = [(n, im) for n, im in bundled_images("test", scale=0.5) if n == "china"]
    boxes = textured_crops(image, 48, 3)
    return torch.stack([quantise(image[:, t:t + 48, l:l + 48]) for t, l in boxes])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((np.clip(a, 0, 1) - b) ** 2)))


def test_true_kernel_and_sigma_reproduce_the_degradation(crops):
    seeds = torch.tensor([mix_seed(3, task_id("deblur"), i) for i in range(len(crops))])
    lq = degrade("deblur", crops, seeds)
    blurred = filter_per_sample(crops, DEGRADATIONS["deblur"].kernels_of(seeds))
    assert float((lq - blurred).abs().max()) < 6 / 255  # what is left is the 1/255 noise
    sigmas = DEGRADATIONS["denoise"].sigmas_of(seeds)
    residual = degrade("denoise", crops, seeds) - crops
    inside = (crops > 0.25) & (crops < 0.75)  # away from the clamp
    for i, s in enumerate(sigmas):
        assert float(residual[i][inside[i]].std()) == pytest.approx(float(s), rel=0.15)


@pytest.mark.parametrize("task,method", [("denoise", "BM3D (true sigma)"), ("denoise", "NLM (true sigma)"),
                                         ("deblur", "Richardson-Lucy (true kernel)"), ("deblur", "Wiener (true kernel)"),
                                         ("lowlight", "gamma 0.5"), ("underwater", "gray world")])
def test_classical_restorer_beats_its_input(crops, task, method):
    seeds = torch.tensor([mix_seed(4, task_id(task), i) for i in range(len(crops))])
    lq = quantise(degrade(task, crops, seeds)).permute(0, 2, 3, 1).double().numpy()
    gt = crops.permute(0, 2, 3, 1).double().numpy()
    restore = RESTORERS[task][method]
    out = [restore(x, facts) for x, facts in zip(lq, degradation_info(task, seeds))]
    gain = np.mean([_psnr(o, g) - _psnr(x, g) for o, x, g in zip(out, lq, gt)])
    assert gain > 0.3, f"{method} on {task}: {gain:+.2f} dB"
