"""Tests for fluxir.rl, fluxir.rollouts and fluxir.weightsync: losses by hand, selection, rollouts, Arrow."""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from fluxir import rl
from fluxir.codec import build_codec, token_channels
from fluxir.config import load_config
from fluxir.policy import build_policy
from fluxir.rollouts import (ROLLOUT_COLUMNS, candidate_rows, column_tensor, read_parquet, schedule_of, to_record_batch,
                             to_tensors, with_scores, write_parquet)
from fluxir.sampling import sample_trajectory
from fluxir.seeds import Salt
from fluxir.weightsync import WeightSyncError, make_weight_set, verify_weight_set


def smoke(*overrides):
    return load_config("configs/smoke.yaml", ["wandb.mode=disabled", *overrides])


# ---------------------------------------------------------------------------------------------
# Loss terms by hand
# ---------------------------------------------------------------------------------------------

def test_rsr_terms_by_hand():
    # two samples, one token of two channels; sample 1 has no better candidate (no step term)
    velocity = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    x0_hat = torch.tensor([[[0.5, 0.5]], [[0.0, 1.0]]])
    x_a = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])
    x_b = torch.tensor([[[0.5, 0.0]], [[1.0, 1.0]]])
    t_a, t_b = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.25])
    gt = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
    step, x0 = rl.rsr_terms(velocity, x0_hat, x_a, x_b, t_a, t_b, gt, torch.tensor([True, False]), "mse")
    # sample 0: target velocity (x_b - x_a)/(t_b - t_a) = (-0.5, -1)/(-0.5) = (1, 2) -> error 0
    # sample 1: masked out
    assert step.tolist() == [0.0, 0.0]
    assert x0.tolist() == [0.25, 0.5]  # mean((0.5², 0.5²)), mean((0, 1))
    velocity[0, 0, 0] = 3.0  # now (3, 2) vs (1, 2): mean((2², 0)) = 2
    step, _ = rl.rsr_terms(velocity, x0_hat, x_a, x_b, t_a, t_b, gt, torch.tensor([True, True]), "mse")
    assert step[0].item() == 2.0
    # sample 1: target (-1, -1)/(-0.25) = (4, 4) vs (0, 0): 16
    assert step[1].item() == 16.0
    _, x0 = rl.rsr_terms(velocity, x0_hat, x_a, x_b, t_a, t_b, gt, torch.tensor([True, True]), "log_mse")
    assert x0[0].item() == pytest.approx(math.log(0.25 + 1e-6))


def test_grpo_terms_by_hand():
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, -2.0, 2.0])
    out = rl.grpo_terms(logp_new, logp_old, adv, clip=0.2)
    # r=1.5,A=1: min(1.5, 1.2) = 1.2 -> -1.2 ; r=1.5,A=-1: min(-1.5, -1.2) = -1.5 -> 1.5
    # r=0.5,A=-2: min(-1.0, -1.6) = -1.6 -> 1.6 ; r=1.1,A=2: min(2.2, 2.2) -> -2.2
    torch.testing.assert_close(out, torch.tensor([-1.2, 1.5, 1.6, -2.2]))


def test_gaussian_kl_by_hand():
    p = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    # per dimension (the mean over the 2 dims), in the units of the per-dimension log-probs
    torch.testing.assert_close(rl.gaussian_kl(p, q, 0.5), torch.tensor([(1 + 4) / 0.5, 9 / 0.5]) / 2)


def test_select_best_margin_and_ode_default():
    reward = torch.tensor([1.0, 3.0, 2.0,   # input 0: candidate 1 beats ODE by 2
                           5.0, 5.1, 4.0,   # input 1: beats by 0.1, below margin 0.5
                           9.0, 1.0, 2.0])  # input 2: ODE is best
    chosen, improved, gap = rl.select_best(reward, 3, margin=0.5)
    assert chosen.tolist() == [1, 0, 0]
    assert improved.tolist() == [True, False, False]
    torch.testing.assert_close(gap, torch.tensor([2.0, 0.1, 0.0]))


def test_group_advantages_by_hand():
    adv = rl.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def _sampled(k: int, n: int) -> dict:
    """What `sample_candidates` returns for n inputs, made up: row r's states are all r."""
    return {"final": torch.rand(n * k, 3, 8, 8),
            "states": torch.arange(n * k, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone(),
            "log_probs": torch.zeros(n * k, 2), "candidate": torch.arange(k).repeat(n),
            "noise_seed": torch.arange(n * k) + 2**60}


def _rows(k: int, n: int, reward: torch.Tensor) -> dict:
    inputs = {"lq": torch.rand(n, 3, 8, 8), "gt": torch.rand(n, 3, 8, 8), "task": torch.zeros(n, dtype=torch.long),
              "seed": torch.arange(n) + 100}
    return candidate_rows(inputs, _sampled(k, n), k, 0, 0) | {"reward": reward}


def test_learner_batch_rsr_takes_selected_rows_and_skips_nan_groups():
    cfg = smoke("rl.candidates=2")
    reward = torch.tensor([1.0, 2.0, float("nan"), 0.0, 3.0, 1.0])
    batch, stats = rl.learner_batch(_rows(2, 3, reward), cfg)
    assert stats["skipped"] == 1
    assert batch["seed"].tolist() == [100, 102]
    assert batch["states"][:, 0, 0, 0].tolist() == [1.0, 4.0]  # input 0 -> candidate 1; input 2 -> ODE (row 4)
    assert batch["improved"].tolist() == [True, False]
    fm, _ = rl.learner_batch(_rows(2, 3, reward), smoke("rl.candidates=2", "rl.objective=fm"))
    assert set(fm) == {"lq", "gt", "task", "seed"}
    grpo, _ = rl.learner_batch(_rows(2, 3, reward), smoke("rl.candidates=2", "rl.objective=grpo"))
    assert len(grpo["seed"]) == 4 and "advantage" in grpo


def test_stage1_combinations_are_refused_when_the_config_loads():
    from fluxir.config import ConfigError

    with pytest.raises(ConfigError, match="rl.nfe >= 2"):
        smoke("rl.nfe=1", "rl.candidates=2")
    with pytest.raises(ConfigError, match="rl.kl_weight"):
        smoke("rl.objective=grpo", "rl.kl_weight=0.1")
    with pytest.raises(ConfigError, match="rl: .*stochastic_steps"):
        smoke("rl.stochastic_steps=[5]")


# ---------------------------------------------------------------------------------------------
# Candidates and objectives on a real (smoke-sized) policy
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_and_codec():
    cfg = smoke()
    codec = build_codec(cfg)
    torch.manual_seed(0)
    policy = build_policy(cfg, token_channels(codec))
    with torch.no_grad():  # a non-trivial output so that candidates and losses are not all zero
        for p in policy.transformer.proj_out.parameters():
            p.normal_(0, 0.05)
    return policy, codec


def _inputs(n=3, size=16):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 3, size, size, generator=g), torch.tensor([0, 3, 4][:n]), torch.tensor([11, 22, 33][:n])


def test_candidates_ode_row_is_the_plain_ode(policy_and_codec):
    policy, codec = policy_and_codec
    cfg = smoke("rl.candidates=3", "rl.nfe=3")
    lq, task, seeds = _inputs()
    out = rl.sample_candidates(policy, codec, lq, task, seeds, cfg)
    assert out["states"].shape[:2] == (9, 4) and out["final"].shape == (9, 3, 16, 16)
    assert out["candidate"].tolist() == [0, 1, 2] * 3
    # row 0 of input 1 is exactly the ODE from the same start
    from fluxir.codec import image_ids, pack
    from fluxir.seeds import mix_seed
    from fluxir.flow import initial_state
    lq_tok = pack(codec.encode(lq[1:2]))
    start = initial_state(lq_tok, cfg.flow, torch.Generator().manual_seed(mix_seed(22, Salt.RL_START)))
    ode = sample_trajectory(policy, lq_tok, task[1:2], image_ids(16, 16), rl.rl_schedule(cfg), cfg.flow, x_start=start)
    torch.testing.assert_close(out["states"][3, -1], ode.final[0])
    assert out["log_probs"][0::3].abs().sum() == 0  # ODE rows carry no log-prob
    explored = out["log_probs"].view(3, 3, -1)[:, 1:]
    assert (explored[..., :2] != 0).all() and (explored[..., 2] == 0).all()  # last step is deterministic
    assert not torch.equal(out["states"][3, -1], out["states"][4, -1])  # exploration changes the result
    again = rl.sample_candidates(policy, codec, lq, task, seeds, cfg)
    torch.testing.assert_close(again["states"], out["states"], rtol=0, atol=0)  # seeded per row


def _scored_rows(policy, codec, cfg, reward=None):
    """Candidate rows of `_inputs()` with GT = the flipped LQ and a fixed (or given) reward."""
    k = cfg.rl.candidates
    lq, task, seeds = _inputs()
    out = rl.sample_candidates(policy, codec, lq, task, seeds, cfg)
    reward = -torch.arange(3 * k, dtype=torch.float32) % 5 if reward is None else reward
    inputs = {"lq": lq, "gt": lq.flip(-1), "task": task, "seed": seeds}
    return candidate_rows(inputs, out, k, 0, 0) | {"reward": reward}


@pytest.mark.parametrize("objective,k,extra", [("rsr", 3, ()), ("rsr", 1, ()), ("grpo", 3, ()), ("fm", 1, ()),
                                               ("grpo", 3, ("rl.window=1",)), ("nft", 3, ()),
                                               ("reward_backprop", 1, ("rl.reward.ssim=1",)),
                                               ("rsr", 3, ("rl.shuffle_rewards=true",))])
def test_objective_is_finite_and_differentiable(policy_and_codec, objective, k, extra):
    policy, codec = policy_and_codec
    cfg = smoke(f"rl.candidates={k}", f"rl.objective={objective}", "rl.nfe=3", *extra)
    rows = _scored_rows(policy, codec, cfg)
    batch = rows if objective in ("fm", "reward_backprop") else rl.learner_batch(rows, cfg)[0]
    per, logs = rl.RLObjective(cfg, codec).per_sample(policy, batch)
    assert per.shape == (len(batch["seed"]),) and torch.isfinite(per).all()
    policy.zero_grad()
    per.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    if objective == "rsr" and k == 1:
        assert logs["step"] == 0.0  # no selection without candidates


# ---------------------------------------------------------------------------------------------
# Contracts between the rollout and the learner
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 1])
def test_stored_log_probs_equal_the_learners_recomputation(policy_and_codec, dtype, window):
    """Same weights, same states: the learner's log-prob of each explored step is the rollout's, so the
    PPO ratio of the first update on a rollout is exactly 1."""
    import copy

    from fluxir.accel import place
    from fluxir.codec import image_ids, pack
    policy, codec = policy_and_codec
    policy = copy.deepcopy(policy)
    place(policy, dtype, "cpu")
    bf16_json = ["pretrain.deepspeed=configs/deepspeed/zero2_bf16.json", "rl.deepspeed=configs/deepspeed/zero2_bf16.json"]
    cfg = smoke("rl.candidates=3", "rl.objective=grpo", "rl.nfe=4", f"model.dtype={dtype}",
                *([f"rl.window={window}"] if window else []), *(bf16_json if dtype == "bfloat16" else []))
    batch, _ = rl.learner_batch(_scored_rows(policy, codec, cfg), cfg)
    lq_tok = pack(codec.encode(batch["lq"]))
    with torch.no_grad():
        logp_new, logp_old, _, explored = rl.RLObjective(cfg, codec).step_log_probs(policy, batch, lq_tok,
                                                                                    image_ids(16, 16))
    assert explored.sum() == 6 and (logp_old[explored] != 0).all()  # a real log-prob was stored and picked
    torch.testing.assert_close(logp_new, logp_old, rtol=0, atol=1e-5)
    ratio = torch.exp(logp_new - logp_old)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)


def test_kl_is_zero_while_the_adapter_is_at_its_initialisation():
    cfg = smoke("model.lora.enabled=true", "rl.objective=grpo", "rl.kl_weight=1", "rl.nfe=3")
    codec = build_codec(cfg)
    torch.manual_seed(0)
    policy = build_policy(cfg, token_channels(codec))  # LoRA B = 0: the adapted policy is the base
    batch, _ = rl.learner_batch(_scored_rows(policy, codec, cfg), cfg)
    objective = rl.RLObjective(cfg, codec)
    _, logs = objective.per_sample(policy, batch)
    assert logs["kl"] == 0.0
    with torch.no_grad():  # and it is not zero by construction: a moved adapter gives a positive KL
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    _, logs = objective.per_sample(policy, batch)
    assert logs["kl"] > 0


def test_a_window_branches_off_the_ode_and_explores_only_its_steps(policy_and_codec):
    policy, codec = policy_and_codec
    cfg = smoke("rl.candidates=3", "rl.nfe=4", "rl.window=1", "rl.objective=grpo")
    lq, task, seeds = _inputs()
    out = rl.sample_candidates(policy, codec, lq, task, seeds, cfg)
    branch = rl.branch_steps(cfg, seeds)
    assert set(branch.tolist()) <= {0, 1, 2}
    states, log_probs = out["states"].view(3, 3, 5, *out["states"].shape[2:]), out["log_probs"].view(3, 3, 4)
    for b, start in enumerate(branch.tolist()):
        for j in (1, 2):
            torch.testing.assert_close(states[b, j, :start + 1], states[b, 0, :start + 1], rtol=0, atol=0)
            assert not torch.equal(states[b, j, start + 1], states[b, 0, start + 1])
            assert [bool(x != 0) for x in log_probs[b, j]] == [i == start for i in range(4)]
    with pytest.raises(ValueError, match="rl.window=3"):
        smoke("rl.candidates=3", "rl.nfe=3", "rl.window=3")


def test_rsr_regresses_only_pairs_that_hold_an_explored_step(policy_and_codec):
    """The last step lands on x0̂ deterministically: a pair ending there would regress the policy onto its
    own old output, so it is never picked."""
    cfg = smoke("rl.candidates=3", "rl.nfe=3")
    pairs = rl.informative_pairs(cfg, torch.arange(200))
    assert pairs.shape == (200, 3) and not pairs[:, 2].any()
    picked = rl.pick_true(pairs, torch.arange(200), Salt.RL_PAIR)
    assert set(picked.tolist()) == {0, 1}


def test_shuffled_rewards_are_a_permutation_within_each_group():
    reward = torch.arange(12, dtype=torch.float32)
    shuffled = rl.shuffled_within_groups(reward, torch.tensor([1, 2, 3]), 4)
    for g in range(3):
        assert sorted(shuffled[4 * g:4 * g + 4].tolist()) == reward[4 * g:4 * g + 4].tolist()
    assert not torch.equal(shuffled, reward)
    torch.testing.assert_close(shuffled, rl.shuffled_within_groups(reward, torch.tensor([1, 2, 3]), 4))


def test_nft_gradient_is_signed_by_the_optimality():
    """d/dv of the nft loss is 2β(2r − 1)(v − u)/‖v − u‖²·(1/D): towards good samples, away from bad."""
    u = torch.zeros(2, 1, 2)
    v = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], requires_grad=True)
    r = torch.tensor([1.0, 0.0])
    rl.nft_terms(v, u, r, beta=0.5).sum().backward()
    mse = 0.5  # mean((1, 0)²)
    expected = 2 * 0.5 * (2 * r - 1)[:, None, None] * (v.detach() - u) / 2 / mse  # /2: mean over 2 dims
    torch.testing.assert_close(v.grad, expected)
    assert rl.optimality(torch.tensor([-3.0, 0.0, 0.5, 3.0])).tolist() == [0.0, 0.5, 0.75, 1.0]



def test_lpips_reward_sees_at_least_64_px():
    from fluxir.metrics import at_least

    x = torch.rand(2, 3, 32, 32)
    assert at_least(x, 64).shape == (2, 3, 64, 64) and at_least(x, 32) is x


# ---------------------------------------------------------------------------------------------
# Arrow record batches and Parquet
# ---------------------------------------------------------------------------------------------

def test_rollouts_roundtrip_through_parquet(tmp_path):
    n = 4
    cols = {"input": torch.arange(n), "task": torch.tensor([0, 1, 2, 3]), "seed": torch.arange(n) * 7,
            "candidate": torch.tensor([0, 1, 0, 1]), "noise_seed": torch.arange(n) + 2**60,
            "version": torch.full((n,), 3), "lq": torch.rand(n, 3, 8, 8), "gt": torch.rand(n, 3, 8, 8),
            "final": torch.rand(n, 3, 8, 8), "states": torch.randn(n, 3, 16, 12), "log_probs": torch.randn(n, 2)}
    batch = to_record_batch(cols, [1.0, 0.5, 0.0], [0, 1, 2])
    assert batch.schema.field("states").type == pa.fixed_shape_tensor(pa.float32(), [3, 16, 12])
    scored = with_scores(batch, {"psnr": torch.rand(n), "reward": torch.rand(n)})
    path = write_parquet([scored, scored], tmp_path / "r" / "iter_00000001.parquet")
    table = read_parquet(path)
    assert table.num_rows == 2 * n
    assert table.schema.field("final").type == pa.fixed_shape_tensor(pa.float32(), [3, 8, 8])
    assert schedule_of(table) == ([1.0, 0.5, 0.0], [0, 1, 2])
    back = to_tensors(table.to_batches())
    for name, value in cols.items():
        np.testing.assert_array_equal(back[name][:n].numpy(), value.numpy().astype(back[name].numpy().dtype))
    np.testing.assert_array_equal(column_tensor(table, "reward")[n:].numpy(), column_tensor(scored, "reward").numpy())
    with pytest.raises(ValueError, match="different row counts"):
        to_record_batch({"input": torch.arange(2), "task": torch.arange(3)}, [1.0, 0.0], [0, 1])


def test_candidate_rows_have_the_schemas_arrow_layout():
    """The Parquet layout of a rollout shard: column names and order, Arrow types, one row per candidate."""
    n, k = 2, 3
    inputs = {"lq": torch.rand(n, 3, 8, 8), "gt": torch.rand(n, 3, 8, 8), "task": torch.tensor([4, 1]),
              "seed": torch.tensor([7, 9])}
    rows = candidate_rows(inputs, _sampled(k, n), k, version=5, first_index=10)
    batch = to_record_batch(rows, [1.0, 0.5, 0.0], [0, 1, 2])
    assert batch.schema.names == ["input", "task", "seed", "candidate", "noise_seed", "version", "lq", "gt", "final",
                                  "states", "log_probs"] == [c.name for c in ROLLOUT_COLUMNS]
    assert [str(batch.schema.field(name).type) for name in ("input", "version", "noise_seed")] == ["int64"] * 3
    assert batch.schema.field("lq").type == pa.fixed_shape_tensor(pa.float32(), [3, 8, 8])
    assert batch.schema.field("log_probs").type == pa.fixed_shape_tensor(pa.float32(), [2])
    assert rows["input"].tolist() == [10, 10, 10, 11, 11, 11] and rows["version"].tolist() == [5] * 6
    assert rows["seed"].tolist() == [7, 7, 7, 9, 9, 9] and torch.equal(rows["gt"][3], inputs["gt"][1])
    scored = with_scores(batch, {"psnr": torch.rand(6), "ssim": torch.rand(6), "reward": torch.rand(6),
                                 "lpips": torch.full((6,), float("nan"))})
    assert scored.schema.names[11:] == ["psnr", "ssim", "reward", "lpips"]
    assert all(str(scored.schema.field(name).type) == "float" for name in scored.schema.names[11:])


def test_a_missing_or_unknown_rollout_column_is_named():
    n, k = 2, 2
    inputs = {"lq": torch.rand(n, 3, 8, 8), "gt": torch.rand(n, 3, 8, 8), "task": torch.zeros(n, dtype=torch.long),
              "seed": torch.arange(n)}
    sampled = _sampled(k, n)
    with pytest.raises(ValueError, match="'log_probs' missing"):
        candidate_rows(inputs, {c: v for c, v in sampled.items() if c != "log_probs"}, k, 0, 0)
    with pytest.raises(ValueError, match="'extra'"):
        candidate_rows({**inputs, "extra": torch.zeros(n)}, sampled, k, 0, 0)
    with pytest.raises(ValueError, match="unknown rollout column 'extra'"):
        to_record_batch({"extra": torch.zeros(n)}, [1.0, 0.0], [0, 1])
    batch = to_record_batch(candidate_rows(inputs, sampled, k, 0, 0), [1.0, 0.0], [0, 1])
    with pytest.raises(ValueError, match="unknown score column 'psnr_db'"):
        with_scores(batch, {"psnr_db": torch.zeros(n * k)})
    rows = _rows(k, n, torch.zeros(n * k))
    with pytest.raises(ValueError, match="'reward' missing"):
        rl.learner_batch({c: v for c, v in rows.items() if c != "reward"}, smoke("rl.candidates=2"))
    with pytest.raises(ValueError, match="'final' missing"):
        rl.learner_batch({c: v for c, v in rows.items() if c != "final"}, smoke("rl.candidates=2", "rl.objective=nft"))
    with pytest.raises(ValueError, match="unknown rollout column 'advantage'"):
        rl.learner_batch({**rows, "advantage": torch.zeros(n * k)}, smoke("rl.candidates=2"))


# ---------------------------------------------------------------------------------------------
# Weight sets
# ---------------------------------------------------------------------------------------------

def test_weight_set_verifies_and_refuses_tampering(policy_and_codec):
    policy, _ = policy_and_codec
    expected = policy.trainable_state_dict()
    ws = make_weight_set(expected, version=4)
    verify_weight_set(ws, expected)
    tampered = dict(ws.tensors)
    name = next(iter(tampered))
    tampered[name] = tampered[name].clone()
    tampered[name].view(-1)[0] += 1e-3
    with pytest.raises(WeightSyncError, match="checksum"):
        verify_weight_set(type(ws)(4, tampered, ws.checksum), expected)
    partial = {k: v for k, v in ws.tensors.items() if k != name}
    with pytest.raises(WeightSyncError, match="1 missing"):
        verify_weight_set(type(ws)(4, partial, ws.checksum), expected)
    reshaped = {**ws.tensors, name: ws.tensors[name].reshape(-1)}
    with pytest.raises(WeightSyncError, match=name.replace(".", r"\.")):
        verify_weight_set(make_weight_set(reshaped, 4), expected)


@pytest.mark.parametrize("objective,k", [("nft", 3), ("fm", 1)])
def test_single_process_loop_updates_the_policy_with_the_ray_systems_math(policy_and_codec, tmp_path, objective, k):
    """fluxir.rl_loop.LocalRL (the benchmarks' stage 1): one iteration samples K candidates per input,
    scores them and takes `rl.updates_per_rollout` optimizer steps that change the trainable weights."""
    from fluxir.policy import save_policy
    from fluxir.rl_loop import LocalRL
    policy, _ = policy_and_codec
    save_policy(policy, tmp_path / "base", smoke())
    cfg = smoke(f"rl.init={tmp_path / 'base'}", f"rl.objective={objective}", f"rl.candidates={k}",
                "rl.updates_per_rollout=2")
    loop = LocalRL(cfg)
    before = {n: p.detach().clone() for n, p in loop.policy.trainable_state_dict().items()}
    record = loop.iteration(0)
    assert record["iteration"] == 1 and record["rollouts"] == (cfg.rl.batch_size * k if objective == "nft" else 0)
    assert torch.isfinite(torch.tensor(record["loss"]))
    after = loop.policy.trainable_state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_a_bf16_weight_set_ships_half_the_bytes_and_verifies_against_a_bf16_receiver(policy_and_codec):
    policy, _ = policy_and_codec
    fp32 = policy.trainable_state_dict()
    bf16 = {k: v.to(torch.bfloat16) for k, v in fp32.items()}  # what a model.dtype=bfloat16 rollout actor holds
    full, half = make_weight_set(fp32, 3), make_weight_set(fp32, 3, torch.bfloat16)
    assert half.num_bytes * 2 == full.num_bytes
    assert all(t.dtype == torch.bfloat16 for t in half.tensors.values())
    verify_weight_set(half, bf16)  # the checksum covers the bf16 bytes shipped
    with pytest.raises(WeightSyncError, match="torch.float32.*expected torch.bfloat16"):
        verify_weight_set(full, bf16)


class CountingCodec(torch.nn.Module):
    """The pixel codec, counting the images it encodes."""

    def __init__(self, codec):
        super().__init__()
        self.codec, self.encoded = codec, 0
        self.latent_channels, self.downsample = codec.latent_channels, codec.downsample

    def encode(self, images):
        self.encoded += len(images)
        return self.codec.encode(images)

    def decode(self, latents):
        return self.codec.decode(latents)


@pytest.mark.parametrize("objective,k", [("rsr", 3), ("grpo", 3), ("fm", 1), ("reward_backprop", 1)])
def test_the_learner_encodes_each_samples_lq_and_gt_once(policy_and_codec, objective, k):
    """VAE encodes per learner sample = 2 (LQ and GT), shared by every term of the objective."""
    policy, codec = policy_and_codec
    cfg = smoke(f"rl.candidates={k}", f"rl.objective={objective}", "rl.nfe=3", "rl.reward.ssim=1")
    rows = _scored_rows(policy, codec, cfg)
    batch = rows if objective in ("fm", "reward_backprop") else rl.learner_batch(rows, cfg)[0]
    counting = CountingCodec(codec)
    rl.RLObjective(cfg, counting).per_sample(policy, batch)
    assert counting.encoded == 2 * len(batch["seed"])


TERMS = '''
import torch

def mean(restored, lq, gt, task):
    return restored.mean((1, 2, 3))

def boom(restored, lq, gt, task):
    raise RuntimeError("scorer server unreachable")

def half_nan(restored, lq, gt, task):
    out = restored.mean((1, 2, 3))
    out[:2] = float("nan")
    return out

def misshapen(restored, lq, gt, task):
    return torch.zeros(len(restored), 2)
'''


@pytest.fixture
def term_module(tmp_path, monkeypatch):
    (tmp_path / "myterms.py").write_text(TERMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myterms"


def _image_rows(k: int, n: int) -> dict:
    """`_rows` with 16 px images (SSIM's window needs 11)."""
    g = torch.Generator().manual_seed(3)
    images = {name: torch.rand(n * k, 3, 16, 16, generator=g) for name in ("lq", "gt", "final")}
    return _rows(k, n, torch.zeros(n * k)) | images


def _with_terms(*terms, chunk=64):
    spec = ", ".join(f"{name}: {{function: 'myterms:{name}', weight: 2.0}}" for name in terms)
    return smoke("rl.candidates=2", "rl.reward.ssim=0.5", f"rl.reward.chunk={chunk}", f"rl.reward.terms={{{spec}}}")


def test_reward_terms_add_their_weighted_scores_chunk_by_chunk_in_float32(term_module):
    from fluxir.rewards import load_terms

    rows = _image_rows(2, 3)
    cfg = _with_terms("mean", chunk=4)
    scores = rl.score_columns(rows, cfg.rl.reward, terms=load_terms(cfg.rl.reward))
    reference = rl.score(rows["final"], rows["gt"], cfg.rl.reward)  # all rows in one chunk
    assert scores["psnr"].dtype == torch.float32 == reference["psnr"].dtype
    f64 = compute_metrics_f64(rows)
    torch.testing.assert_close(scores["psnr"].double(), f64["psnr"], rtol=0, atol=1e-4)  # float32 vs float64 dB
    torch.testing.assert_close(scores["ssim"].double(), f64["ssim"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["reward"], reference["reward"] + 2.0 * rows["final"].mean((1, 2, 3)))
    assert scores["failed_term"].tolist() == [0] * 6 and scores["lpips"].isnan().all()


def compute_metrics_f64(rows):
    from fluxir.metrics import compute_metrics

    return compute_metrics(rows["final"], rows["gt"])


@pytest.mark.parametrize("name,failed_rows,why", [("boom", 6, "raised RuntimeError: scorer server unreachable"),
                                                   ("half_nan", 2, "2 non-finite"),
                                                   ("misshapen", 6, r"shape \(6, 2\), expected \(6,\)")])
def test_a_failing_reward_term_is_named_and_its_inputs_skipped_and_counted(term_module, caplog, name,
                                                                           failed_rows, why):
    from fluxir.rewards import load_terms

    cfg = _with_terms("mean", name)
    rows = _image_rows(2, 3)
    with caplog.at_level("WARNING", logger="fluxir.rewards"):
        scores = rl.score_columns(rows, cfg.rl.reward, terms=load_terms(cfg.rl.reward))
    assert re.search(f"reward term '{name}' .*{why}", caplog.text)
    assert int(scores["reward"].isnan().sum()) == failed_rows
    assert scores["failed_term"].tolist() == [2 if r.isnan() else 0 for r in scores["reward"]]  # 1 + its index
    rows |= scores
    if failed_rows == 6:  # no input left: the iteration takes no update, and says why
        with pytest.raises(rl.NoValidRollouts, match="non-finite reward") as err:
            rl.learner_batch(rows, cfg)
        assert err.value.stats == {"skipped": 3, f"reward_failed/{name}": 6}
        return
    _, stats = rl.learner_batch(rows, cfg)
    assert stats["skipped"] == 1 and stats[f"reward_failed/{name}"] == failed_rows  # a NaN row skips its input


def test_a_reward_term_that_cannot_be_imported_is_refused_by_name():
    from fluxir.config import ConfigError
    from fluxir.rewards import RewardTermError, load_terms

    cfg = smoke("rl.reward.terms={sharp: {function: 'no_such_module:score'}}")
    with pytest.raises(RewardTermError, match="rl.reward.terms.sharp: cannot load no_such_module:score"):
        load_terms(cfg.rl.reward)
    with pytest.raises(ConfigError, match="not of the form package.module:function"):
        smoke("rl.reward.terms={sharp: {function: 'a.b'}}")
    with pytest.raises(ConfigError, match="clash with the built-in"):
        smoke("rl.reward.terms={psnr: {function: 'a:b'}}")


def test_the_shipped_no_reference_term_prefers_detail_and_penalises_noise():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from iqa_terms import noref
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(2, 3, 32, 32, generator=g)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, 1, 1)
    noisy = (blurred + 0.1 * torch.randn(blurred.shape, generator=g)).clamp(0, 1)
    none = torch.zeros(2, dtype=torch.long)
    assert (noref.noise_sigma(noisy) > 2 * noref.noise_sigma(blurred)).all()
    assert (noref.detail(blurred, blurred, blurred, none).abs() < 0.5).all()  # no gain over the input
    assert (noref.detail(sharp, blurred, sharp, none, noise_weight=0) > 1).all()  # recovered edges score higher
