"""fluxir.stats: the paired, task-stratified bootstrap behind every "A beats B" in the docs."""
import numpy as np
import pytest

from fluxir.stats import bootstrap, compare, verdict


def _result(values: dict[str, list[float]], nfe: int = 1) -> dict:
    return {"tasks": {t: {"lq": {"per_image": {"psnr": v}}, "nfe": {str(nfe): {"per_image": {"psnr": v}}}}
                      for t, v in values.items()}}


def test_a_constant_shift_is_found_exactly_and_noise_straddles_zero():
    rng = np.random.default_rng(0)
    base = {t: list(rng.normal(20, 2, 12)) for t in ("sr", "denoise")}
    shifted = {t: [x + 0.3 for x in v] for t, v in base.items()}
    r = compare(_result(shifted), _result(base), 1, "psnr", 1, 2000)
    assert r["mean"] == pytest.approx(0.3) and r["lo"] == pytest.approx(0.3) and r["hi"] == pytest.approx(0.3)
    noise = {t: list(np.asarray(v) + rng.normal(0, 1, 12)) for t, v in base.items()}
    r = compare(_result(noise), _result(base), 1, "psnr", 1, 2000)
    assert r["lo"] < r["mean"] < r["hi"] and r["lo"] < 0.5 and r["hi"] > -0.5


def test_the_mean_is_over_tasks_not_images():
    diffs = {"a": np.full(2, 1.0), "b": np.zeros(10)}
    assert bootstrap(diffs, 100)[0] == pytest.approx(0.5)


def test_different_sets_are_refused():
    with pytest.raises(ValueError, match="not of the same set"):
        compare(_result({"sr": [1.0, 2.0]}), _result({"sr": [1.0]}), 1, "psnr", 1, 10)


def test_verdict_reads_the_metric_direction():
    assert verdict(0.1, 0.3, "psnr") == "A better" and verdict(0.1, 0.3, "lpips") == "B better"
    assert verdict(-0.3, -0.1, "lpips") == "A better" and verdict(-0.1, 0.2, "ssim") == "no difference shown"
