"""A small random FLUX pipeline folder in the diffusers layout, for tests of the flux-dev path.

Same files and classes as black-forest-labs/FLUX.1-dev (model_index.json, transformer/, vae/,
text_encoder/ (CLIP), text_encoder_2/ (T5), tokenizer/, tokenizer_2/, scheduler/), tiny sizes:
the transformer has FLUX.1-dev's 64 input channels and guidance embedding, `out_channels` left
unset as in FLUX.1-dev's config; the VAE has FLUX's 16 latent channels, /8, scaling and shift.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_DIM, T5_DIM, T5_TOKENS = 24, 32, 16
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _tokenizers(root: Path) -> tuple[int, int]:
    """Character-level CLIP BPE and T5 unigram tokenizers; returns their vocabulary sizes."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    clip.save_pretrained(root / "tokenizer")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    t5.save_pretrained(root / "tokenizer_2")
    return len(clip), len(t5)


def _text_encoders(root: Path, clip_vocab: int, t5_vocab: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=CLIP_DIM, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                 projection_dim=CLIP_DIM, bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1,
                                 pad_token_id=clip_vocab - 1)).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder_2")


def write_flux_pipeline(root: Path, seed: int = 0) -> Path:
    """Write the folder (about 1 MB) and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    _text_encoders(root, *_tokenizers(root))
    FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                  latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
