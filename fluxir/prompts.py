"""Task prompts -> FLUX text conditioning, computed once and cached (docs/ARCHITECTURE.md, "One code path
for every scale").

`fluxir embed-prompts CONFIG` runs FluxPipeline's own `encode_prompt` (CLIP pooled + T5 tokens) on
the text encoders of `model.path` and writes `model.prompt_cache` (safetensors). Training,
rollouts and evaluation load only the cache; no text encoder is ever held beside the transformer.
The cache records the prompts it encodes, so a config whose prompts changed refuses a stale cache.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxir.config import BLIND_PROMPT
from fluxir.degradations import TASKS

log = logging.getLogger(__name__)


def task_prompts(cfg) -> list[str]:
    """The prompts in task-id order (one shared prompt in `blind` mode): row i conditions task i."""
    if cfg.model.conditioning == "blind":
        return [BLIND_PROMPT]
    return [cfg.model.prompts[t] for t in TASKS]


def encode_prompts(folder: str | Path, prompts: list[str], max_sequence_length: int, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (P, L, D), pooled_prompt_embeds (P, E)) from the pipeline's text encoders."""
    from diffusers import FluxPipeline

    from fluxir.accel import runtime_device
    from fluxir.flux_folder import TEXT_PARTS, require

    require(folder, TEXT_PARTS, "`fluxir embed-prompts`")
    device = runtime_device() if device is None else device
    pipe = FluxPipeline.from_pretrained(str(folder), transformer=None, vae=None, dtype=dtype)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
    return embeds.float().cpu(), pooled.float().cpu()


def embed_prompts(cfg, out: str | Path | None = None) -> Path:
    """Encode `task_prompts(cfg)` and write the cache (default `model.prompt_cache`) atomically."""
    out = Path(out or cfg.model.prompt_cache or cfg.run_dir / "prompts.safetensors")
    prompts = task_prompts(cfg)
    embeds, pooled = encode_prompts(cfg.model.path, prompts, cfg.model.max_sequence_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({"prompt_embeds": embeds.contiguous(), "pooled_prompt_embeds": pooled.contiguous()}, str(tmp),
              metadata={"prompts": json.dumps(prompts), "source": str(Path(cfg.model.path).resolve()),
                        "max_sequence_length": str(cfg.model.max_sequence_length)})
    tmp.replace(out)
    log.info("prompt cache %s: %d prompts, embeds %s, pooled %s", out, len(prompts), tuple(embeds.shape),
             tuple(pooled.shape))
    return out


def load_prompt_cache(path: str | Path, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (prompt_embeds (P, L, D), pooled_prompt_embeds (P, E)) for `cfg`'s prompts, else a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt cache {path} not found (write it with `fluxir embed-prompts CONFIG`)")
    expected = task_prompts(cfg)
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get("prompts")
        if recorded is not None and json.loads(recorded) != expected:
            raise ValueError(f"prompt cache {path} was computed for other prompts than the config's "
                             f"model.prompts / conditioning; rerun `fluxir embed-prompts`")
        tokens, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled_prompt_embeds")
    if tokens.shape[0] != len(expected) or pooled.shape[0] != len(expected):
        raise ValueError(f"prompt cache {path} holds {tokens.shape[0]} prompts, the config needs {len(expected)}")
    return tokens, pooled
