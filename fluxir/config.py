"""Typed experiment configuration: pydantic models loaded from YAML, with `key.sub=value` overrides.

A wrong key or value stops start-up with a `ConfigError` whose message names the dotted path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fluxir.degradations import TASKS
from fluxir.metrics import LPIPS_MIN_SIZE


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the dotted key path."""


def configs_dir() -> Path:
    """The shipped configs (experiment YAMLs, DeepSpeed JSONs, sweep spaces): the installed package's
    `fluxir.configs`, or the `configs/` folder of a source checkout (an editable install)."""
    from importlib.resources import files
    try:
        return Path(str(files("fluxir.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


CONFIGS = configs_dir()
# Settings that name a file the run reads: a relative path in a YAML file is relative to that file's
# folder, one given as an override is relative to the working folder, and the defaults are shipped files.
FILE_KEYS = ("pretrain.deepspeed", "rl.deepspeed", "distill.sweep")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    enabled: bool = False
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Attention q/k/v/out, feed-forward and context projections, as FLUX LoRAs usually target.
    targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                          "ff_context.net.2", "proj_mlp", "proj_out"]


# One instruction per task for FLUX's text encoders (flux-dev); tiny learns its task tokens instead.
TASK_PROMPTS = {
    "sr": "Super-resolve this low-resolution photo into a sharp, detailed high-resolution photo.",
    "deblur": "Remove the motion blur from this photo and restore its sharp edges.",
    "lowlight": "Brighten this underexposed low-light photo and restore natural colours and detail.",
    "underwater": "Remove the blue-green underwater colour cast and haze from this photo.",
    "denoise": "Remove the noise from this photo while keeping its fine texture.",
    "raindrop": "Remove the raindrops from this photo and restore the scene behind them.",
    "desnow": "Remove the falling snow from this photo and restore the scene behind it.",
}
BLIND_PROMPT = "Restore this degraded photo into a clean, sharp, natural high-quality photo."


class ModelConfig(Strict):
    """The FluxTransformer2DModel policy. `tiny` builds from the sizes below; `flux-dev` loads `path`."""
    preset: Literal["tiny", "flux-dev"] = "tiny"
    path: str | None = None  # local diffusers folder (flux-dev: the pipeline folder with transformer/ and vae/)
    num_layers: int = Field(2, ge=0)
    num_single_layers: int = Field(2, ge=0)
    attention_head_dim: int = Field(16, ge=4)
    num_attention_heads: int = Field(4, ge=1)
    joint_attention_dim: int = Field(64, ge=1)
    pooled_projection_dim: int = Field(64, ge=1)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    text_tokens: int = Field(4, ge=1)  # learned task tokens per task (tiny)
    # The network's reading (fluxir.policy.RestorationPolicy): velocity; x0_residual (x0̂ = LQ + F); or
    # x0_precond, EDM-style x0̂ = LQ + c_skip(t)·(x_t − E[x_t|LQ]) + c_out(t)·F, equal to x0_residual at t = 1.
    parametrization: Literal["velocity", "x0_residual", "x0_precond"] = "x0_residual"
    sigma_data: float = Field(0.2, gt=0)  # x0_precond: typical per-pixel spread of GT − LQ in [-1, 1] units
    conditioning: Literal["task", "blind"] = "task"
    prompt_cache: str | None = None  # safetensors of cached prompt embeddings (flux-dev; `fluxir embed-prompts`)
    # The fixed instruction per task that `fluxir embed-prompts` encodes (T5 + CLIP); `blind` encodes BLIND_PROMPT.
    prompts: dict[str, str] = dict(TASK_PROMPTS)
    max_sequence_length: int = Field(512, ge=1, le=512)  # T5 tokens per prompt (FLUX.1-dev: 512)
    guidance: float | None = None  # FLUX.1-dev's distilled-guidance input (guidance_embeds models); None: 1.0
    # Weights of rollout actors and evaluation ("bfloat16" on GPUs); the learner's precision is its DeepSpeed JSON.
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False  # recompute each block in backward (diffusers), for 512/1024 px on GPUs
    lora: LoraConfig = LoraConfig()

    @field_validator("prompts", mode="before")
    @classmethod
    def _over_defaults(cls, v: dict[str, str]) -> dict[str, str]:
        """A partial `model.prompts` (e.g. one override) replaces only the tasks it names."""
        return {**TASK_PROMPTS, **(v or {})}

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if self.preset == "flux-dev" and not self.path:
            raise ValueError("preset flux-dev needs model.path (a local diffusers folder)")
        if self.preset == "flux-dev" and not self.prompt_cache:
            raise ValueError("preset flux-dev needs model.prompt_cache (write it with `fluxir embed-prompts CONFIG`)")
        unknown = sorted(set(self.prompts) - set(TASKS))
        if unknown:
            raise ValueError(f"model.prompts names unknown task(s) {unknown}; known: {list(TASKS)}")
        return self


class CodecConfig(Strict):
    kind: Literal["pixel", "vae"] = "pixel"
    vae_path: str | None = None  # diffusers AutoencoderKL folder (default: <model.path>/vae)


class FlowConfig(Strict):
    """Rectified flow from source (t=1) to clean (t=0); see docs/ARCHITECTURE.md, "The flow"."""
    source: Literal["gaussian", "lq"] = "lq"
    sigma_src: float = Field(0.1, gt=0)
    t_start: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "FlowConfig":
        if self.source == "gaussian" and self.t_start != 1.0:
            raise ValueError("a gaussian source needs t_start = 1 (no clean estimate to start part-way)")
        return self


class DataConfig(Strict):
    tasks: list[str] = list(TASKS)
    folder: str | None = None  # optional folder of clean training images (default: bundled photos)
    train_images: list[str] | None = None  # a subset of the bundled training photos (default: all of them)
    train_scale: float = Field(0.5, gt=0, le=1)
    # Per-crop rescaling (lo, hi) of the train_scale images: a crop covers crop/s source pixels, resized
    # (antialiased) to the crop, for s uniform in [lo, hi]. None: crops at train_scale.
    rescale: tuple[float, float] | None = None
    # Texture-weighted crops: keep one of this many uniform draws with probability ∝ its mean gradient
    # magnitude + texture_floor × the image's mean (1: uniform crops).
    texture_candidates: int = Field(1, ge=1)
    texture_floor: float = Field(0.2, ge=0)
    # Relative sampling weight per task (unnamed tasks 1); None: uniform. Mild tasks (sr, deblur) learn
    # slowest under a per-sample log-MSE, so a larger share of the batches can go to them.
    task_weights: dict[str, float] | None = None
    val_crops_per_image: int = Field(2, ge=1)  # validation crops per training image (`fluxir eval --split val`)
    crop: int = Field(32, ge=8)
    batch_size: int = Field(16, ge=1)
    test_crop: int = Field(64, ge=8)
    test_crops_per_image: int = Field(4, ge=1)
    test_scale: float = Field(0.5, gt=0, le=1)
    testset_dir: str | None = None  # default: <output_dir>/testset-<crop>-<scale>

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
        return tasks

    @field_validator("train_images")
    @classmethod
    def _bundled_names(cls, v):
        from fluxir.data import TRAIN_IMAGES

        unknown = sorted(set(v or []) - set(TRAIN_IMAGES))
        if unknown or v == []:
            raise ValueError(f"train_images must name bundled training photos {list(TRAIN_IMAGES)}; unknown: {unknown}")
        return v

    @model_validator(mode="after")
    def _weights_name_tasks(self) -> "DataConfig":
        w = self.task_weights or {}
        unknown = sorted(set(w) - set(self.tasks))
        if unknown or any(v < 0 for v in w.values()) or (w and sum(w.get(t, 1.0) for t in self.tasks) <= 0):
            raise ValueError(f"task_weights {w} must give non-negative weights to tasks in data.tasks "
                             f"(unknown: {unknown}), not all 0")
        return self

    @field_validator("rescale")
    @classmethod
    def _rescale_range(cls, v):
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"rescale {list(v)} must be [lo, hi] with 0 < lo <= hi")
        return v

    @field_validator("crop", "test_crop")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"{v} is not a multiple of 4 (x4 super-resolution and 2x2 token packing)")
        return v


class PretrainConfig(Strict):
    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    # Learning rate: linear warm-up over warmup_steps, then a cosine decay to min_lr_ratio·lr at `steps`.
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    num_workers: int = Field(2, ge=1)
    # The DeepSpeed JSON: ZeRO stage, precision, optimizer betas/eps, gradient clipping. fluxir sets only
    # the batch (data.batch_size split over num_workers), lr, weight_decay and the schedule above.
    deepspeed: str = str(CONFIGS / "deepspeed/zero2_cpu.json")
    worker_resources: dict[str, float] = {"CPU": 1}  # per Ray Train rank; {"CPU": 8, "GPU": 1} on a GPU node
    loss: Literal["mse", "log_mse"] = "log_mse"
    t_start_fraction: float = Field(0.5, ge=0, le=1)  # share of samples at t = t_start (the 1-NFE state)
    # Exponential moving average of the trainable weights (0: off); the saved model is the average,
    # the last raw weights go to <run>/pretrain/model-raw.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)


class EvalConfig(Strict):
    nfe: list[int] = [1, 2, 4, 8]
    schedule: Literal["uniform", "shifted"] = "uniform"
    shift: float = Field(1.0, gt=0)
    crop_border: int = Field(0, ge=0)
    test_y_channel: bool = False
    batch_size: int = Field(16, ge=1)
    tile: int | None = None  # tile size for restoring larger images (default: data.crop)
    overlap: int = Field(8, ge=0)
    lpips: bool = True
    grid_samples: int = Field(4, ge=1)  # before/after rows per task in the report
    # The Ray task that scores a policy in `fluxir run`, `distill` and `sweep` (a GPU worker on a GPU cluster)
    resources: dict[str, float] = {"CPU": 1}

    @field_validator("nfe")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("nfe must be a non-empty list of positive step counts")
        return v


class RewardTerm(Strict):
    """A plug-in reward term: `function` ("package.module:function") maps a batch (restored, lq, gt: (B, 3, H, W)
    in [0, 1]; task: (B,) ids) to B scores, higher is better; the reward adds weight × score."""
    function: str
    weight: float = 1.0

    @field_validator("function")
    @classmethod
    def _importable_form(cls, v: str) -> str:
        module, _, name = v.partition(":")
        if not module or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"{v!r} is not of the form package.module:function")
        return v


class RewardConfig(Strict):
    """reward = psnr·PSNR(dB) + ssim·SSIM − lpips·LPIPS + Σ weight·term, per candidate
    (docs/ARCHITECTURE.md, "Stage 1").

    Scale guide: 1 dB PSNR ~ 0.02 SSIM ~ 0.01 LPIPS on the tiny test crops.
    """
    psnr: float = Field(1.0, ge=0)
    ssim: float = Field(0.0, ge=0)
    lpips: float = Field(0.0, ge=0)
    # LPIPS sees crops of at least this size (smaller ones are upsampled bilinearly): at 32 px AlexNet's
    # deeper feature maps are 1×1 and the distance is mostly colour statistics
    lpips_min_size: int = Field(LPIPS_MIN_SIZE, ge=32)
    # Plug-in terms by name (no-reference IQA, task metrics, a judge behind a server), loaded in the reward
    # workers; a term that raises or returns non-finite or misshapen scores makes those rows' reward NaN:
    # their inputs are skipped and counted per term.
    terms: dict[str, RewardTerm] = {}
    chunk: int = Field(64, ge=1)  # rows scored at a time (float32): memory does not grow with the shard

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        clash = sorted(set(self.terms) & {"psnr", "ssim", "lpips", "reward"})
        if clash:
            raise ValueError(f"reward terms {clash} clash with the built-in scores; name them otherwise")
        if self.psnr == self.ssim == self.lpips == 0 and not any(t.weight for t in self.terms.values()):
            raise ValueError("at least one reward weight must be non-zero")
        return self


class RLConfig(Strict):
    """Stage 1: rollout actors, reward workers and a DeepSpeed learner group on Ray
    (docs/ARCHITECTURE.md, "Stage 1")."""
    model_config = ConfigDict(**Strict.model_config, validate_by_name=True, serialize_by_alias=True)
    # rsr: the paper's reward-selected regression; grpo: PPO-clipped ratio of stochastic steps; nft:
    # likelihood-free reward-weighted flow matching on the policy's own samples; fm: plain flow matching
    # (a control); reward_backprop: the reward's gradient through the sampler (a control)
    objective: Literal["rsr", "grpo", "nft", "fm", "reward_backprop"] = "rsr"
    init: str | None = None  # policy folder to start from (default: <run>/pretrain/model)
    iterations: int | None = Field(100, ge=1)  # None: no limit (then max_seconds stops the run)
    max_seconds: float | None = Field(None, gt=0)  # also stop after this much loop wall-clock
    batch_size: int = Field(16, ge=1)  # inputs per iteration
    candidates: int = Field(4, ge=1)  # K per input: the ODE trajectory + K-1 modulated ones
    nfe: int = Field(4, ge=1)
    schedule: Literal["uniform", "shifted"] = "uniform"
    shift: float = Field(1.0, gt=0)
    rho: float = Field(1.0, ge=0, le=4)  # exploration: ≤ 1 keeps the path's marginal, > 1 adds more noise
    stochastic_steps: list[int] | None = None  # step indices explored (default: all but the last)
    # Branching: the modulated candidates follow the ODE trajectory up to a per-input branch step and
    # explore `window` consecutive steps from there (ODE after it); the learner trains only those steps.
    window: int | None = Field(None, ge=1)
    # The reward-free control: rewards are permuted within each input's candidates before selection or
    # advantages (same compute, no reward information)
    shuffle_rewards: bool = False
    nft_beta: float = Field(1.0, gt=0)  # nft: the step of the implicit positive/negative policies
    keep_states: list[int] | None = None  # schedule indices stored per trajectory (default: all)
    updates_per_rollout: int = Field(1, ge=1)  # learner steps per rollout batch (fresh states/noise each)
    margin: float = Field(0.0, ge=0)  # rsr: best must beat the ODE candidate's reward by this
    step_weight: float = Field(1.0, ge=0)  # rsr: next-state regression (velocity units)
    x0_weight: float = Field(1.0, ge=0)  # rsr: x0_hat -> GT
    fm_weight: float = Field(0.5, ge=0)  # flow-matching anchor (rsr, grpo; the whole loss for fm)
    clip: float = Field(0.2, gt=0)  # grpo: PPO ratio clip
    kl_weight: float = Field(0.0, ge=0)  # grpo: KL to the adapter-disabled reference (needs LoRA)
    reward: RewardConfig = RewardConfig()
    # Regression loss of stage 1's flow-matching anchor and rsr's state and x0 terms: per-sample log-MSE
    # (each sample weighted by its own error) or MSE. (nft divides by each sample's own error itself.)
    loss: Literal["mse", "log_mse"] = "log_mse"
    lr: float = Field(5e-5, gt=0)  # constant; a fraction of stage 0's peak, so the base does not drift
    # The DeepSpeed JSON (ZeRO stage, precision, betas, clipping); fluxir sets the batch and lr.
    deepspeed: str = str(CONFIGS / "deepspeed/zero2_cpu.json")
    num_rollout_actors: int = Field(2, ge=1)
    num_reward_workers: int = Field(1, ge=1)
    num_learners: int = Field(2, ge=1)
    # Ray resources per actor (logical; fractions let all roles share a laptop's cores: the phases of
    # an iteration run one after another). On a cluster: e.g. {"CPU": 4, "GPU": 1} per learner.
    rollout_resources: dict[str, float] = {"CPU": 0.4}
    reward_resources: dict[str, float] = {"CPU": 0.2}
    # Ray runtime_env of the reward workers alone: what the plug-in terms of rl.reward.terms import (pip
    # packages, py_modules by URI, env_vars), without installing it into every other actor.
    reward_runtime_env: dict[str, Any] | None = None
    learner_resources: dict[str, float] = {"CPU": 0.5}
    # Colocate: slot i = one placement-group bundle (one GPU on a cluster) holding learner-i, rollout-i and,
    # for i < num_reward_workers, reward-i, each with its fraction of the slot's GPU. The phases of an
    # iteration run one after another, so sharing every GPU beats splitting GPUs between roles.
    colocate: bool = False
    max_staleness: int = Field(0, ge=0)  # policy versions a rollout may lag the learner
    # Overlapped stage 1: the rollouts of iteration i+1 run while the learners update on iteration i (sampled
    # by the policy one version behind: needs max_staleness >= 1); grpo's ratio is taken against the
    # log-probs of the policy version that sampled each row. Written `rl.async` in YAML and overrides.
    async_: bool = Field(False, alias="async")
    max_restarts: int = Field(3, ge=0)  # rollout / reward actors
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    write_rollouts: bool = False  # Parquet per iteration under <run>/<stage>/rollouts
    controls: bool = False  # `fluxir run`: also the equal-wall-clock controls (actors/stages.py)

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        steps = self.stochastic_steps or []
        if any(not 0 <= i < self.nfe for i in steps):
            raise ValueError(f"stochastic_steps {steps} must be step indices in [0, nfe={self.nfe})")
        if self.keep_states is not None and any(not 0 <= i <= self.nfe for i in self.keep_states):
            raise ValueError(f"keep_states {self.keep_states} must be schedule indices in [0, {self.nfe}]")
        if self.colocate and (self.num_rollout_actors != self.num_learners
                              or self.num_reward_workers > self.num_learners):
            raise ValueError(f"rl.colocate needs one rollout actor per learner slot and at most one reward worker "
                             f"per slot: num_rollout_actors={self.num_rollout_actors}, num_learners="
                             f"{self.num_learners}, num_reward_workers={self.num_reward_workers}")
        if self.objective in ("grpo", "nft") and self.candidates < 2:
            raise ValueError(f"{self.objective} needs candidates >= 2 (advantages are relative within a group)")
        if self.shuffle_rewards and self.objective in ("fm", "reward_backprop"):
            raise ValueError(f"rl.shuffle_rewards has no rewards to shuffle with objective={self.objective}")
        if self.iterations is None and self.max_seconds is None:
            raise ValueError("rl.iterations=null needs rl.max_seconds (something has to stop the run)")
        local = [m for m in (self.reward_runtime_env or {}).get("py_modules", []) if "://" not in str(m)]
        if local:
            raise ValueError(f"rl.reward_runtime_env.py_modules {local}: an actor's runtime_env takes packages by URI "
                             f"(s3://, gs://, https://...zip) or pip; ship local folders with the job's runtime_env "
                             f"(`ray job submit --runtime-env`, cluster/runtime_env.yaml) or, on one node, "
                             f"env_vars: {{PYTHONPATH: folder}}")
        if self.async_ and self.max_staleness < 1:
            raise ValueError("rl.async samples with the policy one version behind the learner: it needs "
                             f"rl.max_staleness >= 1 (got {self.max_staleness})")
        return self


class StudentConfig(Strict):
    """How one stage-2 student is trained (one Tune trial); a sweep's space draws from these keys."""
    # Its K-step schedule: uniform, shifted (distill.shift), searched (the schedule search's, fixed), or
    # learned (starts from the searched one; its times are trained with the network).
    schedule: Literal["uniform", "shifted", "searched", "learned"] = "searched"
    steps: int = Field(200, ge=1)  # updates per student
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    teacher_weight: float = Field(1.0, ge=0)  # each jump's end onto the teacher's state at that time
    gt_weight: float = Field(0.5, ge=0)  # the final state onto GT
    loss: Literal["mse", "log_mse"] = "log_mse"
    schedule_lr: float = Field(0.02, gt=0)  # learned schedule: lr of its softmax logits
    eval_every: int = Field(50, ge=1)  # validation (and trial report/checkpoint) period in steps

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.teacher_weight == self.gt_weight == 0:
            raise ValueError("teacher_weight and gt_weight cannot both be 0")
        return self


class DistillConfig(Strict):
    """Stage 2: trajectory distillation (docs/ARCHITECTURE.md, "Stage 2"); one student per step budget."""
    teacher: str | None = None  # policy folder (default: <run>/rl/model if present, else <run>/pretrain/model)
    teacher_nfe: int = Field(20, ge=2)  # N: the teacher's ODE grid
    teacher_schedule: Literal["uniform", "shifted"] = "uniform"
    shift: float = Field(3.0, gt=0)  # the FLUX/SD3 time shift of stage 2's shifted schedules
    calibration_size: int = Field(256, ge=1)  # training crops: teacher trajectories and the schedule search
    validation_size: int = Field(64, ge=1)  # held-out crops (own seed) for trial metrics and ASHA
    budgets: list[int] = [1, 2, 4]
    # The judged metric: what the schedule search minimises, how the best student per budget and the
    # exported policy are chosen (LPIPS on crops upsampled to at least 64 px).
    metric: Literal["lpips", "psnr"] = "lpips"
    search_grid: int = Field(40, ge=2)  # the search moves interior times on multiples of t_start/search_grid
    student: StudentConfig = StudentConfig()
    # Per budget also the controls, with the student's settings and seed: a uniform-schedule student and a
    # GT-only fine-tune (teacher_weight 0) on the student's schedule.
    controls: bool = True
    curve_nfe: list[int] = [1, 2, 4, 8]  # the teacher's quality-vs-NFE curve (plus teacher_nfe)
    trial_resources: dict[str, float] = {"CPU": 1}
    # The teacher's side runs as Ray tasks holding teacher_resources each: its trajectories in teacher_shards
    # tasks (whole sampling batches of teacher_batch rows each), then the schedule search and baselines in one.
    teacher_resources: dict[str, float] = {"CPU": 1}
    teacher_shards: int = Field(1, ge=1)
    teacher_batch: int = Field(32, ge=1)
    max_concurrent: int = Field(2, ge=1)
    sweep: str = str(CONFIGS / "sweeps/distill.yaml")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if not self.budgets or any(not 1 <= k <= self.teacher_nfe for k in self.budgets):
            raise ValueError(f"budgets {self.budgets} must be step counts in [1, teacher_nfe={self.teacher_nfe}]")
        if max(self.budgets) > self.search_grid:
            raise ValueError(f"search_grid {self.search_grid} has fewer times than budget {max(self.budgets)} needs")
        return self


class RayConfig(Strict):
    address: str | None = None  # None: a local instance bound to 127.0.0.1
    num_cpus: int | None = None
    # On (bound to 127.0.0.1): users watch runs there, and Ray Train's placement-group cleaner
    # polls the State API the dashboard serves (without it, it logs a warning every second).
    dashboard: bool = True
    # The cluster adds nodes on demand (an autoscaler): a stage asking for more than it has now waits for
    # them with a warning instead of being refused.
    autoscaling: bool = False


class WandbConfig(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fluxir"


class Config(Strict):
    name: str = "tiny"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    codec: CodecConfig = CodecConfig()
    flow: FlowConfig = FlowConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    eval: EvalConfig = EvalConfig()
    rl: RLConfig = RLConfig()
    distill: DistillConfig = DistillConfig()
    ray: RayConfig = RayConfig()
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        """Settings of two sections that must agree (one section's are checked by its own validator)."""
        if self.data.batch_size % self.pretrain.num_workers:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by pretrain.num_workers "
                             f"{self.pretrain.num_workers} (it is the global batch, split over the workers)")
        from fluxir.rl import check_rl_config  # stage 1's helpers know which steps are explored

        check_rl_config(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def testset_dir(self) -> Path:
        if self.data.testset_dir:
            return Path(self.data.testset_dir)
        return Path(self.output_dir) / f"testset-{self.data.test_crop}-{self.data.test_scale:g}"


class AshaConfig(Strict):
    grace_period: int = Field(50, ge=1)  # steps every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(Strict):
    """A Ray Tune sweep over stage-2 students (`fluxir sweep`; configs/sweeps/distill.yaml).

    `space` keys are `distill.student` keys plus budget (required); values are fixed, or one of
    `{grid: [...]}`, `{choice: [...]}`, `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`.
    """
    metric: Literal["psnr", "ssim", "lpips", "psnr_gain", "lpips_gain"] = "lpips_gain"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    steps: int = Field(200, ge=1)
    eval_every: int = Field(25, ge=1)
    max_concurrent: int | None = Field(None, ge=1)  # default: distill.max_concurrent
    asha: AshaConfig | None = AshaConfig()
    space: dict[str, Any]

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        allowed = {"budget", *StudentConfig.model_fields}
        unknown = set(self.space) - allowed
        if unknown or "budget" not in self.space:
            raise ValueError(f"space keys must include budget and come from {sorted(allowed)} (distill.student's "
                             f"keys); unknown: {sorted(unknown)}")
        if (self.metric == "lpips") != (self.mode == "min"):
            raise ValueError(f"metric {self.metric} is optimised with mode "
                             f"{'min' if self.metric == 'lpips' else 'max'}, not {self.mode}")
        return self


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        return SweepConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"invalid sweep ({path}): {_describe(err)}") from None


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])}: is a value, cannot set {path}")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


# Keys that configs stored in older policy cards and export manifests may hold: the ZeRO stage is the
# DeepSpeed JSON's own, so a stored value says nothing the JSON does not.
RETIRED_KEYS = ("pretrain.zero_stage", "rl.zero_stage")


def stored_config(tree: dict[str, Any], source: str) -> Config:
    """The config stored with a trained policy or an export (`policy.json`, `manifest.json`), retired keys
    dropped."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for dotted in RETIRED_KEYS:
        section, key = dotted.split(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(key, None)
    return config_from_dict(tree, source)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration ({source}): {_describe(err)}") from None


def read_deepspeed(path: str | Path, key: str) -> dict:
    """The DeepSpeed JSON that setting `key` names; a missing or malformed file is refused by name."""
    import json

    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: no DeepSpeed JSON at {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    return ds


def zero_stage(path: str | Path, key: str = "deepspeed") -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 when it has no zero_optimization section)."""
    return int(read_deepspeed(path, key).get("zero_optimization", {}).get("stage", 0))


def check_deepspeed(cfg: Config) -> None:
    """Both stages' DeepSpeed JSONs: readable, one optimizer step per batch, and a bf16 model
    (`model.dtype`) only under a JSON with bf16 on (else the optimizer would step the bf16 weights
    themselves, with no fp32 master copy)."""
    for key, path in (("pretrain.deepspeed", cfg.pretrain.deepspeed), ("rl.deepspeed", cfg.rl.deepspeed)):
        ds = read_deepspeed(path, key)
        if ds.get("gradient_accumulation_steps", 1) != 1:
            raise ConfigError(f"{key}: {path} sets gradient_accumulation_steps; fluxir takes one optimizer step "
                              f"per batch (set the batch size in the YAML instead)")
        if cfg.model.dtype == "bfloat16" and not ds.get("bf16", {}).get("enabled", False):
            raise ConfigError(f"model.dtype=bfloat16 needs a DeepSpeed JSON with bf16 enabled ({key} names {path}, "
                              f"without); use configs/deepspeed/zero2_bf16.json or zero3_bf16.json, or "
                              f"model.dtype=float32")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply `key.sub=value` overrides, and check the
    files it names."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        tree = _read_yaml(path)
        _resolve_files(tree, path.resolve().parent)
    for override in overrides:
        apply_override(tree, override)
    _resolve_files(tree, Path.cwd())
    cfg = config_from_dict(tree, str(path) if path else "<defaults>")
    check_deepspeed(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping; a missing, empty or non-mapping file is refused by name."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if tree is None:
        raise ConfigError(f"{path}: the config file is empty (copy configs/tiny.yaml and edit it, or give that)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return tree


def _resolve_files(tree: dict[str, Any], base: Path) -> None:
    """Make the relative paths of FILE_KEYS in `tree` absolute against `base`."""
    for dotted in FILE_KEYS:
        section, key = dotted.split(".")
        value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            tree[section][key] = str(base / value)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
