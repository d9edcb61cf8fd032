"""What every benchmark shares: the repository on sys.path, a description of the machine, the command
line with its config and overrides, and how a result file is written."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "processor": platform.processor() or platform.machine()}


def command(script: str) -> str:
    """This run's command line as a result records it: `python benchmarks/<script's file name> <arguments>`."""
    return f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:])


def config_parser(doc: str, out: str | None = None, config: str | None = None) -> argparse.ArgumentParser:
    """A parser for `CONFIG [key=value ...]` as the fluxir commands take them, with `doc` as its help.
    `config`: a default that makes CONFIG optional; `out`: adds --out, by default that file name under
    benchmarks/results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config is None:
        parser.add_argument("config")
    else:
        parser.add_argument("config", nargs="?", default=config)
    parser.add_argument("overrides", nargs="*")
    if out is not None:
        parser.add_argument("--out", default=str(RESULTS / out), help=f"result JSON (default: benchmarks/results/{out})")
    return parser


def write_result(path: str | Path, result: dict, indent: int = 1, default=None, quiet: bool = False) -> Path:
    """Writes `result` as JSON to `path` (its folder made when missing) and says so in one line unless
    `quiet`. The text goes to a file beside it first and is renamed over `path`, so a crash mid-write leaves
    the previous result whole. `default` is json.dumps's, for values JSON has no type for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=indent, default=default) + "\n")
    partial.replace(path)
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


# FLUX.1-dev's transformer and VAE configs (black-forest-labs/FLUX.1-dev, diffusers layout): for
# random-init benchmarks at the real shapes. Real weights come only from a local folder (model.path).
FLUX1_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX1_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                 layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
FLUX1_TEXT_TOKENS = 512  # T5 tokens per cached prompt (max_sequence_length)
