"""Image sources (bundled photos, folders, paired LQ/GT folders), the seeded training stream and the
frozen, manifest-described test set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from fluxir.degradations import TASKS, degrade, task_id
from fluxir.files import replaced_whole, write_error
from fluxir.seeds import mix_seed

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy")
TESTSET_FORMAT = 1
# Training: every colour photograph scikit-image ships (its right motorcycle view, a near-duplicate of the
# left, is left out; retina, hubble_deep_field and immunohistochemistry are not photographs) and two
# greyscale photographs for more natural texture. Test: scikit-learn's two photos. Held out: matplotlib's
# Grace Hopper portrait, a third source no split trains or selects on ("never worse than the input").
TRAIN_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "grass")
TEST_IMAGES = ("china", "flower")
HELDOUT_IMAGES = ("grace_hopper",)


# ---------------------------------------------------------------- bundled images


@lru_cache(maxsize=None)
def _bundled_array(name: str) -> np.ndarray:
    """uint8 `(H, W, 3)` photo from scikit-image (train), scikit-learn (test) or matplotlib (held out)."""
    if name in TEST_IMAGES:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name in HELDOUT_IMAGES:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(f"{name}.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view
    array = getattr(skimage.data, name)()
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


def _to_tensor(array: np.ndarray) -> Tensor:
    """uint8 `(H, W, 3)` -> float32 `(3, H, W)` in [0, 1]."""
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float().div(255).contiguous()


def resize(image: Tensor, scale: float) -> Tensor:
    """Antialiased bicubic resize of `(3, H, W)` in [0, 1] by `scale`, clamped to [0, 1]."""
    if scale == 1.0:
        return image
    h, w = image.shape[-2:]
    return resize_to(image, (max(1, round(h * scale)), max(1, round(w * scale))))


def resize_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of `(3, H, W)` in [0, 1] to `size` (h, w), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


SPLITS = {"train": TRAIN_IMAGES, "test": TEST_IMAGES, "heldout": HELDOUT_IMAGES}


@lru_cache(maxsize=1)
def _check_splits_disjoint() -> None:
    """Assert no bundled image is in two splits (or twice in one), by pixel hash."""
    hashes = [hashlib.sha1(_bundled_array(n).tobytes()).hexdigest() for names in SPLITS.values() for n in names]
    assert len(set(hashes)) == len(hashes), "bundled train/test/held-out images overlap"


def bundled_images(split: str, scale: float = 1.0) -> list[tuple[str, Tensor]]:
    """Clean RGB photos `(name, (3, H, W) float32 in [0, 1])` shipped with the installed packages.

    "train": scikit-image photos; "test": scikit-learn's china and flower; "heldout": matplotlib's
    grace_hopper. The splits never share an image (checked by pixel hash). `scale` resizes (antialiased).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    _check_splits_disjoint()
    return [(n, resize(_to_tensor(_bundled_array(n)), scale)) for n in SPLITS[split]]


# ---------------------------------------------------------------- loading files


class ImageFileError(ValueError):
    """An image file that cannot be read, or written where asked; the message is one line naming the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{path}: {self.reason}")


class BadImageError(ImageFileError):
    """An image file that cannot be used; the message names the file and the reason."""


def _read_array(path: Path) -> np.ndarray:
    """Raw pixel array of a file (PIL, tifffile for TIFF, numpy for .npy); palette/LA/CMYK resolved."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    with Image.open(path) as im:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # upright, as viewers show it
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("PA", "LA"):
            im = im.convert("RGBA")
        elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif im.mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        elif im.mode == "I":  # 16-bit greyscale PNGs open as "I" in some Pillow versions
            a = np.asarray(im)
            if a.min() < 0 or a.max() > 65535:
                raise BadImageError(path, "32-bit integer image with values outside 16-bit range")
            return a.astype(np.uint16)
        return np.asarray(im)


def _to_unit(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale an array to float in [0, 1] by its dtype; floats must already be finite and in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadImageError(path, "float image contains NaN or inf")
        if array.min() < 0 or array.max() > 1:
            raise BadImageError(path, f"float image values in [{array.min():.3g}, {array.max():.3g}], not [0, 1]")
        return array.astype(np.float32)
    raise BadImageError(path, f"ambiguous pixel type {array.dtype} (expected uint8, uint16 or float in [0, 1])")


def _to_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """`(H, W)`, `(H, W, 1|2|3|4)` in [0, 1] -> `(H, W, 3)`; alpha must be fully opaque."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise BadImageError(path, f"unsupported array shape {pixels.shape} (expected (H, W) or (H, W, 1-4))")
    if pixels.shape[-1] in (2, 4):
        if pixels[..., -1].min() < 1:
            raise BadImageError(path, "alpha channel has transparent pixels (flatten the image onto a background first)")
        pixels = pixels[..., :-1]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def load_image(path: str | Path, min_size: int = 16) -> Tensor:
    """Load an image file as float32 `(3, H, W)` in [0, 1].

    Unambiguous conversions: greyscale/palette -> RGB, 16-bit -> [0, 1], fully opaque alpha dropped, the
    EXIF orientation applied. Raises BadImageError(path, reason) for a missing or empty file, an unreadable
    or truncated one, real transparency (refused: what belongs under it is not known), NaN/inf or
    out-of-range floats, ambiguous types, or a side shorter than `min_size`.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file")
    try:
        array = _read_array(path)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise BadImageError(path, "unreadable (not an image file PIL knows)") from exc
    except Exception as exc:  # PIL/tifffile/numpy raise many types for corrupt data
        raise BadImageError(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    pixels = _to_rgb(_to_unit(np.asarray(array), path), path)
    h, w = pixels.shape[:2]
    if min(h, w) < min_size:
        raise BadImageError(path, f"size {h}x{w} is smaller than min_size={min_size}")
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().contiguous()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderSource:
    """Clean images found recursively under `root`: `.images` = [(relative name, (3, H, W))].

    Bad files are skipped, listed in `.skipped` as (path, reason) and logged with one warning each.
    """

    def __init__(self, root: str | Path, min_size: int = 16) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.images: list[tuple[str, Tensor]] = []
        self.skipped: list[tuple[Path, str]] = []
        files = _image_files(self.root)
        for path in files:
            try:
                self.images.append((path.relative_to(self.root).as_posix(), load_image(path, min_size)))
            except BadImageError as exc:
                self.skipped.append((path, exc.reason))
                log.warning("skipping image %s: %s", path, exc.reason)
        if not self.images:
            raise ValueError(f"no usable images in folder {self.root} "
                             f"({len(files)} image files found, {len(self.skipped)} skipped as bad)")
        log.info("loaded %d images from %s (%d skipped)", len(self.images), self.root, len(self.skipped))

    def __len__(self) -> int:
        return len(self.images)


class PairedFolderSource:
    """LQ/GT pairs in the `<root>/<task>/{LQ,GT}/<name>` layout: `.items` = [(name, task, lq, gt)].

    `tasks=None` takes every task folder present (in TASKS order). A pair with a missing partner,
    mismatched sizes or a bad image is skipped, listed in `.skipped` and logged with one warning.
    """

    def __init__(self, root: str | Path, tasks: Sequence[str] | None = None, min_size: int = 16) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"paired folder {self.root} does not exist")
        if tasks is None:
            tasks = [t for t in TASKS if (self.root / t).is_dir()]
        for t in tasks:
            task_id(t)
            if not (self.root / t / "LQ").is_dir() or not (self.root / t / "GT").is_dir():
                raise FileNotFoundError(f"{self.root / t} needs LQ/ and GT/ subfolders")
        self.tasks = tuple(tasks)
        self.items: list[tuple[str, str, Tensor, Tensor]] = []
        self.skipped: list[tuple[Path, str]] = []
        for t in self.tasks:
            self._load_task(t, min_size)
        if not self.items:
            raise ValueError(f"no usable LQ/GT pairs in folder {self.root} ({len(self.skipped)} skipped)")

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        log.warning("skipping pair %s: %s", path, reason)

    def _load_task(self, task: str, min_size: int) -> None:
        lq_dir, gt_dir = self.root / task / "LQ", self.root / task / "GT"
        lq_names = {p.relative_to(lq_dir).as_posix() for p in _image_files(lq_dir)}
        gt_names = {p.relative_to(gt_dir).as_posix() for p in _image_files(gt_dir)}
        for name in sorted(lq_names ^ gt_names):
            present, missing = (lq_dir, "GT") if name in lq_names else (gt_dir, "LQ")
            self._skip(present / name, f"no {missing} partner")
        for name in sorted(lq_names & gt_names):
            try:
                lq = load_image(lq_dir / name, min_size)
                gt = load_image(gt_dir / name, min_size)
            except BadImageError as exc:
                self._skip(exc.path, exc.reason)
                continue
            if lq.shape != gt.shape:
                self._skip(lq_dir / name, f"LQ size {tuple(lq.shape[1:])} != GT size {tuple(gt.shape[1:])}")
                continue
            self.items.append((name, task, lq, gt))

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------- training stream


def dihedral(image: Tensor, k: int) -> Tensor:
    """One of the 8 flips/90° rotations (k in 0..7) of `(C, H, W)`."""
    out = torch.rot90(image, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def gradient_magnitude(image: Tensor) -> Tensor:
    """`(H, W)` luminance gradient magnitude of `(3, H, W)` (forward differences; last row/column 0)."""
    lum = image.mean(dim=0)
    grad = torch.zeros_like(lum)
    gx, gy = lum[:-1, 1:] - lum[:-1, :-1], lum[1:, :-1] - lum[:-1, :-1]
    grad[:-1, :-1] = torch.sqrt(gx**2 + gy**2)
    return grad


class TextureMap:
    """Mean gradient magnitude of any window of one image in O(1), from a summed-area table."""

    def __init__(self, image: Tensor) -> None:
        grad = gradient_magnitude(image).double()
        self.mean = float(grad.mean())
        self.table = F.pad(grad.cumsum(0).cumsum(1), (1, 0, 1, 0))

    def window_mean(self, top: Tensor, left: Tensor, size: int) -> Tensor:
        t, b, l, r = top, top + size, left, left + size
        total = self.table[b, r] - self.table[t, r] - self.table[b, l] + self.table[t, l]
        return (total / size**2).float()


class TrainStream:
    """Seeded, resumable stream of degraded training crops.

    `batch(step, rank, world_size)` is a pure function of (seed, step, rank, world_size): sample j of
    rank r at step s is global sample (s·world_size + r)·batch_size + j, whose image, scale, crop,
    flip/rotation, task and degradation seed come from a generator seeded by (seed, global index).
    Resuming at a step reproduces the stream; ranks get disjoint samples.

    Crops favour texture: of `texture_candidates` uniformly drawn windows one is kept with probability
    ∝ its mean gradient magnitude + `texture_floor` × the image's mean (flat areas still appear, less
    often); sr and deblur are the identity on flat crops. With `rescale` = (lo, hi) the window covers
    crop/s source pixels for s uniform in [lo, hi] and is resized (antialiased) to the crop. Tasks are
    drawn uniformly, or in proportion to `task_weights` (one per task).
    """

    def __init__(self, images: Sequence[tuple[str, Tensor]], tasks: Sequence[str], crop: int,
                 batch_size: int, seed: int, rescale: tuple[float, float] | None = None,
                 texture_candidates: int = 1, texture_floor: float = 0.2,
                 task_weights: Sequence[float] | None = None) -> None:
        if crop <= 0 or crop % 4:
            raise ValueError(f"crop must be a positive multiple of 4 (sr downsamples ×4), got {crop}")
        if not tasks:
            raise ValueError("tasks must name at least one task")
        if texture_candidates < 1 or texture_floor < 0:
            raise ValueError(f"texture_candidates must be >= 1 and texture_floor >= 0, got "
                             f"{texture_candidates}, {texture_floor}")
        if task_weights is not None and (len(task_weights) != len(tasks) or min(task_weights) < 0
                                         or sum(task_weights) <= 0):
            raise ValueError(f"task_weights {list(task_weights)} must be one non-negative weight per task "
                             f"{list(tasks)}, not all 0")
        if rescale is not None and not 0 < rescale[0] <= rescale[1]:
            raise ValueError(f"rescale must be (lo, hi) with 0 < lo <= hi, got {rescale}")
        for t in tasks:
            task_id(t)
        largest = self.window(crop, rescale[0]) if rescale else crop
        small = [n for n, im in images if min(im.shape[-2:]) < largest]
        for n in small:
            log.warning("training image %s is smaller than the largest window %d; not used", n, largest)
        self.images = [(n, im) for n, im in images if min(im.shape[-2:]) >= largest]
        if not self.images:
            raise ValueError(f"no training image is at least {largest}x{largest}")
        self.tasks = tuple(tasks)
        self.crop, self.batch_size, self.seed = crop, batch_size, seed
        self.rescale, self.candidates, self.floor = rescale, texture_candidates, texture_floor
        self.textures = [TextureMap(im) for _, im in self.images] if texture_candidates > 1 else None
        self.task_weights = torch.tensor(task_weights, dtype=torch.float64) if task_weights is not None else None

    @staticmethod
    def window(crop: int, scale: float) -> int:
        """Source pixels a crop covers at `scale` (crop/scale, rounded)."""
        return max(1, round(crop / scale))

    def _corner(self, index: int, size: int, g: torch.Generator) -> tuple[int, int]:
        """(top, left) of a `size` window of image `index`: one uniform draw, or texture-weighted among several."""
        h, w = self.images[index][1].shape[-2:]
        tops = torch.randint(h - size + 1, (self.candidates,), generator=g)
        lefts = torch.randint(w - size + 1, (self.candidates,), generator=g)
        if self.candidates == 1:
            return int(tops[0]), int(lefts[0])
        texture = self.textures[index]
        weights = texture.window_mean(tops, lefts, size) + self.floor * texture.mean + 1e-12
        pick = int(torch.multinomial(weights, 1, generator=g))
        return int(tops[pick]), int(lefts[pick])

    def sample(self, index: int) -> tuple[Tensor, int, int]:
        """Global sample `index` -> (GT crop `(3, crop, crop)`, task id, degradation seed)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, index))
        which = int(torch.randint(len(self.images), (1,), generator=g))
        size = self.crop
        if self.rescale:
            lo, hi = self.rescale
            size = self.window(self.crop, lo + (hi - lo) * float(torch.rand(1, generator=g)))
        top, left = self._corner(which, size, g)
        k = int(torch.randint(8, (1,), generator=g))
        if self.task_weights is None:
            task = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=g))]
        else:
            task = self.tasks[int(torch.multinomial(self.task_weights, 1, generator=g))]
        deg_seed = int(torch.randint(2**62, (1,), generator=g))
        window = self.images[which][1][:, top : top + size, left : left + size]
        gt = dihedral(resize_to(window, (self.crop, self.crop)), k)
        return gt, task_id(task), deg_seed

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """dict(lq, gt `(B, 3, crop, crop)` in [0, 1], task `(B,)` int64 ids in TASKS order, seed `(B,)` int64)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        first = (step * world_size + rank) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        gt = torch.stack([s[0] for s in samples]).contiguous()
        task = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        seed = torch.tensor([s[2] for s in samples], dtype=torch.int64)
        lq = torch.empty_like(gt)
        for t in task.unique().tolist():
            idx = (task == t).nonzero().squeeze(1)
            lq[idx] = degrade(TASKS[t], gt[idx], seed[idx])
        return {"lq": lq, "gt": gt, "task": task, "seed": seed}


# ---------------------------------------------------------------- frozen test set


def textured_crops(image: Tensor, size: int, count: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners (top, left) of up to `count` non-overlapping `size`×`size` windows of `(3, H, W)`
    with the highest mean gradient magnitude, best first (greedy over a `stride` grid, default size/4).

    Flat windows (sky, petals) make restoration metrics meaningless, so they are avoided.
    """
    h, w = image.shape[-2:]
    if min(h, w) < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop size {size}")
    stride = stride or max(1, size // 4)
    score = F.avg_pool2d(gradient_magnitude(image)[None, None], size, stride=stride)[0, 0]  # (rows, cols)
    order = torch.argsort(score.flatten(), descending=True, stable=True).tolist()
    chosen: list[tuple[int, int]] = []
    for flat in order:
        top, left = (flat // score.shape[1]) * stride, (flat % score.shape[1]) * stride
        if all(abs(top - t) >= size or abs(left - l) >= size for t, l in chosen):
            chosen.append((top, left))
            if len(chosen) == count:
                break
    if len(chosen) < count:
        log.warning("only %d non-overlapping %dx%d crops fit in a %dx%d image", len(chosen), size, size, h, w)
    return chosen


WRITE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def output_format(path: str | Path) -> str:
    """PIL's format name for writing an 8-bit RGB image to `path`, from its suffix; ImageFileError if
    fluxir does not write that kind of file (or this Pillow cannot)."""
    Image.init()
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if suffix not in WRITE_SUFFIXES or fmt not in Image.SAVE:
        raise ImageFileError(path, f"cannot write {f'{suffix!r} files' if suffix else 'a file without a suffix'}; "
                                   f"the output must end in one of {', '.join(WRITE_SUFFIXES)}")
    return fmt


def check_output_path(path: str | Path, source: str | Path | None = None) -> None:
    """Raise ImageFileError unless an image can be written at `path`: a suffix fluxir writes, not a folder
    nor a read-only file, inside a writable folder (or one that can be made), and not the file `source`
    (also through a link or another spelling)."""
    path = Path(path)
    output_format(path)
    if path.is_dir():
        raise ImageFileError(path, "is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ImageFileError(path, "is read-only")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ImageFileError(path, f"cannot be written: {folder} is not a writable folder")
    if source is not None and path.exists() and os.path.samefile(source, path):
        raise ImageFileError(path, f"is the input {source} itself; give another output, or --overwrite to replace it")


def save_image(image: Tensor, path: str | Path) -> None:
    """Write `(3, H, W)` in [0, 1] as an 8-bit RGB image (format from the suffix, e.g. PNG); a failed write
    (ImageFileError) leaves a file already at `path` as it was."""
    path = Path(path)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    try:
        with replaced_whole(path) as f:
            Image.fromarray(array).save(f, format=fmt)
    except OSError as err:
        raise ImageFileError(path, f"not written ({write_error(path, err).strerror}); "
                                   "a file already there is unchanged") from err


def quantise(image: Tensor) -> Tensor:
    """Round `(..., H, W)` in [0, 1] to the 8-bit grid, as a PNG round trip would."""
    return (image.clamp(0, 1) * 255).round() / 255


def crop_pairs(images: Sequence[tuple[str, Tensor]], tasks: Sequence[str], crop: int, crops_per_image: int,
               seed: int) -> dict:
    """The most textured `crop`² windows of each image (8-bit GT) and each task's degraded LQ.

    Returns dict(names, sources, boxes, gt (N, 3, crop, crop), tasks={task: dict(lq, seeds)}); the
    degradation seed of pair i of task t is mix_seed(seed, task id, i).
    """
    gts, names, sources, boxes = [], [], [], []
    for source, image in images:
        for k, (top, left) in enumerate(textured_crops(image, crop, crops_per_image)):
            gts.append(quantise(image[:, top : top + crop, left : left + crop]))
            names.append(f"{source}_{k}.png")
            sources.append(source)
            boxes.append([top, left, crop, crop])
    gt = torch.stack(gts).contiguous()
    per_task = {}
    for t in tasks:
        seeds = torch.tensor([mix_seed(seed, task_id(t), i) for i in range(len(names))], dtype=torch.int64)
        per_task[t] = {"lq": degrade(t, gt, seeds), "seeds": seeds}
    return {"names": names, "sources": sources, "boxes": boxes, "gt": gt, "tasks": per_task}


def _build_testset(folder: Path, spec: dict) -> dict:
    """Write all PNG pairs of `spec` into `folder`; return the manifest."""
    crops = crop_pairs(bundled_images("test", spec["scale"]), spec["tasks"], spec["crop"], spec["crops_per_image"],
                       spec["seed"])
    pairs = []
    for t, d in crops["tasks"].items():
        for i, name in enumerate(crops["names"]):
            save_image(crops["gt"][i], folder / t / "GT" / name)
            save_image(d["lq"][i], folder / t / "LQ" / name)
            pairs.append({"task": t, "name": name, "source": crops["sources"][i], "box": crops["boxes"][i],
                          "seed": int(d["seeds"][i]), "lq": f"{t}/LQ/{name}", "gt": f"{t}/GT/{name}"})
    return {"format_version": TESTSET_FORMAT, "spec": spec, "pairs": pairs}


# Seeds of the in-memory evaluation sets (the frozen test set's is 1234).
EVAL_SET_SEEDS = {"val": 4321, "heldout": 2468}


def in_memory_set(cfg, split: str) -> dict[str, dict]:
    """An evaluation set in `load_testset`'s format, built in memory (8-bit, as the PNG test set is).

    "val": `data.val_crops_per_image` textured crops of each training image (bundled: at the test scale), with
    their own degradation seeds — where settings are chosen. "heldout": crops of a photo that no split
    trains or selects on (matplotlib's Grace Hopper), reported beside the frozen test set.
    """
    d = cfg.data
    per_image = d.val_crops_per_image if split == "val" else d.test_crops_per_image
    images = (training_images(cfg, scale=d.test_scale) if split == "val"
              else bundled_images(split, scale=d.test_scale))
    crops = crop_pairs(images, d.tasks, d.test_crop, per_image, EVAL_SET_SEEDS[split])
    return {t: {"lq": quantise(v["lq"]), "gt": crops["gt"], "names": crops["names"], "seeds": v["seeds"]}
            for t, v in crops["tasks"].items()}


def training_images(cfg, scale: float | None = None) -> list[tuple[str, Tensor]]:
    """The clean images stage 0 trains on: `data.folder` as its files are, else the bundled training
    photos at `scale` (default `data.train_scale`)."""
    if cfg.data.folder:
        return ImageFolderSource(cfg.data.folder, min_size=cfg.data.crop).images
    images = bundled_images("train", scale=cfg.data.train_scale if scale is None else scale)
    return [(n, im) for n, im in images if cfg.data.train_images is None or n in cfg.data.train_images]


def train_stream(cfg, batch_size: int | None = None, seed: int | None = None) -> TrainStream:
    """The training stream a `Config` describes (images, tasks, crop, texture weighting, rescaling); stage 0
    uses it as is, stages 1 and 2 with their own batch size and seed."""
    d = cfg.data
    return TrainStream(training_images(cfg), d.tasks, d.crop, d.batch_size if batch_size is None else batch_size,
                       cfg.seed if seed is None else seed, rescale=tuple(d.rescale) if d.rescale else None,
                       texture_candidates=d.texture_candidates, texture_floor=d.texture_floor,
                       task_weights=[d.task_weights.get(t, 1.0) for t in d.tasks] if d.task_weights else None)


def evaluation_set(cfg, split: str) -> dict[str, dict]:
    """The set `fluxir eval --split` scores: "test" (the frozen, materialised test set), "val" or "heldout"."""
    if split == "test":
        return frozen_testset(cfg)
    if split in EVAL_SET_SEEDS:
        return in_memory_set(cfg, split)
    raise ValueError(f"unknown evaluation split {split!r}; known: test, val, heldout")


def _read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_testset_current(folder: str | Path) -> None:
    """Raise ValueError unless every stored LQ is what today's degradation code makes of its stored GT and
    seed (to the 8-bit step): a set built by an older version of a degradation is stale, and its numbers
    would not match a fresh clone's."""
    data = load_testset(folder)
    for task, d in data.items():
        fresh = quantise(degrade(task, d["gt"], d["seeds"]))
        worst = (fresh - d["lq"]).abs().flatten(1).amax(1)
        stale = [d["names"][i] for i in torch.nonzero(worst > 1.5 / 255).flatten().tolist()]
        if stale:
            raise ValueError(f"test set {folder} is stale: {task} LQ of {stale[:3]} ({len(stale)} of "
                             f"{len(worst)}) differ from what the current degradation makes of their GT and seed "
                             f"(max {float(worst.max()) * 255:.0f}/255); delete the folder to rebuild it")


def materialise_testset(out_dir: str | Path, tasks: Sequence[str] = TASKS, crop: int = 64,
                        crops_per_image: int = 4, seed: int = 1234, scale: float = 1.0) -> Path:
    """Build (once) the frozen test set: textured GT crops of the bundled test photos and each task's LQ.

    Writes 8-bit PNG pairs `out_dir/<task>/{LQ,GT}/<image>_<k>.png` and `out_dir/manifest.json`
    (format version, spec, and per pair: source image, crop box [top, left, h, w], task, degradation
    seed). Built in a temporary sibling folder and renamed into place. An existing set with the same
    spec is reused untouched; one with a different spec raises ValueError.
    """
    for t in tasks:
        task_id(t)
    if crop % 4:
        raise ValueError(f"crop must be a multiple of 4 (sr downsamples ×4), got {crop}")
    out_dir = Path(out_dir)
    spec = {"tasks": list(tasks), "crop": int(crop), "crops_per_image": int(crops_per_image),
            "seed": int(seed), "scale": float(scale)}
    existing = _read_manifest(out_dir)
    if existing is not None:
        if existing.get("format_version") == TESTSET_FORMAT and existing.get("spec") == spec:
            check_testset_current(out_dir)
            log.info("reusing test set %s", out_dir)
            return out_dir
        raise ValueError(f"test set {out_dir} was built with spec {existing.get('spec')} "
                         f"(format {existing.get('format_version')}), not {spec} (format {TESTSET_FORMAT}); "
                         f"delete the folder or choose another out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists, is not empty and has no manifest.json; "
                         f"delete the folder or choose another out_dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = _build_testset(tmp, spec)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished the same build first
            if _read_manifest(out_dir) != manifest:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote test set %s: %d pairs", out_dir, len(manifest["pairs"]))
    return out_dir


def frozen_testset(cfg) -> dict[str, dict]:
    """The frozen test set a `Config` names (built once under `cfg.testset_dir`), loaded."""
    d = cfg.data
    path = materialise_testset(cfg.testset_dir, tasks=d.tasks, crop=d.test_crop,
                               crops_per_image=d.test_crops_per_image, seed=1234, scale=d.test_scale)
    return load_testset(path)


def load_testset(folder: str | Path) -> dict[str, dict]:
    """Load a materialised test set: {task: dict(lq=(N, 3, h, w), gt=(N, 3, h, w), names=[...], seeds=(N,))}.

    Every pair listed in the manifest must load; a missing or bad file raises ValueError.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} has no manifest.json; build it with materialise_testset")
    if manifest.get("format_version") != TESTSET_FORMAT:
        raise ValueError(f"{folder}: test-set format {manifest.get('format_version')}, expected {TESTSET_FORMAT}")
    source = PairedFolderSource(folder, tasks=manifest["spec"]["tasks"], min_size=1)
    found = {(task, name): (lq, gt) for name, task, lq, gt in source.items}
    out: dict[str, dict] = {}
    for t in manifest["spec"]["tasks"]:
        pairs = [p for p in manifest["pairs"] if p["task"] == t]
        missing = [p["lq"] for p in pairs if (t, p["name"]) not in found]
        if missing:
            raise ValueError(f"test set {folder} is incomplete: {missing[:5]} missing or unreadable")
        out[t] = {
            "lq": torch.stack([found[t, p["name"]][0] for p in pairs]),
            "gt": torch.stack([found[t, p["name"]][1] for p in pairs]),
            "names": [p["name"] for p in pairs],
            "seeds": torch.tensor([p["seed"] for p in pairs], dtype=torch.int64),
        }
    return out
