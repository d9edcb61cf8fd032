"""Classical restorers from well-kept libraries (bm3d, scikit-image, SciPy), the baselines of quality.py.

Each restorer maps one LQ image (H, W, 3) float64 in [0, 1] plus what it is told about the
degradation (`info`: the true σ for the denoisers, the true blur kernel for the deblurrers) to a
restored image of the same shape. `RESTORERS[task]` lists the methods tried for a task; the benchmark
reports each and takes the best one per task on the test set itself (an upper bound for the baseline).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Restorer = Callable[[np.ndarray, dict], np.ndarray]


def bicubic(lq: np.ndarray, info: dict) -> np.ndarray:
    """sr: the LQ input already is the ×4 bicubic upsampling of the small image."""
    return lq


def bm3d_denoise(lq: np.ndarray, info: dict) -> np.ndarray:
    import bm3d

    return bm3d.bm3d_rgb(lq, sigma_psd=info["sigma"])


def nlm_denoise(lq: np.ndarray, info: dict) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    sigma = info["sigma"]
    return denoise_nl_means(lq, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True,
                            channel_axis=-1)


def _per_channel(lq: np.ndarray, fn) -> np.ndarray:
    return np.stack([fn(lq[..., c]) for c in range(lq.shape[-1])], axis=-1)


def _psf(info: dict) -> np.ndarray:
    """The degradation correlates with its kernel; deconvolution wants the convolution kernel (flipped)."""
    return np.ascontiguousarray(info["kernel"][::-1, ::-1])


def _deconvolve(lq: np.ndarray, info: dict, fn) -> np.ndarray:
    """Deconvolve each channel of a reflect-padded copy (the degradation blurred with reflect padding; the
    FFT-based methods would otherwise ring at the borders of a small crop), then crop back."""
    psf = _psf(info)
    pad = psf.shape[0]
    padded = np.pad(lq, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return _per_channel(padded, lambda ch: fn(ch, psf))[pad:-pad, pad:-pad]


def richardson_lucy(lq: np.ndarray, info: dict) -> np.ndarray:
    from skimage.restoration import richardson_lucy as rl

    return _deconvolve(lq, info, lambda ch, psf: rl(ch, psf, num_iter=20, clip=True))


def wiener(lq: np.ndarray, info: dict) -> np.ndarray:
    from skimage.restoration import wiener as wf

    return _deconvolve(lq, info, lambda ch, psf: wf(ch, psf, balance=0.1, clip=True))


def gamma(lq: np.ndarray, info: dict) -> np.ndarray:
    """lowlight: γ = 0.5, the inverse of the middle of the degradation's γ range [1.5, 2.5]."""
    from skimage.exposure import adjust_gamma

    return adjust_gamma(np.clip(lq, 0, 1), 0.5)


def clahe(lq: np.ndarray, info: dict) -> np.ndarray:
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(np.clip(lq, 0, 1), clip_limit=0.01)


def gray_world(lq: np.ndarray, info: dict) -> np.ndarray:
    """underwater: scale each channel so that its mean is the mean over channels (gray-world white balance)."""
    means = lq.reshape(-1, 3).mean(axis=0)
    return np.clip(lq * (means.mean() / np.maximum(means, 1e-6)), 0, 1)


def median(size: int) -> Restorer:
    def restore(lq: np.ndarray, info: dict) -> np.ndarray:
        from scipy.ndimage import median_filter

        return median_filter(lq, size=(size, size, 1), mode="reflect")

    return restore


RESTORERS: dict[str, dict[str, Restorer]] = {
    "sr": {"bicubic": bicubic},
    "deblur": {"Richardson-Lucy (true kernel)": richardson_lucy, "Wiener (true kernel)": wiener},
    "lowlight": {"gamma 0.5": gamma, "CLAHE": clahe},
    "underwater": {"gray world": gray_world},
    "denoise": {"BM3D (true sigma)": bm3d_denoise, "NLM (true sigma)": nlm_denoise},
    "raindrop": {"median 3x3": median(3), "median 5x5": median(5)},
    "desnow": {"median 3x3": median(3), "median 5x5": median(5)},
}


def degradation_info(task: str, seeds) -> list[dict]:
    """Per-sample facts a non-blind classical restorer is given: σ (denoise) or the blur kernel (deblur)."""
    from fluxir.degradations import DEGRADATIONS

    if task == "denoise":
        return [{"sigma": float(s)} for s in DEGRADATIONS["denoise"].sigmas_of(seeds)]
    if task == "deblur":
        return [{"kernel": k.double().numpy()} for k in DEGRADATIONS["deblur"].kernels_of(seeds)]
    return [{} for _ in range(len(seeds))]
