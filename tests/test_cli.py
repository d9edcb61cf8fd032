"""The command line: help for every subcommand, config errors with dotted paths, the smoke pipeline end to end."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from actors.cli import build_parser, main
from fluxir.data import save_image
from fluxir.degradations import TASKS

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["run", "pretrain", "rl", "distill", "sweep", "submit", "eval", "restore", "export", "weights",
               "embed-prompts", "testset"]


def _top_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_subcommand(capsys):
    parser_names = list(build_parser()._subparsers._group_actions[0].choices)
    assert parser_names == SUBCOMMANDS  # a new subcommand is added here too, so its help is tested
    out = _top_help(capsys)
    for name in SUBCOMMANDS:
        assert f"    {name} " in out.replace("\n", " \n")


def test_help_for_run_names_every_stage(capsys):
    line = " ".join(_top_help(capsys).split("    run ", 1)[1].split("    pretrain ", 1)[0].split())
    for stage in ("stage 0", "stage 1", "controls", "stage 2", "held-out", "report", "export"):
        assert stage in line, (stage, line)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: fluxir " + name in capsys.readouterr().out


def test_bad_config_key_exits_2_naming_the_path(capsys):
    assert main(["testset", str(ROOT / "configs/smoke.yaml"), "data.crop_size=32"]) == 2
    err = capsys.readouterr().err
    assert "data.crop_size" in err and "unknown key" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "actors", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "pretrain" in out.stdout
    # the installed `fluxir` script: an install older than pyproject.toml's [project.scripts] names a moved module
    script = Path(sysconfig.get_path("scripts")) / "fluxir"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "pretrain" in out.stdout, out.stderr[-2000:]


@pytest.fixture(scope="module")
def smoke_run(cluster_smoke_run, ray_session):
    """`fluxir run configs/smoke.yaml`, submitted with `ray job submit` to a `ray start` head (conftest.py;
    tests/test_cluster.py checks the job itself). The tests here read its outputs and run later stages
    on the test session's own local Ray."""
    assert cluster_smoke_run.status == "SUCCEEDED", cluster_smoke_run.logs[-4000:]
    return cluster_smoke_run.run_dir, cluster_smoke_run.args


def test_run_writes_report_table_and_grids(smoke_run):
    run_dir, _ = smoke_run
    report = (run_dir / "report.md").read_text()
    for task in ("sr", "deblur", "lowlight", "underwater", "denoise", "raindrop", "desnow"):
        assert f"| {task} |" in report
        assert (run_dir / "images" / f"{task}.png").stat().st_size > 1000
    assert "BasicSR convention" in report and "LPIPS: unavailable" in report
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result["nfe"]) == {1, 2}
    assert all(e["lq"]["psnr"] > 5 for e in result["tasks"].values())
    assert (run_dir / "pretrain" / "model" / "policy.safetensors").is_file()
    from fluxir.export import verify_export

    choice = json.loads((run_dir / "distill" / "choice.json").read_text())
    manifest = verify_export(run_dir / "export")  # `fluxir run` ends with the export: stage 2's choice
    assert manifest["source"]["policy_dir"] == str((run_dir / choice["policy_dir"]).resolve())
    assert manifest["default_budget"] == choice["budget"] and manifest["source"]["choice"] == choice["name"]


def test_run_includes_stage1_with_wandb_offline(smoke_run):
    run_dir, _ = smoke_run
    report = (run_dir / "report.md").read_text()
    assert "## Stage 1: RL trajectory optimisation" in report
    assert "| task | LQ input | stage-0 base | RL |" in report
    assert (run_dir / "rl" / "model" / "policy.safetensors").is_file()
    assert (run_dir / "rl_gap.png").stat().st_size > 1000
    card = json.loads((run_dir / "rl" / "model" / "policy.json").read_text())
    assert (card["stage"], card["version"]) == ("rl", 3)
    offline = list((run_dir / "rl" / "wandb").glob("offline-run-*"))
    assert offline, "wandb offline run missing"


def test_run_includes_stage2_students_per_budget(smoke_run):
    """Stage 2 of `fluxir run`: teacher = the RL policy, per budget a Tune-trained student and its two
    controls, the searched schedules, all evaluated; the export choice judged on validation."""
    from fluxir.flow import check_schedule
    from fluxir.rollouts import read_parquet, schedule_of

    run_dir, _ = smoke_run
    report = (run_dir / "report.md").read_text()
    assert "## Stage 2: trajectory distillation" in report and "| 4 | teacher N=4 |" in report
    assert "| 2 | control: GT-only fine-tune |" in report and "Did distillation pay" in report
    result = json.loads((run_dir / "distill.json").read_text())
    assert sorted(result["students"]) == ["1", "2"]
    for k, student in result["students"].items():
        card = json.loads((Path(student["model_dir"]) / "policy.json").read_text())
        assert card["budget"] == int(k) and card["step"] == 4 and len(check_schedule(card["schedule"])) == int(k) + 1
        assert card["arm"] == "student" and card["schedule_kind"] == "searched"
        assert card["schedule"] == result["schedules"]["searched"][k]
        assert set(result["evals"]["students"][k]["nfe"]) == {int(k)}
        controls = result["controls"][k]
        assert controls["gt-only"]["params"]["teacher_weight"] == 0 and controls["gt-only"]["schedule"] == card["schedule"]
        if card["schedule"] == result["schedules"]["uniform"][k]:  # the uniform control would be the student itself
            assert "uniform-student" not in controls and f"K={k}: searched" in report and "not trained twice" in report
        else:
            assert controls["uniform-student"]["schedule"] == result["schedules"]["uniform"][k]
        assert set(result["evals"]["controls"][k]) == set(controls)
    assert set(result["evals"]["teacher"]["nfe"]) == {1, 2, 4}
    assert result["searched"]["2"]["evaluations"] >= 1
    teacher = json.loads((run_dir / "distill" / "teacher.json").read_text())
    assert teacher["identity"]["teacher"].endswith("rl/model")
    table = read_parquet(run_dir / "distill" / "teacher_calibration.parquet")
    assert table.num_rows == 16 and schedule_of(table)[0] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert tuple(table.column("states").type.shape) == (5, 64, 12)
    choice = result["choice"]
    assert choice["metric"] == "psnr" and choice["validation"]["psnr"] >= choice["teacher_validation"]["psnr"]
    assert all(c["budget"] >= choice["budget"] for c in choice["candidates"]
               if c["validation"]["psnr"] >= choice["teacher_validation"]["psnr"])


@pytest.mark.slow  # ~20 s: a Tune sweep and its restore; CI runs it (`make test-slow`)
def test_two_trial_sweep_with_asha_and_resume(smoke_run):
    """`fluxir sweep` on a real local Ray: 2 trials (budgets 1, 2), the Pareto table, best per budget, then
    each best student's two controls with its settings; `--resume` restores the finished experiments
    instead of training again."""
    run_dir, args = smoke_run
    sweep = str(ROOT / "configs/sweeps/smoke.yaml")
    assert main(["sweep", *args[1:], "--sweep", sweep]) == 0
    result = json.loads((run_dir / "sweep.json").read_text())
    assert result["trials"] == 6 and result["errored"] == 0
    students = [r for r in result["rows"] if r["params"]["arm"] == "student"]
    assert sorted(r["params"]["budget"] for r in students) == [1, 2]
    assert all(r["params"]["schedule"] == "learned" for r in students)
    for student in students:
        controls = {r["params"]["arm"]: r["params"] for r in result["rows"]
                    if r["params"]["arm"] != "student" and r["params"]["budget"] == student["params"]["budget"]}
        assert sorted(controls) == ["gt-only", "uniform-student"]
        assert controls["uniform-student"] == {**student["params"], "arm": "uniform-student", "schedule": "uniform"}
        assert controls["gt-only"] == {**student["params"], "arm": "gt-only", "teacher_weight": 0.0}
    schedules = json.loads((run_dir / "sweep" / "schedules.json").read_text())
    assert sorted(schedules) == ["1", "2"] and schedules["1"] == [1.0, 0.0]
    for k in (1, 2):
        assert (run_dir / "sweep" / "best" / f"K{k}" / "policy.safetensors").is_file()
    report = (run_dir / "sweep_report.md").read_text()
    assert "Best student per budget, its controls" in report and "stopped early by ASHA" in report
    assert "| 2 | control: uniform-schedule student |" in report
    assert (run_dir / "sweep_pareto.png").stat().st_size > 1000
    stamp = {p: p.stat().st_mtime for p in (run_dir / "sweep").glob("*trials/**/trainer.pt")}
    assert len(stamp) >= 6
    assert main(["sweep", *args[1:], "--sweep", sweep, "--resume"]) == 0
    assert {p: p.stat().st_mtime for p in (run_dir / "sweep").glob("*trials/**/trainer.pt")} == stamp


@pytest.mark.slow  # ~40 s: a second stage-0 start; CI runs it (`make test-slow`)
def test_pretrain_resumes_from_the_last_checkpoint(smoke_run):
    """Asking the finished 6-step run for 8 steps continues at step 6 from its DeepSpeed checkpoint."""
    from actors.pretrain import run_pretrain
    from fluxir.config import load_config

    run_dir, args = smoke_run
    cfg = load_config(args[1], args[2:] + ["pretrain.steps=8"])
    out = run_pretrain(cfg, show_progress=False)
    assert (out["metrics"]["start_step"], out["metrics"]["step"]) == (6, 8)
    assert sorted(p.name for p in (run_dir / "pretrain").glob("checkpoint_0*")) == [
        "checkpoint_00000006", "checkpoint_00000008"]  # keep_checkpoints = 2


def test_run_reports_the_held_out_photo_and_eval_scores_any_split(smoke_run, tmp_path):
    run_dir, args = smoke_run
    report = (run_dir / "report.md").read_text()
    assert "## On the held-out photo" in report and "Worse than the input:" in report
    held = json.loads((run_dir / "heldout.json").read_text())
    assert set(held) == {"base", "rl"} and set(held["base"]["tasks"]) == set(TASKS)
    out = tmp_path / "val.json"
    assert main(["eval", *args[1:], "--split", "val", "--nfe", "1", "--out", str(out)]) == 0
    val = json.loads(out.read_text())
    entry = val["tasks"]["denoise"]
    assert val["nfe"] == [1] and entry["count"] == 7  # one crop of each training photo
    assert len(entry["nfe"]["1"]["per_image"]["psnr"]) == 7
    assert entry["nfe"]["1"]["psnr"] == pytest.approx(sum(entry["nfe"]["1"]["per_image"]["psnr"]) / 7)


def test_restore_one_image(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    image = torch.rand(3, 37, 45)  # odd size: padded, tiled, cropped back
    save_image(image, tmp_path / "in.png")
    assert main(["restore", "--policy", str(run_dir / "pretrain/model"), "--task", "denoise",
                 str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    from fluxir.data import load_image

    out = load_image(tmp_path / "out.png")
    assert out.shape == (3, 37, 45)


def test_restore_refuses_a_corrupt_image(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["restore", "--policy", str(run_dir / "pretrain/model"), "--task", "sr", str(bad),
                 str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and err.count("\n") == 1


def test_wandb_offline_runs_hold_figures_and_images(smoke_run):
    """Offline wandb (the default): the pipeline's summary run holds the test-set means, the before/after
    grids, the reward-gap and Pareto plots; stage 0 logged its loss curve."""
    run_dir, _ = smoke_run
    (report,) = (run_dir / "report" / "wandb").glob("offline-run-*")
    media = [p.name for p in (report / "files" / "media" / "images").rglob("*.png")]
    for key in ("before_after/denoise", "rl_gap", "distill_pareto"):
        assert any(n.startswith(key.split("/")[-1]) for n in media), (key, media)
    assert list((run_dir / "pretrain" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "distill_pareto.png").stat().st_size > 1000


def test_export_of_the_run_and_restore_from_it(smoke_run, tmp_path):
    """`fluxir export` picks stage 2's choice and carries its test-set means; `--budget 1` the 1-step
    student; `restore --model` uses the export."""
    run_dir, _ = smoke_run
    choice = json.loads((run_dir / "distill" / "choice.json").read_text())
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    k = str(choice["budget"])
    assert manifest["default_budget"] == choice["budget"] and manifest["budgets"][k]["times"] == choice["schedule"]
    assert manifest["budgets"][k]["metrics"]["psnr"] == pytest.approx(choice["test"]["psnr"]) and choice["test"]["psnr"] > 5
    assert main(["export", str(run_dir), str(tmp_path / "k1"), "--budget", "1"]) == 0
    manifest = json.loads((tmp_path / "k1" / "manifest.json").read_text())
    assert manifest["source"]["stage"] == "distill" and manifest["default_budget"] == 1
    assert manifest["budgets"]["1"]["metrics"]["psnr"] > 5
    image = torch.rand(3, 40, 40)
    save_image(image, tmp_path / "in.png")
    assert main(["restore", "--model", str(out), "--task", "sr", str(tmp_path / "in.png"),
                 str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()
