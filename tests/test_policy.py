"""Policy: widened input keeps the output, zero-init x0 residual returns the LQ, LoRA, flux-dev folder path."""
import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxir.codec import image_ids
from fluxir.config import load_config
from fluxir.policy import (_tiny_transformer, build_policy, load_policy, save_policy,
                           widen_input)


def _inputs(b=2, hw=8, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, (hw // 2) ** 2, c, generator=g), torch.randn(b, (hw // 2) ** 2, c, generator=g),
            torch.tensor([0.9, 0.3]), torch.tensor([0, 4]), image_ids(hw, hw))


def test_widened_transformer_equals_unwidened():
    cfg = load_config(None)
    tr = _tiny_transformer(cfg.model, 12)
    x, lq, t, _, ids = _inputs()
    kw = dict(encoder_hidden_states=torch.randn(2, 4, 64), pooled_projections=torch.randn(2, 64), timestep=t,
              img_ids=ids, txt_ids=torch.zeros(4, 3), return_dict=False)
    ref = tr(hidden_states=x, **kw)[0]
    widen_input(tr, 12)
    assert tr.config.in_channels == 24 and tr.x_embedder.in_features == 24
    out = tr(hidden_states=torch.cat([x, lq], -1), **kw)[0]
    assert torch.equal(out, ref)


def test_fresh_x0_residual_policy_returns_the_lq_exactly():
    policy = build_policy(load_config(None), 12)
    x, lq, t, task, ids = _inputs()
    pred = policy(x, lq, t, task, ids)
    assert torch.equal(pred.x0_hat, lq)
    torch.testing.assert_close(pred.velocity, (x - lq) / t.view(-1, 1, 1))


@pytest.mark.parametrize("source", ["lq", "gaussian"])
def test_precond_reading_equals_the_residual_at_t1_and_returns_the_state_at_t0(source):
    """x0_precond = LQ + c_skip·(x_t − E[x_t|LQ]) + c_out·F: the plain residual reading at t = 1, the state
    itself at t → 0, and the same trainable weights (same seeded init) as x0_residual."""
    over = [f"flow.source={source}", "model.sigma_data=0.3"]
    residual = build_policy(load_config(None, over), 12)
    precond = build_policy(load_config(None, over + ["model.parametrization=x0_precond"]), 12)
    for name, value in residual.trainable_state_dict().items():
        assert torch.equal(value, precond.trainable_state_dict()[name]), name
    with torch.no_grad():
        for p in (residual, precond):
            torch.nn.init.normal_(p.transformer.proj_out.weight, std=0.1, generator=torch.Generator().manual_seed(5))
    x, lq, _, task, ids = _inputs()
    ones = torch.ones(2)
    torch.testing.assert_close(precond(x, lq, ones, task, ids).x0_hat, residual(x, lq, ones, task, ids).x0_hat)
    tiny = torch.full((2,), 1e-6)
    torch.testing.assert_close(precond(x, lq, tiny, task, ids).x0_hat, x, atol=1e-4, rtol=0)
    # in between: the least-squares skip (1−t)σ_d²/D times the state's deviation from E[x_t | LQ]
    half = torch.full((2,), 0.5)
    sigma = 0.1 if source == "lq" else 1.0
    out = precond.transformer(hidden_states=torch.cat([x, lq], -1), encoder_hidden_states=precond.task_tokens[task],
                              pooled_projections=precond.task_pooled[task], timestep=half, img_ids=ids,
                              txt_ids=torch.zeros(4, 3), return_dict=False)[0]
    d = (0.5 * 0.3) ** 2 + (0.5 * sigma) ** 2
    mean = lq if source == "lq" else 0.5 * lq
    expected = lq + 0.5 * 0.09 / d * (x - mean) + 0.5 * sigma / d ** 0.5 * out
    torch.testing.assert_close(precond(x, lq, half, task, ids).x0_hat, expected)


def test_velocity_reading_and_tasks_change_the_output():
    cfg = load_config(None, ["model.parametrization=velocity"])
    policy = build_policy(cfg, 12)
    x, lq, t, _, ids = _inputs()
    a = policy(x, lq, t, torch.tensor([0, 0]), ids).velocity
    b = policy(x, lq, t, torch.tensor([3, 3]), ids).velocity
    assert not torch.allclose(a, b)
    torch.testing.assert_close(policy(x, lq, t, torch.tensor([0, 0]), ids).x0_hat, x - t.view(-1, 1, 1) * a)


def test_build_is_deterministic_in_the_seed():
    a = build_policy(load_config(None, ["model.parametrization=velocity"]), 12).trainable_state_dict()
    b = build_policy(load_config(None, ["model.parametrization=velocity"]), 12).trainable_state_dict()
    c = build_policy(load_config(None, ["model.parametrization=velocity", "seed=1"]), 12).trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_lora_trains_only_adapters_and_the_widened_input():
    cfg = load_config(None, ["model.parametrization=velocity", "model.lora.enabled=true", "model.lora.rank=4",
                             "model.lora.targets=[to_q, to_k, to_v, to_out.0]"])
    policy = build_policy(cfg, 12)
    names = list(policy.trainable_state_dict())
    assert any("lora_A" in n for n in names) and any("x_embedder" in n for n in names)
    assert all("lora_" in n or "x_embedder" in n or n.startswith("task_") for n in names)
    assert not any("ff." in n for n in names)
    base = build_policy(load_config(None, ["model.parametrization=velocity"]), 12)
    x, lq, t, task, ids = _inputs()
    # LoRA B starts at zero: the adapted policy equals the base at init
    torch.testing.assert_close(policy(x, lq, t, task, ids).velocity, base(x, lq, t, task, ids).velocity)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.parametrization=velocity"])
    policy = build_policy(cfg, 12)
    with torch.no_grad():
        policy.task_pooled.add_(1.0)
    save_policy(policy, tmp_path, cfg)
    loaded = load_policy(tmp_path, cfg, 12)
    x, lq, t, task, ids = _inputs()
    assert torch.equal(loaded(x, lq, t, task, ids).velocity, policy(x, lq, t, task, ids).velocity)


def test_trainable_state_is_checked():
    policy = build_policy(load_config(None), 12)
    state = policy.trainable_state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        policy.load_trainable_state_dict(state)


def test_a_transformer_folder_without_weights_is_named(tmp_path):
    """The full flux-dev path (folder, prompt cache, VAE, RL) is in test_flux_dev.py."""
    from fluxir.flux_folder import IncompleteModelFolder

    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                           axes_dims_rope=(4, 6, 6)).save_pretrained(tmp_path / "transformer")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    cfg = load_config(None, ["model.preset=flux-dev", f"model.path={tmp_path}", "model.prompt_cache=p.safetensors"])
    with pytest.raises(IncompleteModelFolder, match="transformer/diffusion_pytorch_model.safetensors"):
        build_policy(cfg, 16)


def test_the_tiny_init_is_the_one_the_published_results_came_from():
    """The README and docs/BENCHMARKS.md figures come from this seeded init (blake2b of the trainable
    tensors, torch 2.14.1): reordering the random draws (widening, task tokens, LoRA) changes every figure."""
    from fluxir.weightsync import weights_checksum

    state = build_policy(load_config("configs/tiny.yaml"), 12).trainable_state_dict()
    assert weights_checksum(state) == "a2fd79a45ddc425e8493a75269888cf087b6c1d41b5af19b2d014d2be7ef87e7"
