"""Samplers over explicit schedules: the deterministic ODE, modulated stochastic variants, tiled restore.

Every sampler takes a schedule list (t_start, ..., 0); NFE = len(schedule) − 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fluxir import flow
from fluxir.accel import module_device
from fluxir.codec import image_ids, pack, unpack
from fluxir.flow import initial_state, source_mean, source_sigma


@dataclass
class Trajectory:
    """States x_{t_i} (B, N, C) at every schedule time, the step log-probs and the final clean tokens."""
    schedule: list[float]
    states: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[torch.Tensor] = field(default_factory=list)  # one (B,) per step; 0 for ODE steps
    x0_hats: list[torch.Tensor] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


def sample_trajectory(policy, lq_tokens, task, img_ids, schedule, flow_cfg, x_start=None, rho: float = 0.0,
                      stochastic_steps: set[int] | None = None, generator=None,
                      step_noise: dict[int, torch.Tensor] | None = None) -> Trajectory:
    """Integrate from x_start along `schedule`; steps in `stochastic_steps` use the modulated step with ρ.

    lq_tokens (B, N, C); task (B,) int64; img_ids (N, 3). Without a stochastic step this is the ODE.
    `step_noise[i]` (B, N, C), if given, is the standard-normal draw of stochastic step i (per-row
    seeding); otherwise it comes from `generator`.
    """
    schedule = flow.check_schedule(schedule)
    mu, sigma = source_mean(lq_tokens, flow_cfg.source), source_sigma(flow_cfg)
    x = initial_state(lq_tokens, flow_cfg, generator) if x_start is None else x_start
    traj = Trajectory(schedule, [x])
    for i, (t, s) in enumerate(zip(schedule, schedule[1:])):
        pred = policy(x, lq_tokens, torch.full((x.shape[0],), t, device=x.device), task, img_ids)
        traj.x0_hats.append(pred.x0_hat)
        if s == 0.0:
            x, lp = pred.x0_hat, torch.zeros(x.shape[0], device=x.device)  # the last step lands on the clean estimate
        elif stochastic_steps and i in stochastic_steps and rho > 0:
            noise = step_noise.get(i) if step_noise else None
            x, lp = flow.stochastic_step(x, pred.velocity, t, s, mu, sigma, rho, noise=noise, generator=generator)
        else:
            x, lp = flow.ode_step(x, pred.velocity, t, s), torch.zeros(x.shape[0], device=x.device)
        traj.states.append(x)
        traj.log_probs.append(lp)
    return traj


@torch.no_grad()
def restore(policy, codec, lq: torch.Tensor, task: torch.Tensor, schedule, flow_cfg, seed: int = 0,
            eps: torch.Tensor | None = None) -> torch.Tensor:
    """Restore a batch (B, 3, H, W) in [0, 1] with the ODE sampler; returns (B, 3, H, W) in [0, 1].

    `eps`, if given, is the source's standard-normal ε in latent layout, shaped like `codec.encode(lq)`
    (`seed` then goes unused); otherwise ε is drawn over the tokens from a CPU generator seeded with `seed`.
    Runs on the policy's device (codec beside it) and returns on `lq`'s device.
    """
    device = module_device(policy)
    z = codec.encode(lq.to(device))
    h, w = z.shape[-2:]
    if eps is not None and eps.shape != z.shape:
        raise ValueError(f"noise {tuple(eps.shape)} does not match the latent {tuple(z.shape)}")
    lq_tokens = pack(z)
    x_start = None if eps is None else initial_state(lq_tokens, flow_cfg, eps=pack(eps))
    gen = torch.Generator().manual_seed(seed)
    traj = sample_trajectory(policy, lq_tokens, task.to(device), image_ids(h, w, device=device), schedule, flow_cfg,
                             x_start=x_start, generator=gen)
    return codec.decode(unpack(traj.final, h, w)).to(lq.device)


def noise_field(shape, seed: int) -> torch.Tensor:
    """Standard-normal ε of `shape` from a CPU generator seeded with `seed`: the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def tile_boxes(h: int, w: int, tile: int, overlap: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(tile height, tile width, [(top, left)]) of the overlapping tiles that cover an h × w image; a side
    shorter than `tile` is one tile of that side's length."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile={tile})")
    th, tw = min(tile, h), min(tile, w)
    return th, tw, [(y, x) for y in _tile_starts(h, th, overlap) for x in _tile_starts(w, tw, overlap)]


def _ramp(size: int, overlap: int) -> torch.Tensor:
    ramp = torch.ones(size)
    if overlap > 0:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        ramp[:overlap], ramp[-overlap:] = edge, edge.flip(0)
    return ramp


def _blend_window(th: int, tw: int, overlap: int) -> torch.Tensor:
    """(th, tw) weights: linear ramps over the overlap, 1 inside, never 0 (so every pixel is covered)."""
    return _ramp(th, overlap)[:, None] * _ramp(tw, overlap)[None, :]


@torch.no_grad()
def restore_tiled(policy, codec, lq, task, schedule, flow_cfg, tile: int, overlap: int, seed: int = 0,
                  batch_size: int = 64, progress=None) -> torch.Tensor:
    """Restore images larger than the training crop with overlapping, linearly blended tiles.

    lq (B, 3, H, W) in [0, 1]; the tiles of all images go through the model `batch_size` at a time and
    are blended into the output as they come (memory stays that of the images). Every tile starts from
    its crop of one latent noise field per image (`noise_field` with `seed`), so overlapping tiles share
    their source noise and blending mixes no independent draws; tile starts must therefore sit on the
    codec's latent grid (multiples of `codec.downsample`). `progress(done, total)` is called with the
    tiles restored so far after each batch.
    """
    b, _, h, w = lq.shape
    th, tw, boxes = tile_boxes(h, w, tile, overlap)
    if len(boxes) == 1:
        out = restore(policy, codec, lq, task, schedule, flow_cfg, seed)
        if progress:
            progress(b, b)
        return out
    ds = codec.downsample
    if any(v % ds for v in [th, tw, *(c for box in boxes for c in box)]):
        raise ValueError(f"tile {tile} with overlap {overlap} on a {h}x{w} image puts tiles off the codec's "
                         f"{ds}-pixel latent grid: tile, tile − overlap and the image size must be multiples of {ds}")
    eps = noise_field((b, codec.latent_channels, h // ds, w // ds), seed)
    weight, acc, norm = _blend_window(th, tw, overlap), torch.zeros_like(lq), torch.zeros(1, 1, h, w)
    for y, x in boxes:
        norm[:, :, y:y + th, x:x + tw] += weight
    jobs = [(i, y, x) for i in range(b) for y, x in boxes]
    if progress:
        progress(0, len(jobs))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        crops = torch.stack([lq[i, :, y:y + th, x:x + tw] for i, y, x in chunk])
        noise = torch.stack([eps[i, :, y // ds:(y + th) // ds, x // ds:(x + tw) // ds] for i, y, x in chunk])
        outs = restore(policy, codec, crops, task[[i for i, _, _ in chunk]], schedule, flow_cfg, eps=noise)
        for (i, y, x), out in zip(chunk, outs):
            acc[i, :, y:y + th, x:x + tw] += out * weight
        if progress:
            progress(start + len(chunk), len(jobs))
    return acc / norm


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) so H and W are multiples of `multiple`; returns the original size."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph), mode="reflect")
    return images, (h, w)
