"""Ray Train + DeepSpeed (CPU, gloo, ZeRO-2 fp32) on the shared local Ray: learning, saving, resuming, NaN guard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from actors.train import load_ds_config, run_training
from tests.toy_recipe import EVAL_FILE, ToyRegression

log = logging.getLogger(__name__)

RECIPE = "tests.toy_recipe:ToyRegression"
CONFIG = {"seed": 3, "dim": 8, "hidden": 32, "batch_size": 32}
DS_CONFIG = load_ds_config(
    Path(__file__).resolve().parent.parent / "configs/deepspeed/zero2_cpu.json",
    {"optimizer": {"params": {"lr": 1e-2, "weight_decay": 0.0}}},
)
STEPS = 30
EMA_DECAY = 0.8  # the runs keep a weight average: saved as the model, the last weights as model-raw


def _train(run_dir, name, steps, config=CONFIG, progress=None):
    return run_training(
        RECIPE, config, run_dir=str(run_dir), name=name, steps=steps, num_workers=2, ds_config=DS_CONFIG,
        checkpoint_every=10, keep_checkpoints=2, log_every=5, progress=progress, ema_decay=EMA_DECAY,
    )


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return ToyRegression(CONFIG).load_model(model_dir).state_dict()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def straight_run(ray_session, run_dir):
    """An uninterrupted 30-step run, with every metrics dict the driver saw."""
    seen: list[dict] = []
    result = _train(run_dir, "straight", STEPS, progress=seen.append)
    log.info("straight run: %.1fs wall, engine startup %.1fs, %.1f steps/s",
             result["wall_s"], result["metrics"]["engine_startup_s"], result["metrics"]["steps_per_s"])
    return result, seen


def test_two_workers_learn_and_report_progress(straight_run):
    result, seen = straight_run
    assert [m["step"] for m in seen] == [5, 10, 15, 20, 25, 30]
    assert result["metrics"]["step"] == STEPS and result["metrics"]["start_step"] == 0
    assert seen[-1]["loss"] < 0.5 * seen[0]["loss"]
    assert (seen[0]["accelerator"], seen[0]["dist_backend"], seen[0]["zero_stage"]) == ("cpu", "gloo", 2)


def test_checkpoints_hold_every_rank_and_respect_keep(straight_run):
    result, _ = straight_run
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.name == "checkpoint_00000030"
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_00000020", "checkpoint_00000030"]
    shards = sorted(p.name for p in (checkpoint / "step00000030").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO shard per rank, merged into one checkpoint dir
    assert json.loads((checkpoint / "fluxir_state.json").read_text())["step"] == STEPS


def test_saved_model_reloads_and_reproduces_loss(straight_run):
    result, _ = straight_run
    recipe = ToyRegression(CONFIG)
    saved = json.loads((Path(result["model_dir"]) / EVAL_FILE).read_text())["eval_loss"]
    reloaded = recipe.eval_loss(recipe.load_model(result["model_dir"]))
    assert reloaded == pytest.approx(saved, abs=1e-6)
    assert reloaded < 0.5 * recipe.eval_loss(recipe.build_model())


def test_weight_average_is_the_model_and_the_last_weights_are_kept(straight_run):
    model_dir = Path(straight_run[0]["model_dir"])
    average, last = _weights(model_dir), _weights(f"{model_dir}-raw")
    assert set(average) == set(last)
    assert any(not torch.equal(average[k], last[k]) for k in average)
    recipe = ToyRegression(CONFIG)
    assert recipe.eval_loss(recipe.load_model(f"{model_dir}-raw")) < 0.5 * recipe.eval_loss(recipe.build_model())


@pytest.mark.slow  # a second training run from a checkpoint: ~60 s; CI runs it (`make test-slow`)
def test_resume_continues_at_checkpoint_and_matches_straight_run(straight_run, run_dir):
    first = _train(run_dir, "resumed", 20)
    assert first["metrics"]["step"] == 20
    second = _train(run_dir, "resumed", STEPS)
    assert second["metrics"]["start_step"] == 20 and second["metrics"]["step"] == STEPS
    for suffix in ("", "-raw"):  # the weight average resumes from the checkpoint too
        straight = _weights(straight_run[0]["model_dir"] + suffix)
        resumed = _weights(second["model_dir"] + suffix)
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key + suffix)


@pytest.mark.slow  # a third training start (~45 s), kept out of the 8-minute suite; CI runs it (`make test-slow`)
def test_nan_loss_stops_training_and_names_the_step(ray_session, run_dir):
    with pytest.raises(RuntimeError, match=r"(?s)non-finite.*step 3|step 3.*NaN") as info:
        _train(run_dir, "nan", 10, config={**CONFIG, "nan_at_step": 3, "nan_rank": 1})
    assert "NaN" in str(info.value)
    log.info("NaN run failed as it should: %s", info.value)


def test_ds_config_overrides_merge_deeply():
    config = load_ds_config(Path(__file__).resolve().parent.parent / "configs/deepspeed/zero2_cpu.json",
                            {"optimizer": {"params": {"lr": 3e-4}}})
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.999] and config["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        load_ds_config(config, {"gradient_accumulation_steps": 4})


def test_threads_follow_the_cpu_share():
    from actors.runtime import threads_for

    assert [threads_for({"CPU": c}) for c in (0.2, 0.5, 1, 1.2, 2, 8)] == [1, 1, 1, 2, 2, 8]
    assert threads_for({}) == 1 and threads_for({"GPU": 1}) == 1


class _Planted:
    """Unpickling this writes a file: what a planted checkpoint could do in a Ray worker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("code ran",))


def test_deepspeed_checkpoints_load_weights_only(tmp_path):
    """DeepSpeed's own checkpoint types load; a pickle that would run code is refused by file name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from actors.train import _weights_only_load

    honest = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(2)}}}}}, honest)
    assert _weights_only_load(str(honest))["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    planted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "marker"
    torch.save({"module": _Planted(str(marker))}, planted)
    with pytest.raises(Exception, match=f"{planted}: refused"):
        _weights_only_load(str(planted))
    assert not marker.exists()


@pytest.mark.slow  # two training starts (~60 s); CI runs it (`make test-slow`)
def test_resume_refuses_a_planted_checkpoint(ray_session, run_dir):
    _train(run_dir, "planted", 10)
    shard = run_dir / "planted" / "checkpoint_00000010" / "step00000010" / "mp_rank_00_model_states.pt"
    marker = run_dir / "planted-marker"
    torch.save({"module": _Planted(str(marker))}, shard)
    with pytest.raises(RuntimeError, match="mp_rank_00_model_states.pt: refused"):
        _train(run_dir, "planted", 20)
    assert not marker.exists()
