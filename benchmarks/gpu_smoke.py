"""One-GPU smoke benchmark of the FLUX-scale path: a random-init FLUX.1-dev-shaped policy in bf16.

    python benchmarks/gpu_smoke.py [--out benchmarks/results/gpu_smoke.json] [--budget-s 420]

It builds FluxTransformer2DModel at FLUX.1-dev's width (and depth, when the card has the memory),
widens its input for the LQ latent and adds LoRA exactly as `fluxir.policy.assemble_policy` does,
with FLUX's VAE shapes, and measures with fluxir's own code:
- rollout: ms per transformer step (one NFE) for batches of candidates at 512 (and 1024) px, and
  one whole `sample_candidates` call (VAE encode, K trajectories, VAE decode), bf16, no grad;
- VAE: encode and decode ms per image;
- learner: `RLObjective.per_sample` (rsr + flow-matching anchor) + backward + AdamW step with
  LoRA, the module in bf16 and fp32 master weights + moments beside it (DeepSpeed bf16's layout),
  gradient checkpointing on (and off once), step seconds and peak memory.
Without a GPU it exits at once with status 2 and says so (nothing heavy is imported first).
`--small --device cpu` runs the same code on a few-block model for the test suite.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import FLUX1_DEV_TRANSFORMER, FLUX1_TEXT_TOKENS, FLUX1_VAE, RESULTS, ROOT, machine, write_result  # light: no torch

RESOLUTIONS = (512, 1024)
ROLLOUT_BATCHES = {512: (1, 4, 8, 16), 1024: (1, 4)}
LEARNER_BATCHES = {512: (1, 2, 4), 1024: (1, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_smoke.json)")
    p.add_argument("--config", default="configs/flux-dev-7task.yaml", help="LoRA, RL and flow settings")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    p.add_argument("--depth", type=float, default=None, help="fraction of FLUX.1-dev's blocks (default: by memory)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only together with --small")
    p.add_argument("--small", action="store_true", help="a few-block model at 64 px: checks the script, not speed")
    p.add_argument("--phases", default="rollout,learner", help="comma list of rollout, learner (default both)")
    p.add_argument("--cudnn-sdpa", action="store_true",
                   help="keep cuDNN attention in the learner (off by default: its backward crashed on H100, torch 2.11)")
    return p.parse_args(argv)


def require_device(name: str, small: bool):
    """The torch device, or exit 2 with a plain message when no GPU is visible."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU is visible to torch (torch.cuda.is_available() is False). This benchmark "
              "measures a 12B FLUX-shaped policy and needs one GPU with >= 40 GB; run it on a GPU machine "
              "(`--small --device cpu` only checks the script).", file=sys.stderr)
        sys.exit(2)
    if name == "cpu" and not small:
        print("gpu_smoke: --device cpu is only for --small (a full-size FLUX on CPU would take hours)", file=sys.stderr)
        sys.exit(2)
    return torch.device(name)


# --------------------------------------------------------------------------------- building

@contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def model_shapes(small: bool, depth: float) -> tuple[dict, dict]:
    if small:
        return ({**FLUX1_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 24,
                 "axes_dims_rope": (4, 6, 6)},
                {**FLUX1_VAE, "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1})
    shapes = dict(FLUX1_DEV_TRANSFORMER)
    shapes["num_layers"] = max(1, round(shapes["num_layers"] * depth))
    shapes["num_single_layers"] = max(1, round(shapes["num_single_layers"] * depth))
    return shapes, dict(FLUX1_VAE)


def depth_for(device, requested: float | None) -> float:
    """Full depth when the card holds bf16 weights + activations (>= 60 GiB), else a proportional share."""
    import torch

    if requested is not None:
        return requested
    if device.type != "cuda":
        return 1.0
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return 1.0 if total >= 60 else max(0.1, (total - 16) / 44)


def build(cfg, shapes: dict, vae_shapes: dict, device, text_tokens: int):
    """(policy, codec) on `device` in bf16: random-init FLUX shapes, fluxir's widening, LoRA, conditioning."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fluxir.codec import VaeCodec
    from fluxir.policy import assemble_policy
    from fluxir.prompts import task_prompts

    torch.manual_seed(cfg.seed)
    with default_dtype(torch.bfloat16), torch.device(device):
        transformer = FluxTransformer2DModel(**shapes)
        vae = AutoencoderKL(**vae_shapes)
        n = len(task_prompts(cfg))
        tokens = torch.randn(n, text_tokens, shapes["joint_attention_dim"]) * 0.1
        pooled = torch.randn(n, shapes["pooled_projection_dim"]) * 0.1
    token_channels = vae_shapes["latent_channels"] * 4
    policy = assemble_policy(transformer, cfg.model, token_channels, lambda _: (tokens, pooled, False))
    return policy.to(device=device, dtype=torch.bfloat16).eval(), VaeCodec(vae).to(device)


def parameter_counts(policy) -> dict:
    params = list(policy.parameters())
    lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    return {"total": sum(p.numel() for p in params), "lora": lora,
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


# --------------------------------------------------------------------------------- timing

def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Runner:
    """Runs measurements in order until the time budget is spent; an out-of-memory is a result, not a crash.

    The report is rewritten after every measurement, so a crash keeps what was measured before it.
    """

    def __init__(self, device, budget_s: float, report: dict, out: Path):
        self.device, self.deadline, self.records = device, time.perf_counter() + budget_s, []
        self.report, self.out = report, out
        report["records"] = self.records

    def measure(self, record: dict, fn) -> None:
        import torch

        if time.perf_counter() > self.deadline:
            record["skipped"] = "time budget"
        else:
            reset_peak(self.device)
            try:
                record.update(fn())
                record["peak_gib"] = peak_gib(self.device)
            except torch.OutOfMemoryError:
                record["oom"] = True
            except RuntimeError as err:  # recorded, so one failure does not lose the other measurements
                record["error"] = str(err).splitlines()[0][:300]
        print(json.dumps(record), flush=True)
        self.records.append(record)
        write_result(self.out, self.report, indent=2, quiet=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- phases

def latent_inputs(codec, batch: int, px: int, device):
    import torch

    from fluxir.codec import image_ids

    side = px // codec.downsample
    g = torch.Generator().manual_seed(batch * 10_000 + px)
    x = torch.randn(batch, (side // 2) ** 2, codec.latent_channels * 4, generator=g).to(device)
    lq = torch.randn(x.shape, generator=g).to(device)
    return x, lq, image_ids(side, side, device=device)


def rollout_step(policy, codec, batch: int, px: int, device, repeats: int) -> dict:
    """One transformer step (one NFE) on `batch` candidate states, as the samplers call it."""
    import torch

    x, lq, ids = latent_inputs(codec, batch, px, device)
    t = torch.full((batch,), 0.7, device=device)
    task = torch.arange(batch, device=device) % policy.num_conditions
    with torch.inference_mode():
        s = timed(lambda: policy(x, lq, t, task, ids), device, repeats)
        finite = bool(torch.isfinite(policy(x, lq, t, task, ids).velocity).all())
    return {"ms_per_step": round(s * 1e3, 2), "ms_per_step_per_candidate": round(s * 1e3 / batch, 2),
            "tokens": x.shape[1], "finite": finite}


def vae_times(codec, px: int, device, repeats: int) -> dict:
    import torch

    images = torch.rand(1, 3, px, px, device=device)
    with torch.inference_mode():
        z = codec.encode(images)
        enc = timed(lambda: codec.encode(images), device, repeats)
        dec = timed(lambda: codec.decode(z), device, repeats)
    return {"encode_ms": round(enc * 1e3, 2), "decode_ms": round(dec * 1e3, 2)}


def rollout_input(policy, codec, cfg, px: int, device) -> dict:
    """One `sample_candidates` call for one input: VAE encode, the ODE + K-1 explored trajectories, decode."""
    import torch

    from fluxir.rl import sample_candidates

    lq = torch.rand(1, 3, px, px, device=device)
    task, seeds = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([7])
    with torch.inference_mode():
        s = timed(lambda: sample_candidates(policy, codec, lq, task, seeds, cfg), device, repeats=1)
    return {"seconds": round(s, 3), "candidates": cfg.rl.candidates, "nfe": cfg.rl.nfe,
            "transformer_forwards": 2 * cfg.rl.nfe if cfg.rl.candidates > 1 else cfg.rl.nfe}


class MasterWeights:
    """DeepSpeed bf16's optimizer layout: bf16 trainable tensors in the module, fp32 master copies and
    AdamW moments beside them (16 bytes per trainable parameter with the bf16 weight and gradient)."""

    def __init__(self, params, lr: float, fused: bool):
        import torch

        self.params = list(params)
        self.master = [p.detach().float().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, fused=fused)

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float()
            p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p, m in zip(self.params, self.master):
            p.data.copy_(m.data)


def learner_batch_of(cfg, codec, batch: int, px: int, device) -> dict:
    """An rsr learner batch (images, task, seeds, kept states, improved flags) on `device`."""
    import torch

    from fluxir.rl import kept_indices

    side = px // codec.downsample
    g = torch.Generator().manual_seed(px + batch)
    states = torch.randn(batch, len(kept_indices(cfg)), (side // 2) ** 2, codec.latent_channels * 4, generator=g)
    return {"lq": torch.rand(batch, 3, px, px, generator=g).to(device),
            "gt": torch.rand(batch, 3, px, px, generator=g).to(device),
            "task": torch.arange(batch, device=device) % 7, "seed": torch.arange(batch, device=device) + 11,
            "states": states.to(device), "improved": torch.ones(batch, dtype=torch.bool, device=device)}


def learner_step(policy, objective, optimizer, cfg, codec, batch: int, px: int, device, checkpointing: bool,
                 repeats: int) -> dict:
    transformer = policy.transformer
    transformer.enable_gradient_checkpointing() if checkpointing else transformer.disable_gradient_checkpointing()
    data = learner_batch_of(cfg, codec, batch, px, device)
    losses = []

    def step():  # the module is bf16 throughout; the policy casts the fp32 flow state, as under DeepSpeed
        loss = objective.per_sample(policy, data)[0].mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    s = timed(step, device, repeats)
    return {"step_s": round(s, 3), "samples_per_s": round(batch / s, 2), "loss": float(losses[-1])}


def run(args, out: Path) -> dict:
    device = require_device(args.device, args.small)
    import torch

    from fluxir.accel import training_attention
    from fluxir.config import load_config
    from fluxir.rl import RLObjective

    cfg = load_config(ROOT / args.config, ["model.path=/unused"])  # shapes here; weights are random
    depth = depth_for(device, args.depth)
    shapes, vae_shapes = model_shapes(args.small, depth)
    resolutions, repeats = ((64,), 1) if args.small else (RESOLUTIONS, 3)
    started = time.perf_counter()
    policy, codec = build(cfg, shapes, vae_shapes, device, 8 if args.small else FLUX1_TEXT_TOKENS)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformer": {**shapes, "depth_fraction": depth}, "lora": cfg.model.lora.model_dump(),
              "params": parameter_counts(policy), "build_s": round(time.perf_counter() - started, 1),
              "weights_gib": peak_gib(device)}
    report["command"] = "python benchmarks/gpu_smoke.py " + " ".join(sys.argv[1:])
    print(json.dumps({k: report[k] for k in ("device", "params", "build_s", "weights_gib")}), flush=True)
    runner = Runner(device, args.budget_s, report, out)
    phases = set(args.phases.split(","))
    for px in resolutions if "rollout" in phases else ():
        for b in ((1, 2) if args.small else ROLLOUT_BATCHES[px]):
            runner.measure({"phase": "rollout", "resolution": px, "batch": b},
                           lambda: rollout_step(policy, codec, b, px, device, repeats))
        runner.measure({"phase": "vae", "resolution": px}, lambda: vae_times(codec, px, device, repeats))
        runner.measure({"phase": "rollout_input", "resolution": px},
                       lambda: rollout_input(policy, codec, cfg, px, device))
    if "learner" not in phases:
        return report
    if not args.cudnn_sdpa:
        training_attention()  # what fluxir's learners do: no cuDNN attention in backward
    report["learner_sdpa"] = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                              "flash": torch.backends.cuda.flash_sdp_enabled()}
    policy.train()
    objective = RLObjective(cfg, codec)
    optimizer = MasterWeights([p for p in policy.parameters() if p.requires_grad], cfg.rl.lr, device.type == "cuda")
    plan = [(px, b, True) for px in resolutions for b in ((1,) if args.small else LEARNER_BATCHES[px])]
    plan.insert(0, (resolutions[0], 1, False))
    for px, b, ckpt in plan:
        runner.measure({"phase": "learner", "resolution": px, "batch": b, "gradient_checkpointing": ckpt},
                       lambda: learner_step(policy, objective, optimizer, cfg, codec, b, px, device, ckpt, repeats))
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def table(report: dict) -> str:
    lines = [f"{report['device']}: {report['params']['total'] / 1e9:.2f} B params "
             f"({report['params']['trainable'] / 1e6:.0f} M trainable), weights {report['weights_gib']} GiB",
             "| phase | px | batch | ckpt | ms/step | s/step | encode/decode ms | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["records"]:
        if r.get("skipped") or r.get("oom") or r.get("error"):
            note = r.get("skipped") or ("out of memory" if r.get("oom") else f"error: {r['error'][:60]}")
            lines.append(f"| {r['phase']} | {r['resolution']} | {r.get('batch', '')} | | {note} | | | |")
            continue
        codec_ms = f"{r['encode_ms']} / {r['decode_ms']}" if r["phase"] == "vae" else ""
        seconds = r.get("step_s", r.get("seconds", ""))
        lines.append(f"| {r['phase']} | {r['resolution']} | {r.get('batch', 1)} | "
                     f"{'on' if r.get('gradient_checkpointing') else ''} | {r.get('ms_per_step', '')} | {seconds} | "
                     f"{codec_ms} | {r.get('peak_gib')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / "gpu_smoke.json"
    report = run(args, out)
    write_result(out, report, indent=2)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
