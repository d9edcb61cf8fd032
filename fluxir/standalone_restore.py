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
  * images larger than the tile are restored in overlapping tiles blended with linear ramps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_model(model_dir: Path, device: str = "cpu", dtype=torch.float32):
    """(transformer, prompt_embeds (T, L, D), pooled (T, P), vae or None, manifest, schedules)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    manifest = json.loads((model_dir / "manifest.json").read_text())
    schedules = {int(k): v for k, v in json.loads((model_dir / "schedules.json").read_text()).items()}
    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=dtype)
    cond = load_file(str(model_dir / "conditioning.safetensors"))
    vae = None
    if manifest["sampler"]["codec"] == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype).to(device).eval()
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


def _ramp(tile: int, overlap: int):
    r = torch.ones(tile)
    if overlap > 0:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        r[:overlap], r[-overlap:] = edge, edge.flip(0)
    return r[:, None] * r[None, :]


def restore(model, image, task: str, budget: int | None = None):
    """One image (3, H, W) in [0, 1] -> restored (3, H, W); tiled like fluxir's evaluation."""
    manifest, schedules = model[4], model[5]
    s = manifest["sampler"]
    schedule = schedules[budget if budget is not None else manifest["default_budget"]]
    task_id = manifest["tasks"].index(task)
    multiple = max(4, 2 * s["downsample"])
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    x = torch.nn.functional.pad(image[None], (0, pw, 0, ph), mode="reflect") if ph or pw else image[None]
    tile, overlap, (H, W) = s["tile"], s["overlap"], x.shape[-2:]
    if H <= tile and W <= tile:
        return sample(model, x, task_id, schedule, s["seed"])[0, :, :h, :w]
    if H < tile or W < tile:
        raise ValueError(f"image {h}x{w} is smaller than the tile {tile} in one dimension")
    boxes = [(y, xx) for y in _tile_starts(H, tile, overlap) for xx in _tile_starts(W, tile, overlap)]
    crops = torch.cat([x[:, :, y:y + tile, xx:xx + tile] for y, xx in boxes])
    ds, lt, vae = s["downsample"], tile // s["downsample"], model[3]
    field = torch.randn(1, vae.config.latent_channels if vae is not None else 3, H // ds, W // ds,
                        generator=torch.Generator().manual_seed(s["seed"]))
    noise = torch.cat([field[:, :, y // ds:y // ds + lt, xx // ds:xx // ds + lt] for y, xx in boxes])
    outs = torch.cat([sample(model, crops[i:i + 64], task_id, schedule, s["seed"], noise[i:i + 64])
                      for i in range(0, len(crops), 64)])
    acc, norm, weight = torch.zeros_like(x), torch.zeros(1, 1, H, W), _ramp(tile, overlap)
    for k, (y, xx) in enumerate(boxes):
        acc[:, :, y:y + tile, xx:xx + tile] += outs[k] * weight
        norm[:, :, y:y + tile, xx:xx + tile] += weight
    return (acc / norm)[0, :, :h, :w]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parent), help="export folder (default: here)")
    p.add_argument("--task", required=True)
    p.add_argument("--budget", type=int, help="steps; a key of schedules.json (default: manifest default_budget)")
    p.add_argument("input")
    p.add_argument("output", help=".png (8-bit) or .npy (float32 H×W×3 in [0, 1])")
    args = p.parse_args(argv)
    model = load_model(Path(args.model))
    rgb = np.asarray(Image.open(args.input).convert("RGB"), dtype=np.float32) / 255.0
    out = restore(model, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), args.task, args.budget)
    array = out.permute(1, 2, 0).float().cpu().numpy()
    if args.output.endswith(".npy"):
        np.save(args.output, array)
    else:
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(args.output)
    print(f"restored {args.input} ({args.task}) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
