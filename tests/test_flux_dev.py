"""The flux-dev path on CPU, with a small random FLUX pipeline saved in the diffusers layout:
folder checks, `fluxir embed-prompts`, the VAE codec, the widened input, LoRA targets, gradient
checkpointing, and one real RL iteration (Ray actors + DeepSpeed learners) from configs/flux-dev-7task.yaml."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from actors import cli
from fluxir.codec import build_codec, image_ids
from fluxir.config import load_config
from fluxir.flux_folder import IncompleteModelFolder, TEXT_PARTS, TRAINING_PARTS, missing_files
from fluxir.policy import build_policy, save_policy
from fluxir.codec import token_channels
from fluxir.prompts import encode_prompts, load_prompt_cache, task_prompts
from tests.flux_pipeline import CLIP_DIM, T5_DIM, T5_TOKENS, write_flux_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_flux_pipeline(tmp_path_factory.mktemp("flux") / "FLUX.1-tiny")


def _cfg(pipeline: Path, tmp: Path, *overrides):
    """configs/flux-dev-7task.yaml pointed at the small pipeline, sized for 2 CPU cores."""
    return load_config(ROOT / "configs/flux-dev-7task.yaml", [
        f"model.path={pipeline}", f"model.prompt_cache={tmp / 'prompts.safetensors'}",
        f"model.max_sequence_length={T5_TOKENS}", "model.dtype=float32", "model.lora.rank=4", "model.lora.alpha=4",
        f"output_dir={tmp}", "wandb.mode=disabled", *overrides])


@pytest.fixture(scope="module")
def cache(pipeline, tmp_path_factory) -> Path:
    """`fluxir embed-prompts` run through the CLI, as a user would."""
    tmp = tmp_path_factory.mktemp("cache")
    cfg = _cfg(pipeline, tmp)
    overrides = [f"model.path={pipeline}", f"model.prompt_cache={cfg.model.prompt_cache}",
                 f"model.max_sequence_length={T5_TOKENS}"]
    assert cli.main(["embed-prompts", "configs/flux-dev-7task.yaml", *overrides]) == 0
    return Path(cfg.model.prompt_cache)


def test_embed_prompts_caches_the_pipelines_own_encoding(pipeline, cache):
    cfg = _cfg(pipeline, cache.parent)
    with safe_open(str(cache), framework="pt") as f:
        meta, embeds, pooled = f.metadata(), f.get_tensor("prompt_embeds"), f.get_tensor("pooled_prompt_embeds")
    assert json.loads(meta["prompts"]) == task_prompts(cfg) and len(task_prompts(cfg)) == 7
    assert embeds.shape == (7, T5_TOKENS, T5_DIM) and pooled.shape == (7, CLIP_DIM)
    ref_embeds, ref_pooled = encode_prompts(pipeline, task_prompts(cfg), T5_TOKENS, device="cpu")
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not torch.allclose(embeds[0], embeds[4])  # different tasks, different conditioning


def test_a_cache_for_other_prompts_is_refused(pipeline, cache):
    cfg = _cfg(pipeline, cache.parent, "model.prompts.denoise=Remove all the grain.")
    with pytest.raises(ValueError, match="other prompts.*embed-prompts"):
        load_prompt_cache(cache, cfg)
    with pytest.raises(FileNotFoundError, match="embed-prompts"):
        load_prompt_cache(cache.parent / "absent.safetensors", cfg)


def test_incomplete_folders_name_every_missing_file(pipeline, tmp_path):
    assert missing_files(pipeline, TRAINING_PARTS + TEXT_PARTS) == []
    broken = shutil.copytree(pipeline, tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "text_encoder_2")
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(broken / "transformer" / "diffusion_pytorch_model.safetensors",
                broken / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    cfg = _cfg(broken, tmp_path)
    with pytest.raises(IncompleteModelFolder, match="transformer/diffusion_pytorch_model-00002-of-00002"):
        build_policy(cfg, 64)
    with pytest.raises(IncompleteModelFolder, match="vae/diffusion_pytorch_model.safetensors"):
        build_codec(cfg)
    code = cli.main(["embed-prompts", "configs/flux-dev-7task.yaml", f"model.path={broken}",
                     f"model.prompt_cache={tmp_path / 'p.safetensors'}"])
    assert code == 2 and not (tmp_path / "p.safetensors").exists()
    with pytest.raises(IncompleteModelFolder, match="does not exist"):
        build_policy(_cfg(tmp_path / "nowhere", tmp_path), 64)


def test_vae_codec_uses_fluxs_scaling_and_shift(pipeline):
    from diffusers import AutoencoderKL

    codec = build_codec(load_config(None, ["codec.kind=vae", f"codec.vae_path={pipeline / 'vae'}"]))
    assert (codec.latent_channels, codec.downsample, token_channels(codec)) == (16, 8, 64)
    images = torch.rand(2, 3, 32, 32)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae")
    with torch.no_grad():
        ref = (vae.encode(images * 2 - 1).latent_dist.mode() - 0.1159) * 0.3611
        decoded = ((vae.decode(ref / 0.3611 + 0.1159).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(codec.encode(images), ref)
    torch.testing.assert_close(codec.decode(ref), decoded)


def test_flux_dev_policy_widened_input_lora_targets_and_checkpointing(pipeline, cache, tmp_path):
    cfg = _cfg(pipeline, cache.parent)
    policy = build_policy(cfg, 64)
    tr = policy.transformer
    assert tr.x_embedder.in_features == 128 and torch.all(tr.x_embedder.weight[:, 64:] == 0)
    assert tr.config.out_channels == 64 and tr.proj_out.out_features == 64  # not widened with the input
    assert tr.config.guidance_embeds and policy.guidance == 3.5 and tr.gradient_checkpointing
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    for module in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.0.proj", "ff_context.net.2"):
        assert f"transformer_blocks.0.{module}" in lora
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= lora
    trainable = policy.trainable_state_dict()
    assert all("lora_" in n or "x_embedder" in n for n in trainable)
    tokens, _ = load_prompt_cache(cache, cfg)
    assert torch.equal(policy.task_tokens, tokens) and not policy.task_tokens.requires_grad

    # the widened base saves and reloads in the diffusers layout (out_channels pinned, not 128)
    from diffusers import FluxTransformer2DModel

    tr.save_pretrained(tmp_path / "t")
    assert FluxTransformer2DModel.from_pretrained(tmp_path / "t").proj_out.out_features == 64

    # checkpointing recomputes in backward and gives the same gradients
    x, lq = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    t, task, ids = torch.tensor([0.9, 0.4]), torch.tensor([0, 5]), image_ids(4, 4)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    grads = []
    for ckpt in (True, False):
        tr.enable_gradient_checkpointing() if ckpt else tr.disable_gradient_checkpointing()
        policy.train().zero_grad()
        policy(x, lq, t, task, ids).velocity.square().mean().backward()
        grads.append(tr.x_embedder.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, 64:].abs().sum() > 0  # the LQ columns learn


def test_restore_an_odd_sized_image_through_the_vae_path(pipeline, cache):
    from fluxir.evaluate import eval_schedule, restore_image

    cfg = _cfg(pipeline, cache.parent)
    policy, codec = build_policy(cfg, 64).eval(), build_codec(cfg)
    image = torch.rand(3, 40, 50)
    out = restore_image(policy, codec, image, "denoise", cfg, eval_schedule(cfg, 2))
    assert out.shape == image.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_colocated_slots_and_precision_are_checked(pipeline, tmp_path):
    from actors.learner import learner_ds_config
    from actors.pretrain import deepspeed_config
    from actors.rl import slot_resources
    from fluxir.config import ConfigError

    cfg = load_config(ROOT / "configs/flux-dev-7task.yaml", ["model.path=/models/FLUX.1-dev"])
    assert [slot_resources(cfg, i) for i in range(8)] == [{"CPU": 16.0, "GPU": 1.0}] * 8  # one GPU per slot
    assert learner_ds_config(cfg, 8)["bf16"]["enabled"] and deepspeed_config(cfg)["bf16"]["enabled"]
    heavy = load_config(ROOT / "configs/flux-dev-7task.yaml", ["model.path=/m", "rl.rollout_resources={GPU: 0.6}"])
    with pytest.raises(ValueError, match="slot 0 asks for 1.15 GPU"):
        slot_resources(heavy, 0)
    with pytest.raises(ConfigError, match="one rollout actor per learner slot"):
        load_config(ROOT / "configs/flux-dev-7task.yaml", ["model.path=/m", "rl.num_rollout_actors=4"])
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 needs a DeepSpeed JSON with bf16.*rl.deepspeed"):
        load_config(ROOT / "configs/flux-dev-7task.yaml", ["model.path=/m", "rl.deepspeed=configs/deepspeed/zero2_cpu.json"])
    zero3 = load_config(ROOT / "configs/flux-dev-7task.yaml", ["model.path=/m", "rl.deepspeed=configs/deepspeed/zero3_bf16.json"])
    assert learner_ds_config(zero3, 8)["zero_optimization"]["stage"] == 3  # the JSON alone sets the ZeRO stage


@pytest.mark.slow  # ~45 s: one real RL iteration on the flux-dev path; CI runs it (`make test-slow`)
def test_one_rl_iteration_on_the_flux_dev_path(ray_session, pipeline, cache, tmp_path):
    """2 colocated slots (learner + rollout actor each, the reward worker in slot 0), DeepSpeed ZeRO-2 on the
    VAE codec, prompt cache, LoRA and widened input: one iteration changes the adapter and the LQ columns."""
    from safetensors.torch import load_file

    from actors.rl import run_rl
    from fluxir.rollouts import read_parquet

    cfg = _cfg(pipeline, cache.parent, f"output_dir={tmp_path}", f"rl.init={tmp_path / 'base'}",
               "data.crop=32", "data.train_scale=0.5", "rl.batch_size=2", "rl.candidates=2", "rl.nfe=2",
               "rl.iterations=1", "rl.updates_per_rollout=1", "rl.lr=0.01", "rl.reward.lpips=0",
               "rl.deepspeed=configs/deepspeed/zero2_cpu.json", "rl.num_learners=2", "rl.num_rollout_actors=2",
               "rl.num_reward_workers=1", "rl.learner_resources={CPU: 0.4}", "rl.rollout_resources={CPU: 0.4}",
               "rl.reward_resources={CPU: 0.2}", "rl.checkpoint_every=1")
    assert cfg.rl.colocate  # the config's layout: slot i holds learner-i, rollout-i (and reward-i)
    save_policy(build_policy(cfg, 64), tmp_path / "base", cfg)
    placed = []

    def where(system):  # every actor of the run sits in its slot of the one placement group
        import ray

        pg = system.slots.id.hex()
        for name in ("learner-0", "learner-1", "rollout-0", "rollout-1", "reward-0"):
            placed.append(ray.util.state.get_actor(ray.get_actor(name)._actor_id.hex()).placement_group_id == pg)

    out = run_rl(cfg, show_progress=False, on_issued=where)
    assert placed == [True] * 5
    assert out["iterations"] == 1 and out["version"] == 1
    before, after = load_file(str(tmp_path / "base" / "policy.safetensors")), load_file(
        str(Path(out["model_dir"]) / "policy.safetensors"))
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and any(after[k].abs().sum() > 0 for k in lora_b)  # B starts at zero
    x_emb = next(k for k in after if "x_embedder" in k and k.endswith("weight"))
    assert after[x_emb][:, 64:].abs().sum() > 0 and torch.equal(before[x_emb][:, :64].abs().sum() > 0, torch.tensor(True))
    rows = read_parquet(sorted((tmp_path / cfg.name / "rl" / "rollouts").glob("*.parquet"))[0])
    assert rows.num_rows == 4 and set(rows.column("candidate").to_pylist()) == {0, 1}
