"""Stage 1 in one process: the Ray system's rollouts, rewards, learner batch and objective, with a plain
AdamW in place of the DeepSpeed engine (the optimizer settings of `rl.deepspeed`).

Benchmarks use it to compare objectives and controls over many seeds without starting actors; the
product runs stage 1 on Ray (actors/rl.py), and `benchmarks/rl_throughput.py` measures both.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fluxir import rl
from fluxir.data import train_stream
from fluxir.seeds import Salt, mix_seed
from fluxir.rollouts import candidate_rows


def rl_stream(cfg):
    """Stage 1's input stream (the iteration is the cursor): the same for every objective and control."""
    return train_stream(cfg, batch_size=cfg.rl.batch_size, seed=mix_seed(cfg.seed, Salt.RL_INPUTS))


def deepspeed_optimizer(cfg, params) -> tuple[torch.optim.Optimizer, float]:
    """AdamW with `rl.deepspeed`'s betas, eps and weight decay at `rl.lr`, and its gradient clipping."""
    ds = json.loads(Path(cfg.rl.deepspeed).read_text())
    p = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=cfg.rl.lr, betas=tuple(p["betas"]), eps=p["eps"],
                            weight_decay=p["weight_decay"])
    return opt, float(ds.get("gradient_clipping", 0.0))


class LocalRL:
    """`iteration(it)`: rollout → score → learner batch → `rl.updates_per_rollout` AdamW steps, in this process."""

    def __init__(self, cfg):
        """The policy stage 1 starts from (`rl.init`, else the run's stage-0 model), in train mode."""
        from fluxir.metrics import load_lpips
        from fluxir.policy import load_trained
        from fluxir.rewards import load_terms

        policy, codec = load_trained(rl.init_dir(cfg), cfg)
        self.cfg, self.policy, self.codec = cfg, policy.train(), codec
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.opt, self.clip = deepspeed_optimizer(cfg, self.params)
        self.objective, self.stream = rl.RLObjective(cfg, codec), rl_stream(cfg)
        reads_rewards = cfg.rl.objective in rl.REWARD_OBJECTIVES
        self.lpips = load_lpips() if reads_rewards and cfg.rl.reward.lpips > 0 else None
        self.terms = load_terms(cfg.rl.reward) if reads_rewards else []

    def rollout_rows(self, inputs: dict, it: int) -> dict[str, torch.Tensor]:
        """Iteration `it`'s scored candidate rows, the columns the Ray path's rollout actor and reward worker
        write (`rollouts.candidate_rows`, `rl.score_columns`), sampled by policy version `it`."""
        out = rl.sample_candidates(self.policy, self.codec, inputs["lq"], inputs["task"], inputs["seed"], self.cfg)
        rows = candidate_rows(inputs, out, self.cfg.rl.candidates, it, it * self.cfg.rl.batch_size)
        return rows | rl.score_columns(rows, self.cfg.rl.reward, self.lpips, terms=self.terms)

    def iteration(self, it: int) -> dict:
        t0 = time.perf_counter()
        inputs, stats, rollouts = self.stream.batch(it), {}, 0
        batch = inputs
        if self.cfg.rl.objective in rl.REWARD_OBJECTIVES:
            rows = self.rollout_rows(inputs, it)
            batch, stats = rl.learner_batch(rows, self.cfg)
            rollouts = len(rows["seed"])
        t1 = time.perf_counter()
        for update in range(self.cfg.rl.updates_per_rollout):  # as the controller: fresh states/noise each
            per, logs = self.objective.per_sample(self.policy, rl.reseeded(batch, update))
            loss = per.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite RL loss at iteration {it} ({logs}); no update applied")
            self.opt.zero_grad()
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.opt.step()
        t2 = time.perf_counter()
        return {"iteration": it + 1, **stats, **logs, "loss": float(loss.detach()), "rollouts": rollouts,
                "rollout_s": t1 - t0, "learn_s": t2 - t1, "iteration_s": t2 - t0}
