"""Where a process computes: the GPU Ray assigned it (via CUDA_VISIBLE_DEVICES), else the CPU.

Rollout actors and reward workers place their modules with `place`; learners let DeepSpeed place
the engine and move each batch with `to_device`. Random draws stay on the CPU generators that seed
them, so a seed gives the same trajectory on any device.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def runtime_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor on `device` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters are (the CPU for a module without any, like the pixel codec)."""
    return next(module.parameters(), torch.empty(0)).device


def place(module: torch.nn.Module, dtype_name: str = "float32", device=None) -> torch.device:
    """Move `module` to `device` (default: `runtime_device()`) in the named dtype; return the device."""
    device = runtime_device() if device is None else torch.device(device)
    module.to(device=device, dtype=DTYPES[dtype_name])
    return device


def training_attention() -> None:
    """Keep cuDNN's fused attention out of backward passes on a GPU.

    Measured (benchmarks/gpu_smoke.py, H100, torch 2.11 + cu130): the FLUX learner step crashed twice
    in backward with cuDNN SDPA enabled (CUBLAS_STATUS_EXECUTION_FAILED, then an illegal memory
    access) and ran with it disabled (flash attention). Forward-only rollouts keep cuDNN.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
