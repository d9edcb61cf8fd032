"""The restoration policy: diffusers' FluxTransformer2DModel with LQ channel-concat and task conditioning.

One code path for every scale (docs/ARCHITECTURE.md): `tiny` builds a random-init transformer from the config
sizes; `flux-dev` loads a local diffusers folder. The LQ latent is concatenated to the noisy tokens along
channels (x_embedder widened, new columns zero-initialised, as FLUX Fill does). Tasks condition the
transformer's text inputs: learned embeddings (tiny) or cached prompt embeddings (flux-dev).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fluxir import flow
from fluxir.degradations import TASKS

log = logging.getLogger(__name__)


class Prediction(NamedTuple):
    velocity: torch.Tensor  # (B, N, C)
    x0_hat: torch.Tensor    # (B, N, C)


def widen_input(transformer, extra_channels: int) -> None:
    """Widen x_embedder by `extra_channels` zero-initialised input columns (output unchanged)."""
    old = transformer.x_embedder
    new = nn.Linear(old.in_features + extra_channels, old.out_features, bias=old.bias is not None,
                    dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    transformer.x_embedder = new
    # out_channels: None in FLUX.1-dev's config means "= in_channels"; pin it before in_channels grows
    transformer.register_to_config(in_channels=old.in_features + extra_channels,
                                   out_channels=transformer.proj_out.out_features)


def zero_output(transformer) -> None:
    """Zero the final projection so a fresh x0-residual policy returns the LQ image exactly."""
    with torch.no_grad():
        transformer.proj_out.weight.zero_()
        if transformer.proj_out.bias is not None:
            transformer.proj_out.bias.zero_()


def add_lora(transformer, lora_cfg) -> None:
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                       target_modules=list(lora_cfg.targets), init_lora_weights=True))


class RestorationPolicy(nn.Module):
    """v_θ(x_t, LQ, t, task) on packed tokens.

    forward(x_t (B, N, C), lq (B, N, C), t (B,), task (B,) int64, img_ids (N, 3)) -> Prediction.

    The transformer's output F is read as a velocity, an x0 residual (x0̂ = LQ + F) or, with
    `precond` = (source, σ_src, σ_data), the preconditioned residual of `flow.precondition`.
    """

    def __init__(self, transformer, token_channels: int, parametrization: str, task_tokens: torch.Tensor,
                 task_pooled: torch.Tensor, learn_conditioning: bool, guidance: float | None = None,
                 precond: tuple[str, float, float] | None = None):
        super().__init__()
        if (parametrization == "x0_precond") != (precond is not None):
            raise ValueError("the x0_precond reading needs precond=(source, sigma_src, sigma_data), and only it")
        self.transformer = transformer
        self.token_channels = token_channels
        self.parametrization = parametrization
        self.precond = precond
        self.guidance = guidance
        if learn_conditioning:
            self.task_tokens = nn.Parameter(task_tokens)
            self.task_pooled = nn.Parameter(task_pooled)
        else:
            self.register_buffer("task_tokens", task_tokens)
            self.register_buffer("task_pooled", task_pooled)

    @property
    def num_conditions(self) -> int:
        return self.task_tokens.shape[0]

    def conditioning(self, task: torch.Tensor):
        idx = task if self.num_conditions > 1 else torch.zeros_like(task)
        return self.task_tokens[idx], self.task_pooled[idx]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The transformer's input dtype (bf16 on a GPU cluster); the flow state stays in its own dtype."""
        return self.transformer.x_embedder.weight.dtype

    def forward(self, x_t, lq, t, task, img_ids) -> Prediction:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        dtype = self.compute_dtype
        tokens, pooled = self.conditioning(task.to(self.task_tokens.device))
        txt_ids = torch.zeros(tokens.shape[1], 3, dtype=img_ids.dtype, device=img_ids.device)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full_like(t, self.guidance if self.guidance is not None else 1.0).to(dtype)
        out = self.transformer(hidden_states=torch.cat([x_t, lq], dim=-1).to(dtype),
                               encoder_hidden_states=tokens.to(dtype), pooled_projections=pooled.to(dtype),
                               timestep=t.to(dtype), img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                               return_dict=False)[0].to(x_t.dtype)
        if self.parametrization == "velocity":
            return Prediction(out, flow.x0_hat(x_t, out, t))
        if self.parametrization == "x0_precond":
            source, sigma_src, sigma_data = self.precond
            tb = t.view(-1, *([1] * (x_t.dim() - 1)))
            mean = lq if source == "lq" else (1 - tb) * lq  # E[x_t | LQ], taking E[x0 | LQ] = LQ
            c_skip, c_out = flow.precondition(tb, sigma_src, sigma_data)
            x0 = lq + c_skip * (x_t - mean) + c_out * out
        else:
            x0 = lq + out
        return Prediction(flow.velocity_from_x0(x_t, x0, t.clamp_min(1e-4)), x0)

    # --- the tensors that training changes and weight sync ships ------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"trainable weights do not match the policy: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)


def _tiny_transformer(m, token_channels: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=token_channels, out_channels=token_channels, num_layers=m.num_layers,
        num_single_layers=m.num_single_layers, attention_head_dim=m.attention_head_dim,
        num_attention_heads=m.num_attention_heads, joint_attention_dim=m.joint_attention_dim,
        pooled_projection_dim=m.pooled_projection_dim, guidance_embeds=False,
        axes_dims_rope=tuple(m.axes_dims_rope))


def _pretrained_transformer(path: Path, token_channels: int, dtype_name: str):
    """The frozen base from <path>/transformer, loaded in `model.dtype` (bf16: 24 GB for FLUX.1-dev, not 48)."""
    from diffusers import FluxTransformer2DModel

    from fluxir.accel import DTYPES
    from fluxir.flux_folder import require

    folder = require(path, ("transformer",), "the flux-dev policy") / "transformer"
    transformer = FluxTransformer2DModel.from_pretrained(folder, dtype=DTYPES[dtype_name])
    if transformer.config.in_channels != token_channels:
        raise ValueError(f"{folder}: in_channels {transformer.config.in_channels} != codec tokens {token_channels}")
    return transformer


def build_policy(cfg, token_channels: int) -> RestorationPolicy:
    """Build the policy named by `cfg.model` (a `Config`), deterministic in `cfg.seed`."""
    m = cfg.model
    num_conditions = 1 if m.conditioning == "blind" else len(TASKS)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        if m.preset == "tiny":
            transformer = _tiny_transformer(m, token_channels)
        else:
            transformer = _pretrained_transformer(Path(m.path), token_channels, m.dtype)

        policy = assemble_policy(transformer, m, token_channels, _task_conditioning(cfg, num_conditions),
                                 precond=precond_of(cfg))
    log.info("policy: %s, %.2f M params (%.2f M trainable)", m.preset,
             sum(p.numel() for p in policy.parameters()) / 1e6,
             sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6)
    return policy


def precond_of(cfg) -> tuple[str, float, float] | None:
    """(source, σ_src, σ_data) of the x0_precond reading, None for the other readings."""
    if cfg.model.parametrization != "x0_precond":
        return None
    from fluxir.flow import source_sigma

    return cfg.flow.source, source_sigma(cfg.flow), cfg.model.sigma_data


def _task_conditioning(cfg, num_conditions: int):
    """`assemble_policy`'s conditioning step: the prompt cache (flux-dev) or learned task tokens (tiny),
    drawn after the widening (the order of the draws is part of the seeded init)."""
    m = cfg.model

    def draw(transformer):
        if m.prompt_cache:
            from fluxir.prompts import load_prompt_cache

            return (*load_prompt_cache(m.prompt_cache, cfg), False)
        cfg_t = transformer.config
        return (torch.randn(num_conditions, m.text_tokens, cfg_t.joint_attention_dim) * 0.02,
                torch.randn(num_conditions, cfg_t.pooled_projection_dim) * 0.02, True)

    return draw


def assemble_policy(transformer, m, token_channels: int, conditioning, precond=None) -> RestorationPolicy:
    """A loaded transformer -> the policy: widened LQ input, output init, task conditioning, LoRA, checkpointing.

    `m` is the model config; `conditioning(transformer)` returns (tokens, pooled, learnable). The order of
    the random draws (widening, conditioning, LoRA) is part of the seeded init.
    """
    widen_input(transformer, token_channels)
    if m.parametrization != "velocity":
        zero_output(transformer)
    tokens, pooled, learn_conditioning = conditioning(transformer)
    if m.lora.enabled:
        transformer.requires_grad_(False)
        add_lora(transformer, m.lora)
        transformer.x_embedder.requires_grad_(True)  # the new LQ input columns must learn
    if m.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return RestorationPolicy(transformer, token_channels, m.parametrization, tokens, pooled, learn_conditioning,
                             guidance=m.guidance, precond=precond)


def save_policy(policy: RestorationPolicy, directory: str | Path, cfg=None, extra: dict | None = None) -> Path:
    """Write the trainable tensors (safetensors) and a JSON card; the base comes from the config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in policy.trainable_state_dict().items()}
    tmp = directory / "policy.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / "policy.safetensors")
    card = {"token_channels": policy.token_channels, "parametrization": policy.parametrization, **(extra or {})}
    if cfg is not None:
        card["config"] = cfg.model_dump(mode="json")
    (directory / "policy.json").write_text(json.dumps(card, indent=2))
    return directory


def load_policy(directory: str | Path, cfg, token_channels: int) -> RestorationPolicy:
    directory = Path(directory)
    weights = directory / "policy.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no trained policy at {directory} (missing policy.safetensors)")
    policy = build_policy(cfg, token_channels)
    policy.load_trainable_state_dict(load_file(str(weights)))
    return policy.eval()


def load_trained(directory: str | Path, cfg, place_on_device: bool = False):
    """(policy, codec) of the trained policy folder `directory`, in eval mode; with `place_on_device`, both
    on this process's accelerator (a GPU when Ray or the driver has one) in `model.dtype`."""
    from fluxir.codec import build_codec, token_channels

    codec = build_codec(cfg)
    policy = load_policy(directory, cfg, token_channels(codec))
    if place_on_device:
        from fluxir.accel import place

        place(codec, cfg.model.dtype, place(policy, cfg.model.dtype))
    return policy, codec
