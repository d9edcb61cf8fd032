"""Stage 1 math: candidate trajectories, rewards, selection, and the RL objectives.

Pure torch; the Ray layer (actors/rl.py) runs it. Candidates of one input are K consecutive rows
(row b·K + k); candidate 0 is the deterministic ODE trajectory, 1..K−1 are modulated ones that share
its start and differ by the noise of their stochastic steps (with `rl.window`, they share its states up
to a per-input branch step and explore only the window's steps).

Objectives, per sample (the learner averages them over the global batch). Every regression term is a
per-sample log-MSE (`rl.loss`), so its gradient is the MSE's divided by the MSE: the terms are in
one unit system (relative error) and their weights compare directly.
- `rsr` (reward-selected regression, the paper's): the best candidate by reward is selected when it
  beats the ODE candidate by `margin`; at a random state pair (x_a, x_b) of the selected trajectory
  whose step was explored, the policy's velocity at x_a is regressed onto (x_b − x_a)/(t_b − t_a)
  (only where a better candidate was found), its x0̂ at x_a onto GT, plus the flow-matching anchor.
- `grpo` (Flow-GRPO style): group-normalised advantages, PPO-clipped ratio of the per-dimension
  log-prob of one random explored step per candidate, optional KL to the adapter-disabled reference,
  plus anchor.
- `nft` (DiffusionNFT family, likelihood-free): flow matching onto each candidate's own final image,
  through the implicit positive policy v⁺ = v_old + β(v − v_old) weighted by the candidate's optimality
  r ∈ [0, 1] and the negative one v⁻ = v_old − β(v − v_old) weighted by 1 − r; no log-probs. v_old is
  the learner's own velocity, detached: the sampling policy on a rollout's first update, the current one
  on later updates of the same rollout.
- `fm`: the anchor alone, i.e. stage-0 flow matching continued (the equal-time control).
- `reward_backprop` (DRaFT/ReFL style, a control for differentiable rewards): the ODE sampler run with
  gradients and the reward, normalised by its spread over the batch, maximised directly; plus anchor.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from fluxir import flow
from fluxir.codec import image_ids, pack, unpack
from fluxir.config import Config
from fluxir.metrics import at_least, compute_metrics
from fluxir.objectives import (LOG_MSE_EPS, flow_matching_per_sample, flow_matching_reading, per_sample_mse,
                               per_sample_regression, sample_times)
from fluxir.objectives import flow_matching_from_latents
from fluxir.flow import initial_state, source_mean, source_sigma
from fluxir.rewards import add_terms, failures_by_term
from fluxir.rollouts import check_columns
from fluxir.sampling import sample_trajectory
from fluxir.seeds import Salt, mix_seed

REWARD_OBJECTIVES = ("rsr", "grpo", "nft")  # the objectives that read rollouts and their rewards


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


def window_starts(cfg: Config) -> list[int]:
    """Branch steps a window of `rl.window` consecutive explored steps can start at."""
    allowed = set(stochastic_indices(cfg))
    return [i for i in sorted(allowed) if all(i + j in allowed for j in range(cfg.rl.window))]


def branch_steps(cfg: Config, seeds: torch.Tensor) -> torch.Tensor:
    """Per input (its seed), the step its modulated candidates branch off the ODE trajectory at (0 without
    `rl.window`: they explore from the start)."""
    if cfg.rl.window is None:
        return torch.zeros(len(seeds), dtype=torch.long)
    starts = torch.tensor(window_starts(cfg))
    return starts[row_uniform_int(seeds.cpu(), len(starts), Salt.RL_WINDOW)]


def explored_mask(cfg: Config, seeds: torch.Tensor) -> torch.Tensor:
    """(B, nfe) bool: the steps the modulated candidates of each input (its seed) take stochastically."""
    mask = torch.zeros(len(seeds), cfg.rl.nfe, dtype=torch.bool)
    if cfg.rl.window is None:
        mask[:, stochastic_indices(cfg)] = True
        return mask
    start = branch_steps(cfg, seeds)
    steps = torch.arange(cfg.rl.nfe)
    return (steps >= start[:, None]) & (steps < start[:, None] + cfg.rl.window)


def pick_true(mask: torch.Tensor, seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """Per row, the column of a uniformly drawn True entry of `mask` (B, P), from the row's own generator."""
    counts = mask.sum(1)
    if (counts == 0).any():
        raise ValueError("a row has nothing to pick from")
    nth = torch.tensor([int(torch.randint(int(c), (1,), generator=row_generator(s, salt)))
                        for s, c in zip(seeds.tolist(), counts.tolist())])
    return (mask.long().cumsum(1) == (nth + 1)[:, None]).long().argmax(1)


def informative_pairs(cfg: Config, seeds: torch.Tensor) -> torch.Tensor:
    """(B, S−1) bool: consecutive kept-state pairs whose interval holds an explored step of each input (its
    seed). A pair ending on a deterministic step regresses the policy onto its own output: no signal."""
    mask, kept = explored_mask(cfg, seeds), kept_indices(cfg)
    return torch.stack([mask[:, a:b].any(1) for a, b in zip(kept, kept[1:])], 1)


def kept_indices(cfg: Config) -> list[int]:
    """Schedule indices whose states are stored per trajectory (always includes start and end)."""
    keep = cfg.rl.keep_states if cfg.rl.keep_states is not None else range(cfg.rl.nfe + 1)
    return sorted(set(keep) | {0, cfg.rl.nfe})


def init_dir(cfg: Config) -> Path:
    """The policy stage 1 starts from: rl.init, else the run's stage-0 model."""
    return Path(cfg.rl.init) if cfg.rl.init else cfg.run_dir / "pretrain" / "model"


def check_rl_config(cfg: Config) -> None:
    """Stage 1's combinations of steps, candidates, window and objective that its own section's validator
    cannot see (they need the helpers above); the config's validator calls it. Raises ValueError naming
    the keys."""
    if cfg.rl.candidates > 1 and not stochastic_indices(cfg):
        raise ValueError(f"rl.candidates={cfg.rl.candidates} needs a stochastic step: rl.nfe >= 2 and "
                         f"rl.stochastic_steps not only the last step")
    if cfg.rl.candidates > 1 and cfg.rl.rho == 0:
        raise ValueError("rl.rho = 0 makes every candidate the ODE trajectory; use rl.candidates=1")
    if cfg.rl.objective == "grpo" and len(kept_indices(cfg)) != cfg.rl.nfe + 1:
        raise ValueError("rl.objective=grpo needs every state (rl.keep_states unset)")
    if cfg.rl.window is not None and not window_starts(cfg):
        raise ValueError(f"rl.window={cfg.rl.window} does not fit in the explored steps {stochastic_indices(cfg)} "
                         f"(rl.nfe={cfg.rl.nfe}, rl.stochastic_steps)")
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

def _starts(lq_tok: torch.Tensor, seeds: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Each input's start state at t_start, drawn from its own seed (rollouts and reward_backprop alike)."""
    return torch.cat([initial_state(lq_tok[i:i + 1], cfg.flow, row_generator(s, Salt.RL_START))
                      for i, s in enumerate(seeds.tolist())])


@torch.no_grad()
def sample_candidates(policy, codec, lq: torch.Tensor, task: torch.Tensor, seeds: torch.Tensor, cfg: Config) -> dict:
    """K candidate trajectories per input. lq (B, 3, H, W) in [0, 1]; task (B,); seeds (B,) int64 per input.

    Returns rows b·K + k: `final` (B·K, 3, H, W) images in [0, 1], `states` (B·K, S, N, C) at
    `kept_indices`, `log_probs` (B·K, nfe) per-dimension step log-probs (0 on ODE steps), `candidate`
    (B·K,), `noise_seed` (B·K,).
    """
    k_count = cfg.rl.candidates
    z = codec.encode(lq)
    h, w = z.shape[-2:]
    lq_tok, ids = pack(z), image_ids(h, w, device=z.device)
    schedule = rl_schedule(cfg)
    ode = sample_trajectory(policy, lq_tok, task, ids, schedule, cfg.flow, x_start=_starts(lq_tok, seeds, cfg))
    noise_seed = torch.tensor([[mix_seed(int(s), k) for k in range(k_count)] for s in seeds.tolist()]).view(-1)
    states, log_probs = [torch.stack(ode.states, 1)], [torch.stack(ode.log_probs, 1)]
    if k_count > 1:
        explore_seeds = noise_seed.view(-1, k_count)[:, 1:].reshape(-1)
        explored = _explore(policy, lq_tok, task, ids, schedule, cfg, states[0], seeds, explore_seeds)
        states.append(explored[0])
        log_probs.append(explored[1])
    state_rows = _interleave(states, k_count)[:, kept_indices(cfg)]
    return {
        "final": codec.decode(unpack(state_rows[:, -1], h, w)).clamp(0, 1).cpu(),
        "states": state_rows.cpu(),
        "log_probs": _interleave(log_probs, k_count).cpu(),
        "candidate": torch.arange(k_count).repeat(len(seeds)),
        "noise_seed": noise_seed,
    }


def _explore(policy, lq_tok, task, ids, schedule, cfg, ode_states, seeds, explore_seeds):
    """The modulated candidates, rows b·(K−1) + j: (states (R, nfe+1, N, C), log_probs (R, nfe)).

    Input b's candidates start from its ODE state at its branch step and take its explored steps
    stochastically (noise of step i drawn per row from (noise seed, i)), the others as ODE steps.
    """
    k1, nfe = cfg.rl.candidates - 1, cfg.rl.nfe
    branch, mask = branch_steps(cfg, seeds), explored_mask(cfg, seeds)
    states = ode_states.new_zeros(len(explore_seeds), *ode_states.shape[1:])
    log_probs = ode_states.new_zeros(len(explore_seeds), nfe)
    for start in branch.unique().tolist():
        inputs = (branch == start).nonzero().squeeze(1)
        rows = (inputs[:, None] * k1 + torch.arange(k1)).flatten()
        steps = [i for i in range(nfe) if mask[inputs[0], i]]
        noise = {i - start: row_normal(explore_seeds[rows], tuple(lq_tok.shape[1:]), mix_seed(Salt.RL_STEP, i))
                 for i in steps}
        rep = lambda x: x[inputs.to(x.device)].repeat_interleave(k1, 0)  # noqa: E731
        branchoff = sample_trajectory(policy, rep(lq_tok), rep(task), ids, schedule[start:], cfg.flow,
                                      x_start=rep(ode_states[:, start]), rho=cfg.rl.rho,
                                      stochastic_steps={i - start for i in steps}, step_noise=noise)
        dev_rows = rows.to(states.device)
        states[dev_rows] = torch.cat([rep(ode_states[:, :start]), torch.stack(branchoff.states, 1)], 1)
        log_probs[dev_rows, start:] = torch.stack(branchoff.log_probs, 1).to(log_probs.dtype)
    return states, log_probs


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


def score(final: torch.Tensor, gt: torch.Tensor, weights, lpips=None) -> dict[str, torch.Tensor]:
    """PSNR, SSIM (float32) and LPIPS (on crops of at least `weights.lpips_min_size`) of final images against GT,
    and the built-in reward: the reward worker's scoring, and reward_backprop's (differentiable when `lpips` is)."""
    metrics = compute_metrics(final, gt, dtype=torch.float32)
    if lpips is not None:
        metrics["lpips"] = lpips(at_least(final, weights.lpips_min_size), at_least(gt, weights.lpips_min_size))
    return {**metrics, "reward": combine_reward(metrics, weights)}


def score_columns(rows: dict[str, torch.Tensor], weights, lpips=None, device=None, terms=()) -> dict[str, torch.Tensor]:
    """The score columns (`rollouts.SCORE_COLUMNS`, on the CPU) of candidate rows (final, gt, lq, task), scored
    without gradients `weights.chunk` rows at a time on `device` (default: where `final` is): `score` plus the
    plug-in `terms` (`fluxir.rewards.load_terms`); lpips is NaN where the reward does not compute it."""
    device = rows["final"].device if device is None else device
    parts = []
    with torch.no_grad():
        for start in range(0, len(rows["final"]), weights.chunk):
            chunk = {k: rows[k][start:start + weights.chunk].to(device) for k in ("final", "gt", "lq", "task")}
            scores = {k: v.cpu() for k, v in score(chunk["final"], chunk["gt"], weights, lpips).items()}
            scores["reward"], scores["failed_term"] = add_terms(scores["reward"], list(terms), chunk["final"],
                                                                chunk["lq"], chunk["gt"], chunk["task"])
            parts.append(scores)
    scores = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    scores.setdefault("lpips", torch.full_like(scores["reward"], float("nan")))
    return scores


def shuffled_within_groups(reward: torch.Tensor, seeds: torch.Tensor, k_count: int) -> torch.Tensor:
    """The rewards of each input's K candidates permuted (seeded by the input): the reward-free control."""
    group = reward.view(-1, k_count)
    perms = torch.stack([torch.randperm(k_count, generator=row_generator(s, Salt.RL_SHUFFLE)) for s in seeds.tolist()])
    return group.gather(1, perms.to(group.device)).view(-1)


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


class NoValidRollouts(ValueError):
    """Every input of a learner batch has a candidate with a non-finite reward; `stats` counts the skips."""

    def __init__(self, message: str, stats: dict[str, int]):
        super().__init__(message)
        self.stats = stats


LEARNER_KEYS = ("lq", "gt", "task", "seed")  # the rollout columns every learner batch carries
LEARNER_READS = {"rsr": ("states",), "grpo": ("states", "log_probs", "candidate"),  # and per objective
                 "nft": ("states", "log_probs", "candidate", "final")}


def learner_batch(rows: dict[str, torch.Tensor], cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The learner's global batch from scored rollout rows: tensors keyed by the rollout schema
    (`rollouts.ROLLOUT_COLUMNS` and `SCORE_COLUMNS`, as `rollouts.to_tensors` returns them); an unknown
    column, or one the objective reads that is missing, raises naming it.

    rsr: one row per input (the selected trajectory); grpo, nft: every candidate with its advantage
    (nft also its final image). With `rl.shuffle_rewards` selection and advantages read rewards permuted
    within each group. Also returns selection statistics (of the true rewards) for logging.
    """
    check_columns(rows, ("input", "reward", *LEARNER_KEYS, *LEARNER_READS.get(cfg.rl.objective, ())),
                  f"learner batch ({cfg.rl.objective})")
    k_count = cfg.rl.candidates
    valid = torch.isfinite(rows["reward"].view(-1, k_count)).all(1)  # a NaN reward skips its whole group
    failures = failures_by_term(rows["failed_term"], list(cfg.rl.reward.terms)) if "failed_term" in rows else {}
    if not valid.any():
        raise NoValidRollouts(f"every rollout of inputs {rows['input'][::k_count].tolist()} has a non-finite "
                              f"reward", {"skipped": len(valid), **failures})
    rows = {k: v.view(-1, k_count, *v.shape[1:])[valid].flatten(0, 1) for k, v in rows.items()}
    reward = rows["reward"]
    group = reward.view(-1, k_count)
    stats = {"reward_mean": float(reward.mean()), "reward_max": float(group.max(1).values.mean()),
             "ode_reward": float(group[:, 0].mean()), "gap": float((group.max(1).values - group[:, 0]).mean()),
             "skipped": int((~valid).sum()), **failures}
    if cfg.rl.shuffle_rewards:
        reward = shuffled_within_groups(reward, rows["seed"][::k_count], k_count)
    chosen, improved, _ = select_best(reward, k_count, cfg.rl.margin)
    stats["improved_fraction"] = float(improved.float().mean())
    if cfg.rl.objective in ("grpo", "nft"):
        batch = {k: rows[k] for k in (*LEARNER_KEYS, "states", "log_probs", "candidate")}
        batch["advantage"] = group_advantages(reward, k_count)
        if cfg.rl.objective == "nft":
            batch["final"] = rows["final"]
        return batch, stats
    pick = torch.arange(len(chosen)) * k_count + (chosen if cfg.rl.objective == "rsr" else 0)
    batch = {k: rows[k][pick] for k in LEARNER_KEYS}
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
    """(next-state regression (B,), x0̂-to-GT (B,)), both per-sample `kind` regressions.

    step = regression of v_θ(x_a) onto (x_b − x_a)/(t_b − t_a), zero where not `improved`;
    x0   = regression of x0̂ onto GT tokens. In log units the step term reads the same in x0 units
    (x0 = x_a − t_a·v scales the error by t_a, a per-sample constant).
    """
    dt = (t_b - t_a).view(-1, *([1] * (x_a.dim() - 1)))
    target = (x_b - x_a) / dt
    step = per_sample_regression(velocity, target, kind) * improved.float()
    return step, per_sample_regression(x0_hat, gt_tokens, kind)


def grpo_terms(logp_new, logp_old, advantage, clip: float) -> torch.Tensor:
    """PPO-clipped surrogate, to minimise: −min(r·A, clip(r, 1−ε, 1+ε)·A), r = exp(logp_new − logp_old). (B,)"""
    ratio = torch.exp((logp_new - logp_old).clamp(-20, 20))  # bounded: a far-off step cannot overflow
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)


def optimality(advantage: torch.Tensor) -> torch.Tensor:
    """nft's r ∈ [0, 1] from a group-normalised advantage: 0.5 + A/2, clipped (one spread = certain)."""
    return (0.5 + 0.5 * advantage).clamp(0, 1)


def nft_terms(value, target, optimal, beta: float) -> torch.Tensor:
    """Likelihood-free policy loss on the policy's own samples, per sample (B,):
    (r·‖v⁺ − u‖² + (1 − r)·‖v⁻ − u‖²) / ‖v_old − u‖², v^± = v_old ± β(v − v_old), v_old = v detached.

    Its gradient is 2β(2r − 1)(v − u)/‖v_old − u‖²: towards the good samples, away from the bad, in the
    log-MSE units of the other terms.
    """
    old = value.detach()
    pos, neg = old + beta * (value - old), old - beta * (value - old)
    scale = per_sample_mse(old, target) + LOG_MSE_EPS
    return (optimal * per_sample_mse(pos, target) + (1 - optimal) * per_sample_mse(neg, target)) / scale


def normalised_reward_loss(reward: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """−(R − mean R)/std R with the batch statistics detached: the reward gradient in spread units. (B,)"""
    mean, std = reward.detach().mean(), reward.detach().std(unbiased=False)
    return -(reward - mean) / (std + eps)


def gaussian_kl(mean_p, mean_q, std) -> torch.Tensor:
    """KL(N(mean_p, std²) ‖ N(mean_q, std²)) per dimension (mean over all but the batch dim), as the log-probs. (B,)"""
    std = torch.as_tensor(std, dtype=mean_p.dtype).expand_as(mean_p)
    return ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1).mean(1)


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


def row_seeds(batch: dict) -> torch.Tensor:
    """One seed per candidate row: the input's seed mixed with the candidate index."""
    return torch.tensor([mix_seed(int(s), int(c)) for s, c in zip(batch["seed"], batch["candidate"])])


class RLObjective:
    """`per_sample(policy, batch)` -> (loss (B,), logs): the configured objective on a learner shard."""

    def __init__(self, cfg: Config, codec):
        self.cfg, self.codec = cfg, codec
        self.rl = cfg.rl
        self.schedule = rl_schedule(cfg)
        self.times = torch.tensor([self.schedule[i] for i in kept_indices(cfg)])
        self.lpips = None
        if self.rl.objective == "reward_backprop" and self.rl.reward.lpips > 0:
            from fluxir.metrics import load_lpips

            self.lpips = load_lpips(requires_grad=True)  # frozen weights, gradients to its inputs

    def per_sample(self, policy, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Each row's LQ and GT are encoded once (`latents`) and shared by every term."""
        latents = {"lq": self.codec.encode(batch["lq"]), "gt": self.codec.encode(batch["gt"])}
        anchor = self._anchor(policy, batch, latents)
        if self.rl.objective == "fm":
            return anchor, {"fm": _mean(anchor)}
        lq_tok = pack(latents["lq"])
        h, w = latents["lq"].shape[-2:]
        ids = image_ids(h, w, device=lq_tok.device)
        if self.rl.objective == "rsr":
            step, x0 = self._rsr(policy, batch, lq_tok, pack(latents["gt"]), ids)
            loss = self.rl.step_weight * step + self.rl.x0_weight * x0 + self.rl.fm_weight * anchor
            return loss, {"step": _mean(step), "x0": _mean(x0), "fm": _mean(anchor)}
        if self.rl.objective == "nft":
            nft = self._nft(policy, batch, latents)
            return nft + self.rl.fm_weight * anchor, {"nft": _mean(nft), "fm": _mean(anchor)}
        if self.rl.objective == "reward_backprop":
            reward = self._sampled_reward(policy, batch, lq_tok, ids, h, w)
            loss = normalised_reward_loss(reward) + self.rl.fm_weight * anchor
            return loss, {"reward": _mean(reward), "fm": _mean(anchor)}
        surrogate, kl = self._grpo(policy, batch, lq_tok, ids)
        loss = surrogate + self.rl.kl_weight * kl + self.rl.fm_weight * anchor
        return loss, {"surrogate": _mean(surrogate), "kl": _mean(kl), "fm": _mean(anchor)}

    def _fm_prediction(self, policy, batch, z_clean: torch.Tensor, z_lq: torch.Tensor, seeds: torch.Tensor,
                       salt: int):
        """The policy on the flow path from the clean latents `z_clean` to the source, at per-row times and
        noise."""
        t = torch.cat([sample_times(1, self.cfg.flow.t_start, self.cfg.pretrain.t_start_fraction,
                                    row_generator(s, salt)) for s in seeds.tolist()])
        dev = z_clean.device  # per-row draws on the CPU (device-independent), then moved
        fm_batch = {**batch, "t": t.to(dev), "noise": row_normal(seeds.cpu(), tuple(z_clean.shape[1:]), salt).to(dev)}
        return flow_matching_from_latents(policy, self.cfg, z_clean, z_lq, fm_batch)

    def _anchor(self, policy, batch, latents) -> torch.Tensor:
        """Stage-0 flow matching on the batch's (LQ, GT) with per-sample time and noise."""
        pred, x0, x1 = self._fm_prediction(policy, batch, latents["gt"], latents["lq"], batch["seed"], Salt.RL_FM)
        per = flow_matching_per_sample(pred, x0, x1, self.cfg.model.parametrization, self.cfg.rl.loss)
        return per.view(batch["seed"].shape[0])

    def _rsr(self, policy, batch, lq_tok, gt_tok, ids):
        """The step term on a random `informative_pairs` pair of the selected trajectory."""
        pairs = informative_pairs(self.cfg, batch["seed"])
        pairs[~pairs.any(1)] = True  # an ODE-only row (K = 1) carries no step term; any pair will do
        pair = pick_true(pairs, batch["seed"].cpu(), Salt.RL_PAIR).to(lq_tok.device)
        rows = torch.arange(len(pair), device=lq_tok.device)
        x_a, x_b = batch["states"][rows, pair], batch["states"][rows, pair + 1]
        times = self.times.to(lq_tok.device)
        t_a, t_b = times[pair], times[pair + 1]
        pred = policy(x_a, lq_tok, t_a, batch["task"], ids)
        return rsr_terms(pred.velocity, pred.x0_hat, x_a, x_b, t_a, t_b, gt_tok, batch["improved"],
                         self.cfg.rl.loss)

    def step_log_probs(self, policy, batch, lq_tok, ids):
        """(log p_new, log p_old, step moments (mean, std), explored rows) at one random explored step per
        candidate: the learner's recomputation beside the rollout's stored value."""
        explored = batch["candidate"] > 0
        pick = pick_true(explored_mask(self.cfg, batch["seed"]), row_seeds(batch), Salt.RL_PAIR).to(lq_tok.device)
        rows = torch.arange(len(pick), device=lq_tok.device)
        x_a, x_b = batch["states"][rows, pick], batch["states"][rows, pick + 1]
        t_a, t_b = self.times.to(lq_tok.device)[pick], self.times.to(lq_tok.device)[pick + 1]
        mu, sigma = source_mean(lq_tok, self.cfg.flow.source), source_sigma(self.cfg.flow)
        pred = policy(x_a, lq_tok, t_a, batch["task"], ids)
        mean, std = flow.stochastic_step_moments(x_a, pred.velocity, t_a, t_b, mu, sigma, self.rl.rho)
        logp_old = batch["log_probs"][rows, pick]
        logp_new = torch.where(explored, flow.gaussian_log_prob(x_b, mean, std), logp_old)  # ODE rows: ratio 1
        return logp_new, logp_old, (x_a, t_a, t_b, mu, sigma, mean, std), explored

    def _grpo(self, policy, batch, lq_tok, ids):
        logp_new, logp_old, (x_a, t_a, t_b, mu, sigma, mean, std), explored = self.step_log_probs(
            policy, batch, lq_tok, ids)
        surrogate = grpo_terms(logp_new, logp_old, batch["advantage"], self.rl.clip) * explored.float()
        kl = torch.zeros_like(surrogate)
        if self.rl.kl_weight > 0:
            with torch.no_grad(), adapters_disabled(policy):
                ref = policy(x_a, lq_tok, t_a, batch["task"], ids)
            ref_mean, _ = flow.stochastic_step_moments(x_a, ref.velocity, t_a, t_b, mu, sigma, self.rl.rho)
            kl = gaussian_kl(mean, ref_mean, std) * explored.float()
        return surrogate, kl

    def _nft(self, policy, batch, latents) -> torch.Tensor:
        """Flow matching onto each candidate's own final image at a fresh (t, ε) per row, signed by its reward."""
        z_final = self.codec.encode(batch["final"])
        pred, x0, x1 = self._fm_prediction(policy, batch, z_final, latents["lq"], row_seeds(batch), Salt.RL_NFT)
        value, target = flow_matching_reading(pred, x0, x1, self.cfg.model.parametrization)
        return nft_terms(value, target, optimality(batch["advantage"]), self.rl.nft_beta)

    def _sampled_reward(self, policy, batch, lq_tok, ids, h, w) -> torch.Tensor:
        """The reward of the ODE sampler's output, with gradients through every step."""
        traj = sample_trajectory(policy, lq_tok, batch["task"], ids, self.schedule, self.cfg.flow,
                                 x_start=_starts(lq_tok, batch["seed"], self.cfg))
        final = self.codec.decode(unpack(traj.final, h, w)).clamp(0, 1)
        if self.lpips is not None:
            self.lpips.to(final.device)
        return score(final.float(), batch["gt"].float(), self.rl.reward, self.lpips)["reward"]
