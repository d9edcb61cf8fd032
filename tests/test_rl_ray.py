"""Stage 1 on a real local Ray (127.0.0.1, 2 CPUs), smoke-sized: the whole iteration, equivalence of
1- and 2-rank updates, a rollout actor killed mid-iteration, a driver SIGKILLed and resumed, and a
tampered weight set refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fluxir.codec import build_codec
from fluxir.config import load_config
from fluxir.policy import build_policy, save_policy
from fluxir.codec import token_channels

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp: Path, *overrides):
    return load_config(ROOT / "configs/smoke.yaml", [f"output_dir={tmp}", f"rl.init={tmp / 'base'}",
                                                     "wandb.mode=disabled", *overrides])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A smoke policy with a non-trivial output layer, saved where `rl.init` points."""
    tmp = tmp_path_factory.mktemp("rl")
    cfg = _cfg(tmp)
    torch.manual_seed(0)
    policy = build_policy(cfg, token_channels(build_codec(cfg)))
    with torch.no_grad():
        for p in policy.transformer.proj_out.parameters():
            p.normal_(0, 0.05)
    save_policy(policy, tmp / "base", cfg)
    return tmp


@pytest.mark.slow  # ~60 s of fault injection; CI runs it (`make test-slow`)
def test_full_iterations_with_a_rollout_actor_killed(ray_session, base):
    """2 rollout actors, 1 reward worker, 2 learner ranks; rollout-0 is killed with its shard in flight
    in iteration 1: the shard is re-issued, the restarted actor re-synced, the run finishes on time."""
    import ray

    from actors.rl import run_rl
    from fluxir.metrics import psnr
    from fluxir.rollouts import read_parquet, to_tensors

    seen = []

    def kill_then_check(system):
        if not seen:
            ray.kill(system.rollouts[0], no_restart=False)  # dies with its shard in flight
            seen.append(None)
        else:
            seen.append((ray.get(system.rollouts[0].ping.remote()), system.version))

    cfg = _cfg(base, "rl.iterations=3", "rl.checkpoint_every=1", "rl.keep_checkpoints=1")
    assert (cfg.rl.num_rollout_actors, cfg.rl.num_reward_workers, cfg.rl.num_learners) == (2, 1, 2)
    out = run_rl(cfg, stage="full", show_progress=False, write_rollouts=True, on_issued=kill_then_check)
    assert out["version"] == 3 and out["iterations"] == 3
    assert out["history"][0]["reissued"] >= 1 and out["history"][-1]["restarts"] >= 1
    assert seen[1:] and all(actor == learner for actor, learner in seen[1:])  # the restarted actor is current
    assert all(h["stale"] == 0 for h in out["history"])
    last = out["history"][-1]
    assert last["rollouts"] == cfg.rl.batch_size * cfg.rl.candidates
    for key in ("rollout_s", "reward_s", "learn_s", "sync_s", "gap", "reward_mean", "loss"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    stage = base / "smoke" / "full"
    assert (stage / "model" / "policy.safetensors").is_file()
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["iter_00000003"]  # keep-last-1, no temp left
    table = read_parquet(stage / "rollouts" / "iter_00000001.parquet")
    assert table.num_rows == cfg.rl.batch_size * cfg.rl.candidates
    rows = to_tensors(table.to_batches())
    assert rows["version"].unique().tolist() == [1]  # iteration 2 sampled with the policy after update 1
    assert rows["candidate"].tolist() == list(range(cfg.rl.candidates)) * cfg.rl.batch_size
    assert rows["states"].shape[1] == cfg.rl.nfe + 1 and torch.isfinite(rows["reward"]).all()
    torch.testing.assert_close(rows["psnr"], psnr(rows["final"], rows["gt"]).float(), rtol=1e-5, atol=1e-4)


def test_two_rank_update_equals_one_rank(ray_session, base):
    """The same global batch: one update on 1 rank and on 2 ranks gives the same weights."""
    from actors.learner import LearnerGroup
    from fluxir import rl
    from fluxir.metrics import compute_metrics
    from fluxir.policy import load_policy
    from fluxir.rollouts import candidate_rows

    cfg = _cfg(base, "rl.batch_size=6")
    codec = build_codec(cfg)
    policy = load_policy(base / "base", cfg, token_channels(codec))
    from fluxir.rl_loop import rl_stream
    inputs = rl_stream(cfg).batch(0)
    out = rl.sample_candidates(policy, codec, inputs["lq"], inputs["task"], inputs["seed"], cfg)
    rows = candidate_rows(inputs, out, cfg.rl.candidates, 0, 0)
    rows["reward"] = rl.combine_reward(compute_metrics(out["final"], rows["gt"]), cfg.rl.reward)
    batch, stats = rl.learner_batch(rows, cfg)
    assert stats["improved_fraction"] > 0  # the step term is exercised too
    weights, losses = {}, {}
    for world in (1, 2):
        group = LearnerGroup(cfg, base / "base", num_learners=world)
        try:
            losses[world] = group.update(batch, 0)["loss"]
            weights[world] = group.get_weights()
        finally:
            group.shutdown()
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
    # One AdamW step moves each weight by about lr; allow 0.5 % of it for the two ranks' float summation
    # order (Adam divides by √v, which magnifies rounding where gradients are tiny). A mis-scaled loss or
    # a missing rank would move weights by tens of % of lr.
    tol = cfg.rl.lr * 5e-3
    diffs = {n: (weights[1][n] - weights[2][n]).abs().max().item() for n in weights[1]}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, (worst, diffs[worst])
    moved = max((weights[1][n] - policy.trainable_state_dict()[n]).abs().max().item() for n in weights[1])
    assert moved > 10 * tol  # the update did something


def test_tampered_weight_set_is_refused_by_an_actor(ray_session, base):
    import ray

    from actors.rl import RolloutActor
    from fluxir.policy import load_policy
    from fluxir.weightsync import WeightSet, WeightSyncError, make_weight_set

    cfg = _cfg(base)
    actor = RolloutActor.options(num_cpus=0.1).remote(cfg.model_dump(mode="json"), str(base / "base"), 0, 1)
    try:
        state = load_policy(base / "base", cfg, token_channels(build_codec(cfg))).trainable_state_dict()
        good = make_weight_set(state, 7)
        bad = {k: v.clone() for k, v in good.tensors.items()}
        next(iter(bad.values())).view(-1)[0] += 1.0
        with pytest.raises(WeightSyncError, match="checksum"):
            ray.get(actor.set_weights.remote(WeightSet(7, bad, good.checksum)))
        assert ray.get(actor.ping.remote()) == 0  # still on its old version
        assert ray.get(actor.set_weights.remote(good)) == 7
    finally:
        ray.kill(actor)


DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from fluxir.config import load_config
from actors.rl import run_rl
cfg = load_config(sys.argv[1], sys.argv[2:])
out = run_rl(cfg, stage="sigkill", show_progress=False)
print("FINAL", out["version"], out["iterations"], flush=True)
"""


@pytest.mark.slow  # SIGKILLs a driver and resumes it: ~70 s each; CI runs them (`make test-slow`)
@pytest.mark.parametrize("objective", [["rl.objective=grpo"], ["rl.objective=grpo", "rl.window=1", "rl.nfe=3"],
                                       ["rl.objective=nft"], ["rl.objective=reward_backprop", "rl.reward.ssim=1"]],
                         ids=["grpo", "grpo-window", "nft", "reward_backprop"])
def test_driver_sigkill_then_resume(ray_session, base, objective, tmp_path):
    """SIGKILL the driver after a checkpoint; the rerun resumes and reaches the same final version."""
    address = ray_session.get_runtime_context().gcs_address
    overrides = [f"output_dir={tmp_path}", f"rl.init={base / 'base'}", "wandb.mode=disabled", f"ray.address={address}",
                 "rl.iterations=12", "rl.checkpoint_every=2", "rl.keep_checkpoints=2",
                 "rl.num_rollout_actors=1", "rl.num_learners=1",  # one of each: this test is about the driver
                 *objective]  # and runs that objective end to end
    cmd = [sys.executable, "-c", DRIVER, str(ROOT / "configs/smoke.yaml"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpts = tmp_path / "smoke" / "sigkill" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (ckpts / "iter_00000002").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("iter_"))
    assert kept and all((ckpts / k / "controller.json").is_file() for k in kept)
    killed_at = json.loads((ckpts / kept[-1] / "controller.json").read_text())["iteration"]
    assert killed_at < 12
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "FINAL 12 12" in rerun.stdout
    assert "resumed stage from" in rerun.stderr + rerun.stdout
    final = sorted(p.name for p in ckpts.iterdir())
    assert final[-1] == "iter_00000012" and not [p for p in final if p.startswith(".tmp")]
    history = json.loads((ckpts.parent / "history.json").read_text())
    assert [h["iteration"] for h in history] == list(range(1, 13))  # resumed history is continuous


USER_TERMS = '''
def boom(restored, lq, gt, task):
    raise RuntimeError("judge server unreachable")
'''


def test_reward_workers_load_plug_in_terms_from_their_own_runtime_env(ray_session, base, tmp_path):
    """rl.reward.terms imported inside the reward worker from its own rl.reward_runtime_env (the shipped
    no-reference example and a user's package whose term raises): the example's weighted score is added,
    the failing term's rows get a NaN reward and its index, and the worker keeps serving."""
    import ray

    from actors.rl import RewardWorker
    from fluxir import rl
    from fluxir.rollouts import candidate_rows, column_tensor, to_record_batch

    sys.path.insert(0, str(ROOT / "examples"))
    from iqa_terms.noref import detail
    sys.path.pop(0)
    (tmp_path / "userterms").mkdir()
    (tmp_path / "userterms" / "__init__.py").write_text(USER_TERMS)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(tmp_path)])}}  # one node
    terms = "{detail: {function: 'iqa_terms.noref:detail', weight: 0.5}, boom: {function: 'userterms:boom'}}"
    cfg = _cfg(base, f"rl.reward.terms={terms}")
    n, k = 2, 2
    g = torch.Generator().manual_seed(0)
    inputs = {"lq": torch.rand(n, 3, 16, 16, generator=g), "gt": torch.rand(n, 3, 16, 16, generator=g),
              "task": torch.zeros(n, dtype=torch.long), "seed": torch.arange(n)}
    sampled = {"final": torch.rand(n * k, 3, 16, 16, generator=g), "states": torch.zeros(n * k, 2, 4, 12),
               "log_probs": torch.zeros(n * k, 1), "candidate": torch.arange(k).repeat(n),
               "noise_seed": torch.arange(n * k)}
    rows = candidate_rows(inputs, sampled, k, 0, 0)
    batch = to_record_batch(rows, [1.0, 0.0], [0, 1])
    worker = RewardWorker.options(num_cpus=0.1, runtime_env=env).remote(cfg.model_dump(mode="json"), 1)
    try:
        scored = ray.get(worker.score.remote(batch))
    finally:
        ray.kill(worker)
    assert column_tensor(scored, "reward").isnan().all()  # boom failed on every row...
    assert column_tensor(scored, "failed_term").tolist() == [2] * (n * k)  # ...and is named by its index
    alone = _cfg(base, "rl.reward.terms={detail: {function: 'iqa_terms.noref:detail', weight: 0.5}}")
    worker = RewardWorker.options(num_cpus=0.1, runtime_env=env).remote(alone.model_dump(mode="json"), 1)
    try:
        scored = ray.get(worker.score.remote(batch))
    finally:
        ray.kill(worker)
    builtin = rl.score(rows["final"], rows["gt"], alone.rl.reward)["reward"]
    expected = builtin + 0.5 * detail(rows["final"], rows["lq"], rows["gt"], rows["task"])
    torch.testing.assert_close(column_tensor(scored, "reward"), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # two short stage-1 runs (~40 s each); CI runs them (`make test-slow`)
def test_overlapped_stage1_samples_one_version_behind_within_the_staleness_bound(ray_session, base):
    """rl.async: iteration i+1's rollouts are issued before iteration i's update, so they carry the policy one
    version behind (staleness 1, accepted by max_staleness 1); a rollout two versions behind is refused,
    re-synced and sampled again."""
    from actors.rl import run_rl
    from fluxir.rollouts import read_parquet, to_tensors

    overrides = ("rl.async=true", "rl.max_staleness=1", "rl.iterations=3", "rl.num_learners=1",
                 "rl.num_rollout_actors=1", "rl.checkpoint_every=10")
    out = run_rl(_cfg(base, *overrides), stage="async", show_progress=False, write_rollouts=True)
    history = out["history"]
    assert [h["staleness"] for h in history] == [0, 1, 1] and [h["stale"] for h in history] == [0, 0, 0]
    assert out["version"] == 3
    versions = [to_tensors(read_parquet(base / "smoke" / "async" / "rollouts" / f"iter_{i:08d}.parquet")
                           .to_batches())["version"].unique().tolist() for i in range(3)]
    assert versions == [[0], [0], [1]]  # iteration 2 was sampled before update 1 landed

    issues = []

    def jump_version(system):  # a second sync while iteration 2's rollouts run: they end up 2 versions behind
        issues.append(system.version)
        if len(issues) == 2:
            system.sync(system.version + 1)

    out = run_rl(_cfg(base, *overrides), stage="async-bound", show_progress=False, on_issued=jump_version)
    history = out["history"]
    assert [h["stale"] for h in history] == [0, 1, 0]  # lag 2 > rl.max_staleness: sampled again
    assert max(h["staleness"] for h in history) <= 1 and out["version"] == 4
