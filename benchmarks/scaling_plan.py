"""FLUX.1-dev (12B) LoRA RL for restoration on 8-GPU nodes, planned on paper: parameters, per-GPU memory, time.

    .venv/bin/python benchmarks/scaling_plan.py [--tflops-h100 400] [--tflops-h200 450] [--candidates 4] [--no-smoke]

No GPU and no weights. The transformer (FLUX.1-dev's config, x_embedder widened by fluxir.policy.widen_input,
LoRA added by fluxir.policy.add_lora) and the VAE are built on the meta device, so the parameter counts are
exact. Activation bytes and FLOPs come from running small copies of the same transformer on meta (every
block of a kind is identical, so one double and one single block are measured and multiplied):
- saved-for-backward bytes: autograd's saved-tensor hooks, each storage once, weights excluded;
- inference live bytes: a dispatch mode that tracks when each tensor is created and freed;
- FLOPs: torch's FlopCounterMode (matmuls), attention by formula.
Attention is replaced by a stand-in that allocates and saves what FlashAttention-2 and cuDNN attention keep
(q, k, v, out and an fp32 logsumexp), so no L×L matrix is counted.

Taken from the code: the VAE decode chunk (fluxir.codec.VaeCodec.decode_batch, read off a meta instance),
what sample_candidates and the reward worker keep on the GPU, and the colocated config as it is
(configs/flux-dev-7task.yaml through fluxir.config.load_config; its slots through actors.rl.slot_resources).
Every figure that is not counted is an assumption (ASSUMPTIONS below; printed and saved). If
benchmarks/results/gpu_smoke.json exists (and --no-smoke is not given), its measured figures are printed next
to the estimates, and its rollout ms/step, VAE ms and learner step seconds replace the assumed throughput for
the GPU kind it was measured on.
Writes benchmarks/results/scaling_plan.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from common import FLUX1_DEV_TRANSFORMER, FLUX1_TEXT_TOKENS, FLUX1_VAE, RESULTS, ROOT, machine, write_result  # noqa: E402
from fluxir.config import LoraConfig, RewardConfig, load_config, zero_stage  # noqa: E402
from fluxir.metrics import compute_metrics  # noqa: E402
from fluxir.policy import add_lora, widen_input  # noqa: E402

GIB = 2 ** 30
HIDDEN = FLUX1_DEV_TRANSFORMER["num_attention_heads"] * FLUX1_DEV_TRANSFORMER["attention_head_dim"]
LAYERS = FLUX1_DEV_TRANSFORMER["num_layers"] + FLUX1_DEV_TRANSFORMER["num_single_layers"]
TEXT_TOKENS = FLUX1_TEXT_TOKENS  # cached T5 prompt embeddings: joint-attention tokens in every forward
TOKEN_CHANNELS = 64  # 16 latent channels, 2x2 packed
RANKS = (16, 64, 128)
PLAN_RANK = 64  # the rank of the layout and time tables
REWARD_CHUNK = RewardConfig().chunk  # rows a reward worker scores at a time
RESOLUTIONS = (512, 1024)
MICRO_BATCHES = (1, 2, 4)
NFES = (4, 8, 20)
GPUS_PER_NODE = 8
# fluxir/rl.py RLObjective.per_sample: the objective's forward and the flow-matching anchor's forward both
# keep their graphs until the single backward, and each sample's LQ and GT are VAE-encoded twice.
FORWARDS_PER_SAMPLE = 2
VAE_ENCODES_PER_SAMPLE = 4
DEEPSPEED = {2: "configs/deepspeed/zero2_bf16.json", 3: "configs/deepspeed/zero3_bf16.json"}
CONFIG = "configs/flux-dev-7task.yaml"  # the colocated FLUX.1-dev config checked as it is
DS_MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters (zero3_bf16.json leaves it unset)

ASSUMPTIONS = {
    "gpu_gib": {"H100": 79.6, "H200": 140.4},  # nvidia-smi totals: 81559 MiB (H100 SXM 80 GB), 143771 MiB (H200)
    "tflops_bf16": {"H100": 400.0, "H200": 450.0},  # sustained dense bf16 rate of the transformer's matmuls
    "conv_fraction": 0.3,  # the VAE and LPIPS (convolutions, GroupNorm at full resolution) run at this share
    "usable_fraction": 0.9,  # plan to 90 % of the card: fragmentation and short peaks the model does not see
    "overhead_gib": 2.0,  # per GPU process: CUDA context, cuBLAS/cuDNN workspaces, NCCL, allocator slack
    "backward_blocks": 1,  # one more block's worth of activations as gradient buffers during backward
    "allgather_gb_s": 350.0,  # ZeRO-3 parameter all-gather bandwidth per GPU over NVLink
    "zero3_gathers_per_forward": 2,  # forward and checkpoint recompute; backward reuses the recompute's
    "rollout_min_inputs": 2,  # per rollout call (K rows each) to keep a GPU busy; the layout rule uses it
    "dtypes": "transformer and VAE bf16 on learners and rollout actors (model.dtype: bfloat16; actors/rl.py "
              "and actors/learner.py place the codec in it; DeepSpeed's bf16 casts the learner's module, LoRA "
              "working copy included); LoRA optimizer state fp32; LPIPS fp32",
}


# ---------------------------------------------------------------------------------------------
# Models on the meta device
# ---------------------------------------------------------------------------------------------

def numel(params) -> int:
    return sum(p.numel() for p in params)


def flux_transformer(layers: tuple[int, int] = (19, 38), rank: int | None = None, widen: bool = True):
    """FLUX.1-dev's transformer on meta (optionally fewer blocks), as fluxir.policy.build_policy shapes it."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**FLUX1_DEV_TRANSFORMER, "num_layers": layers[0],
                                          "num_single_layers": layers[1]})
        if widen:
            widen_input(model, TOKEN_CHANNELS)
        if rank is not None:
            model.requires_grad_(False)
            add_lora(model, LoraConfig(enabled=True, rank=rank, alpha=float(rank)))
            model.x_embedder.requires_grad_(True)
    return model.to(torch.bfloat16)


def flux_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**FLUX1_VAE).to(torch.bfloat16)


def alexnet_features():
    """LPIPS's backbone (torchvision AlexNet features, as fluxir.metrics.LPIPS loads it)."""
    import torchvision

    with torch.device("meta"):
        return torchvision.models.alexnet().features


@functools.cache
def decode_chunk() -> int:
    """Images per VAE decode call: fluxir.codec.VaeCodec.decode splits its input into `decode_batch` chunks."""
    from fluxir.codec import VaeCodec

    return VaeCodec(flux_vae()).decode_batch


def param_counts() -> dict:
    base = flux_transformer(widen=False)
    released, x_old = numel(base.parameters()), numel(base.x_embedder.parameters())
    counts = {"released": released, "x_embedder_released": x_old}
    for rank in RANKS:
        model = flux_transformer(rank=rank)
        lora = numel(p for n, p in model.named_parameters() if "lora_" in n)
        counts[f"lora_r{rank}"] = lora
        counts[f"trainable_r{rank}"] = numel(p for p in model.parameters() if p.requires_grad)
    counts["x_embedder_widened"] = numel(model.x_embedder.parameters())
    counts["widened"] = released - x_old + counts["x_embedder_widened"]
    counts["frozen"] = counts["widened"] - counts["x_embedder_widened"]
    counts["lora_layers"] = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    counts["vae"] = numel(flux_vae().parameters())
    counts["lpips_backbone"] = numel(alexnet_features().parameters())
    return counts


# ---------------------------------------------------------------------------------------------
# Measuring on meta: attention stand-in, saved and live bytes, FLOPs
# ---------------------------------------------------------------------------------------------

class FlashLike(torch.autograd.Function):
    """Stands in for SDPA: allocates the output and saves q, k, v, out and an fp32 logsumexp, as FA2/cuDNN do."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def flash_attention():
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: FlashLike.apply(query, key, value)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def weight_keys(model) -> set[int]:
    return {storage_key(t) for t in [*model.parameters(), *model.buffers()]}


def flux_inputs(n_img: int, batch: int = 1) -> dict:
    bf16 = torch.bfloat16
    with torch.device("meta"):
        return {"hidden_states": torch.empty(batch, n_img, 2 * TOKEN_CHANNELS, dtype=bf16),
                "encoder_hidden_states": torch.empty(batch, TEXT_TOKENS, 4096, dtype=bf16),
                "pooled_projections": torch.empty(batch, 768, dtype=bf16),
                "timestep": torch.ones(batch, dtype=bf16), "guidance": torch.ones(batch, dtype=bf16),
                "img_ids": torch.zeros(n_img, 3), "txt_ids": torch.zeros(TEXT_TOKENS, 3), "return_dict": False}


def image_tokens(resolution: int) -> int:
    return (resolution // 16) ** 2  # VAE /8, then 2x2 packing


def label_blocks(model, where: list) -> list:
    """Hooks that keep where[0] = the (part, submodule) running now: part is first_double, double, single or
    outside. The first double block is apart: its text stream needs no input gradient yet (frozen
    context_embedder on cached prompts), so it saves less than blocks 2..19."""
    def enter(part, sub):
        return lambda module, args: where.insert(0, (part, sub))

    def leave(module, args, output):
        where.pop(0)

    hooks = []
    for part, block in (("first_double", model.transformer_blocks[0]), ("double", model.transformer_blocks[1]),
                        ("single", model.single_transformer_blocks[0])):
        for name, module in block.named_modules():
            hooks.append(module.register_forward_pre_hook(enter(part, ".".join(name.split(".")[:2]) or "(block)")))
            hooks.append(module.register_forward_hook(leave))
    return hooks


def saved_bytes(model, n_img: int) -> dict:
    """Bytes autograd keeps for backward (batch 1) by (part, submodule), each storage once, weights excluded."""
    skip, seen, where = weight_keys(model), {}, [("outside", "")]

    def pack(t):
        key = storage_key(t)
        if key not in skip and key not in seen:  # t is kept so that its storage id is not reused
            seen[key] = (where[0], t.untyped_storage().nbytes(), t)
        return t

    hooks = label_blocks(model, where)
    with flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**flux_inputs(n_img))
    for h in hooks:
        h.remove()
    out: dict = {}
    for (part, sub), nbytes, _ in seen.values():
        out.setdefault(part, {}).setdefault(sub, 0)
        out[part][sub] += nbytes
    return out


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside that are alive at once (each storage once)."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.live, self.now, self.peak = skip, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key in self.skip:
            return
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += self.live[key][0]
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self.release, key)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def live_peak(run, model=None) -> int:
    """Peak live bytes of `run()` without grad (its inputs and the model's weights not counted)."""
    with torch.no_grad(), flash_attention(), LiveBytes(weight_keys(model) if model else set()) as mode:
        run()
    return mode.peak


def transformer_flops(n_img: int, rank: int) -> dict:
    """Matmul FLOPs (forward, backward) of the full transformer at batch 1, attention excluded (by formula)."""
    totals = {}
    for layers in ((1, 1), (2, 1), (1, 2)):
        model = flux_transformer(layers, rank)
        with flash_attention(), FlopCounterMode(display=False) as counter:
            out = model(**flux_inputs(n_img))[0]
            fwd = counter.get_total_flops()
            out.float().sum().backward()
        totals[layers] = (fwd, counter.get_total_flops() - fwd)
    one, double, single = totals[(1, 1)], totals[(2, 1)], totals[(1, 2)]
    full = [one[i] + 18 * (double[i] - one[i]) + 37 * (single[i] - one[i]) for i in (0, 1)]
    return {"linear_fwd": full[0], "linear_bwd": full[1]}


def attention_flops(n_img: int) -> float:
    """QK^T and AV of every layer: 4·L²·hidden per layer, L = image + text tokens."""
    tokens = n_img + TEXT_TOKENS
    return 4 * tokens ** 2 * HIDDEN * LAYERS


def conv_net_costs(resolution: int) -> dict:
    """VAE encode/decode (bf16), LPIPS backbone (fp32) and PSNR + SSIM (fluxir.metrics.compute_metrics in float32,
    as the reward worker runs it): FLOPs and live peak bytes per image (pair for LPIPS and the metrics)."""
    vae, alex = flux_vae(), alexnet_features()
    image = torch.empty(1, 3, resolution, resolution, device="meta")
    image_bf16 = image.to(torch.bfloat16)
    latent = torch.empty(1, 16, resolution // 8, resolution // 8, device="meta", dtype=torch.bfloat16)
    out = {}
    for name, model, run in (("encode", vae, lambda: vae.encode(image_bf16).latent_dist.mode()),
                             ("decode", vae, lambda: vae.decode(latent).sample),
                             ("lpips", alex, lambda: (alex(image), alex(image))),  # prediction and GT
                             ("metrics", None, lambda: compute_metrics(image, image, dtype=torch.float32))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:  # SDPA's math path: attention counted
            run()
        out[f"{name}_flops"] = counter.get_total_flops()
        out[f"{name}_live_bytes"] = live_peak(run, model)
    return out


def measure(res: int) -> dict:
    """One resolution: saved bytes per block (each rank), inference live bytes, FLOPs, conv nets, metrics."""
    n_img = image_tokens(res)
    row = {"resolution": res, "image_tokens": n_img, "tokens": n_img + TEXT_TOKENS,
           "saved": {rank: saved_bytes(flux_transformer((2, 1), rank), n_img) for rank in RANKS}}
    model = flux_transformer((1, 1), PLAN_RANK)
    row["inference_live_bytes"] = live_peak(lambda: model(**flux_inputs(n_img)), model)
    row["flops"] = {**transformer_flops(n_img, PLAN_RANK), "attention_fwd": attention_flops(n_img)}
    return row | conv_net_costs(res)


# ---------------------------------------------------------------------------------------------
# Memory model (GiB per GPU)
# ---------------------------------------------------------------------------------------------

def gib(nbytes: float) -> float:
    return nbytes / GIB


def block_bytes(m: dict, rank: int) -> dict:
    """Saved bytes per row: per double block, per single block, outside the blocks (no checkpointing)."""
    saved = m["saved"][rank]
    return {part: sum(saved.get(part, {}).values()) for part in ("first_double", "double", "single", "outside")}


def learner_activations(m: dict, rank: int, micro: int, checkpointing: bool) -> dict:
    """Kept (both graphs of every row) and transient (one block recomputed / back-propagated) bytes."""
    b = block_bytes(m, rank)
    if checkpointing:  # only the inputs of each block stay: image + text hidden states, bf16
        kept = LAYERS * m["tokens"] * HIDDEN * 2 + b["outside"]
        transient_blocks = 1 + ASSUMPTIONS["backward_blocks"]
    else:
        kept = b["first_double"] + 18 * b["double"] + 38 * b["single"] + b["outside"]
        transient_blocks = ASSUMPTIONS["backward_blocks"]
    transient = max(transient_blocks * max(b["double"], b["single"]), m["encode_live_bytes"])
    return {"kept": micro * FORWARDS_PER_SAMPLE * kept, "transient": micro * transient}


def zero_buffers(zero: int, counts: dict, trainable: int, deepspeed: str | None = None) -> float:
    """DeepSpeed's communication buckets (bf16 elements) from the repository's JSON, capped at what exists."""
    ds = json.loads((ROOT / (deepspeed or DEEPSPEED[zero])).read_text())["zero_optimization"]
    reduce = min(ds.get("reduce_bucket_size", 5e8), trainable) * (2 if ds.get("overlap_comm") else 1)
    if zero == 2:
        gather = min(ds.get("allgather_bucket_size", 5e8), trainable)
    else:
        gather = min(ds.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS)
                     + ds.get("stage3_prefetch_bucket_size", 5e7), counts["widened"])
    return 2 * (reduce + gather)


def learner_memory(counts: dict, m: dict, rank: int, zero: int, micro: int, checkpointing: bool,
                   gpus: int = GPUS_PER_NODE, allocated_only: bool = False, deepspeed: str | None = None) -> dict:
    """GiB per learner GPU by part. allocated_only: what torch.cuda.max_memory_allocated sees on one GPU
    without DeepSpeed (no buckets, no process overhead), for comparing with benchmarks/gpu_smoke.py."""
    trainable = counts[f"trainable_r{rank}"]
    shard = gpus if zero == 3 else 1  # ZeRO-3 partitions parameters, frozen ones included; ZeRO-2 does not
    act = learner_activations(m, rank, micro, checkpointing)
    parts = {
        "frozen_base": counts["frozen"] * 2 / shard,
        "trainable_bf16": trainable * 2 / shard,
        "optimizer_and_grads": trainable * 16 / gpus,  # fp32 master, Adam m and v, fp32 grads
        "zero_buffers": 0 if allocated_only else zero_buffers(zero, counts, trainable, deepspeed),
        "vae": counts["vae"] * 2,
        "activations": act["kept"] + act["transient"],
        "overhead": 0 if allocated_only else ASSUMPTIONS["overhead_gib"] * GIB,
    }
    return {k: gib(v) for k, v in parts.items()} | {"total": gib(sum(parts.values()))}


def policy_bytes(counts: dict, rank: int) -> float:
    """A rollout actor's bf16 policy copy: the widened transformer and its LoRA."""
    return (counts["widened"] + counts[f"lora_r{rank}"]) * 2


def image_bytes(m: dict) -> int:
    """One RGB image at the resolution, fp32 (LQ, GT and decoded images are fp32 tensors in [0, 1])."""
    return 3 * m["resolution"] ** 2 * 4


def trajectory_bytes(m: dict, nfe: int) -> float:
    """Per candidate row, fp32 like the LQ latent (codec.encode returns the images' dtype): the Trajectory's
    states (nfe+1) and x0_hats (nfe), then sample_candidates' stacked kept states and their interleaved copy
    (nfe+1 each; all states are kept by default). Step noise is drawn on the CPU and moved one step at a time."""
    return m["image_tokens"] * TOKEN_CHANNELS * 4 * (4 * nfe + 3)


def decoded_bytes(m: dict, rows: int) -> float:
    """VaeCodec.decode's output for `rows` images at its end: the bf16 chunks, their fp32 cast and the next
    fp32 temporary (+1, /2): 2.5 fp32 images per row."""
    return rows * image_bytes(m) * 2.5


def rollout_memory(counts: dict, m: dict, rank: int, inputs: int, k: int, nfe: int,
                   allocated_only: bool = False) -> dict:
    """One rollout actor: policy copy, VAE, trajectories and the peak of its sampling phases for `inputs` inputs.

    fluxir/rl.py sample_candidates encodes all inputs at once, runs the ODE rows (inputs) then the explored rows
    (inputs·(K−1)) as one batch each, and decodes the inputs·K finals in chunks of VaeCodec.decode_batch.
    allocated_only: no process overhead (what torch.cuda.max_memory_allocated sees).
    """
    rows = inputs * k
    phases = {"transformer": inputs * max(k - 1, 1) * m["inference_live_bytes"],
              "vae_decode": min(decode_chunk(), rows) * m["decode_live_bytes"] + decoded_bytes(m, rows),
              "vae_encode": inputs * m["encode_live_bytes"]}
    parts = {"weights": policy_bytes(counts, rank), "vae": counts["vae"] * 2,
             "trajectories": rows * trajectory_bytes(m, nfe), "peak_phase": max(phases.values()),
             "overhead": 0 if allocated_only else ASSUMPTIONS["overhead_gib"] * GIB}
    return {name: gib(v) for name, v in parts.items()} | {"total": gib(sum(parts.values())),
                                                          "peak_phase_is": max(phases, key=phases.get)}


def reward_memory(counts: dict, m: dict, rows: int) -> float:
    """A reward worker scoring `rows` candidates in one call (RewardWorker.score on the GPU): LPIPS (fp32), the
    final, GT and LQ images of every row, and the larger of PSNR + SSIM (float32) and LPIPS for one chunk of
    `rl.reward.chunk` rows (`fluxir.rl.score_columns` scores chunk by chunk)."""
    working = max(m["metrics_live_bytes"], m["lpips_live_bytes"]) * min(rows, REWARD_CHUNK)
    return gib(counts["lpips_backbone"] * 4 + rows * 3 * image_bytes(m) + working) + ASSUMPTIONS["overhead_gib"]


def slot_memory(counts: dict, m: dict, zero: int, micro: int, inputs: int, k: int, nfe: int, rank: int = PLAN_RANK,
                checkpointing: bool = True, deepspeed: str | None = None) -> dict:
    """One colocated slot (one GPU): learner rank (micro-batch `micro`), rollout actor (`inputs` inputs) and
    reward worker (the actor's inputs·K rows). Each process keeps its own peak, so the slot needs their sum."""
    parts = {"learner": learner_memory(counts, m, rank, zero, micro, checkpointing, deepspeed=deepspeed)["total"],
             "rollout": rollout_memory(counts, m, rank, inputs, k, nfe)["total"],
             "reward": reward_memory(counts, m, inputs * k)}
    return parts | {"total": sum(parts.values())}


def max_inputs(fits, limit: int = 4096) -> int:
    """Largest n in 1..limit with fits(n) (fits is monotone); 0 if not even 1."""
    n = 0
    while n < limit and fits(n + 1):
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Time model
# ---------------------------------------------------------------------------------------------

def forward_flops(m: dict) -> float:
    return m["flops"]["linear_fwd"] + m["flops"]["attention_fwd"]


def rates(gpu: str, tflops: dict) -> dict:
    bf16 = tflops[gpu] * 1e12
    return {"bf16": bf16, "conv": bf16 * ASSUMPTIONS["conv_fraction"]}


def rollout_seconds(m: dict, rate: dict, k: int, nfe: int, measured: dict) -> dict:
    """Per input: K·NFE transformer forwards, 1 VAE encode, K decodes, K LPIPS(pred, GT) pairs."""
    row_s = measured.get("row_forward_s") or forward_flops(m) / rate["bf16"]
    encode_s = measured.get("encode_s") or m["encode_flops"] / rate["conv"]
    decode_s = measured.get("decode_s") or m["decode_flops"] / rate["conv"]
    return {"transformer": k * nfe * row_s, "vae": encode_s + k * decode_s,
            "reward": k * m["lpips_flops"] / rate["conv"]}


def learner_seconds(m: dict, rate: dict, checkpointing: bool = True) -> float:
    """Per sample: both forwards, their recompute, their backward (frozen base: input grads only), 4 encodes."""
    f = m["flops"]
    per_graph = (f["linear_fwd"] * (2 if checkpointing else 1) + f["linear_bwd"]
                 + f["attention_fwd"] * ((2 if checkpointing else 1) + 2.5))  # flash backward ≈ 2.5× forward
    return FORWARDS_PER_SAMPLE * per_graph / rate["bf16"] + VAE_ENCODES_PER_SAMPLE * m["encode_flops"] / rate["conv"]


def zero3_gather_seconds(counts: dict, gpus: int = GPUS_PER_NODE) -> float:
    """Per learner step (not overlapped): every forward and recompute gathers the other ranks' bf16 shards."""
    gathers = FORWARDS_PER_SAMPLE * ASSUMPTIONS["zero3_gathers_per_forward"]
    moved = counts["widened"] * 2 * (gpus - 1) / gpus
    return gathers * moved / (ASSUMPTIONS["allgather_gb_s"] * 1e9)


# ---------------------------------------------------------------------------------------------
# GPU measurements (benchmarks/results/gpu_smoke.json), if any
# ---------------------------------------------------------------------------------------------

def load_smoke() -> dict:
    """benchmarks/gpu_smoke.py's report ({"device", "lora", "transformer", "records": [...]}), or {}."""
    path = RESULTS / "gpu_smoke.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {"records": report} if isinstance(report, list) else report


def smoke_gpu(report: dict) -> str:
    return "H200" if "H200" in str(report.get("device", "")).upper() else "H100"


def smoke_records(report: dict) -> list[dict]:
    """Records that measured something (not skipped, out of memory or failed)."""
    return [r for r in report.get("records", []) if isinstance(r, dict) and "phase" in r
            and not (r.get("skipped") or r.get("oom") or r.get("error"))]


def full_depth(report: dict) -> bool:
    return float(report.get("transformer", {}).get("depth_fraction", 1.0)) >= 1.0


def largest_batch(records: list[dict]) -> dict:
    return max(records, key=lambda r: int(r.get("batch", 1)))


def measured_rates(report: dict, gpu: str, res: int) -> dict:
    """Measured per-row forward, per-image VAE and per-sample learner seconds for this GPU kind and resolution,
    if recorded; forward and learner times from the largest measured batch (the plan's batches are larger)."""
    if not report or smoke_gpu(report) != gpu:
        return {}
    records = [r for r in smoke_records(report) if r.get("resolution") == res]
    deep = records if full_depth(report) else []
    out = {}
    rollouts = [r for r in deep if r["phase"] == "rollout" and r.get("ms_per_step")]
    if rollouts:
        best = largest_batch(rollouts)
        out["row_forward_s"] = best["ms_per_step"] / 1e3 / max(int(best.get("batch", 1)), 1)
    learners = [r for r in deep if r["phase"] == "learner" and r.get("gradient_checkpointing") and r.get("step_s")]
    if learners:
        best = largest_batch(learners)
        out["learner_sample_s"] = best["step_s"] / max(int(best.get("batch", 1)), 1)
    for r in records:
        if r["phase"] == "vae":
            out.update({f"{n}_s": r[f"{n}_ms"] / 1e3 for n in ("encode", "decode") if r.get(f"{n}_ms")})
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def cell(v) -> str:
    """Floats to 2 decimals; ints with thousands separators from 10,000 (so 512 and 1024 read as pixel sizes)."""
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v)


def numeric(v) -> bool:
    """A number, a number as text, or an empty cell."""
    try:
        float(str(v).replace(",", "") or 0)
    except ValueError:
        return False
    return not isinstance(v, bool)


def table(title: str, headers: list[str], rows: list[list]) -> None:
    """A Markdown table; columns of numbers are right-aligned."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" if all(numeric(r[i]) for r in rows) else "---" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")


def capacity(gpu: str) -> float:
    """GiB a plan may use on one GPU of this kind."""
    return ASSUMPTIONS["gpu_gib"][gpu] * ASSUMPTIONS["usable_fraction"]


def fits(total_gib: float, gpu: str) -> str:
    return "yes" if total_gib <= capacity(gpu) else "no"


def print_params(c: dict) -> None:
    rows = [["FLUX.1-dev transformer as released (in_channels 64)", c["released"]],
            ["x_embedder as released (64 -> 3072)", c["x_embedder_released"]],
            ["x_embedder widened (128 -> 3072, fully trainable)", c["x_embedder_widened"]],
            ["transformer after widening", c["widened"]],
            ["frozen base (widened transformer minus x_embedder)", c["frozen"]],
            *[[f"LoRA r={r} ({c['lora_layers']} adapted Linear layers)", c[f"lora_r{r}"]] for r in RANKS],
            *[[f"trainable at r={r} (LoRA + x_embedder)", c[f"trainable_r{r}"]] for r in RANKS],
            ["FLUX VAE (AutoencoderKL)", c["vae"]], ["LPIPS backbone (AlexNet features)", c["lpips_backbone"]]]
    table("Parameters (counted on meta)", ["what", "parameters"], rows)


def print_activation_constants(meas: dict) -> None:
    rows = []
    for res, m in meas.items():
        b = block_bytes(m, PLAN_RANK)
        rows.append([res, m["tokens"], round(b["first_double"] / m["tokens"]), round(b["double"] / m["tokens"]),
                     round(b["single"] / m["tokens"]), HIDDEN * 2, round(m["inference_live_bytes"] / m["tokens"]),
                     gib(b["outside"])])
    table(f"Activation constants per token of L = image + text tokens (r={PLAN_RANK}, bf16; FA2-style attention)",
          ["px", "tokens L", "saved B/token, double block 1", "saved B/token, double blocks 2-19",
           "saved B/token, single block", "checkpoint B/token per block (its hidden-state inputs)",
           "inference live peak B/token", "saved outside blocks GiB"], rows)
    rows = []
    for part in ("double", "single"):
        saved = meas[RESOLUTIONS[0]]["saved"][PLAN_RANK][part]
        tokens = meas[RESOLUTIONS[0]]["tokens"]
        rows += [[part, sub, round(v / tokens)] for sub, v in sorted(saved.items(), key=lambda kv: -kv[1])]
    table(f"Where a block's saved bytes come from ({RESOLUTIONS[0]} px, r={PLAN_RANK}; bytes per token of L)",
          ["block", "submodule", "B/token"], rows)


def print_learner(counts: dict, meas: dict) -> dict:
    grid, rows = {}, []
    for zero in (2, 3):
        for res in RESOLUTIONS:
            for ckpt in (True, False):
                for micro in MICRO_BATCHES:
                    mem = learner_memory(counts, meas[res], PLAN_RANK, zero, micro, ckpt)
                    grid[f"zero{zero}_{res}px_mb{micro}_{'ckpt' if ckpt else 'nockpt'}"] = mem
                    rows.append([f"ZeRO-{zero}", res, "on" if ckpt else "off", micro, mem["frozen_base"],
                                 mem["trainable_bf16"] + mem["optimizer_and_grads"] + mem["zero_buffers"],
                                 mem["activations"], mem["vae"] + mem["overhead"], mem["total"],
                                 fits(mem["total"], "H100"), fits(mem["total"], "H200")])
    table(f"Learner per GPU, GiB (8 ranks, r={PLAN_RANK}, {FORWARDS_PER_SAMPLE} graphs per sample)",
          ["ZeRO", "px", "grad ckpt", "micro-batch", "frozen base", "LoRA state + buckets", "activations",
           "VAE + overhead", "total", "fits 80 GB", "fits 141 GB"], rows)
    rows = []
    for rank in RANKS:
        for zero in (2, 3):
            mem = learner_memory(counts, meas[512], rank, zero, 1, True)
            rows.append([rank, f"ZeRO-{zero}", mem["trainable_bf16"], mem["optimizer_and_grads"],
                         mem["zero_buffers"], mem["total"], gib(counts[f"trainable_r{rank}"] * 2)])
    table("LoRA rank: trainable-state GiB per GPU (8 ranks; total at 512 px, micro-batch 1, checkpointing)",
          ["rank", "ZeRO", "bf16 working copy", "fp32 master+Adam+grads (/8)", "buckets", "total",
           "weight sync per rollout actor (bf16: the actors' dtype)"], rows)
    return grid


def print_rollout(counts: dict, meas: dict, k: int, nfe: int) -> dict:
    out, rows = {}, []
    for gpu in ASSUMPTIONS["gpu_gib"]:
        for res, m in meas.items():
            for actors in (1, 2, 3, 4, 5):
                share = capacity(gpu) / actors
                n = max_inputs(lambda n: rollout_memory(counts, m, PLAN_RANK, n, k, nfe)["total"] <= share)
                if n == 0:
                    break
                phase = rollout_memory(counts, m, PLAN_RANK, n, k, nfe)["peak_phase_is"]
                out[f"{gpu}_{res}px_{actors}actors"] = {"inputs": n, "rows": n * k, "peak_phase": phase}
                rows.append([gpu, res, actors, f"{1 / actors:.2f}", n, n * k, phase])
    for res, m in meas.items():
        out[f"{res}px_one_input"] = rollout_memory(counts, m, PLAN_RANK, 1, k, nfe)
    table(f"Rollout actors: inputs (and candidate rows, K={k}, NFE={nfe}) that fit per actor "
          f"(VAE decode in chunks of {decode_chunk()})",
          ["GPU", "px", "actors per GPU", "num_gpus each", "inputs", "rows", "largest phase"], rows)
    rows = []
    for res, m in meas.items():
        rows.append([res, gib(policy_bytes(counts, PLAN_RANK)), gib(m["inference_live_bytes"]),
                     gib(m["decode_live_bytes"]), gib(m["encode_live_bytes"]), gib(decoded_bytes(m, 1)),
                     gib(trajectory_bytes(m, nfe)), gib(m["metrics_live_bytes"]), gib(m["lpips_live_bytes"])])
    table(f"Rollout and reward memory terms, GiB (r={PLAN_RANK}; per row = one candidate)",
          ["px", "bf16 policy copy", "transformer live / row", "VAE decode live / image (bf16)",
           "VAE encode live / input", "decoded image / row", f"trajectory tensors / row (NFE {nfe})",
           "PSNR + SSIM live / row (float32)", "LPIPS live / pair"], rows)
    return out


def print_colocated(counts: dict, meas: dict, k: int, nfe: int) -> dict:
    out, rows = {}, []
    for gpu in ASSUMPTIONS["gpu_gib"]:
        for res in RESOLUTIONS:
            for zero in (2, 3):
                slot = lambda n: slot_memory(counts, meas[res], zero, n, n, k, nfe)  # noqa: E731
                best = max_inputs(lambda n: slot(n)["total"] <= capacity(gpu), 256)
                shown = slot(max(best, 1))
                out[f"{gpu}_{res}px_zero{zero}"] = {"max_micro_batch": best, **shown}
                rows.append([gpu, res, f"ZeRO-{zero}", best, shown["learner"], shown["rollout"], shown["reward"],
                             shown["total"]])
    table(f"Colocated slot: learner rank + rollout actor + reward worker on one GPU (r={PLAN_RANK}, K={k}, "
          f"NFE={nfe}, checkpointing; rsr: rollout inputs per actor = learner micro-batch)",
          ["GPU", "px", "ZeRO", "largest micro-batch that fits", "learner GiB", "rollout GiB", "reward GiB",
           "total GiB"], rows)
    return out


def slot_gpu(cfg) -> dict:
    """The GPU fractions of a colocated config's roles (learner, rollout, reward)."""
    rl = cfg.rl
    return {role: getattr(rl, f"{role}_resources").get("GPU", 0) for role in ("learner", "rollout", "reward")}


def print_config_check(counts: dict, meas: dict, cfg, path: str = CONFIG) -> dict:
    """The config as it is: its crop, shard sizes, K, NFE, ZeRO stage, rank and checkpointing, slot by slot."""
    from actors.rl import slot_resources  # the bundles RLSystem asks Ray for (raises if a slot's GPUs sum > 1)

    rl, rank = cfg.rl, cfg.model.lora.rank
    if rank not in RANKS:
        raise ValueError(f"{path}: model.lora.rank {rank} is not one of the counted ranks {RANKS}")
    px = cfg.data.crop
    m = meas.get(px) or measure(px)
    rows_per_input = rl.candidates if rl.objective == "grpo" else 1  # rsr trains one row per input
    zero = zero_stage(rl.deepspeed, "rl.deepspeed")
    setting = {"config": path, "colocate": rl.colocate, "px": px, "k": rl.candidates, "nfe": rl.nfe,
               "objective": rl.objective, "zero_stage": zero, "deepspeed": os.path.relpath(rl.deepspeed, ROOT), "rank": rank,
               "checkpointing": cfg.model.gradient_checkpointing,
               "micro_batch": -(-rl.batch_size * rows_per_input // rl.num_learners),
               "inputs_per_actor": -(-rl.batch_size // rl.num_rollout_actors), "num_gpus": slot_gpu(cfg),
               "slots": [slot_resources(cfg, i) for i in range(rl.num_learners)] if rl.colocate else None}
    mem = slot_memory(counts, m, zero, setting["micro_batch"], setting["inputs_per_actor"], rl.candidates,
                      rl.nfe, rank, cfg.model.gradient_checkpointing, rl.deepspeed)
    per_gpu = {gpu: {"capacity": capacity(gpu), "fits": mem["total"] <= capacity(gpu),
                     "headroom": capacity(gpu) - mem["total"]} for gpu in ASSUMPTIONS["gpu_gib"]}
    table(f"{path} as it is: one slot (px {px}, learner micro-batch {setting['micro_batch']}, "
          f"{setting['inputs_per_actor']} inputs per rollout actor, K={rl.candidates}, NFE={rl.nfe}, "
          f"ZeRO-{zero}, r={rank})",
          ["GPU", "learner GiB", "rollout GiB", "reward GiB", "total GiB", "90 % of the card", "fits", "headroom"],
          [[gpu, mem["learner"], mem["rollout"], mem["reward"], mem["total"], v["capacity"],
            "yes" if v["fits"] else "no", v["headroom"]] for gpu, v in per_gpu.items()])
    print(f"\nslot 0 bundle: {setting['slots'][0] if setting['slots'] else 'not colocated'}; "
          f"num_gpus learner / rollout / reward: {' / '.join(f'{v:g}' for v in setting['num_gpus'].values())}")
    return {**setting, "gib": mem, "per_gpu": per_gpu}


def print_time(counts: dict, meas: dict, k: int, tflops: dict, smoke: dict, layout: list[dict]) -> dict:
    """Per input and per sample, then one iteration of the recommended layout (rollout, then learner)."""
    out, rows, split = {}, [], []
    for plan in layout:
        gpu, res, micro = plan["gpu"], plan["resolution"], plan["micro_batch"]
        m, rate, meas_rate = meas[res], rates(gpu, tflops), measured_rates(smoke, gpu, res)
        learn = meas_rate.get("learner_sample_s") or learner_seconds(m, rate)
        learn += zero3_gather_seconds(counts) / micro if plan["zero_stage"] == 3 else 0
        for nfe in NFES:
            roll = rollout_seconds(m, rate, k, nfe, meas_rate)
            per_input = sum(roll.values())
            inputs = GPUS_PER_NODE * micro
            t_roll, t_learn = micro * per_input, micro * learn
            half = GPUS_PER_NODE // 2  # the split layout: 4 GPUs of learners, 4 of rollout actors
            t_split = inputs * per_input / half + inputs * learn / half
            out[f"{gpu}_{res}px_nfe{nfe}"] = {
                "forward_tflop": forward_flops(m) / 1e12, "rollout_s_per_input": roll,
                "learner_s_per_sample": learn, "micro_batch": micro, "inputs_per_iteration": inputs,
                "rollout_s": t_roll, "learner_s": t_learn, "iteration_s": t_roll + t_learn,
                "iteration_s_split_4_4": t_split, "measured": meas_rate}
            source = "/".join("measured" if key in meas_rate else "assumed"
                              for key in ("row_forward_s", "learner_sample_s"))
            rows.append([gpu, res, nfe, source, per_input, *(100 * v / per_input for v in roll.values()), learn,
                         micro, inputs, t_roll, t_learn, t_roll + t_learn, inputs / (t_roll + t_learn), t_split])
        split.append([gpu, res, zero3_gather_seconds(counts), learner_seconds(m, rate)])
    table(f"Time model (K={k}, rsr, 1 update per rollout; one node in the recommended layout: rollout on all 8 "
          "GPUs, then the update on all 8; times measured in gpu_smoke.json where the column says so, else "
          f"assumed {tflops['H100']:.0f} / {tflops['H200']:.0f} TFLOP/s bf16 on H100 / H200 and convolutions at "
          f"{ASSUMPTIONS['conv_fraction']:.0%} of it)",
          ["GPU", "px", "NFE", "forward / learner time", "rollout s / input", "% transformer", "% VAE", "% reward",
           "learner s / sample", "micro-batch", "inputs / iteration", "rollout s", "learner s", "iteration s",
           "inputs / s", "iteration s if split 4 + 4 GPUs"], rows)
    table("ZeRO-3 extra per learner step: parameter all-gathers if not overlapped (assumed NVLink rate)",
          ["GPU", "px", "all-gather s per step", "learner compute s per sample (assumed rate)"], split)
    return out


def print_flops(meas: dict) -> None:
    rows = []
    for res, m in meas.items():
        f = m["flops"]
        rows.append([res, m["tokens"], f["linear_fwd"] / 1e12, f["attention_fwd"] / 1e12, forward_flops(m) / 1e12,
                     f["linear_bwd"] / 1e12, m["encode_flops"] / 1e12, m["decode_flops"] / 1e12,
                     m["lpips_flops"] / 1e12])
    table(f"FLOPs per image (TFLOP; transformer at r={PLAN_RANK}, batch 1)",
          ["px", "tokens L", "matmul fwd", "attention fwd (4·L²·3072·57)", "forward total",
           "matmul bwd (input grads + LoRA)", "VAE encode", "VAE decode", "LPIPS pair"], rows)


def smoke_estimates(r: dict, counts: dict, m: dict, rate: dict, rank: int) -> list[tuple]:
    """(figure, measured, estimate) for one gpu_smoke record; memory as max_memory_allocated would see it."""
    batch, ckpt = int(r.get("batch") or 1), bool(r.get("gradient_checkpointing", True))
    weights = policy_bytes(counts, rank) + counts["vae"] * 2
    if r["phase"] == "learner":
        mem = learner_memory(counts, m, rank, 2, batch, ckpt, gpus=1, allocated_only=True)
        return [("step s", r.get("step_s"), learner_seconds(m, rate, ckpt) * batch),
                ("peak GiB", r.get("peak_gib"), mem["total"])]
    if r["phase"] == "rollout":
        return [("ms / step", r.get("ms_per_step"), 1e3 * batch * forward_flops(m) / rate["bf16"]),
                ("peak GiB", r.get("peak_gib"), gib(weights + batch * m["inference_live_bytes"]))]
    if r["phase"] == "vae":
        return [("encode ms", r.get("encode_ms"), 1e3 * m["encode_flops"] / rate["conv"]),
                ("decode ms", r.get("decode_ms"), 1e3 * m["decode_flops"] / rate["conv"]),
                ("peak GiB", r.get("peak_gib"), gib(weights + max(m["encode_live_bytes"], m["decode_live_bytes"])))]
    if r["phase"] == "rollout_input":
        k, nfe = int(r.get("candidates", 4)), int(r.get("nfe", 4))
        est = rollout_seconds(m, rate, k, nfe, {})
        mem = rollout_memory(counts, m, rank, 1, k, nfe, allocated_only=True)
        return [(f"s per input (K={k}, NFE={nfe})", r.get("seconds"), est["transformer"] + est["vae"]),
                ("peak GiB", r.get("peak_gib"), mem["total"])]
    return []


def ckpt_tag(record: dict) -> str:
    if "gradient_checkpointing" not in record:
        return ""
    return "on" if record["gradient_checkpointing"] else "off"


def print_measured(counts: dict, meas: dict, report: dict, tflops: dict) -> list[dict]:
    if not report:
        print("\n### Measured on one GPU\n\nnot measured (no benchmarks/results/gpu_smoke.json)")
        return []
    gpu, rate = smoke_gpu(report), rates(smoke_gpu(report), tflops)
    rank = int(report.get("lora", {}).get("rank", 16))
    rank = min(RANKS, key=lambda x: abs(x - rank))  # the nearest counted rank
    note = "" if full_depth(report) else " (fewer blocks than FLUX.1-dev: transformer figures not comparable)"
    rows, out = [], []
    for r in report.get("records", []):
        res = r.get("resolution")
        if res not in meas:
            continue
        status = r.get("skipped") or ("out of memory" if r.get("oom") else r.get("error"))
        if status:
            rows.append([r["phase"], res, r.get("batch", ""), ckpt_tag(r), str(status)[:60], "", ""])
            continue
        for what, got, est in smoke_estimates(r, counts, meas[res], rate, rank):
            rows.append([r["phase"], res, r.get("batch", ""), ckpt_tag(r), what, f"{got}", est])  # as recorded
            out.append({"gpu": gpu, "phase": r["phase"], "resolution": res, "batch": r.get("batch"),
                        "gradient_checkpointing": r.get("gradient_checkpointing"), "what": what,
                        "measured": got, "estimate": est})
    table(f"Measured on one GPU ({report.get('device', 'device not named')}, torch {report.get('torch', '?')}, "
          f"r={rank}; benchmarks/results/gpu_smoke.json, `{report.get('command', '?')}`) next to the estimate{note}",
          ["phase", "px", "batch", "grad ckpt", "figure", "measured", "estimate"], rows)
    return out


def recommend(coloc: dict, k: int, cfg) -> list[dict]:
    """Per node kind and resolution: one slot per GPU (learner rank, rollout actor, reward worker) with the largest
    micro-batch that fits. ZeRO-2 if it reaches `rollout_min_inputs` per actor, else ZeRO-3 if that does, else the
    stage that fits more. The GPU fractions are the config's (with slots any split that sums to 1 places the same)."""
    out = []
    for gpu in ASSUMPTIONS["gpu_gib"]:
        for res in RESOLUTIONS:
            options = [(zero, coloc[f"{gpu}_{res}px_zero{zero}"]["max_micro_batch"]) for zero in (2, 3)]
            good = [o for o in options if o[1] >= ASSUMPTIONS["rollout_min_inputs"]]
            zero, micro = good[0] if good else max(options, key=lambda o: o[1])
            out.append({"gpu": gpu, "resolution": res, "zero_stage": zero, "micro_batch": micro,
                        "rl.batch_size": GPUS_PER_NODE * micro, "learners": GPUS_PER_NODE,
                        "rollout_actors": GPUS_PER_NODE, "reward_workers": GPUS_PER_NODE,
                        "num_gpus": slot_gpu(cfg)})
    table(f"Recommended layout per 8-GPU node (r={PLAN_RANK}, K={k}, rsr; rl.colocate: 8 slots, one per GPU, "
          "each a learner rank, a rollout actor and a reward worker)",
          ["GPU", "px", "ZeRO", "micro-batch (= rollout inputs per actor)", "rl.batch_size",
           "learner / rollout / reward num_gpus"],
          [[r["gpu"], r["resolution"], f"ZeRO-{r['zero_stage']}", r["micro_batch"], r["rl.batch_size"],
            " / ".join(f"{v:g}" for v in r["num_gpus"].values())] for r in out])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflops-h100", type=float, default=ASSUMPTIONS["tflops_bf16"]["H100"])
    parser.add_argument("--tflops-h200", type=float, default=ASSUMPTIONS["tflops_bf16"]["H200"])
    parser.add_argument("--candidates", type=int, default=4, help="K per input (rl.candidates)")
    parser.add_argument("--no-smoke", action="store_true", help="ignore benchmarks/results/gpu_smoke.json")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # quiet the bf16 cast notice of the meta models
    started = time.perf_counter()
    tflops = {"H100": args.tflops_h100, "H200": args.tflops_h200}
    ASSUMPTIONS["tflops_bf16"] = tflops
    k, nfe_mem = args.candidates, max(NFES)
    cfg = load_config(ROOT / CONFIG)
    counts = param_counts()
    meas = {res: measure(res) for res in RESOLUTIONS}
    smoke = {} if args.no_smoke else load_smoke()
    print_params(counts)
    print_activation_constants(meas)
    print_flops(meas)
    learner = print_learner(counts, meas)
    rollout = print_rollout(counts, meas, k, nfe_mem)
    coloc = print_colocated(counts, meas, k, nfe_mem)
    layout = recommend(coloc, k, cfg)
    config_check = print_config_check(counts, meas, cfg)
    timing = print_time(counts, meas, k, tflops, smoke, layout)
    measured = print_measured(counts, meas, smoke, tflops)
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.1f} s; decode chunk {decode_chunk()}; assumptions: {json.dumps(ASSUMPTIONS)}")
    result = {"command": ".venv/bin/python benchmarks/scaling_plan.py" + (" --no-smoke" if args.no_smoke else ""),
              "machine": machine(), "seconds": seconds,
              "assumptions": ASSUMPTIONS, "candidates": k, "plan_rank": PLAN_RANK, "decode_chunk": decode_chunk(),
              "params": counts,
              "measured_on_meta": {str(r): {**v, "saved": {str(k2): s for k2, s in v["saved"].items()}}
                                   for r, v in meas.items()},
              "learner_gib": learner, "rollout": rollout, "colocated": coloc, "layout": layout,
              "config_check": config_check, "time": timing, "gpu_smoke": measured or "not measured"}
    write_result(RESULTS / "scaling_plan.json", result, default=str)


if __name__ == "__main__":
    main()
