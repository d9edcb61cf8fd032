"""The DeepSpeed learner group: N Ray actors in one placement group, one torch.distributed rank each.

Each rank builds the policy from the stage's initial weights, wraps it in a DeepSpeed engine
(ZeRO stage and precision from the JSON named by `rl.deepspeed`) and, on `update(batch)`, takes
its contiguous shard of the global batch. Its loss is the shard's per-sample loss summed and
scaled by world/n_global, so DeepSpeed's gradient average over ranks is exactly the global mean:
an N-rank update equals a 1-rank update on the same batch (up to float summation order).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.runtime import host_rendezvous, threads_for
from actors.train import _import_deepspeed, full_parameters, load_ds_config, weights_only_loads

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class NonFiniteLossError(RuntimeError):
    """A rank's loss was NaN/inf; no rank stepped on it."""


def learner_ds_config(cfg, world: int) -> dict:
    """rl.deepspeed (its ZeRO stage, precision, betas, clipping) with the RL batch and the constant `rl.lr`."""
    micro = max(1, -(-cfg.rl.batch_size // world))
    return load_ds_config(cfg.rl.deepspeed, {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * world,
        "gradient_accumulation_steps": 1,
        "optimizer": {"params": {"lr": cfg.rl.lr}},
    })


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous near-equal shard [lo, hi) of n rows for `rank`."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@ray.remote
class LearnerActor:
    """One rank: a DeepSpeed engine around the policy, updated by the configured RL objective."""

    def __init__(self, config: dict, init_dir: str, rank: int, world: int, threads: int):
        import torch

        from fluxir.config import config_from_dict

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(config)
        self.init_dir, self.rank, self.world = init_dir, rank, world
        self.engine = None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def host_rendezvous(self) -> tuple[str, int]:
        """Rank 0: the process group's rendezvous, on this node's address only."""
        return host_rendezvous()

    def setup(self, master: str, port: int, local_rank: int, ds_config: dict) -> dict:
        import torch

        from fluxir.accel import place, training_attention
        from fluxir.policy import load_trained
        from fluxir.rl import RLObjective

        if master == LOOPBACK:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's sockets on loopback too
        if ray.get_gpu_ids():  # Ray shows this actor only its own GPU (also a fraction of one): device 0
            local_rank = 0
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world), "LOCAL_RANK": str(local_rank),
                           "MASTER_ADDR": master, "MASTER_PORT": str(port)})
        deepspeed = _import_deepspeed()
        training_attention()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://{master}:{port}",
                                   rank=self.rank, world_size=self.world)
        policy, self.codec = load_trained(self.init_dir, self.cfg)
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=policy, model_parameters=params, config=ds_config,
                                               dist_init_required=False)
        weights_only_loads(self.engine)
        place(self.codec, self.cfg.model.dtype, self.engine.device)  # DeepSpeed placed the policy
        self.objective = RLObjective(self.cfg, self.codec)
        return {"rank": self.rank, "backend": backend, "zero_stage": self.engine.zero_optimization_stage(),
                "trainable": sum(p.numel() for p in params)}

    def update(self, batch: dict, iteration: int) -> dict:
        import torch
        import torch.distributed as dist

        from fluxir.accel import to_device

        n = len(batch["seed"])
        lo, hi = shard_bounds(n, self.rank, self.world)
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        if hi > lo:
            shard = to_device({k: v[lo:hi] for k, v in batch.items()}, self.engine.device)
            per, logs = self.objective.per_sample(self.engine, shard)
            loss = per.sum() * (self.world / n)
        else:  # an empty shard still joins the gradient all-reduce
            per, logs = torch.zeros(0), {}
            loss = sum(p.sum() for p in params) * 0.0
        stats = torch.tensor([float(per.sum().detach()) if hi > lo else 0.0, float(hi - lo),
                              0.0 if torch.isfinite(loss.detach()) else 1.0], device=self.engine.device)
        dist.all_reduce(stats)  # on the engine's device: NCCL reduces only GPU tensors
        if stats[2] > 0:
            raise NonFiniteLossError(f"non-finite RL loss at iteration {iteration} (rank {self.rank} logs {logs}; "
                                     f"{int(stats[2])} rank(s) affected); no update applied")
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": float(stats[0] / max(stats[1], 1)), **logs}

    def get_weights(self):
        """Trainable tensors as fp32 CPU copies (gathered under ZeRO-3); rank 0 returns them, others None."""
        import torch

        with full_parameters(self.engine):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).clone()
                    for k, v in self.engine.module.trainable_state_dict().items()}

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")

    def save_policy(self, directory: str, extra: dict) -> None:
        from fluxir.policy import save_policy

        with full_parameters(self.engine):
            if self.rank == 0:
                save_policy(self.engine.module, directory, self.cfg, extra=extra)


def actor_options(resources: dict[str, float]) -> dict:
    """Ray actor options for a resource dict such as {"CPU": 0.5} or {"CPU": 4, "GPU": 1, "custom": 1}."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": custom or None}


class LearnerGroup:
    """N `learner-i` ranks packed into one placement group; every call goes to all ranks."""

    def __init__(self, cfg, init_dir: str | Path, num_learners: int | None = None,
                 resources: dict[str, float] | None = None, ready_timeout_s: float = 300, slots=None):
        """`slots`: a ready placement group whose bundle i hosts rank i (colocated stage 1); it stays its
        owner's to remove. Without it the group packs its own bundles, one per rank."""
        self.world = num_learners or cfg.rl.num_learners
        resources = dict(resources or cfg.rl.learner_resources)
        self.owns_pg = slots is None
        self.pg = slots or placement_group([resources] * self.world, strategy="PACK", name=f"{cfg.name}-learners")
        ray.get(self.pg.ready(), timeout=ready_timeout_s)
        config = cfg.model_dump(mode="json")
        self.actors = [
            LearnerActor.options(
                name=f"learner-{rank}", **actor_options(resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(config, str(init_dir), rank, self.world, threads_for(resources))
            for rank in range(self.world)
        ]
        try:
            self.facts = self._rendezvous(cfg)
        except BaseException:
            self.shutdown()
            raise
        log.info("learner group: %d rank(s), %s", self.world, self.facts[0])

    def _rendezvous(self, cfg) -> list[dict]:
        """Rank 0 hosts the process group; every rank builds its engine."""
        master, port = ray.get(self.actors[0].host_rendezvous.remote())
        nodes = ray.get([a.node.remote() for a in self.actors])
        local_ranks = [nodes[:rank].count(node) for rank, node in enumerate(nodes)]
        ds_config = learner_ds_config(cfg, self.world)
        return ray.get([a.setup.remote(master, port, lr, ds_config) for a, lr in zip(self.actors, local_ranks)])

    def _all(self, method: str, *args):
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def update(self, batch: dict, iteration: int) -> dict:
        ref = ray.put(batch)  # one copy in the object store, read by every rank
        return self._all("update", ref, iteration)[0]

    def get_weights(self) -> dict:
        return self._all("get_weights")[0]

    def save_checkpoint(self, directory: str | Path, tag: str) -> None:
        self._all("save_checkpoint", str(directory), tag)

    def load_checkpoint(self, directory: str | Path, tag: str) -> None:
        self._all("load_checkpoint", str(directory), tag)

    def save_policy(self, directory: str | Path, extra: dict) -> None:
        self._all("save_policy", str(directory), extra)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_pg:
            remove_placement_group(self.pg)
