"""The seven restoration tasks of the paper as synthetic, seeded degradations of clean images.

Every degradation maps GT `(B, 3, H, W)` in [0, 1] plus int64 seeds `(B,)` to LQ of the same shape;
sample i depends only on (its image, its seed), never on the rest of the batch.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("sr", "deblur", "lowlight", "underwater", "denoise", "raindrop", "desnow")


def task_id(name: str) -> int:
    """Index of task `name` in TASKS (the task-id order used everywhere)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS.index(name)


# ---------------------------------------------------------------- per-sample randomness


def _generators(seeds: Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with that sample's seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def _uniform(gens: list[torch.Generator], ranges: list[tuple[float, float]]) -> Tensor:
    """Per-sample uniform draws `(B, len(ranges))`, column j in ranges[j]."""
    u = torch.stack([torch.rand(len(ranges), generator=g) for g in gens])
    lo = torch.tensor([r[0] for r in ranges])
    hi = torch.tensor([r[1] for r in ranges])
    return lo + (hi - lo) * u


def _normal(gens: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """Per-sample standard normal noise `(B, *shape)`."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


# ---------------------------------------------------------------- kernels


def motion_kernels(lengths: Tensor, angles: Tensor, size: int = 15, samples: int = 64) -> Tensor:
    """Linear motion-blur kernels `(B, size, size)` summing to 1.

    A centred segment of length `lengths` `(B,)` px at `angles` `(B,)` rad (counter-clockwise from +x,
    image y pointing down) is rendered sub-pixel by bilinearly splatting `samples` points along it.
    """
    if float(lengths.max()) > size - 1:
        raise ValueError(f"motion length {float(lengths.max()):.1f} px does not fit a {size}x{size} kernel")
    t = torch.linspace(-0.5, 0.5, samples)
    px = t[None] * (lengths * torch.cos(angles))[:, None]  # (B, N)
    py = -t[None] * (lengths * torch.sin(angles))[:, None]
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    wx = (1 - (px[..., None] - grid).abs()).clamp(min=0)  # (B, N, size)
    wy = (1 - (py[..., None] - grid).abs()).clamp(min=0)
    k = torch.einsum("bny,bnx->byx", wy, wx)
    return k / k.sum(dim=(1, 2), keepdim=True)


def gaussian_kernels(sigmas: Tensor, size: int) -> Tensor:
    """1-D Gaussian kernels `(B, size)` summing to 1, std `sigmas` `(B,)` px."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-0.5 * (x[None] / sigmas[:, None]) ** 2)
    return g / g.sum(dim=1, keepdim=True)


def _pad(x: Tensor, left: int, right: int, top: int, bottom: int, padding: str) -> Tensor:
    # explicit padding: conv2d's own `padding=` takes a far slower path on CPU for grouped convs
    return F.pad(x, (left, right, top, bottom), mode="reflect" if padding == "reflect" else "constant")


def filter_per_sample(x: Tensor, kernels: Tensor, padding: str = "reflect") -> Tensor:
    """Correlate each sample of `x` `(B, C, H, W)` with its own kernel `(B, k, k)` (odd k), same size out.

    One grouped conv2d over the B*C channels; `padding` is "reflect" or "zeros".
    """
    b, c, h, w = x.shape
    p = kernels.shape[-1] // 2
    weight = kernels.repeat_interleave(c, dim=0)[:, None]  # (B*C, 1, k, k)
    flat = _pad(x.reshape(1, b * c, h, w), p, p, p, p, padding)
    return F.conv2d(flat, weight, groups=b * c).reshape(b, c, h, w)


def gaussian_blur(x: Tensor, sigmas: Tensor, size: int, padding: str = "reflect", peak: bool = False) -> Tensor:
    """Separable Gaussian blur of each sample of `x` `(B, C, H, W)` with its own std `sigmas` `(B,)` px.

    With `peak=True` the 2-D kernel is scaled to peak 1 instead of summing to 1 (an impulse of
    height a becomes a blob of height a).
    """
    b, c, h, w = x.shape
    g = gaussian_kernels(sigmas, size)
    if peak:
        g = g / g.amax(dim=1, keepdim=True)
    g = g.repeat_interleave(c, dim=0)[:, None, None, :]  # (B*C, 1, 1, k)
    p = size // 2
    flat = _pad(x.reshape(1, b * c, h, w), p, p, p, p, padding)
    flat = F.conv2d(F.conv2d(flat, g, groups=b * c), g.transpose(2, 3), groups=b * c)
    return flat.reshape(b, c, h, w)


# ---------------------------------------------------------------- the contract


class Degradation:
    """Base class: a seeded synthetic degradation GT -> LQ.

    Subclasses set `name`, `uses_seed`, `ranges` (the parameter-range table, also in their docstring)
    and implement `apply`. Call as `deg(gt, seeds)`:
    gt `(B, 3, H, W)` float32 in [0, 1], seeds int64 `(B,)` -> LQ `(B, 3, H, W)` float32 in [0, 1].
    Each sample's parameters and noise come only from `torch.Generator().manual_seed(seed_i)`.
    """

    name: ClassVar[str] = ""
    uses_seed: ClassVar[bool] = True
    ranges: ClassVar[dict[str, tuple[float, float]]] = {}

    def __call__(self, gt: Tensor, seeds: Tensor) -> Tensor:
        if gt.ndim != 4 or gt.shape[1] != 3 or gt.dtype != torch.float32:
            raise ValueError(f"{self.name}: gt must be float32 (B, 3, H, W), got {gt.dtype} {tuple(gt.shape)}")
        if seeds.dtype != torch.int64 or seeds.shape != gt.shape[:1]:
            raise ValueError(f"{self.name}: seeds must be int64 ({gt.shape[0]},), "
                             f"got {seeds.dtype} {tuple(seeds.shape)}")
        if gt.shape[0] == 0:
            return gt.clone()
        return self.apply(gt, seeds).clamp(0, 1).contiguous()

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        """Degrade `(B, 3, H, W)`; the caller clamps to [0, 1]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SuperResolution(Degradation):
    """×4 bicubic downsampling (antialiased) then bicubic upsampling back to H×W.

    Deterministic, no parameters. H and W must be multiples of 4.
    """

    name = "sr"
    uses_seed = False
    factor: ClassVar[int] = 4

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        h, w = gt.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"sr: image size {h}x{w} must be a multiple of {self.factor} in both H and W")
        small = F.interpolate(gt, size=(h // 4, w // 4), mode="bicubic", antialias=True, align_corners=False)
        return F.interpolate(small.clamp(0, 1), size=(h, w), mode="bicubic", align_corners=False)


class MotionDeblur(Degradation):
    """Random linear motion blur (sub-pixel rendered line, reflect padding) plus faint Gaussian noise.

    | parameter | range               |
    |-----------|---------------------|
    | length    | [5, 13] px          |
    | angle     | [0, π) rad          |
    | noise_std | 1/255 (fixed)       |
    """

    name = "deblur"
    ranges = {"length": (5.0, 13.0), "angle": (0.0, math.pi)}
    noise_std: ClassVar[float] = 1 / 255
    kernel_size: ClassVar[int] = 15

    def _kernels(self, gens: list[torch.Generator]) -> Tensor:
        p = _uniform(gens, [self.ranges["length"], self.ranges["angle"]])
        return motion_kernels(p[:, 0], p[:, 1], self.kernel_size)

    def kernels_of(self, seeds: Tensor) -> Tensor:
        """The blur kernels `(B, k, k)` the samples with these seeds were degraded with (correlation
        kernels, as `filter_per_sample` applies them): the "true kernel" a non-blind deblurrer gets."""
        return self._kernels(_generators(seeds))

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        gens = _generators(seeds)
        blurred = filter_per_sample(gt, self._kernels(gens))
        return blurred + self.noise_std * _normal(gens, tuple(gt.shape[1:]))


class LowLight(Degradation):
    """Low light: I = s·J^γ plus signal-dependent (Poisson–Gaussian) noise of variance a·I + b².

    | parameter  | range          |
    |------------|----------------|
    | gamma γ    | [1.5, 2.5]     |
    | scale s    | [0.15, 0.45]   |
    | shot a     | [2e-4, 1.5e-3] |
    | read b     | [2e-3, 1e-2]   |
    """

    name = "lowlight"
    ranges = {"gamma": (1.5, 2.5), "scale": (0.15, 0.45), "shot": (2e-4, 1.5e-3), "read": (2e-3, 1e-2)}

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        gens = _generators(seeds)
        p = _uniform(gens, list(self.ranges.values()))[:, :, None, None, None]  # (B, 4, 1, 1, 1)
        dark = p[:, 1] * gt.clamp(min=0) ** p[:, 0]
        std = torch.sqrt(p[:, 2] * dark + p[:, 3] ** 2)
        return dark + std * _normal(gens, tuple(gt.shape[1:]))


class Underwater(Degradation):
    """Underwater image formation: I_c = J_c·t_c + B_c·(1 − t_c), t_c = exp(−β_c·d).

    Red is attenuated most. The distance d grows linearly towards the top of the image
    (d = d0·(1 + tilt·(1 − y/H))); the backscatter colour B is blue-green.

    | parameter    | range          |
    |--------------|----------------|
    | beta_r       | [0.30, 0.60] /unit |
    | beta_g       | [0.05, 0.20] /unit |
    | beta_b       | [0.03, 0.15] /unit |
    | distance d0  | [1.5, 5.0] units   |
    | tilt         | [0.0, 0.6]         |
    | backscatter_r| [0.02, 0.15]       |
    | backscatter_g| [0.35, 0.65]       |
    | backscatter_b| [0.45, 0.80]       |
    """

    name = "underwater"
    ranges = {
        "beta_r": (0.30, 0.60), "beta_g": (0.05, 0.20), "beta_b": (0.03, 0.15),
        "distance": (1.5, 5.0), "tilt": (0.0, 0.6),
        "backscatter_r": (0.02, 0.15), "backscatter_g": (0.35, 0.65), "backscatter_b": (0.45, 0.80),
    }

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        h = gt.shape[-2]
        p = _uniform(_generators(seeds), list(self.ranges.values()))
        beta = p[:, 0:3, None, None]  # (B, 3, 1, 1)
        backscatter = p[:, 5:8, None, None]
        rows = 1 - (torch.arange(h, dtype=torch.float32) + 0.5) / h  # 1 at the top, 0 at the bottom
        depth = p[:, 3, None, None, None] * (1 + p[:, 4, None, None, None] * rows[None, None, :, None])
        t = torch.exp(-beta * depth)  # (B, 3, H, 1)
        return gt * t + backscatter * (1 - t)


class Denoise(Degradation):
    """Additive white Gaussian noise, σ (in 8-bit units) chosen per sample from `sigmas`, then clamp.

    | parameter | range                                   |
    |-----------|-----------------------------------------|
    | sigma     | one of {15, 25, 50} / 255 (or fixed)    |

    `Denoise(sigma=25)` fixes σ = 25/255 for every sample.
    """

    name = "denoise"
    ranges = {"sigma": (15.0, 50.0)}

    def __init__(self, sigma: float | None = None, sigmas: tuple[float, ...] = (15.0, 25.0, 50.0)) -> None:
        self.sigmas = (float(sigma),) if sigma is not None else tuple(float(s) for s in sigmas)
        if not self.sigmas or min(self.sigmas) < 0:
            raise ValueError(f"denoise: sigmas must be non-negative 8-bit values, got {self.sigmas}")

    def sample_sigmas(self, gens: list[torch.Generator]) -> Tensor:
        """Per-sample σ in [0, 1] units `(B,)`."""
        idx = torch.cat([torch.randint(len(self.sigmas), (1,), generator=g) for g in gens])
        return torch.tensor(self.sigmas)[idx] / 255

    def sigmas_of(self, seeds: Tensor) -> Tensor:
        """The σ `(B,)` (in [0, 1] units) the samples with these seeds got: what a non-blind denoiser gets."""
        return self.sample_sigmas(_generators(seeds))

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        gens = _generators(seeds)
        sigma = self.sample_sigmas(gens)[:, None, None, None]
        return gt + sigma * _normal(gens, tuple(gt.shape[1:]))

    def __repr__(self) -> str:
        return f"Denoise(sigmas={self.sigmas})"


class Raindrop(Degradation):
    """Adherent raindrops: soft-edged elliptical lenses showing a blurred, inverted, brightened view.

    Inside drop k (centre c, radii r·(1, aspect), rotated) the output samples the blurred image at
    c + m·(p − c) (m < 0: inverted, as a water-drop lens), times gain plus offset. With ρ the
    elliptical radius, the drop's alpha is opacity·clamp((1 − ρ²) / (2·softness), 0, 1): opaque in
    the middle, fading to 0 over roughly the outer `softness` fraction of the radius.

    | parameter       | range                     |
    |-----------------|---------------------------|
    | count           | 3 … 12 drops              |
    | radius r        | [0.06, 0.16] · min(H, W)  |
    | aspect          | [0.65, 1.0]               |
    | rotation        | [0, π) rad                |
    | magnification m | [−1.5, −0.5]              |
    | softness        | [0.15, 0.45]              |
    | opacity         | [0.85, 1.0] per image     |
    | blur σ          | [1.0, 3.0] px             |
    | gain            | [1.0, 1.2]                |
    | offset          | [0.0, 0.06]               |
    """

    name = "raindrop"
    max_drops: ClassVar[int] = 12
    min_drops: ClassVar[int] = 3
    ranges = {
        "x": (0.0, 1.0), "y": (0.0, 1.0), "radius": (0.06, 0.16), "aspect": (0.65, 1.0),
        "rotation": (0.0, math.pi), "magnification": (-1.5, -0.5), "softness": (0.15, 0.45),
    }
    image_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "opacity": (0.85, 1.0), "blur": (1.0, 3.0), "gain": (1.0, 1.2), "offset": (0.0, 0.06),
    }
    kernel_size: ClassVar[int] = 19

    def sample(self, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample drop table `(B, 12, 7)` (columns as `ranges`) and image params `(B, 4)`.

        Rows past a sample's drop count are parked far off-image, so they never cover a pixel.
        """
        drops, image = [], []
        for g in _generators(seeds):
            n = int(torch.randint(self.min_drops, self.max_drops + 1, (1,), generator=g))
            d = _uniform([g] * self.max_drops, list(self.ranges.values()))
            d[n:, :2] = -100.0
            drops.append(d)
            image.append(_uniform([g], list(self.image_ranges.values()))[0])
        return torch.stack(drops), torch.stack(image)

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        b, _, h, w = gt.shape
        drops, image = self.sample(seeds)
        d = drops[:, :, :, None, None]  # (B, K, 7, 1, 1): d[:, k, j] is (B, 1, 1)
        cx, cy = d[:, :, 0] * w, d[:, :, 1] * h  # centres in px
        rx = d[:, :, 2] * min(h, w)
        ry = rx * d[:, :, 3]
        cos, sin = torch.cos(d[:, :, 4]), torch.sin(d[:, :, 4])
        # rho^2 = qa*dx^2 + qb*dx*dy + qc*dy^2 for the rotated ellipse, with separable dx, dy
        qa = (cos / rx) ** 2 + (sin / ry) ** 2
        qb = 2 * cos * sin * (1 / rx**2 - 1 / ry**2)
        qc = (sin / rx) ** 2 + (cos / ry) ** 2
        ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5  # (H, 1)
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5  # (1, W)
        dx, dy = xs - cx, ys - cy  # (B, K, 1, W), (B, K, H, 1)
        # keep, per pixel, the drop it is deepest inside (a loop over K beats max(dim) on CPU)
        a = torch.full((b, h, w), -1.0)
        m, pcx, pcy = torch.zeros(b, h, w), torch.zeros(b, h, w), torch.zeros(b, h, w)
        for k in range(self.max_drops):
            rho2 = (qa[:, k] * dx[:, k] ** 2 + qc[:, k] * dy[:, k] ** 2) + (qb[:, k] * dx[:, k]) * dy[:, k]
            t = (1 - rho2) * (1 / (2 * d[:, k, 6]))
            front = t > a
            a = torch.where(front, t, a)
            m = torch.where(front, d[:, k, 5], m)
            pcx = torch.where(front, cx[:, k], pcx)
            pcy = torch.where(front, cy[:, k], pcy)
        a = a.clamp_(0, 1)[:, None] * image[:, 0, None, None, None]
        src_x = pcx + m * (xs - pcx)  # inverted lens view around the drop centre
        src_y = pcy + m * (ys - pcy)
        grid = torch.stack([2 * src_x / w - 1, 2 * src_y / h - 1], dim=-1)  # (B, H, W, 2)
        ksize = min(self.kernel_size, 2 * (min(h, w) // 2) - 1)
        blurred = gaussian_blur(gt, image[:, 1], ksize)
        lens = F.grid_sample(blurred, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        lens = lens * image[:, 2, None, None, None] + image[:, 3, None, None, None]
        return gt * (1 - a) + lens.clamp(0, 1) * a


class Snow(Degradation):
    """Falling snow: bright Gaussian flakes in three size classes plus a motion-streaked class,
    alpha-composited over the image, then a light veil.

    Flake counts scale with image area (densities are flakes per pixel); each flake has a random
    opacity; streaks are near-vertical (wind-tilted) motion blurs of small flakes.

    | parameter        | range                     |
    |------------------|---------------------------|
    | density_small    | [4e-3, 1.2e-2] /px        |
    | density_medium   | [1e-3, 4e-3] /px          |
    | density_large    | [1e-4, 8e-4] /px          |
    | density_streak   | [5e-4, 3e-3] /px          |
    | sigma_small      | [0.4, 0.7] px             |
    | sigma_medium     | [0.8, 1.3] px             |
    | sigma_large      | [1.5, 2.5] px             |
    | sigma_streak     | [0.4, 0.7] px             |
    | opacity          | [0.4, 1.0] per flake      |
    | streak_length    | [4, 12] px                |
    | streak_angle     | π/2 ± 0.5 rad             |
    | flake_colour     | [0.85, 1.0]               |
    | veil             | [0.05, 0.25]              |
    | veil_colour      | [0.75, 0.95]              |
    """

    name = "desnow"
    ranges = {
        "density_small": (4e-3, 1.2e-2), "density_medium": (1e-3, 4e-3),
        "density_large": (1e-4, 8e-4), "density_streak": (5e-4, 3e-3),
        "sigma_small": (0.4, 0.7), "sigma_medium": (0.8, 1.3), "sigma_large": (1.5, 2.5), "sigma_streak": (0.4, 0.7),
        "streak_length": (4.0, 12.0), "streak_angle": (math.pi / 2 - 0.5, math.pi / 2 + 0.5),
        "flake_colour": (0.85, 1.0), "veil": (0.05, 0.25), "veil_colour": (0.75, 0.95),
    }
    opacity: ClassVar[tuple[float, float]] = (0.4, 1.0)
    layers: ClassVar[int] = 4
    kernel_size: ClassVar[int] = 13

    def _flakes(self, gens: list[torch.Generator], p: Tensor, h: int, w: int) -> Tensor:
        """Impulse maps `(B, 4, H, W)`: one layer per flake class, flake opacity at its pixel."""
        b = len(gens)
        idx, val = [], []
        for i, g in enumerate(gens):
            for layer in range(self.layers):
                n = int(round(float(p[i, layer]) * h * w))
                pos = torch.randint(h * w, (n,), generator=g)
                lo, hi = self.opacity
                val.append(lo + (hi - lo) * torch.rand(n, generator=g))
                idx.append(pos + (i * self.layers + layer) * h * w)
        impulses = torch.zeros(b * self.layers * h * w)
        impulses.index_put_((torch.cat(idx),), torch.cat(val), accumulate=True)
        return impulses.view(b, self.layers, h, w).clamp(max=1)

    def apply(self, gt: Tensor, seeds: Tensor) -> Tensor:
        b, _, h, w = gt.shape
        gens = _generators(seeds)
        p = _uniform(gens, list(self.ranges.values()))  # (B, 13)
        impulses = self._flakes(gens, p, h, w)
        # peak-normalised kernels: a flake's peak alpha is its opacity
        flakes = gaussian_blur(impulses.reshape(b * self.layers, 1, h, w), p[:, 4:8].reshape(-1),
                               self.kernel_size, padding="zeros", peak=True).view(b, self.layers, h, w)
        length = p[:, 8]
        streak_kernels = motion_kernels(length, p[:, 9], size=15)
        streak_gain = (length / (math.sqrt(2 * math.pi) * p[:, 7])).clamp(min=1)[:, None, None, None]
        streaks = filter_per_sample(flakes[:, 3:4], streak_kernels, padding="zeros") * streak_gain
        layers = torch.cat([flakes[:, :3], streaks], dim=1).clamp(0, 1)
        alpha = 1 - torch.prod(1 - layers, dim=1, keepdim=True)  # (B, 1, H, W)
        snowy = gt * (1 - alpha) + p[:, 10, None, None, None] * alpha
        veil = p[:, 11, None, None, None]
        return snowy * (1 - veil) + p[:, 12, None, None, None] * veil


DEGRADATIONS: dict[str, Degradation] = {
    d.name: d for d in (SuperResolution(), MotionDeblur(), LowLight(), Underwater(), Denoise(), Raindrop(), Snow())
}
assert tuple(DEGRADATIONS) == TASKS


def degrade(task: str, gt: Tensor, seeds: Tensor) -> Tensor:
    """Apply task `task`'s degradation: gt `(B, 3, H, W)` in [0, 1], int64 seeds `(B,)` -> LQ `(B, 3, H, W)`."""
    if task not in DEGRADATIONS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[task](gt, seeds)


def degradation_sheet(image: Tensor, path: str | Path, seed: int = 0) -> Path:
    """Save a labelled PNG grid: the clean image `(3, H, W)` in [0, 1] and each task's LQ with `seed`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = image.shape[-2:]
    gt = image[None, :, : h - h % 4, : w - w % 4].float().contiguous()
    panels = [("clean", gt[0])]
    panels += [(t, degrade(t, gt, torch.tensor([seed]))[0]) for t in TASKS]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3 * cols, 3 * rows * h / w + 0.4 * rows))
    FigureCanvasAgg(fig)
    for i, (label, img) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(label)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    log.info("wrote degradation sheet %s", path)
    return path
