"""Export a trained policy as a folder that loads without fluxir, and load it back (checksums verified).

Layout of an export (docs/ARCHITECTURE.md, "Export"):
  transformer/              diffusers `save_pretrained` (safetensors), LoRA merged, input widened for the LQ
  adapter/                  (LoRA runs only) peft `adapter_config.json` + `adapter_model.safetensors`, and
                            `x_embedder.safetensors`: the trained, widened input layer the adapter needs
  vae/                      (VAE codec only) the frozen AutoencoderKL
  conditioning.safetensors  per-task `prompt_embeds` (T, L, D) and `pooled_prompt_embeds` (T, P)
  schedules.json            {budget: times}: the sampling times this transformer was trained/evaluated for
  restore.py                a sampler that needs only torch + diffusers (fluxir/standalone_restore.py)
  README.md                 model card
  manifest.json             config, base model id and hash, sampler settings, metrics, sha256 of every file
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file, save_file

from fluxir.degradations import TASKS
from fluxir.weightsync import weights_checksum

FORMAT = "fluxir-export/1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ExportError(ValueError):
    """An export folder is incomplete, tampered with or truncated; the message names the file."""


# --- checksums ---------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def export_files(root: Path) -> set[str]:
    """Relative paths of everything under `root` but directories and the top-level manifest (symlinks
    included, never followed): what a manifest lists, no more and no less."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        found.update((here / name).relative_to(root).as_posix()
                     for name in files + [d for d in dirs if (here / d).is_symlink()])
    return found - {MANIFEST}


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under `root` except the manifest."""
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in sorted(export_files(root))}


def confined(root: Path, rel: str) -> Path:
    """`root / rel`, refused (naming `rel`) unless it is a plain relative path that stays inside `root`
    once resolved: no absolute path, no `..`, no symlink leading out."""
    plain = PurePosixPath(rel)
    if plain.is_absolute() or ".." in plain.parts or plain.as_posix() != rel:
        raise ExportError(f"{root / MANIFEST}: path {rel!r} is not a plain relative path inside the export")
    try:
        inside = (root / rel).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ExportError(f"{root}: path {rel!r} does not resolve ({err})") from err
    if not inside:
        raise ExportError(f"{root}: path {rel!r} leads outside the export (a symlink)")
    return root / rel


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{root}: no {MANIFEST} (not a fluxir export)")
    try:
        manifest = json.loads(confined(root, MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: unreadable manifest ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict):
        raise ExportError(f"{path}: no file table")
    return manifest


def _check_file(f: Path, want: dict) -> None:
    if not f.is_file():
        raise ExportError(f"{f}: missing (listed in {MANIFEST})")
    size = f.stat().st_size
    if size != want["bytes"]:
        raise ExportError(f"{f}: truncated or altered: {size} bytes, the manifest says {want['bytes']}")
    if sha256_file(f) != want["sha256"]:
        raise ExportError(f"{f}: sha256 does not match the manifest (file altered)")


def verify_export(root: str | Path) -> dict:
    """Check that every path the manifest lists stays inside the export, that it lists every file there,
    and each file's size and sha256; return the manifest. This detects corruption and edits, not who made
    them: whoever can rewrite the files can rewrite the manifest too."""
    root = Path(root)
    manifest = _read_manifest(root)
    files = {rel: confined(root, rel) for rel in manifest["files"]}
    unlisted = sorted(export_files(root) - files.keys())
    if unlisted:
        raise ExportError(f"{root}: {', '.join(unlisted)}: not listed in {MANIFEST} (an export holds only "
                          "the files its manifest lists)")
    for rel, f in files.items():
        _check_file(f, manifest["files"][rel])
    return manifest


# --- the base model's identity -------------------------------------------------------------------

def base_model_identity(cfg, token_channels: int) -> dict:
    """What the policy was trained from: a local diffusers folder (sha256 of its transformer weight
    files, as model hubs list them) or the tiny preset (sha256 of its seeded random-init tensors)."""
    m = cfg.model
    if m.preset == "tiny":
        from fluxir.policy import _tiny_transformer

        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            base = _tiny_transformer(m, token_channels)
        return {"id": f"fluxir/tiny (random init, seed {cfg.seed})",
                "hash": "sha256-tensors:" + weights_checksum(base.state_dict(), "sha256")}
    folder = Path(m.path) / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    return {"id": str(m.path), "hash": "sha256-files:" + hashlib.sha256(
        "".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest(),
        "files": [f.name for f in files]}


# --- writing an export ---------------------------------------------------------------------------

def _merged_transformer(policy, in_place: bool):
    """The policy's transformer with any LoRA fused into its weights and the adapters removed; a copy
    unless `in_place` (a 12B transformer is not copied twice in memory when the caller is done with it)."""
    import copy

    transformer = policy.transformer if in_place else copy.deepcopy(policy.transformer)
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora(safe_fusing=True)
        transformer.unload_lora()
    return transformer


def _write_adapter(policy, lora_cfg, out: Path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True)
    LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
               target_modules=list(lora_cfg.targets)).save_pretrained(str(out))
    state = {k: v.contiguous().cpu() for k, v in get_peft_model_state_dict(policy.transformer).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    x_emb = policy.transformer.x_embedder
    save_file({k: v.detach().contiguous().cpu() for k, v in x_emb.state_dict().items()},
              str(out / "x_embedder.safetensors"))


def sampler_settings(cfg, codec) -> dict:
    return {"parametrization": cfg.model.parametrization, "source": cfg.flow.source,
            "sigma_src": cfg.flow.sigma_src, "sigma_data": cfg.model.sigma_data, "t_start": cfg.flow.t_start, "codec": cfg.codec.kind,
            "downsample": codec.downsample, "tile": cfg.eval.tile or cfg.data.crop, "overlap": cfg.eval.overlap,
            "seed": cfg.seed, "guidance": getattr(cfg.model, "guidance", None) or 1.0}


def _model_card(manifest: dict) -> str:
    rows = [f"| {k} | {v['times']} | " + " | ".join(f"{v['metrics'].get(m, float('nan')):.4f}"
                                                     for m in ("psnr", "ssim", "lpips")) + " |"
            for k, v in manifest["budgets"].items()]
    return "\n".join([
        f"# fluxir restoration model ({manifest['source']['stage']})", "",
        f"Tasks: {', '.join(manifest['tasks'])}. Base: {manifest['base_model']['id']}.", "",
        "| steps | times | PSNR | SSIM | LPIPS |", "|---:|---|---:|---:|---:|", *rows, "",
        "Metrics: means over the tasks of fluxir's frozen test set (NaN: not measured).", "",
        "Without fluxir (torch + diffusers): `python MODEL/restore.py --task denoise in.png out.png`.",
        "With fluxir: `fluxir restore --model MODEL --task denoise in.png out.png`.",
        "`manifest.json` lists the sha256 of every file; fluxir refuses a folder that does not match it or holds",
        "a file it does not list (keep images elsewhere). The checksums catch corruption and accidental edits,",
        "not who wrote the files: whoever can change them can rewrite the manifest too. Treat an export from a",
        "source you do not trust like code."])


def export_policy(policy, codec, cfg, out_dir: str | Path, schedules: dict[int, list[float]],
                  source: dict, metrics: dict[int, dict] | None = None, in_place: bool = False) -> Path:
    """Write the export of `policy` (a RestorationPolicy) to `out_dir` (must not exist; written to a
    temporary sibling first, then renamed, so a failed export leaves nothing half-written).
    `in_place`: fuse the LoRA into `policy` itself instead of a copy (the policy is spent afterwards)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new folder for the export")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if cfg.model.lora.enabled:  # before the merge, which removes the adapter layers
            _write_adapter(policy, cfg.model.lora, tmp / "adapter")
        _merged_transformer(policy, in_place).save_pretrained(tmp / "transformer", safe_serialization=True)
        if cfg.codec.kind == "vae":
            codec.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        save_file({"prompt_embeds": policy.task_tokens.detach().contiguous().cpu(),
                   "pooled_prompt_embeds": policy.task_pooled.detach().contiguous().cpu()},
                  str(tmp / "conditioning.safetensors"))
        (tmp / "schedules.json").write_text(json.dumps({str(k): v for k, v in sorted(schedules.items())}, indent=1))
        shutil.copyfile(Path(__file__).with_name("standalone_restore.py"), tmp / "restore.py")
        metrics = metrics or {}
        manifest = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source, "tasks": list(TASKS), "default_budget": min(schedules),
            "budgets": {str(k): {"times": v, "metrics": metrics.get(k, {})} for k, v in sorted(schedules.items())},
            "sampler": sampler_settings(cfg, codec),
            "base_model": base_model_identity(cfg, policy.token_channels),
            "lora": cfg.model.lora.model_dump() if cfg.model.lora.enabled else None,
            "config": cfg.model_dump(mode="json")}
        (tmp / "README.md").write_text(_model_card(manifest) + "\n")
        manifest["files"] = file_table(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- choosing what to export from a run ----------------------------------------------------------

def export_source(run_dir: str | Path, budget: int | None = None) -> Path:
    """The policy folder to export from a run: the distilled student for `budget` (default: the fewest
    steps) when stage 2 ran, else the RL policy, else the stage-0 base."""
    run_dir = Path(run_dir)
    students = {int(p.name[1:]): p for p in (run_dir / "distill" / "best").glob("K*") if p.name[1:].isdigit()}
    if students:
        k = min(students) if budget is None else budget
        if k not in students:
            raise ExportError(f"{run_dir}: no distilled student for budget {k}; there are {sorted(students)}")
        return students[k]
    if budget is not None:
        raise ExportError(f"{run_dir}: --budget {budget} needs distilled students (distill/best/K*), none found")
    for stage in ("rl", "pretrain"):
        if (run_dir / stage / "model" / "policy.json").is_file():
            return run_dir / stage / "model"
    raise ExportError(f"{run_dir}: no trained policy (distill/best/K*, rl/model or pretrain/model)")


def stage2_choice(run_dir: str | Path) -> dict | None:
    """Stage 2's export default (`<run>/distill/choice.json`: the fewest steps within the teacher's
    validation quality) with its policy folder resolved, or None when stage 2 did not record one."""
    path = Path(run_dir) / "distill" / "choice.json"
    if not path.is_file():
        return None
    choice = json.loads(path.read_text())
    folder = Path(choice["policy_dir"])
    choice["policy_dir"] = folder if folder.is_absolute() else Path(run_dir) / folder
    return choice


def policy_schedules(card: dict, cfg) -> dict[int, list[float]]:
    """A student's own schedule ({budget: times}), or the configured evaluation schedules."""
    from fluxir.evaluate import eval_schedule

    if "schedule" in card:
        return {int(card["budget"]): card["schedule"]}
    return {n: eval_schedule(cfg, n) for n in cfg.eval.nfe}


def recorded_metrics(run_dir: Path, policy_dir: Path, card: dict, budgets) -> dict[int, dict]:
    """Test-set means per budget, from the evaluation the run already wrote for this policy ({} if none)."""
    stage = card.get("stage")
    if stage == "distill":
        path, key = run_dir / f"{policy_dir.parent.parent.name}.json", str(card["budget"])
    else:
        path, key = run_dir / "rl_eval.json", "base" if stage == "pretrain" else policy_dir.parent.name
    if not path.is_file():
        return {}
    evals = json.loads(path.read_text())["evals"]
    result = evals.get("students", evals).get(key)
    if result is None:
        return {}
    out = {}
    for k in budgets:
        tasks = [e["nfe"][str(k)] for e in result["tasks"].values() if str(k) in e["nfe"]]
        if tasks:
            out[k] = {m: sum(t[m] for t in tasks) / len(tasks) for m in ("psnr", "ssim", "lpips") if m in tasks[0]}
    return out


def export_run(run_dir: Path, out_dir: Path, policy_dir: Path | None = None, budget: int | None = None) -> Path:
    """Export `policy_dir`, or the run's distilled student for `budget`, or by default stage 2's choice
    (the fewest steps within the teacher's validation quality), else the run's last stage."""
    from fluxir.config import stored_config
    from fluxir.policy import load_trained

    choice = stage2_choice(run_dir) if policy_dir is None and budget is None else None
    policy_dir = policy_dir or (choice["policy_dir"] if choice else export_source(run_dir, budget))
    card = json.loads((policy_dir / "policy.json").read_text())
    cfg = stored_config(card["config"], str(policy_dir / "policy.json"))
    policy, codec = load_trained(policy_dir, cfg, place_on_device=True)
    if choice:
        schedules, metrics = {choice["budget"]: choice["schedule"]}, {choice["budget"]: choice.get("test", {})}
    else:
        schedules = policy_schedules(card, cfg)
        metrics = recorded_metrics(run_dir, policy_dir, card, schedules)
    source = {"run_dir": str(run_dir.resolve()), "policy_dir": str(policy_dir.resolve()), "stage": card.get("stage"),
              **{k: card[k] for k in ("budget", "schedule_kind", "step", "version") if k in card},
              **({"choice": choice["name"], "choice_metric": choice["metric"]} if choice else {})}
    return export_policy(policy, codec, cfg, out_dir, schedules, source, metrics, in_place=True)


def export_summary(out: Path) -> str:
    """One line naming what was exported where, with its budgets."""
    manifest = json.loads((out / MANIFEST).read_text())
    return (f"exported {manifest['source']['policy_dir']} -> {out} (budgets {sorted(manifest['budgets'], key=int)}; "
            f"sha256 of every file in {out / MANIFEST})")


def replace_run_export(run_dir: Path) -> Path:
    """`<run>/export`, written again: the new export is complete before the old one is removed."""
    target, fresh = run_dir / "export", run_dir / "export.new"
    shutil.rmtree(fresh, ignore_errors=True)
    export_run(run_dir, fresh)
    if target.exists():
        shutil.rmtree(target)
    return fresh.rename(target)


# --- reading an export ---------------------------------------------------------------------------

def _from_pretrained(model_class, folder: Path):
    """A diffusers model from safetensors only: never a pickled `.bin` beside or instead of them."""
    try:
        return model_class.from_pretrained(folder, use_safetensors=True)
    except OSError as err:  # diffusers' "no file named ...safetensors"
        raise ExportError(f"{folder}: {str(err).splitlines()[0]}") from err


def load_export(root: str | Path):
    """Verify and load an export: (policy, codec, cfg, manifest, schedules {budget: times})."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fluxir.codec import PixelCodec, VaeCodec
    from fluxir.config import stored_config
    from fluxir.policy import RestorationPolicy, precond_of

    root = Path(root)
    manifest = verify_export(root)
    cfg = stored_config(manifest["config"], str(Path(root) / MANIFEST))
    s = manifest["sampler"]
    transformer = _from_pretrained(FluxTransformer2DModel, root / "transformer")
    cond = load_file(str(root / "conditioning.safetensors"))
    policy = RestorationPolicy(transformer, transformer.config.out_channels, s["parametrization"],
                               cond["prompt_embeds"], cond["pooled_prompt_embeds"], learn_conditioning=False,
                               guidance=s["guidance"], precond=precond_of(cfg)).eval()
    codec = VaeCodec(_from_pretrained(AutoencoderKL, root / "vae")) if s["codec"] == "vae" else PixelCodec()
    schedules = {int(k): v for k, v in json.loads((root / "schedules.json").read_text()).items()}
    return policy, codec, cfg, manifest, schedules
