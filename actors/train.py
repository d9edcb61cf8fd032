"""Runs a fluxir Recipe data-parallel on Ray Train (V2 API) with a DeepSpeed engine per worker.

Checkpoints are DeepSpeed checkpoints: every rank writes its shards into `.tmp-checkpoint_N` in the run's
storage, rank 0 renames the complete folder to `checkpoint_N`, and Ray Train registers that folder as it
is; a folder under its final name is complete. A rerun with the same run_dir/name resumes from the latest
one and removes a `.tmp-` folder left by a run that died while saving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray._common.network_utils import build_address
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
from ray.train.v2.api.callback import UserCallback

from actors.runtime import host_rendezvous, threads_for, worker_env_vars
from fluxir.files import remove_incomplete, replace_dir, write_error

log = logging.getLogger(__name__)

STATE_FILE = "fluxir_state.json"
PROGRESS_POLL_S = 0.5
ON_ANOTHER_RANK = "on another rank"


# ---------------------------------------------------------------- DeepSpeed config


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_ds_config(source: dict | str | os.PathLike, overrides: dict | None = None) -> dict:
    """A DeepSpeed config from a dict or JSON path, deep-merged with ``overrides``.

    E.g. ``load_ds_config("configs/deepspeed/zero2_cpu.json", {"optimizer": {"params": {"lr": 3e-4}}})``.
    """
    config = dict(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    config = _deep_merge(config, overrides or {})
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]  # derived by DeepSpeed from micro batch x accumulation x world
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError("run_training does one optimizer step per recipe batch: gradient_accumulation_steps must be 1")
    return config


# ---------------------------------------------------------------- worker side


def _import_deepspeed():
    """Import DeepSpeed, on its CPU accelerator when this worker has no GPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _deepspeed_checkpoint_types() -> list:
    """The non-tensor types DeepSpeed's ZeRO-1/2/3 checkpoints hold besides containers of tensors and numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
        raise pickle.UnpicklingError(f"{path}: refused, it holds more than weights and DeepSpeed's own state "
                                     f"({reason.strip()})") from None


def weights_only_loads(engine) -> None:
    """Make a DeepSpeed engine load checkpoints weights-only: a planted checkpoint file cannot run code."""
    engine.checkpoint_engine.load = _weights_only_load


def _build_engine(recipe, ds_config: dict):
    import torch.distributed as dist

    deepspeed = _import_deepspeed()
    # Ray Train already created the (gloo) process group; DeepSpeed wraps it instead of making one.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    model = recipe.build_model()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=recipe.trainable_parameters(model),
        config=ds_config,
        dist_init_required=False,
    )
    weights_only_loads(engine)
    return engine


def _engine_facts(engine) -> dict[str, Any]:
    """Which accelerator and collective backend DeepSpeed really ended up on (reported once per log line)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    return {"accelerator": get_accelerator().device_name(), "dist_backend": str(dist.get_backend()),
            "zero_stage": engine.zero_optimization_stage()}


def _restore(engine, ema=None) -> int:
    """Load Ray Train's latest checkpoint into the engine (and the weight average); return the step to
    continue from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        load_path, client_state = engine.load_checkpoint(directory, tag=state["tag"])
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint tag {state['tag']!r} in {checkpoint.path}")
    if ema is not None:
        if "ema" not in (client_state or {}):
            raise RuntimeError(f"pretrain.ema_decay is set but checkpoint {checkpoint.path} holds no weight "
                               f"average (it was written without one); resume with the same settings")
        ema.load_state_dict(client_state["ema"])
    log.info("resumed from %s at step %d", checkpoint.path, state["step"])
    return int(state["step"])


def _report_checkpoint(engine, step: int, metrics: dict, ema=None) -> None:
    """The ranks' DeepSpeed shards into `.tmp-checkpoint_N` beside the run's checkpoints, renamed whole to
    `checkpoint_N` by rank 0, then registered with Ray Train where it lies (no copy)."""
    import torch.distributed as dist

    context = ray.train.get_context()
    name, tag, rank0 = f"checkpoint_{step:08d}", f"step{step:08d}", context.get_world_rank() == 0
    root = Path(context.get_storage().experiment_fs_path)
    tmp, final = root / f".tmp-{name}", root / name
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(tmp), tag=tag, client_state={"ema": ema.state_dict()} if ema else {})
        dist.barrier()
        if rank0:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "tag": tag}))
            replace_dir(tmp, final)
    except Exception as err:
        raise write_error(tmp, err) from err
    dist.barrier()
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(final)), checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _report(engine, step: int, metrics: dict, is_checkpoint: bool, ema=None) -> None:
    """Metrics only on log steps; DeepSpeed checkpoint plus metrics on checkpoint steps."""
    if is_checkpoint:
        _report_checkpoint(engine, step, metrics, ema)
    else:
        ray.train.report(metrics)


def _global_loss(loss, step: int, logs: dict[str, float]) -> float:
    """Mean loss over ranks; raises on any rank's NaN/inf so that no rank steps on it."""
    import torch
    import torch.distributed as dist

    total = loss.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"non-finite loss (NaN/inf) at step {step}: loss={loss.item()} logs={logs}")
    if not torch.isfinite(total).all():
        raise RuntimeError(f"non-finite loss (NaN/inf) at step {step} {ON_ANOTHER_RANK} (summed loss={total.item()})")
    return total.item() / dist.get_world_size()


def _quiet_report_log() -> None:
    """Ray Train V2 logs every report at INFO on a logger named by its file path; keep progress readable."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # layout of a future Ray
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train loop: one recipe batch, one DeepSpeed step; the step is the data cursor."""
    import torch

    from fluxir.accel import to_device, training_attention
    from fluxir.recipe import load_recipe

    _quiet_report_log()
    torch.set_num_threads(cfg["threads"])  # the worker's CPU share: one worker that owns the cores uses them all
    training_attention()
    started = time.perf_counter()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    recipe = load_recipe(cfg["recipe_path"], cfg["config"])
    engine = _build_engine(recipe, cfg["ds_config"])
    if hasattr(recipe, "place"):  # optional hook: the recipe's own modules (a VAE codec) beside the engine
        recipe.place(engine.device)
    ema = _weight_average(engine, cfg["ema_decay"])
    start = step = _restore(engine, ema)
    base = {"start_step": start, "engine_startup_s": time.perf_counter() - started, **_engine_facts(engine)}
    window_start, window_steps = time.perf_counter(), 0
    while step < cfg["steps"]:
        batch = to_device(recipe.batch(step, rank, world), engine.device)
        loss, logs = recipe.loss(engine, batch)
        mean_loss = _global_loss(loss, step, logs)
        engine.backward(loss)
        engine.step()
        if ema is not None:
            ema.update()
        step, window_steps = step + 1, window_steps + 1
        is_checkpoint = step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]
        if is_checkpoint or step % cfg["log_every"] == 0:
            rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
            metrics = {**base, **logs, "loss": mean_loss, "step": step, "steps_per_s": rate}
            _report(engine, step, metrics, is_checkpoint, ema)
            window_start, window_steps = time.perf_counter(), 0
    if start >= cfg["steps"]:
        if start > cfg["steps"]:
            log.warning("checkpoint is at step %d, past steps=%d: saving it as is", start, cfg["steps"])
        ray.train.report({**base, "step": step})  # nothing left to train: keep the last checkpoint
    _save_model(recipe, engine, rank, cfg["model_dir"], ema)


def _weight_average(engine, decay: float):
    """The moving average of the trainable weights (None when `decay` is 0). Under ZeRO-2 every rank holds
    the full weights, so every rank keeps the same average; ZeRO-3 partitions them and is refused."""
    if not decay:
        return None
    if engine.zero_optimization_stage() == 3:
        raise ValueError("pretrain.ema_decay needs full weights on each rank: use ZeRO stage <= 2")
    from fluxir.ema import WeightAverage

    return WeightAverage(engine.module.named_parameters(), decay)


def full_parameters(engine):
    """A block in which every rank holds the full parameters: gathered under ZeRO-3, else as they are."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _save_model(recipe, engine, rank: int, directory: str, ema=None) -> None:
    """Rank 0 hands the unwrapped module to the recipe (all ranks join the ZeRO-3 gather). With a weight
    average, `directory` gets the average and `<directory>-raw` the last weights."""
    with full_parameters(engine):
        if rank != 0:
            return
        if ema is None:
            recipe.save_model(engine.module, directory)
            return
        recipe.save_model(engine.module, f"{directory}-raw")
        with ema.swapped_in():
            recipe.save_model(engine.module, directory)


# ---------------------------------------------------------------- driver side


@ray.remote(num_cpus=0)
class _MetricsInbox:
    """Holds metrics reported by the Train controller until the driver picks them up."""

    def __init__(self):
        self._items: list[dict] = []

    def push(self, metrics: dict) -> None:
        self._items.append(metrics)

    def drain(self) -> list[dict]:
        items, self._items = self._items, []
        return items


class _ForwardMetrics(UserCallback):
    """Runs in the Train controller actor: forwards rank 0's reported metrics to the inbox."""

    def __init__(self, inbox):
        self._inbox = inbox

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            # Waited on so that every report is in the inbox before the run can end (~1 ms each).
            try:
                ray.get(self._inbox.push.remote(dict(metrics[0])), timeout=30)
            except Exception:  # progress is best effort; never fail the run over it
                log.warning("could not forward metrics to the driver", exc_info=True)


class _ProgressPump:
    """Calls ``progress`` on the driver (from a helper thread) with each reported metrics dict."""

    def __init__(self, progress: Callable[[dict], None]):
        self._progress = progress
        self.inbox = _MetricsInbox.remote()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxir-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self._deliver()  # whatever arrived after the last poll
        ray.kill(self.inbox)

    def _run(self):
        while not self._done.wait(PROGRESS_POLL_S):
            self._deliver()

    def _deliver(self):
        for metrics in ray.get(self.inbox.drain.remote()):
            try:
                self._progress(metrics)
            except Exception:  # a broken progress bar must not kill the run
                log.exception("progress callback failed")


def _root_cause(error: Exception) -> str:
    """The workers' own error messages out of Ray Train's wrapper."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        messages = dict.fromkeys(_message(exc) for _, exc in sorted(failures.items()))
        return "\n".join(sorted(messages, key=lambda m: ON_ANOTHER_RANK in m))  # the culprit rank first
    controller_failure = getattr(error, "controller_failure", None)
    return _message(controller_failure) if controller_failure else str(error)


def _message(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def _set_aside(run_path: Path) -> None:
    """resume=False on an existing run: keep the old run, renamed, so that Ray Train starts fresh."""
    if run_path.exists():
        aside = run_path.with_name(f"{run_path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("resume=False: moving existing run %s to %s", run_path, aside)
        run_path.rename(aside)


class _NodeAddressRendezvous(_TorchBackend):
    """Ray Train's torch backend with rank 0's rendezvous on its node's Ray address only (see
    `actors.runtime.host_rendezvous`) instead of torch's store on every interface."""

    def on_start(self, worker_group, backend_config) -> None:
        host, port = worker_group.execute_single(0, host_rendezvous)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   init_method=f"tcp://{build_address(host, port)}",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class NodeAddressTorchConfig(TorchConfig):
    """TorchConfig whose process group meets on rank 0's node address only (backend must be given)."""

    @property
    def backend_cls(self):
        return _NodeAddressRendezvous


def _fit_off_the_main_thread(trainer):
    """`trainer.fit()` on a helper thread, so that Ctrl-C stays a KeyboardInterrupt here. On the main thread
    Ray Train installs its own SIGINT handler, which swallows the first two presses, exits 0 on the third
    and stays installed after the run."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="fluxir-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_training(
    recipe_path: str,
    config: dict,
    *,
    run_dir: str,
    name: str,
    steps: int,
    num_workers: int,
    ds_config: dict | str,
    checkpoint_every: int,
    keep_checkpoints: int,
    resume: bool = True,
    log_every: int = 10,
    resources_per_worker: dict[str, float] | None = None,
    progress: Callable[[dict], None] | None = None,
    max_failures: int = 0,
    ema_decay: float = 0.0,
) -> dict:
    """Train ``recipe_path`` (``"module:Class"`` built with ``config``) for ``steps`` DeepSpeed steps.

    With ``resume`` a run already in ``run_dir/name`` continues from its latest checkpoint
    (Ray Train V2 restores it from the run's storage by itself). Returns the final metrics, the
    latest checkpoint path, the directory ``save_model`` wrote to and the wall seconds. With ``ema_decay``
    the workers keep a moving average of the trainable weights (checkpointed with the engine), saved as
    the model; the last raw weights go to ``<model>-raw``.
    Needs Ray initialised (see ``actors.runtime.init_ray``).
    """
    if checkpoint_every < 1 or log_every < 1 or steps < 1:
        raise ValueError("steps, checkpoint_every and log_every must be >= 1")
    storage = Path(run_dir).resolve()
    run_path = storage / name
    if not resume:
        _set_aside(run_path)
    remove_incomplete(run_path, ".tmp-checkpoint_*")
    model_dir = run_path / "model"
    cfg = {
        "recipe_path": recipe_path,
        "config": config,
        "ds_config": load_ds_config(ds_config),
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
        "model_dir": str(model_dir),
        "ema_decay": ema_decay,
    }
    resources = dict(resources_per_worker or {"CPU": 1})
    cfg["threads"] = threads_for(resources)
    use_gpu = resources.get("GPU", 0) > 0  # one GPU per rank: NCCL and DeepSpeed's CUDA accelerator
    worker_vars = {**worker_env_vars(), "OMP_NUM_THREADS": str(cfg["threads"])}
    if not use_gpu:
        worker_vars["DS_ACCELERATOR"] = "cpu"
    pump = _ProgressPump(progress) if progress else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg,
        torch_config=NodeAddressTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=str(storage),
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[_ForwardMetrics(pump.inbox)] if pump else None,
            worker_runtime_env={"env_vars": worker_vars},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    try:
        with pump or contextlib.nullcontext():
            result = _fit_off_the_main_thread(trainer)
    except ray.train.TrainingFailedError as error:
        raise RuntimeError(f"training run {name!r} failed: {_root_cause(error)}") from error
    wall_s = time.perf_counter() - started
    metrics = dict(result.metrics or {})
    log.info("run %s finished at step %s in %.1fs", name, metrics.get("step"), wall_s)
    return {
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model_dir": str(model_dir),
        "wall_s": wall_s,
    }
