"""Report tables: values, means and win marks computed from an evaluation result."""
from fluxir.report import metric_table, wins


def _result():
    return {"nfe": [1, 4], "convention": "c", "tasks": {
        "sr": {"lq": {"psnr": 20.0, "lpips": 0.30}, "nfe": {1: {"psnr": 21.0, "lpips": 0.35}, 4: {"psnr": 19.0, "lpips": 0.20}}, "count": 2},
        "denoise": {"lq": {"psnr": 10.0, "lpips": 0.50}, "nfe": {1: {"psnr": 16.0, "lpips": 0.40}, 4: {"psnr": 15.0, "lpips": 0.60}}, "count": 2},
    }}


def test_psnr_table_marks_wins_and_averages():
    table = metric_table(_result(), "psnr").splitlines()
    assert table[2] == "| sr | 20.00 | **21.00** | 19.00 |"
    assert table[3] == "| denoise | 10.00 | **16.00** | **15.00** |"
    assert table[4] == "| **mean** | 15.00 | 18.50 | 17.00 |"


def test_lower_is_better_for_lpips():
    table = metric_table(_result(), "lpips").splitlines()
    assert table[2] == "| sr | 0.3000 | 0.3500 | **0.2000** |"
    assert wins(_result(), 4, "lpips") == ["sr"]
    assert wins(_result(), 1, "psnr") == ["sr", "denoise"]
    assert wins(_result(), 4, "psnr") == ["denoise"]


def _per_image_eval(shift: float) -> dict:
    values = {"sr": [20.0, 21.0, 22.0], "denoise": [25.0, 24.0, 26.0]}
    return {"nfe": [1], "tasks": {t: {"nfe": {1: {"per_image": {"psnr": [x + shift for x in v]}}}}
                                  for t, v in values.items()}}


def test_paired_table_gives_the_interval_and_the_verdict():
    from fluxir.report import paired_table

    table = paired_table({"rl": _per_image_eval(0.5), "rl-fm": _per_image_eval(0.0), "base": _per_image_eval(0.5)},
                         "rl", ["psnr"])
    lines = table.splitlines()
    assert lines[0] == "| rl minus | PSNR NFE 1 |"
    assert lines[2] == "| control: flow matching | +0.5000 [+0.5000, +0.5000] ✓ |"
    assert lines[3] == "| stage-0 base | +0.0000 [+0.0000, +0.0000] |"


def test_each_objective_gets_the_controls_that_isolate_it():
    from actors.pipeline import control_configs
    from fluxir.config import load_config

    def names(objective):
        return sorted(control_configs(load_config("configs/smoke.yaml", [f"rl.objective={objective}"]), 30.0))

    assert names("rsr") == ["rl-backprop", "rl-fm", "rl-k1", "rl-shuffled"]
    assert names("nft") == names("grpo") == ["rl-backprop", "rl-fm", "rl-shuffled"]
    shuffled = control_configs(load_config("configs/smoke.yaml", ["rl.objective=nft"]), 30.0)["rl-shuffled"]
    assert shuffled.rl.shuffle_rewards and shuffled.rl.objective == "nft" and shuffled.rl.max_seconds == 30.0
