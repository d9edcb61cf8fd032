"""`fluxir export`: a folder that plain diffusers (+ peft) loads, with checksums that refuse tampering.

The policy here is the smoke model with LoRA on and every LoRA/input weight randomised, so that the
merge is really exercised (a fresh LoRA is a no-op). No Ray is needed.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.cli import main
from fluxir.codec import build_codec
from fluxir.config import load_config
from fluxir.data import load_image, save_image
from fluxir.evaluate import restore_image
from fluxir.export import ExportError, load_export, verify_export
from fluxir.policy import build_policy, load_policy, save_policy
from fluxir.codec import token_channels

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max |Δ| in [0, 1] pixel units between fluxir (LoRA unmerged) and diffusers (merged)

# Runs the export's own restore.py with every fluxir/actors import refused.
NO_FLUXIR = """
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('fluxir', 'actors'):
            raise ImportError('fluxir must not be imported here: ' + name)
sys.meta_path.insert(0, Refuse())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name='__main__')
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('fluxir', 'actors'))
assert not loaded, loaded
"""


def _exported_run(tmp_path_factory, overrides: list[str]):
    """A run folder whose rl/model is the smoke policy with every trainable weight perturbed (so a LoRA is
    not a no-op), exported with `fluxir export`."""
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides)
    policy = build_policy(cfg, token_channels(build_codec(cfg)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:  # lora_A/B or all weights, x_embedder (incl. the LQ columns), task tokens
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run = tmp_path_factory.mktemp("run")
    save_policy(policy, run / "rl" / "model", cfg, {"stage": "rl"})
    out = tmp_path_factory.mktemp("exports") / "model"
    assert main(["export", str(run), str(out)]) == 0
    return cfg, run, out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Pixel codec, LoRA rank 4 (merged in transformer/, kept in adapter/)."""
    return _exported_run(tmp_path_factory, ["model.lora.enabled=true", "model.lora.rank=4"])


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A VAE codec (a small random AutoencoderKL without a shift factor), full fine-tune."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return _exported_run(tmp_path_factory, ["codec.kind=vae", f"codec.vae_path={path}"])


def test_export_layout_and_manifest(lora_run):
    cfg, run, out = lora_run
    for rel in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/x_embedder.safetensors",
                "conditioning.safetensors", "schedules.json", "restore.py", "README.md"):
        assert (out / rel).is_file(), rel
    manifest = verify_export(out)
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}
    assert manifest["lora"]["rank"] == 4 and manifest["config"]["model"]["lora"]["enabled"]
    assert manifest["base_model"]["hash"].startswith("sha256-tensors:")
    assert json.loads((out / "schedules.json").read_text()) == {"1": [1.0, 0.0], "2": [1.0, 0.5, 0.0]}
    weights = json.loads((out / "transformer" / "config.json").read_text())
    assert weights["in_channels"] == 24 and weights["out_channels"] == 12
    from safetensors import safe_open

    with safe_open(str(out / "transformer/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())  # merged, no adapter layers left


def _fluxir_restore(cfg, run, image, budget):
    from fluxir.evaluate import eval_schedule

    codec = build_codec(cfg)
    policy = load_policy(run / "rl" / "model", cfg, token_channels(codec))  # as trained: LoRA unmerged
    return restore_image(policy, codec, image, "denoise", cfg, eval_schedule(cfg, budget))


@pytest.mark.parametrize("which", ["lora_run", "vae_run"])
def test_plain_diffusers_reproduces_fluxir_without_importing_it(which, request, tmp_path):
    """restore.py in a subprocess where `import fluxir` fails: same restoration as fluxir's, within
    TOLERANCE, with the times read from schedules.json (a tiled 45×70 image: tile 16)."""
    cfg, run, out = request.getfixturevalue(which)
    assert (out / "vae" / "config.json").is_file() == (which == "vae_run")
    save_image(torch.rand(3, 45, 70, generator=torch.Generator().manual_seed(1)), tmp_path / "in.png")
    image = load_image(tmp_path / "in.png")
    proc = subprocess.run([sys.executable, "-c", NO_FLUXIR, str(out / "restore.py"), "--task", "denoise",
                           "--budget", "2", str(tmp_path / "in.png"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.from_numpy(np.load(tmp_path / "out.npy")).permute(2, 0, 1)
    ours = _fluxir_restore(cfg, run, image, 2)
    assert theirs.shape == ours.shape == (3, 45, 70)
    assert (theirs - ours).abs().max() < TOLERANCE
    assert (ours - image).abs().mean() > 1e-3  # the random LoRA really changes the output


def test_restore_cli_uses_the_export(lora_run, tmp_path):
    cfg, run, out = lora_run
    save_image(torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(2)), tmp_path / "in.png")
    assert main(["restore", "--model", str(out), "--task", "denoise", "--nfe", "2",
                 str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    ours = _fluxir_restore(cfg, run, load_image(tmp_path / "in.png"), 2)
    got = load_image(tmp_path / "out.png")
    assert (got - ours).abs().max() <= 1 / 255 + 1e-6  # 8-bit rounding only


def test_adapter_folder_rebuilds_the_merged_transformer(lora_run):
    """peft route: the base transformer + adapter/x_embedder.safetensors + adapter/ (peft) gives the
    same outputs as the merged transformer/."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, _, out = lora_run
    base = build_policy(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"lora": cfg.model.lora.model_copy(update={"enabled": False})})}), 12).transformer
    base.x_embedder.load_state_dict(load_file(str(out / "adapter" / "x_embedder.safetensors")))
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out / "adapter")), base)
    result = set_peft_model_state_dict(base, load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    merged = FluxTransformer2DModel.from_pretrained(out / "transformer")
    gen = torch.Generator().manual_seed(3)
    kw = dict(hidden_states=torch.randn(2, 16, 24, generator=gen),
              encoder_hidden_states=torch.randn(2, 4, 32, generator=gen),
              pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([0.3, 0.9]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(base(**kw)[0], merged(**kw)[0], atol=1e-5, rtol=1e-4)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused_naming_it(lora_run, tmp_path, capsys):
    out = _copy(lora_run[2], tmp_path / "tampered")
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte of a tensor flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="diffusion_pytorch_model.safetensors: sha256 does not match"):
        load_export(out)
    save_image(torch.rand(3, 20, 24), tmp_path / "in.png")  # a good image: only the export is at fault
    assert main(["restore", "--model", str(out), "--task", "sr", str(tmp_path / "in.png"),
                 str(tmp_path / "out.png")]) == 2
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err


def test_truncated_and_missing_files_are_refused_naming_them(lora_run, tmp_path):
    out = _copy(lora_run[2], tmp_path / "truncated")
    cond = out / "conditioning.safetensors"
    cond.write_bytes(cond.read_bytes()[:100])
    with pytest.raises(ExportError, match=r"conditioning.safetensors: truncated or altered: 100 bytes"):
        verify_export(out)
    out = _copy(lora_run[2], tmp_path / "missing")
    (out / "schedules.json").unlink()
    with pytest.raises(ExportError, match="schedules.json: missing"):
        verify_export(out)
    with pytest.raises(ExportError, match="not a fluxir export"):
        verify_export(tmp_path)


def test_export_never_overwrites(lora_run, capsys):
    _, run, out = lora_run
    with pytest.raises(FileExistsError, match="exists"):
        main(["export", str(run), str(out)])
    assert main(["export", str(run), str(out.parent / "x"), "--budget", "2"]) == 2  # no students in this run
    assert "needs distilled students" in capsys.readouterr().err
    assert not (out.parent / "x").exists() and not (out.parent / "x.partial").exists()


def _relist(out: Path, files: dict) -> None:
    """Rewrite the manifest's file table (as whoever can edit the files can also do)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = files
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _entry(path: Path) -> dict:
    import hashlib

    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


@pytest.mark.parametrize("rel", ["transformer/diffusion_pytorch_model.bin", "numpy.py", "vae/extra/config.json"])
def test_unlisted_file_is_refused_naming_it(lora_run, tmp_path, capsys, rel):
    """Only the top-level manifest.json may be unlisted: an extra weight file diffusers would pick up, or a
    module that shadows an import of restore.py, is refused before anything loads."""
    out = _copy(lora_run[2], tmp_path / "extra")
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(b"not listed")
    with pytest.raises(ExportError, match=f"{rel}: not listed in manifest.json"):
        verify_export(out)
    save_image(torch.rand(3, 20, 24), tmp_path / "in.png")  # a good image: only the export is at fault
    assert main(["restore", "--model", str(out), "--task", "sr", str(tmp_path / "in.png"),
                 str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert rel in err and err.count("\n") == 1


def test_unlisted_symlink_is_refused(lora_run, tmp_path):
    out = _copy(lora_run[2], tmp_path / "link")
    (out / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ExportError, match="elsewhere: not listed"):
        verify_export(out)


@pytest.mark.parametrize("kind", ["parent", "nested parent", "absolute", "symlink", "symlinked manifest"])
def test_manifest_paths_are_confined_to_the_export(lora_run, tmp_path, monkeypatch, kind):
    """A listed path that leads outside the export is refused, naming it, before any file is hashed."""
    import fluxir.export

    out = _copy(lora_run[2], tmp_path / "export")
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the export")
    rel = {"parent": "../secret", "nested parent": "transformer/../../secret", "absolute": str(secret),
           "symlink": "secret.safetensors", "symlinked manifest": "manifest.json"}[kind]
    if kind == "symlink":
        (out / rel).symlink_to(secret)
    if kind == "symlinked manifest":
        (out / rel).rename(secret)
        (out / rel).symlink_to(secret)
    else:
        _relist(out, {**json.loads((out / "manifest.json").read_text())["files"], rel: _entry(secret)})

    def never(path):
        raise AssertionError(f"hashed {path} before the paths were checked")

    monkeypatch.setattr(fluxir.export, "sha256_file", never)
    with pytest.raises(ExportError, match=re.escape(rel)):
        verify_export(out)


def test_pickled_weights_are_never_loaded(lora_run, tmp_path, capsys):
    """A transformer saved as a pickle (.bin) with a manifest rewritten to match passes the checksums, but
    neither fluxir nor restore.py unpickles it: diffusers is asked for safetensors only."""
    from safetensors.torch import load_file

    from fluxir.export import file_table

    out = _copy(lora_run[2], tmp_path / "pickled")
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    _relist(out, file_table(out))
    verify_export(out)  # the checksums match: they say nothing about who wrote the files
    with pytest.raises(ExportError, match="transformer: .*safetensors"):
        load_export(out)
    save_image(torch.rand(3, 20, 24), tmp_path / "in.png")  # a good image: only the export is at fault
    assert main(["restore", "--model", str(out), "--task", "sr", str(tmp_path / "in.png"),
                 str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    proc = subprocess.run([sys.executable, str(out / "restore.py"), "--task", "sr", "in.png", "out.npy"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "diffusion_pytorch_model.safetensors" in proc.stderr


def test_model_card_says_what_the_checksums_protect(lora_run):
    card = (lora_run[2] / "README.md").read_text()
    assert "not who wrote the files" in card and "like code" in card


def test_load_export_reads_the_vae_from_safetensors(vae_run):
    from fluxir.codec import VaeCodec

    _, codec, *_ = load_export(vae_run[2])
    assert isinstance(codec, VaeCodec) and codec.scaling_factor == 0.5 and codec.latent_channels == 4
