"""Stage 1 on Ray: rollout actors, reward workers, the learner group and the controller loop.

One iteration: the controller takes the next batch of (LQ, GT, task) inputs (the iteration is the
data cursor), shards it over the `rollout-i` actors, hands each shard's Arrow record batch straight
to a `reward-i` worker (object refs, no driver round trip), builds the learner batch from the scored
rows, runs one DeepSpeed update on the `learner-i` ranks, and ships the new trainable tensors to every
rollout actor as a versioned, checksummed `WeightSet` in the actors' dtype through the object store. With
`rl.async` the next iteration's rollouts are issued before the update, so they overlap it, sampled by the
policy one version behind (within `rl.max_staleness`).

Faults: rollout and reward actors restart (`rl.max_restarts`); work lost with a dead actor is issued
again once it is back and re-synced. Checkpoints (every `rl.checkpoint_every` iterations) are written to
a temp folder and renamed, so a killed driver leaves only complete ones; a rerun resumes from the latest.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerGroup, actor_options
from actors.runtime import check_resources, init_ray, threads_for
from actors.tracking import Tracker, rl_metrics
from fluxir.files import remove_incomplete, replace_dir, write_error

log = logging.getLogger(__name__)

STATE_FILE = "controller.json"
LEARNER_TAG = "learner"
RESTART_WAIT_S = 120.0


# ---------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------

@ray.remote
class RolloutActor:
    """Holds a policy copy at a known version; samples K candidate trajectories per input."""

    def __init__(self, config: dict, init_dir: str, index: int, threads: int):
        import torch

        from fluxir.accel import module_device
        from fluxir.config import config_from_dict
        from fluxir.policy import load_trained

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(config)
        self.index = index
        # model.dtype on the GPU Ray assigned (a fraction of one when actors share it)
        self.policy, self.codec = load_trained(init_dir, self.cfg, place_on_device=True)
        self.device = module_device(self.policy)
        self.version = 0

    def ping(self) -> int:
        return self.version

    def set_weights(self, weights) -> int:
        """Load a verified `WeightSet`; a partial/tampered/mismatched one raises and changes nothing."""
        from fluxir.weightsync import verify_weight_set, wire_format

        verify_weight_set(weights, wire_format(self.policy.trainable_state_dict()))
        self.policy.load_trainable_state_dict(weights.tensors)  # cast to the actor's dtype and device
        self.version = weights.version
        return self.version

    def rollout(self, inputs: dict, first_index: int):
        """Arrow record batch of K candidates per input: `fluxir.rollouts.ROLLOUT_COLUMNS`."""
        from fluxir.rl import kept_indices, rl_schedule, sample_candidates
        from fluxir.rollouts import candidate_rows, to_record_batch

        out = sample_candidates(self.policy, self.codec, inputs["lq"].to(self.device), inputs["task"].to(self.device),
                                inputs["seed"], self.cfg)
        rows = candidate_rows(inputs, out, self.cfg.rl.candidates, self.version, first_index)
        return to_record_batch(rows, rl_schedule(self.cfg), kept_indices(self.cfg))


@ray.remote
class RewardWorker:
    """Stateless scorer: PSNR/SSIM (and LPIPS when weighted) of final images against GT, and the reward."""

    def __init__(self, config: dict, threads: int):
        import torch

        from fluxir.accel import runtime_device
        from fluxir.config import config_from_dict
        from fluxir.metrics import load_lpips
        from fluxir.rewards import load_terms

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(config)
        self.lpips = load_lpips() if self.cfg.rl.reward.lpips > 0 else None  # LPIPSUnavailable names the fix
        self.terms = load_terms(self.cfg.rl.reward)  # plug-ins, from this worker's rl.reward_runtime_env
        self.device = runtime_device()  # the GPU when the worker was given one (rl.reward_resources)
        if self.lpips is not None:
            self.lpips.to(self.device)

    def ping(self) -> bool:
        return True

    def score(self, batch):
        """`batch` with `fluxir.rollouts.SCORE_COLUMNS` appended."""
        from fluxir.rl import score_columns
        from fluxir.rollouts import REWARD_READS, check_columns, column_tensor, with_scores

        check_columns(batch.schema.names, REWARD_READS, "reward worker")
        rows = {name: column_tensor(batch, name) for name in REWARD_READS}
        return with_scores(batch, score_columns(rows, self.cfg.rl.reward, self.lpips, self.device, self.terms))


def rl_roles(cfg) -> list[tuple[str, dict[str, float], int]]:
    """(setting, resources per actor, count) of stage 1's actors."""
    rl = cfg.rl
    return [("rl.rollout_resources", rl.rollout_resources, rl.num_rollout_actors),
            ("rl.reward_resources", rl.reward_resources, rl.num_reward_workers),
            ("rl.learner_resources", rl.learner_resources, rl.num_learners)]


# ---------------------------------------------------------------------------------------------
# The system: actors + learner group, with recovery
# ---------------------------------------------------------------------------------------------

def slot_resources(cfg, slot: int) -> dict[str, float]:
    """What colocated slot `slot` holds: learner + rollout (+ reward) resources, e.g. {"CPU": 16, "GPU": 1}."""
    rl = cfg.rl
    roles = [rl.learner_resources, rl.rollout_resources] + ([rl.reward_resources] if slot < rl.num_reward_workers
                                                             else [])
    total: dict[str, float] = {}
    for res in roles:
        for key, value in res.items():
            total[key] = round(total.get(key, 0) + value, 6)
    if total.get("GPU", 0) > 1:
        raise ValueError(f"rl.colocate: slot {slot} asks for {total['GPU']:g} GPU (rl.learner_resources + "
                         f"rl.rollout_resources + rl.reward_resources); the fractions must sum to <= 1")
    return total


def colocated_slots(cfg, ready_timeout_s: float = 300):
    """One placement group, bundle i = slot i (one GPU each on a GPU cluster), packed onto few nodes."""
    bundles = [slot_resources(cfg, i) for i in range(cfg.rl.num_learners)]
    pg = placement_group(bundles, strategy="PACK", name=f"{cfg.name}-rl-slots")
    ray.get(pg.ready(), timeout=ready_timeout_s)
    return pg


class RLSystem:
    """Creates `rollout-i`, `reward-i` and the learner group; runs an iteration's shards through
    `ShardTasks`, which issues work lost with a dead actor again."""

    def __init__(self, cfg, init_dir: str | Path):
        self.cfg = cfg
        config = cfg.model_dump(mode="json")
        rl = cfg.rl
        check_resources("stage 1", rl_roles(cfg), autoscaling=cfg.ray.autoscaling)
        self.slots = colocated_slots(cfg) if rl.colocate else None
        self.rollouts = [self._actor(RolloutActor, f"rollout-{i}", rl.rollout_resources, i, config, str(init_dir), i,
                                     threads_for(rl.rollout_resources)) for i in range(rl.num_rollout_actors)]
        self.rewards = [self._actor(RewardWorker, f"reward-{i}", rl.reward_resources, i, config,
                                    threads_for(rl.reward_resources), runtime_env=rl.reward_runtime_env)
                        for i in range(rl.num_reward_workers)]
        self.learners = None
        try:
            self.learners = LearnerGroup(cfg, init_dir, slots=self.slots)
            ray.get([a.ping.remote() for a in self.rollouts + self.rewards])
        except BaseException:
            self.shutdown()  # nothing half-started keeps holding the cluster's resources
            raise
        self.weights_ref = None
        self.pending = []
        self.version = 0
        self.restarts = 0

    def _actor(self, cls, name, resources, slot: int, *args, runtime_env: dict | None = None):
        """A restartable actor; when colocated, pinned to bundle `slot` (a restart comes back to it)."""
        options = {"runtime_env": runtime_env} if runtime_env else {}
        if self.slots is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.slots, placement_group_bundle_index=slot)
        return cls.options(name=name, **actor_options(resources), max_restarts=self.cfg.rl.max_restarts,
                           max_task_retries=0, **options).remote(*args)

    # --- weight sync ---------------------------------------------------------------------------
    def sync(self, version: int, wait: bool = True) -> int:
        """Ship the learner's trainable tensors, in the rollout actors' dtype (`model.dtype`), as
        `WeightSet(version)` to every rollout actor; bytes sent.

        With `wait` False (overlapped stage 1) the loads are queued behind each actor's running rollout
        and confirmed by the next sync (`settle`); a rollout issued after this call samples the new version.
        """
        from fluxir.accel import DTYPES
        from fluxir.weightsync import make_weight_set

        self.settle()
        weights = make_weight_set(self.learners.get_weights(), version, DTYPES[self.cfg.model.dtype])
        self.weights_ref, self.version = ray.put(weights), version
        self.pending = [a.set_weights.remote(self.weights_ref) for a in self.rollouts]  # all at once
        if wait:
            self.settle()
        return weights.num_bytes

    def settle(self) -> None:
        """Wait for the weight loads of the last sync (re-syncing an actor that restarted meanwhile)."""
        pending, self.pending = self.pending, []
        for i, ref in enumerate(pending):
            self.push_weights(i, ref)

    def push_weights(self, i: int, sent=None) -> None:
        """Make sure rollout-i holds the current weights (waiting out a restart)."""
        until_back(f"rollout-{i}", lambda: self.rollouts[i].set_weights.remote(self.weights_ref), sent)

    def recover_rollout(self, i: int) -> None:
        """Wait for a restarted rollout actor, then give it the current weights."""
        self.restarts += 1
        log.warning("rollout-%d died; waiting for its restart and re-syncing weights v%d", i, self.version)
        self.push_weights(i)

    # --- one iteration's rollouts and rewards ----------------------------------------------------
    def issue(self, inputs: dict, first_index: int, on_issued=None) -> "ShardTasks":
        """Send the rollouts of `inputs` (one shard per rollout actor) and their scoring."""
        tasks = ShardTasks(self, inputs, first_index)
        tasks.issue()
        if on_issued:
            on_issued(self)
        return tasks

    def collect(self, tasks: "ShardTasks") -> tuple[list, dict]:
        """Scored record batches in input order, with timings and fault counters (`ShardTasks.counts`):
        rollout_s is the wait from the later of the issue and this call until the last rollout is in
        (a rollout issued one iteration ahead and already done costs nothing), reward_s the scoring tail
        after it (scoring of early shards overlaps later rollouts)."""
        t0 = time.perf_counter()
        waited_from = max(t0, tasks.issued_at)
        for i in tasks:
            tasks.wait_rollout(i)
        t1 = time.perf_counter()
        results = [tasks.result(i) for i in tasks]
        return results, {**tasks.counts, "rollout_s": max(t1 - waited_from, 0.0), "reward_s": time.perf_counter() - t1}

    def shutdown(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()
        for actor in self.rollouts + self.rewards:
            ray.kill(actor, no_restart=True)
        if self.slots is not None:
            remove_placement_group(self.slots)


class ShardTasks:
    """One iteration's rollout and scoring tasks: the inputs split into one shard per rollout actor
    (shard i on `rollout-i`, its record batch handed as an object ref to `reward-(i mod R)`).

    `issue()` sends them all; `wait_rollout(i)` and `result(i)` wait for shard i's rollout and scored batch,
    issuing the work again after its actor restarted or when the rollout's policy lags the current version
    by more than `rl.max_staleness`, up to `rl.max_restarts + 2` attempts each. `counts` holds how many
    tasks were issued again after a restart (reissued), how many rollouts were too stale (stale) and the
    largest lag accepted (staleness: policy versions between the sampling policy and the learner's).
    """

    def __init__(self, system: RLSystem, inputs: dict, first_index: int):
        self.system = system
        bounds = np.array_split(np.arange(len(inputs["seed"])), len(system.rollouts))
        self.shards = {i: ({k: v[b[0]:b[-1] + 1] for k, v in inputs.items()}, first_index + int(b[0]))
                       for i, b in enumerate(bounds) if len(b)}
        self.attempts = system.cfg.rl.max_restarts + 2
        self.counts = {"reissued": 0, "stale": 0, "staleness": 0}
        self.rollouts, self.scores = {}, {}
        self.issued_at = float("-inf")

    def __iter__(self):
        """The indices of the non-empty shards, in input order."""
        return iter(self.shards)

    def issue(self) -> None:
        """Every shard's rollout, then every shard's scoring chained on it."""
        self.issued_at = time.perf_counter()
        self.rollouts = {i: self.system.rollouts[i].rollout.remote(*shard) for i, shard in self.shards.items()}
        for i in self.rollouts:
            self._score(i)

    def wait_rollout(self, i: int) -> None:
        """Wait for shard i's rollout; after a restart of its actor (re-synced first) or when it is too stale
        (its actor re-synced), issue it and its scoring again."""
        from fluxir.rollouts import column_tensor

        system = self.system
        for _ in range(self.attempts):
            try:
                batch = ray.get(self.rollouts[i])
            except RayActorError:
                system.recover_rollout(i)
                self.counts["reissued"] += 1
            else:
                lag = system.version - int(column_tensor(batch, "version").min())
                if lag <= system.cfg.rl.max_staleness:
                    self.counts["staleness"] = max(self.counts["staleness"], lag)
                    return
                self.counts["stale"] += 1
                log.warning("rollout-%d sampled with a policy %d version(s) old > rl.max_staleness; re-syncing",
                            i, lag)
                system.push_weights(i)
            self.rollouts[i] = system.rollouts[i].rollout.remote(*self.shards[i])
            self._score(i)
        raise RuntimeError(f"rollout-{i} failed {self.attempts} times on one shard")

    def result(self, i: int):
        """Shard i's scored record batch; scored again once a reward worker that died with it is back."""
        for _ in range(self.attempts):
            try:
                return ray.get(self.scores[i])
            except RayActorError:
                name = self._reward_name(i)
                log.warning("%s died; re-scoring shard %d", name, i)
                until_back(name, self._reward_worker(i).ping.remote)
                self.counts["reissued"] += 1
                self._score(i)
        raise RuntimeError(f"{self._reward_name(i)} failed {self.attempts} times on one shard")

    def _score(self, i: int) -> None:
        """Shard i's scoring, chained on its rollout's object ref (no driver round trip)."""
        self.scores[i] = self._reward_worker(i).score.remote(self.rollouts[i])

    def _reward_worker(self, i: int):
        return self.system.rewards[i % len(self.system.rewards)]

    def _reward_name(self, i: int) -> str:
        return f"reward-{i % len(self.system.rewards)}"


def until_back(name: str, call, first=None):
    """ray.get(call()) retried while the actor restarts, for up to RESTART_WAIT_S; `first`: a ref already sent."""
    deadline = time.monotonic() + RESTART_WAIT_S
    ref = first
    while True:
        try:
            return ray.get(ref if ref is not None else call(), timeout=RESTART_WAIT_S)
        except (RayActorError, GetTimeoutError) as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come back within {RESTART_WAIT_S:.0f} s: {err}") from err
            ref = None
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with the controller state), oldest first."""
    return sorted(p for p in root.glob("iter_*") if (p / STATE_FILE).is_file())


def save_checkpoint(system: RLSystem, root: Path, state: dict, keep: int) -> Path:
    """Learner engines + controller state into `.tmp-iter_N`, renamed to `iter_N`; then prune to `keep`."""
    final = root / f"iter_{state['iteration']:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        system.learners.save_checkpoint(tmp, LEARNER_TAG)
        rng = _rng_state()
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "rng": rng}, f)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, final)
    except Exception as err:
        failure = write_error(tmp, getattr(err, "cause", None) or err)  # before the partial files go
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(failure.errno, f"checkpoint {final} not written, earlier ones are kept: "
                                     f"{failure.strerror}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_state() -> dict:
    """The driver's RNG states (sampling itself is seeded per row; these cover anything else)."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(rng: dict) -> None:
    import torch

    random.setstate((3, tuple(rng["python"]), None))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def load_latest(system: RLSystem, root: Path) -> dict | None:
    """Restore the learners from the latest complete checkpoint; its controller state, or None."""
    remove_incomplete(root, ".tmp-iter_*")
    done = _checkpoints(root)
    if not done:
        return None
    latest = done[-1]
    system.learners.load_checkpoint(latest, LEARNER_TAG)
    state = json.loads((latest / STATE_FILE).read_text())
    _set_rng_state(state.pop("rng"))
    log.info("resumed stage from %s (iteration %d, policy v%d)", latest, state["iteration"], state["version"])
    return state


# ---------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------

def run_rl(cfg, stage: str = "rl", init_dir: str | Path | None = None, show_progress: bool = True,
           on_issued=None, write_rollouts: bool | None = None) -> dict:
    """Run (or resume) stage 1 into `<run>/<stage>`; returns {"model_dir", "iterations", "version", ...}.

    `on_issued(system)` is called each iteration right after the rollouts were issued (fault tests).
    """
    from fluxir.rl import init_dir as default_init
    from fluxir.rl_loop import rl_stream

    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    stage_dir = cfg.run_dir / stage
    init_dir = Path(init_dir) if init_dir else default_init(cfg)
    if not (init_dir / "policy.safetensors").is_file():
        raise FileNotFoundError(f"stage {stage}: no initial policy at {init_dir} (run `fluxir pretrain` first)")
    write_rollouts = cfg.rl.write_rollouts if write_rollouts is None else write_rollouts
    started = time.perf_counter()
    system = RLSystem(cfg, init_dir)
    startup_s = time.perf_counter() - started
    tracker, bar, metrics = None, None, None
    try:
        ckpt_root = stage_dir / "checkpoints"
        state = load_latest(system, ckpt_root) or {"iteration": 0, "version": 0, "loop_seconds": 0.0, "history": []}
        system.sync(state["version"])
        stream, metrics, tracker = rl_stream(cfg), rl_metrics(stage), Tracker(cfg, stage, stage_dir)
        bar = _progress(cfg, state["iteration"], stage) if show_progress else None
        ahead = None  # rl.async: the next iteration's rollouts, issued before this iteration's update
        while not _finished(cfg, state):
            record, ahead = _iteration(cfg, system, stream, state["iteration"], on_issued,
                                       stage_dir / "rollouts" if write_rollouts else None, ahead)
            state = {**state, "iteration": record["iteration"], "version": system.version,
                     "loop_seconds": state["loop_seconds"] + record["iteration_s"],
                     "history": state["history"] + [record]}
            metrics.record(record)
            tracker.log(record, step=record["iteration"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", gap=f"{record.get('gap', 0.0):.3f}", v=system.version)
            if state["iteration"] % cfg.rl.checkpoint_every == 0:
                save_checkpoint(system, ckpt_root, state, cfg.rl.keep_checkpoints)
        model_dir = _finish(cfg, system, stage, stage_dir, state)
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.finish()
        if metrics is not None:
            metrics.close()
        system.shutdown()
    return {"model_dir": str(model_dir), "iterations": state["iteration"], "version": state["version"],
            "loop_seconds": state["loop_seconds"], "startup_seconds": startup_s,
            "seconds": time.perf_counter() - started, "history": state["history"]}


def _iteration(cfg, system: RLSystem, stream, it: int, on_issued, rollout_dir: Path | None,
               issued: ShardTasks | None = None) -> tuple[dict, ShardTasks | None]:
    """Issue the rollouts → score them → learn (`rl.updates_per_rollout` updates) → sync the new weights, for
    data cursor `it`: (the iteration's record, the rollouts issued for iteration it + 1 or None).

    With `rl.async` the rollouts of iteration it + 1 are issued once this iteration's are in, so they run
    while the learners update (sampled by the policy one version behind), and the sync does not wait for
    the actors: `issued` are the rollouts the previous iteration issued for this one.
    """
    from fluxir.rl import REWARD_OBJECTIVES, NoValidRollouts, learner_batch, reseeded
    from fluxir.rollouts import to_tensors, write_parquet

    t_iter = time.perf_counter()
    inputs, size = stream.batch(it), cfg.rl.batch_size
    batches, faults, sel, batch, ahead = [], {}, {}, inputs, None  # fm, reward_backprop: the inputs, no rollouts
    if cfg.rl.objective in REWARD_OBJECTIVES:
        batches, faults = system.collect(issued or system.issue(inputs, it * size, on_issued))
        if cfg.rl.async_ and (cfg.rl.iterations is None or it + 1 < cfg.rl.iterations):
            ahead = system.issue(stream.batch(it + 1), (it + 1) * size, on_issued)
        try:
            batch, sel = learner_batch(to_tensors(batches), cfg)
        except NoValidRollouts as err:  # e.g. a plug-in reward term failed on every row: counted, no update
            log.warning("iteration %d takes no update: %s", it + 1, err)
            batch, sel = None, err.stats
    t_learn = time.perf_counter()
    logs = {"loss": float("nan")}
    for update in range(cfg.rl.updates_per_rollout if batch is not None else 0):
        logs = system.learners.update(reseeded(batch, update), it)
    t_sync = time.perf_counter()
    sent = system.sync(system.version + 1, wait=not cfg.rl.async_)
    t_end = time.perf_counter()
    if rollout_dir is not None and batches:
        write_parquet(batches, rollout_dir / f"iter_{it:08d}.parquet")
    record = {"iteration": it + 1, "version": system.version, **sel, **logs, **faults,
              "rollouts": sum(b.num_rows for b in batches), "learn_s": t_sync - t_learn, "sync_s": t_end - t_sync,
              "sync_bytes": sent, "iteration_s": time.perf_counter() - t_iter, "restarts": system.restarts}
    return record, ahead


def _finish(cfg, system: RLSystem, stage: str, stage_dir: Path, state: dict) -> Path:
    """Final checkpoint (unless the last iteration just wrote one), the policy and the history."""
    ckpt_root = stage_dir / "checkpoints"
    done = _checkpoints(ckpt_root)
    if not done or done[-1].name != f"iter_{state['iteration']:08d}":
        save_checkpoint(system, ckpt_root, state, cfg.rl.keep_checkpoints)
    model_dir = stage_dir / "model"
    system.learners.save_policy(model_dir, {"stage": stage, "version": state["version"],
                                            "iterations": state["iteration"], "objective": cfg.rl.objective})
    (stage_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
    return model_dir


def _finished(cfg, state: dict) -> bool:
    """`rl.iterations` done, or `rl.max_seconds` of loop wall-clock spent (either may be unset)."""
    rl = cfg.rl
    return ((rl.iterations is not None and state["iteration"] >= rl.iterations)
            or (rl.max_seconds is not None and state["loop_seconds"] >= rl.max_seconds))


def _progress(cfg, start: int, stage: str):
    from tqdm import tqdm

    total = cfg.rl.iterations  # None (a time limit only): the bar counts without a total
    return tqdm(total=total, initial=start, desc=stage, unit="it", file=sys.stdout)
