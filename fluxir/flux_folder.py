"""A local diffusers FLUX folder (e.g. FLUX.1-dev): what each use needs, checked before loading.

A half-copied 12B checkpoint fails deep inside `from_pretrained` with a message about a tensor; this
names the missing files instead: the config, the weights, and every shard listed in a weight index.
"""
from __future__ import annotations

import json
from pathlib import Path

# weight file stems: diffusers models (transformer, vae) and transformers models (text encoders)
_WEIGHTS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_PARTS = {
    "transformer": "diffusers", "vae": "diffusers",
    "text_encoder": "transformers", "text_encoder_2": "transformers",
    "tokenizer": "tokenizer", "tokenizer_2": "tokenizer",
}
TRAINING_PARTS = ("transformer", "vae")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class IncompleteModelFolder(FileNotFoundError):
    """A local model folder lacks files a stage needs; the message lists them."""


def _missing_weights(folder: Path, stem: str) -> list[str]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [f"{s} (listed in {index.name})" for s in shards if not (folder / s).is_file()]
    if (folder / f"{stem}.safetensors").is_file():
        return []
    return [f"{stem}.safetensors (or a sharded {index.name})"]


def _missing_in(folder: Path, kind: str, label: str) -> list[str]:
    """What one component folder of `kind` lacks, each path prefixed with `label`."""
    if kind == "tokenizer":
        return [] if (folder / "tokenizer_config.json").is_file() else [f"{label}/tokenizer_config.json"]
    missing = [] if (folder / "config.json").is_file() else [f"{label}/config.json"]
    return missing + [f"{label}/{m}" for m in _missing_weights(folder, _WEIGHTS[kind])]


def missing_files(root: str | Path, parts: tuple[str, ...]) -> list[str]:
    """Paths (relative to `root`) that `parts` need and the folder lacks; [] when complete."""
    root = Path(root)
    missing = [m for part in parts for m in _missing_in(root / part, _PARTS[part], part)]
    if any(p in TEXT_PARTS for p in parts) and not (root / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    return missing


def require(root: str | Path, parts: tuple[str, ...], purpose: str) -> Path:
    """`root` as a Path, or `IncompleteModelFolder` naming every missing file and what it is needed for."""
    root = Path(root)
    if not root.is_dir():
        raise IncompleteModelFolder(f"model.path {root} does not exist ({purpose} needs a local diffusers FLUX "
                                    f"folder with {', '.join(parts)})")
    missing = missing_files(root, parts)
    if missing:
        raise IncompleteModelFolder(f"model.path {root} is incomplete for {purpose}: missing {', '.join(missing)}")
    return root


def require_model(folder: str | Path, kind: str, purpose: str) -> Path:
    """One component folder anywhere (e.g. `codec.vae_path`), checked like a pipeline's parts."""
    folder = Path(folder)
    missing = _missing_in(folder, kind, str(folder))
    if missing:
        raise IncompleteModelFolder(f"{folder} is incomplete for {purpose}: missing {', '.join(missing)}")
    return folder
