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
