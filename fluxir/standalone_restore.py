"""Restore an image with an exported fluxir model, using only torch, diffusers, safetensors and Pillow.

`fluxir export` copies this file into every export as `restore.py`; it must never import fluxir.
It re-states fluxir's sampler so that an export is usable (and checkable) on its own:

    python restore.py --task denoise [--budget K] in.png out.png      # out.npy: float32 (H, W, 3)

What it does, from `manifest.json` ("sampler") and `schedules.json` ({budget: times}):
  * encode: pixels x in [0, 1] -> 2x − 1 (pixel codec) or FLUX's VAE latent (mode(E(2x − 1)) − shift)·scale;
  * pack 2×2 latent patches into tokens (FluxPipeline's order) with position ids (0, row, col);
  * start: x = (1 − t0)·μ + t0·(μ + σ·ε), μ = the LQ tokens ("lq" source) or 0 ("gaussian"), ε ~ N(0, I)
    from torch.Generator().manual_seed(seed) (over the tokens; tiled: one latent field over the whole image,
    cropped per tile and packed like the LQ, so overlapping tiles share their noise);
  * each step t -> s of the schedule: the transformer sees [x, LQ] concatenated on channels and the task's
    conditioning (conditioning.safetensors); x0̂ = LQ + out ("x0_residual"), its preconditioned form
    ("x0_precond", c_skip/c_out as fluxir.flow.precondition) or x − t·out ("velocity");
    v = (x − x0̂)/t; x <- x0̂ if s = 0 else x + (s − t)·v;
  * images larger than the tile are restored in overlapping tiles blended with linear ramps (a side shorter
    than the tile is one tile of its length), `BATCH` tiles per transformer call, with a progress bar; the
    overlap is the sampler's (the evaluation's), or with --fast cut to at most FAST_MAX_OVERLAP of the tile
    keeping its remainder modulo 2·downsample (fluxir.evaluate.fast_tiling: fewer tiles, a little lower
    quality).
Like `fluxir restore`, it checks everything it can before loading the model and ends any bad input in one
line on stderr and exit code 2: the budget and task, the image (missing, empty, unreadable, truncated, with
transparent pixels, smaller than `MIN_SIZE`; the EXIF orientation is applied), the output (a suffix of
`OUTPUT_SUFFIXES`, not the input file unless --overwrite). The output is written beside its target and
renamed over it, so a failed write leaves a file already there unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MIN_SIZE = 16
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".npy")
BATCH = 64  # tiles per transformer call
FAST_MAX_OVERLAP = 1 / 8  # of a tile, with --fast


class RestoreError(ValueError):
    """A bad budget, task, input image or output path, or a failed write: one line, exit code 2."""


def read_settings(model_dir: Path) -> tuple[dict, dict[int, list[float]]]:
    """(manifest, schedules {budget: times}) of an export: two small JSON files, read before any weights."""
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text())
        return manifest, {int(k): v for k, v in json.loads((model_dir / "schedules.json").read_text()).items()}
    except (OSError, ValueError) as err:
        raise RestoreError(f"{model_dir}: not a readable fluxir export ({type(err).__name__}: {err})") from None


def load_model(model_dir: Path, device: str = "cpu", dtype=torch.float32):
    """(transformer, prompt_embeds (T, L, D), pooled (T, P), vae or None, manifest, schedules)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    manifest, schedules = read_settings(model_dir)
    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=dtype,
                                                         use_safetensors=True)
    cond = load_file(str(model_dir / "conditioning.safetensors"))
    vae = None
    if manifest["sampler"]["codec"] == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype,
                                            use_safetensors=True).to(device).eval()
    return (transformer.to(device).eval(), cond["prompt_embeds"].to(device, dtype),
            cond["pooled_prompt_embeds"].to(device, dtype), vae, manifest, schedules)


def encode(images, vae):
    if vae is None:
        return images * 2 - 1
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode(latents, vae):
    if vae is not None:
        latents = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return ((latents + 1) / 2).clamp(0, 1)


def pack(latents):
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, height: int, width: int):
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def position_ids(height: int, width: int, device):
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


@torch.no_grad()
def sample(model, lq_images, task: int, schedule: list[float], seed: int, noise=None):
    """The ODE sampler on one batch (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]; `noise`, if given, is ε
    in latent layout (B, C, H/ds, W/ds), else ε is drawn over the tokens from `seed`."""
    transformer, tokens, pooled, vae, manifest, _ = model
    s = manifest["sampler"]
    z = encode(lq_images, vae)
    h, w = z.shape[-2:]
    lq = pack(z)
    ids = position_ids(h, w, lq.device).to(lq.dtype)
    mu = lq if s["source"] == "lq" else torch.zeros_like(lq)
    sigma = s["sigma_src"] if s["source"] == "lq" else 1.0
    eps = pack(noise) if noise is not None else \
        torch.randn(lq.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    t0 = schedule[0]
    x = (1 - t0) * mu + t0 * (mu + sigma * eps.to(lq.device, lq.dtype))
    idx = task if tokens.shape[0] > 1 else 0
    cond = tokens[idx].expand(x.shape[0], -1, -1)
    pool = pooled[idx].expand(x.shape[0], -1)
    txt_ids = torch.zeros(cond.shape[1], 3, device=x.device, dtype=ids.dtype)
    for t, s_next in zip(schedule, schedule[1:]):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        guidance = torch.full_like(tt, s["guidance"]) if transformer.config.guidance_embeds else None
        out = transformer(hidden_states=torch.cat([x, lq], dim=-1), encoder_hidden_states=cond,
                          pooled_projections=pool, timestep=tt, img_ids=ids, txt_ids=txt_ids,
                          guidance=guidance, return_dict=False)[0]
        if s["parametrization"] == "velocity":
            x0 = x - t * out
            v = out
        else:
            x0 = lq + out
            if s["parametrization"] == "x0_precond":  # EDM-style: + c_skip·(x − E[x | LQ]), F scaled by c_out
                sigma, sd = (s["sigma_src"] if s["source"] == "lq" else 1.0), s["sigma_data"]
                d = ((1 - t) * sd) ** 2 + (t * sigma) ** 2
                mean = lq if s["source"] == "lq" else (1 - t) * lq
                x0 = lq + (1 - t) * sd**2 / d * (x - mean) + t * sigma / d**0.5 * out
            v = (x - x0) / max(t, 1e-4)
        x = x0 if s_next == 0.0 else x + (s_next - t) * v
    return decode(unpack(x, h, w), vae)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return sorted(set(range(0, size - tile, tile - overlap)) | {size - tile})


def _ramp(size: int, overlap: int):
    r = torch.ones(size)
    if overlap > 0:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        r[:overlap], r[-overlap:] = edge, edge.flip(0)
    return r


def restore_tiling(sampler: dict, fast: bool = False) -> tuple[int, int]:
    """(tile, overlap) for images larger than one tile: the sampler's, or as fluxir.evaluate.fast_tiling."""
    tile, overlap, step = sampler["tile"], sampler["overlap"], 2 * sampler["downsample"]
    if not fast:
        return tile, overlap
    cap, rest = int(tile * FAST_MAX_OVERLAP), overlap % step
    return tile, min(overlap, rest if cap < rest else rest + (cap - rest) // step * step)


def restore(model, image, task: str, budget: int | None = None, progress=None, fast: bool = False):
    """One image (3, H, W) in [0, 1] -> restored (3, H, W); tiled like fluxir's restore.
    `progress(done, total)` is called with the tiles restored so far."""
    manifest, schedules = model[4], model[5]
    s = manifest["sampler"]
    schedule = schedules[budget if budget is not None else manifest["default_budget"]]
    task_id = manifest["tasks"].index(task)
    multiple = max(4, 2 * s["downsample"])
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    x = torch.nn.functional.pad(image[None], (0, pw, 0, ph), mode="reflect") if ph or pw else image[None]
    (tile, overlap), (H, W) = restore_tiling(s, fast), x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    boxes = [(y, xx) for y in _tile_starts(H, th, overlap) for xx in _tile_starts(W, tw, overlap)]
    if len(boxes) == 1:
        out = sample(model, x, task_id, schedule, s["seed"])
        if progress:
            progress(1, 1)
        return out[0, :, :h, :w]
    ds, vae = s["downsample"], model[3]
    field = torch.randn(1, vae.config.latent_channels if vae is not None else 3, H // ds, W // ds,
                        generator=torch.Generator().manual_seed(s["seed"]))
    weight = _ramp(th, overlap)[:, None] * _ramp(tw, overlap)[None, :]
    acc, norm = torch.zeros_like(x), torch.zeros(H, W)
    for y, xx in boxes:
        norm[y:y + th, xx:xx + tw] += weight
    if progress:
        progress(0, len(boxes))
    for start in range(0, len(boxes), BATCH):
        chunk = boxes[start:start + BATCH]
        crops = torch.cat([x[:, :, y:y + th, xx:xx + tw] for y, xx in chunk])
        noise = torch.cat([field[:, :, y // ds:(y + th) // ds, xx // ds:(xx + tw) // ds] for y, xx in chunk])
        for (y, xx), out in zip(chunk, sample(model, crops, task_id, schedule, s["seed"], noise)):
            acc[0, :, y:y + th, xx:xx + tw] += out * weight
        if progress:
            progress(start + len(chunk), len(boxes))
    return (acc / norm)[0, :, :h, :w]


def read_image(path: str, min_size: int = MIN_SIZE) -> torch.Tensor:
    """An RGB image file -> (3, H, W) in [0, 1], upright by its EXIF orientation; RestoreError if unusable."""
    p = Path(path)
    if not p.is_file():
        raise RestoreError(f"{path}: {'no such file' if not p.exists() else 'not a file'}")
    if p.stat().st_size == 0:
        raise RestoreError(f"{path}: empty file")
    try:
        with Image.open(p) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            pixels = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except Image.UnidentifiedImageError:
        raise RestoreError(f"{path}: unreadable (not an image file PIL knows)") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of saying "corrupt" or "truncated"
        raise RestoreError(f"{path}: unreadable ({type(err).__name__}: {' '.join(str(err).split())})") from None
    if has_alpha and pixels[..., 3].min() < 1:
        raise RestoreError(f"{path}: alpha channel has transparent pixels (flatten the image onto a background "
                           "first)")
    rgb = pixels[..., :3]
    if min(rgb.shape[:2]) < min_size:
        raise RestoreError(f"{path}: size {rgb.shape[0]}x{rgb.shape[1]} is smaller than min_size={min_size}")
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def check_output(path: str, source: str | None) -> None:
    """RestoreError unless `path` has a suffix this script writes, is not a folder nor a read-only file, and
    is not the file `source` (also through a link or another spelling)."""
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise RestoreError(f"{path}: cannot write {p.suffix or 'a file without a suffix'!r}; the output must "
                           f"end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if p.is_dir() or not p.absolute().parent.is_dir():
        raise RestoreError(f"{path}: {'is a folder' if p.is_dir() else 'its folder does not exist'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise RestoreError(f"{path}: is read-only")
    if source is not None and p.exists() and os.path.samefile(source, p):
        raise RestoreError(f"{path}: is the input {source} itself; give another output, or --overwrite to "
                           "replace it")


@contextmanager
def replaced_whole(path: str):
    """A binary file that takes `path`'s place (through a link: the file it names) only once written in full."""
    target = Path(os.path.realpath(path))
    partial = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")
    try:
        with open(partial, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_output(image, path: str) -> None:
    """(3, H, W) in [0, 1] -> 8-bit image file, or float32 (H, W, 3) for .npy; whole or not at all."""
    array = image.permute(1, 2, 0).float().cpu().numpy()
    try:
        with replaced_whole(path) as f:
            if path.lower().endswith(".npy"):
                np.save(f, array)
            else:
                Image.init()
                Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(
                    f, format=Image.registered_extensions()[Path(path).suffix.lower()])
    except OSError as err:
        raise RestoreError(f"{path}: not written ({err.strerror or err}); a file already there is unchanged") from err


def check_request(budget: int | None, task: str, manifest: dict, schedules: dict) -> None:
    """RestoreError unless the export has a schedule for `budget` (None: its default) and knows `task`."""
    if budget is not None and budget not in schedules:
        raise RestoreError(f"--budget {budget}: schedules.json has budgets {sorted(schedules)}")
    if task not in manifest["tasks"]:
        raise RestoreError(f"--task {task!r} is not one of {manifest['tasks']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parent), help="export folder (default: here)")
    p.add_argument("--task", required=True)
    p.add_argument("--budget", type=int, help="steps; a key of schedules.json (default: manifest default_budget)")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input file itself")
    p.add_argument("--fast", action="store_true", help="fewer, less overlapping tiles: faster on large images, "
                                                       "a little lower quality (the test-set figures are without)")
    p.add_argument("input")
    p.add_argument("output", help="an 8-bit image (.png, .jpg, ...) or .npy (float32 H×W×3 in [0, 1])")
    args = p.parse_args(argv)
    try:
        check_request(args.budget, args.task, *read_settings(Path(args.model)))
        image = read_image(args.input)
        check_output(args.output, None if args.overwrite else args.input)
        model = load_model(Path(args.model))
        from tqdm import tqdm  # installed with diffusers (huggingface_hub)

        with tqdm(desc="restore", unit="tile", file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            out = restore(model, image, args.task, args.budget, progress, args.fast)
        write_output(out, args.output)
    except RestoreError as err:
        print(f"restore.py: {err}", file=sys.stderr)
        return 2
    print(f"restored {args.input} ({args.task}) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
