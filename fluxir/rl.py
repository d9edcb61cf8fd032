"""Stage 1 math (DESIGN.md §6): candidate trajectories, rewards, selection, and the RL objectives.

Pure torch; the Ray layer (actors/rl.py) runs it. Candidates of one input are K consecutive rows
(row b·K + k); candidate 0 is the deterministic ODE trajectory, 1..K−1 are modulated ones that share
its start and differ by the noise of their stochastic steps.

Objectives, per sample (the learner averages them over the global batch):
- `rsr` (reward-selected regression, the paper's): the best candidate by reward is selected when it
  beats the ODE candidate by `margin`; at a random state pair (x_a, x_b) of the selected trajectory
  the policy's velocity at x_a is regressed onto (x_b − x_a)/(t_b − t_a) (only where a better
  candidate was found), its x0̂ at x_a onto GT, plus the flow-matching anchor.
- `grpo` (Flow-GRPO style): group-normalised advantages, PPO-clipped ratio of the log-prob of one
  random stochastic step per candidate, optional KL to the adapter-disabled reference, plus anchor.
- `fm`: the anchor alone, i.e. stage-0 flow matching continued (the equal-time control).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from fluxir import flow
from fluxir.codec import image_ids, pack, unpack
from fluxir.config import Config
from fluxir.data import mix_seed
from fluxir.objectives import flow_matching_per_sample, per_sample_mse, per_sample_regression, sample_times
from fluxir.pretrain import flow_matching_prediction
from fluxir.sampling import initial_state, sample_trajectory, source_mean, source_sigma

SALT_START, SALT_STEP, SALT_PAIR, SALT_FM = 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# Schedules and indices
# ---------------------------------------------------------------------------------------------

def rl_schedule(cfg: Config) -> list[float]:
    return flow.make_schedule(cfg.rl.schedule, cfg.rl.nfe, cfg.flow.t_start, cfg.rl.shift)


def stochastic_indices(cfg: Config) -> list[int]:
    """Steps explored by the modulated candidates; the last step (to t = 0) is deterministic."""
    if cfg.rl.stochastic_steps is not None:
        return sorted(set(cfg.rl.stochastic_steps) - {cfg.rl.nfe - 1})
    return list(range(cfg.rl.nfe - 1))


def kept_indices(cfg: Config) -> list[int]:
    """Schedule indices whose states are stored per trajectory (always includes start and end)."""
    keep = cfg.rl.keep_states if cfg.rl.keep_states is not None else range(cfg.rl.nfe + 1)
    return sorted(set(keep) | {0, cfg.rl.nfe})


def init_dir(cfg: Config) -> Path:
    """The policy stage 1 starts from: rl.init, else the run's stage-0 model."""
    return Path(cfg.rl.init) if cfg.rl.init else cfg.run_dir / "pretrain" / "model"


def check_rl_config(cfg: Config) -> None:
    """Combinations the field validators cannot see; raises ValueError naming the keys."""
    if cfg.rl.candidates > 1 and not stochastic_indices(cfg):
        raise ValueError(f"rl.candidates={cfg.rl.candidates} needs a stochastic step: rl.nfe >= 2 and "
                         f"rl.stochastic_steps not only the last step")
    if cfg.rl.candidates > 1 and cfg.rl.rho == 0:
        raise ValueError("rl.rho = 0 makes every candidate the ODE trajectory; use rl.candidates=1")
    if cfg.rl.objective == "grpo" and len(kept_indices(cfg)) != cfg.rl.nfe + 1:
        raise ValueError("rl.objective=grpo needs every state (rl.keep_states unset)")
    if cfg.rl.kl_weight > 0 and not cfg.model.lora.enabled:
        raise ValueError("rl.kl_weight > 0 needs model.lora.enabled (the reference is the adapter-disabled base)")


def row_generator(seed: int, salt: int) -> torch.Generator:
    """The generator of one row: seeded by (seed, salt)."""
    return torch.Generator().manual_seed(mix_seed(int(seed), salt))


def row_normal(seeds: torch.Tensor, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """(len(seeds), *shape) standard normals, row i drawn from its own generator (seed_i, salt)."""
    return torch.stack([torch.randn(shape, generator=row_generator(s, salt))
                        for s in seeds.tolist()])


def row_uniform_int(seeds: torch.Tensor, high: int, salt: int) -> torch.Tensor:
    """(len(seeds),) integers in [0, high), row i from its own generator."""
    return torch.tensor([int(torch.randint(high, (1,), generator=row_generator(s, salt)))
                         for s in seeds.tolist()], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_candidates(policy, codec, lq: torch.Tensor, task: torch.Tensor, seeds: torch.Tensor, cfg: Config) -> dict:
    """K candidate trajectories per input. lq (B, 3, H, W) in [0, 1]; task (B,); seeds (B,) int64 per input.

    Returns rows b·K + k: `final` (B·K, 3, H, W) images in [0, 1], `states` (B·K, S, N, C) at
    `kept_indices`, `log_probs` (B·K, nfe), `candidate` (B·K,), `noise_seed` (B·K,).
    """
    k_count = cfg.rl.candidates
    z = codec.encode(lq)
    h, w = z.shape[-2:]
    lq_tok, ids = pack(z), image_ids(h, w, device=z.device)
    starts = torch.cat([initial_state(lq_tok[i:i + 1], cfg.flow, row_generator(s, SALT_START))
                        for i, s in enumerate(seeds.tolist())])
    schedule = rl_schedule(cfg)
    ode = sample_trajectory(policy, lq_tok, task, ids, schedule, cfg.flow, x_start=starts)
    noise_seed = torch.tensor([[mix_seed(int(s), k) for k in range(k_count)] for s in seeds.tolist()]).view(-1)
    trajs = [(ode, torch.zeros(len(seeds), dtype=torch.bool))]
    if k_count > 1:
        rep = lambda x: x.repeat_interleave(k_count - 1, 0)  # noqa: E731
        explore_seeds = noise_seed.view(-1, k_count)[:, 1:].reshape(-1)
        steps = stochastic_indices(cfg)
        noise = {i: row_normal(explore_seeds, tuple(lq_tok.shape[1:]), mix_seed(SALT_STEP, i)) for i in steps}
        explored = sample_trajectory(policy, rep(lq_tok), rep(task), ids, schedule, cfg.flow, x_start=rep(starts),
                                     rho=cfg.rl.rho, stochastic_steps=set(steps), step_noise=noise)
        trajs.append((explored, None))
    keep = kept_indices(cfg)
    states = [torch.stack([t.states[i] for i in keep], 1) for t, _ in trajs]
    log_probs = [torch.stack(t.log_probs, 1) for t, _ in trajs]
    state_rows = _interleave(states, k_count)
    final_tok = state_rows[:, -1]
    return {
        "final": codec.decode(unpack(final_tok, h, w)).clamp(0, 1).cpu(),
        "states": state_rows.cpu(),
        "log_probs": _interleave(log_probs, k_count).cpu(),
        "candidate": torch.arange(k_count).repeat(len(seeds)),
        "noise_seed": noise_seed,
    }


def _interleave(parts: list[torch.Tensor], k_count: int) -> torch.Tensor:
    """[ODE rows (B, ...), explored rows (B·(K−1), ...)] -> rows b·K + k."""
    ode = parts[0]
    if k_count == 1:
        return ode
    explored = parts[1].view(ode.shape[0], k_count - 1, *ode.shape[1:])
    return torch.cat([ode[:, None], explored], 1).flatten(0, 1)


# ---------------------------------------------------------------------------------------------
# Rewards and selection
# ---------------------------------------------------------------------------------------------

def combine_reward(metrics: dict[str, torch.Tensor], weights) -> torch.Tensor:
    """reward = w_psnr·PSNR + w_ssim·SSIM − w_lpips·LPIPS (weights: RewardConfig)."""
    reward = weights.psnr * metrics["psnr"] + weights.ssim * metrics["ssim"]
    if weights.lpips > 0:
        reward = reward - weights.lpips * metrics["lpips"]
    return reward


def select_best(reward: torch.Tensor, k_count: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input: (selected candidate (B,), improved (B,) bool, gap (B,) best − ODE reward).

    The best candidate is selected if it beats the ODE candidate (k = 0) by more than `margin`;
    otherwise the ODE candidate is.
    """
    group = reward.view(-1, k_count)
    best = group.argmax(1)
    gap = group.gather(1, best[:, None]).squeeze(1) - group[:, 0]
    improved = (gap > margin) & (best != 0)
    return torch.where(improved, best, torch.zeros_like(best)), improved, gap


def group_advantages(reward: torch.Tensor, k_count: int, eps: float = 1e-6) -> torch.Tensor:
    """(r − mean_group) / (std_group + eps), std the population std of the K candidates. (B·K,)"""
    group = reward.view(-1, k_count).double()
    adv = (group - group.mean(1, keepdim=True)) / (group.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1).float()


def learner_batch(rows: dict[str, torch.Tensor], cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The learner's global batch from scored rollout rows (tensors keyed as in `rollouts.to_tensors`).

    rsr: one row per input (the selected trajectory); fm: one row per input (its images only);
    grpo: every candidate with its advantage. Also returns selection statistics for logging.
    """
    k_count = cfg.rl.candidates
    valid = torch.isfinite(rows["reward"].view(-1, k_count)).all(1)  # a NaN image skips its whole group
    if not valid.any():
        raise ValueError(f"every rollout of inputs {rows['input'][::k_count].tolist()} has a non-finite reward")
    rows = {k: v.view(-1, k_count, *v.shape[1:])[valid].flatten(0, 1) for k, v in rows.items()}
    reward = rows["reward"]
    chosen, improved, gap = select_best(reward, k_count, cfg.rl.margin)
    stats = {"reward_mean": float(reward.mean()), "reward_max": float(reward.view(-1, k_count).max(1).values.mean()),
             "ode_reward": float(reward.view(-1, k_count)[:, 0].mean()), "gap": float(gap.mean()),
             "improved_fraction": float(improved.float().mean()), "skipped": int((~valid).sum())}
    keys = ("lq", "gt", "task", "seed")
    if cfg.rl.objective == "grpo":
        batch = {k: rows[k] for k in (*keys, "states", "log_probs", "candidate")}
        batch["advantage"] = group_advantages(reward, k_count)
        return batch, stats
    pick = torch.arange(len(chosen)) * k_count + (chosen if cfg.rl.objective == "rsr" else 0)
    batch = {k: rows[k][pick] for k in keys}
    if cfg.rl.objective == "rsr":
        batch["states"], batch["improved"] = rows["states"][pick], improved
    return batch, stats


def reseeded(batch: dict[str, torch.Tensor], update: int) -> dict[str, torch.Tensor]:
    """The batch for the `update`-th learner step on one rollout: other state pairs and anchor noise."""
    if update == 0:
        return batch
    return {**batch, "seed": torch.tensor([mix_seed(int(s), update) for s in batch["seed"].tolist()])}


# ---------------------------------------------------------------------------------------------
# Loss terms on tensors (checked by hand in the tests)
# ---------------------------------------------------------------------------------------------

def rsr_terms(velocity, x0_hat, x_a, x_b, t_a, t_b, gt_tokens, improved, kind: str):
    """(next-state regression (B,), x0̂-to-GT (B,)).

    step = ‖v_θ(x_a) − (x_b − x_a)/(t_b − t_a)‖² mean over tokens, zero where not `improved`;
    x0   = per-sample `kind` regression of x0̂ onto GT tokens.
    """
    dt = (t_b - t_a).view(-1, *([1] * (x_a.dim() - 1)))
    target = (x_b - x_a) / dt
    step = per_sample_mse(velocity, target) * improved.float()
    return step, per_sample_regression(x0_hat, gt_tokens, kind)


def grpo_terms(logp_new, logp_old, advantage, clip: float) -> torch.Tensor:
    """PPO-clipped surrogate, to minimise: −min(r·A, clip(r, 1−ε, 1+ε)·A), r = exp(logp_new − logp_old). (B,)"""
    ratio = torch.exp((logp_new - logp_old).clamp(-20, 20))  # bounded: a far-off step cannot overflow
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)


def gaussian_kl(mean_p, mean_q, std) -> torch.Tensor:
    """KL(N(mean_p, std²) ‖ N(mean_q, std²)) summed over all but the batch dim. (B,)"""
    std = torch.as_tensor(std, dtype=mean_p.dtype).expand_as(mean_p)
    return ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1).sum(1)


@contextmanager
def adapters_disabled(policy):
    """The reference policy: the same model with its LoRA adapters switched off."""
    policy.transformer.disable_adapters()
    try:
        yield policy
    finally:
        policy.transformer.enable_adapters()


# ---------------------------------------------------------------------------------------------
# The objective the learner runs
# ---------------------------------------------------------------------------------------------

def _mean(x: torch.Tensor) -> float:
    return float(x.detach().mean())


class RLObjective:
    """`per_sample(policy, batch)` -> (loss (B,), logs): the configured objective on a learner shard."""

    def __init__(self, cfg: Config, codec):
        check_rl_config(cfg)
        self.cfg, self.codec = cfg, codec
        self.rl = cfg.rl
        times = rl_schedule(cfg)
        self.times = torch.tensor([times[i] for i in kept_indices(cfg)])
        self.stochastic = stochastic_indices(cfg)

    def per_sample(self, policy, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        anchor = self._anchor(policy, batch)
        if self.rl.objective == "fm":
            return anchor, {"fm": _mean(anchor)}
        lq_tok = pack(self.codec.encode(batch["lq"]))
        h, w = batch["lq"].shape[-2] // self.codec.downsample, batch["lq"].shape[-1] // self.codec.downsample
        ids = image_ids(h, w, device=lq_tok.device)
        if self.rl.objective == "rsr":
            step, x0 = self._rsr(policy, batch, lq_tok, ids)
            loss = self.rl.step_weight * step + self.rl.x0_weight * x0 + self.rl.fm_weight * anchor
            return loss, {"step": _mean(step), "x0": _mean(x0), "fm": _mean(anchor)}
        surrogate, kl = self._grpo(policy, batch, lq_tok, ids)
        loss = surrogate + self.rl.kl_weight * kl + self.rl.fm_weight * anchor
        return loss, {"surrogate": _mean(surrogate), "kl": _mean(kl), "fm": _mean(anchor)}

    def _anchor(self, policy, batch) -> torch.Tensor:
        """Stage-0 flow matching on the batch's (LQ, GT) with per-sample time and noise."""
        seeds, n = batch["seed"], batch["seed"].shape[0]
        z_shape = self.codec.encode(batch["gt"][:1]).shape[1:]
        t = torch.cat([sample_times(1, self.cfg.flow.t_start, self.cfg.pretrain.t_start_fraction,
                                    row_generator(s, SALT_FM)) for s in seeds.tolist()])
        dev = batch["gt"].device  # per-row draws on the CPU (device-independent), then moved
        fm_batch = {**batch, "t": t.to(dev), "noise": row_normal(seeds.cpu(), tuple(z_shape), SALT_FM).to(dev)}
        pred, x0, x1 = flow_matching_prediction(policy, self.codec, self.cfg, fm_batch)
        per = flow_matching_per_sample(pred, x0, x1, self.cfg.model.parametrization, self.cfg.pretrain.loss)
        return per.view(n)

    def _rsr(self, policy, batch, lq_tok, ids):
        pair = row_uniform_int(batch["seed"].cpu(), len(self.times) - 1, SALT_PAIR).to(lq_tok.device)
        rows = torch.arange(len(pair), device=lq_tok.device)
        x_a, x_b = batch["states"][rows, pair], batch["states"][rows, pair + 1]
        times = self.times.to(lq_tok.device)
        t_a, t_b = times[pair], times[pair + 1]
        pred = policy(x_a, lq_tok, t_a, batch["task"], ids)
        gt_tok = pack(self.codec.encode(batch["gt"]))
        return rsr_terms(pred.velocity, pred.x0_hat, x_a, x_b, t_a, t_b, gt_tok, batch["improved"],
                         self.cfg.pretrain.loss)

    def _grpo(self, policy, batch, lq_tok, ids):
        explored = batch["candidate"] > 0
        row_seed = torch.tensor([mix_seed(int(s), int(c)) for s, c in zip(batch["seed"], batch["candidate"])])
        pick = torch.tensor(self.stochastic)[row_uniform_int(row_seed, len(self.stochastic), SALT_PAIR)]
        pick = pick.to(lq_tok.device)
        rows = torch.arange(len(pick), device=lq_tok.device)
        x_a, x_b = batch["states"][rows, pick], batch["states"][rows, pick + 1]
        times = self.times.to(lq_tok.device)
        t_a, t_b = times[pick], times[pick + 1]
        mu, sigma = source_mean(lq_tok, self.cfg.flow.source), source_sigma(self.cfg.flow)
        pred = policy(x_a, lq_tok, t_a, batch["task"], ids)
        mean, std = flow.stochastic_step_moments(x_a, pred.velocity, t_a, t_b, mu, sigma, self.rl.rho)
        logp_new = flow.gaussian_log_prob(x_b, mean, std)
        logp_old = batch["log_probs"][rows, pick]
        logp_new = torch.where(explored, logp_new, logp_old)  # ODE rows: no distribution, ratio 1, masked below
        surrogate = grpo_terms(logp_new, logp_old, batch["advantage"], self.rl.clip) * explored.float()
        kl = torch.zeros_like(surrogate)
        if self.rl.kl_weight > 0:
            with torch.no_grad(), adapters_disabled(policy):
                ref = policy(x_a, lq_tok, t_a, batch["task"], ids)
            ref_mean, _ = flow.stochastic_step_moments(x_a, ref.velocity, t_a, t_b, mu, sigma, self.rl.rho)
            kl = gaussian_kl(mean, ref_mean, std) * explored.float()
        return surrogate, kl
