"""Tests of fluxir.data: bundled images, file loading with bad-image handling, the training stream,
textured crop selection and the frozen test set."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from fluxir.data import (
    BadImageError, ImageFolderSource, PairedFolderSource, TextureMap, TrainStream, bundled_images,
    evaluation_set, gradient_magnitude, in_memory_set, load_image, load_testset, materialise_testset, mix_seed,
    save_image, textured_crops,
)
from fluxir.degradations import TASKS, degrade


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- bundled images


def test_bundled_splits_disjoint_rgb_unit_range():
    train, test, heldout = bundled_images("train"), bundled_images("test"), bundled_images("heldout")
    assert len(train) >= 5 and [n for n, _ in test] == ["china", "flower"]
    assert [n for n, _ in heldout] == ["grace_hopper"]
    names = [n for n, _ in train + test + heldout]
    assert len(set(names)) == len(names)
    assert not {"immunohistochemistry", "hubble_deep_field"} & set(names)  # photographs only
    for _, img in train + test + heldout:
        assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
        assert float(img.min()) >= 0 and float(img.max()) <= 1 and float(img.std()) > 0.05
    test_sums = {round(float(img.sum()), 2) for _, img in test}
    assert not any(round(float(img.sum()), 2) in test_sums for _, img in train)
    half = dict(bundled_images("test", scale=0.5))["china"]
    assert half.shape == (3, 214, 320)  # 427x640 halved
    with pytest.raises(ValueError, match="unknown split"):
        bundled_images("val")


# ---------------------------------------------------------------- loading and bad images


def _bad_files(folder):
    """One file of each bad kind; returns {file name: expected reason fragment}."""
    (folder / "corrupt.png").write_bytes(b"this is not a PNG at all")
    whole = _png(folder / "whole.png", _rgb(64, 64)).read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    rgba = np.dstack([_rgb(), np.full((32, 32), 255, np.uint8)])
    rgba[:5, :5, 3] = 0
    _png(folder / "transparent.png", rgba)
    _png(folder / "tiny.png", _rgb(8, 8))
    nan = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    nan[3, 4, 1] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan, photometric="rgb")
    (folder / "sub").mkdir(exist_ok=True)
    np.save(folder / "sub" / "inf.npy", np.where(np.isnan(nan), np.inf, nan))
    return {"corrupt.png": "unreadable", "truncated.png": "unreadable", "transparent.png": "transparent",
            "tiny.png": "smaller than min_size", "nan.tif": "NaN or inf", "sub/inf.npy": "NaN or inf"}


def test_load_image_conversions(tmp_path):
    grey = np.random.default_rng(2).integers(0, 256, (20, 24), dtype=np.uint8)
    img = load_image(_png(tmp_path / "grey.png", grey))
    assert img.shape == (3, 20, 24)
    for c in range(3):
        np.testing.assert_allclose(img[c].numpy(), grey / 255, atol=1e-7)
    deep = (np.arange(20 * 24).reshape(20, 24) * 97 % 65536).astype(np.uint16)
    img16 = load_image(_png(tmp_path / "deep.png", deep))
    np.testing.assert_allclose(img16[0].numpy(), deep / 65535, atol=1e-7)
    rgb = _rgb(20, 24)
    opaque = load_image(_png(tmp_path / "opaque.png", np.dstack([rgb, np.full((20, 24), 255, np.uint8)])))
    np.testing.assert_allclose(opaque.permute(1, 2, 0).numpy(), rgb / 255, atol=1e-7)
    floats = np.random.default_rng(3).random((20, 24, 3)).astype(np.float32)
    np.save(tmp_path / "ok.npy", floats)
    np.testing.assert_array_equal(load_image(tmp_path / "ok.npy").permute(1, 2, 0).numpy(), floats)
    with pytest.raises(BadImageError, match=r"tiny\.png: size 8x8 is smaller than min_size=16"):
        load_image(_png(tmp_path / "tiny.png", _rgb(8, 8)), min_size=16)


def test_folder_skips_each_bad_image_with_a_warning(tmp_path, caplog):
    expected = _bad_files(tmp_path)
    _png(tmp_path / "good.png", _rgb())
    _png(tmp_path / "sub" / "grey.png", _rgb()[..., 0])
    with caplog.at_level(logging.WARNING, logger="fluxir.data"):
        source = ImageFolderSource(tmp_path, min_size=16)
    assert [n for n, _ in source.images] == ["good.png", "sub/grey.png"]
    assert source.images[1][1].shape == (3, 32, 32)
    assert torch.equal(source.images[1][1][0], source.images[1][1][2])
    skipped = {p.relative_to(tmp_path).as_posix(): reason for p, reason in source.skipped}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
        warnings = [r for r in caplog.records
                    if r.levelno == logging.WARNING and str(tmp_path / name) in r.getMessage()]
        assert len(warnings) == 1, name


def test_all_bad_or_empty_folder_raises_naming_it(tmp_path):
    bad = tmp_path / "all_bad_images"
    bad.mkdir()
    _bad_files(bad)
    message = r"no usable images in folder .*all_bad_images \(6 image files found, 6 skipped"
    with pytest.raises(ValueError, match=message):
        ImageFolderSource(bad)
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing_here"):
        ImageFolderSource(empty)


def test_paired_folder_skips_broken_pairs(tmp_path, caplog):
    for sub in ("LQ", "GT"):
        _png(tmp_path / "denoise" / sub / "ok.png", _rgb(seed=4))
    _png(tmp_path / "denoise" / "LQ" / "lonely.png", _rgb())
    _png(tmp_path / "denoise" / "LQ" / "sized.png", _rgb(32, 32))
    _png(tmp_path / "denoise" / "GT" / "sized.png", _rgb(36, 32))
    _png(tmp_path / "denoise" / "LQ" / "broken.png", _rgb())
    (tmp_path / "denoise" / "GT" / "broken.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="fluxir.data"):
        pairs = PairedFolderSource(tmp_path)
    assert pairs.tasks == ("denoise",)
    assert [(n, t) for n, t, _, _ in pairs.items] == [("ok.png", "denoise")]
    assert len(pairs.skipped) == 3
    for name in ("LQ/lonely.png", "LQ/sized.png", "GT/broken.png"):
        assert any(str(tmp_path / "denoise" / name) in r.getMessage() for r in caplog.records), name


# ---------------------------------------------------------------- training stream


@pytest.fixture(scope="module")
def stream_images():
    g = torch.Generator().manual_seed(0)
    return [(f"img{i}", torch.rand(3, 40 + 8 * i, 56, generator=g)) for i in range(3)]


def test_train_stream_reproducible_and_rank_distinct(stream_images):
    stream = TrainStream(stream_images, ["denoise", "sr", "underwater"], crop=32, batch_size=6, seed=7)
    b = stream.batch(5, rank=1, world_size=2)
    assert b["lq"].shape == b["gt"].shape == (6, 3, 32, 32)
    assert b["task"].dtype == b["seed"].dtype == torch.int64 and b["task"].shape == (6,)
    again = TrainStream(stream_images, ["denoise", "sr", "underwater"], crop=32, batch_size=6, seed=7).batch(5, 1, 2)
    for key in b:
        assert torch.equal(b[key], again[key]), key
    for other in (stream.batch(5, rank=0, world_size=2), stream.batch(6, rank=1, world_size=2)):
        assert not torch.equal(other["seed"], b["seed"]) and not torch.equal(other["gt"], b["gt"])
    # the cursor is just the global sample index: step 1 of rank 0 of 2 == step 2 of a single rank
    assert torch.equal(stream.batch(1, 0, 2)["gt"], stream.batch(2, 0, 1)["gt"])
    other_seed = TrainStream(stream_images, ["denoise", "sr", "underwater"], 32, 6, seed=8).batch(5, 1, 2)
    assert not torch.equal(other_seed["gt"], b["gt"])


def test_train_stream_content(stream_images):
    stream = TrainStream(stream_images, ["sr", "desnow"], crop=32, batch_size=16, seed=0)
    batches = [stream.batch(s) for s in range(4)]
    tasks = torch.cat([b["task"] for b in batches])
    assert set(tasks.tolist()) == {TASKS.index("sr"), TASKS.index("desnow")}
    b = batches[0]
    for i in range(16):
        expected = degrade(TASKS[int(b["task"][i])], b["gt"][i : i + 1], b["seed"][i : i + 1])[0]
        torch.testing.assert_close(b["lq"][i], expected, atol=1e-5, rtol=0)
    # every GT crop is a flipped/rotated window of some source image (random pixels: corners are unique)
    for crop in b["gt"]:
        variants = [torch.rot90(crop, k, (1, 2)) for k in range(4)]
        variants += [v.flip(-1) for v in variants]
        found = 0
        for _, im in stream_images:
            for v in variants:
                for t, l in (im == v[:, :1, :1]).all(dim=0).nonzero().tolist():
                    found += torch.equal(im[:, t : t + 32, l : l + 32], v)
        assert found == 1


def test_texture_map_window_means_equal_direct_means():
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(3))
    grad, texture = gradient_magnitude(image), TextureMap(image)
    tops, lefts = torch.tensor([0, 5, 24]), torch.tensor([0, 17, 34])
    direct = torch.stack([grad[t:t + 16, l:l + 16].mean() for t, l in zip(tops.tolist(), lefts.tolist())])
    torch.testing.assert_close(texture.window_mean(tops, lefts, 16), direct, atol=1e-5, rtol=0)


def test_texture_weighting_prefers_textured_windows():
    """Half flat, half noise: uniform crops land on the noise about half the time, texture-weighted ones
    (8 candidates, floor 0.2) far more often, yet flat crops still appear."""
    image = torch.full((3, 64, 256), 0.5)
    image[:, :, 128:] = torch.rand(3, 64, 128, generator=torch.Generator().manual_seed(0))

    def textured_share(candidates):
        stream = TrainStream([("half", image)], ["denoise"], crop=16, batch_size=200, seed=1,
                             texture_candidates=candidates)
        gt = stream.batch(0)["gt"]
        return float((gt.flatten(1).std(1) > 0.05).float().mean())

    uniform, weighted = textured_share(1), textured_share(8)
    assert 0.35 < uniform < 0.7
    assert weighted > 0.9 and weighted < 1.0


def test_rescaled_crops_are_resized_windows(stream_images):
    stream = TrainStream(stream_images, ["sr"], crop=16, batch_size=8, seed=2, rescale=(0.5, 0.5))
    assert stream.window(16, 0.5) == 32
    b = stream.batch(0)
    assert b["gt"].shape == (8, 3, 16, 16)
    # a 32-px window averaged down to 16 px is smoother than a raw 16-px window of noise
    raw = TrainStream(stream_images, ["sr"], crop=16, batch_size=8, seed=2).batch(0)["gt"]
    assert float(b["gt"].std()) < 0.8 * float(raw.std())
    with pytest.raises(ValueError, match="rescale"):
        TrainStream(stream_images, ["sr"], crop=16, batch_size=8, seed=2, rescale=(0.7, 0.3))
    with pytest.raises(ValueError, match="no training image is at least 128x128"):
        TrainStream(stream_images, ["sr"], crop=32, batch_size=8, seed=2, rescale=(0.25, 1.0))


def test_uniform_stream_draws_are_unchanged(stream_images):
    """One candidate and no rescaling draw exactly what the uniform stream always drew."""
    g = torch.Generator().manual_seed(mix_seed(7, 0))
    which = int(torch.randint(3, (1,), generator=g))
    h, w = stream_images[which][1].shape[-2:]
    top, left = int(torch.randint(h - 31, (1,), generator=g)), int(torch.randint(w - 31, (1,), generator=g))
    k = int(torch.randint(8, (1,), generator=g))
    gt, _, _ = TrainStream(stream_images, ["sr"], crop=32, batch_size=1, seed=7).sample(0)
    window = stream_images[which][1][:, top:top + 32, left:left + 32]
    expected = torch.rot90(window, k % 4, dims=(-2, -1))
    assert torch.equal(gt, expected.flip(-1) if k >= 4 else expected)


def test_validation_and_heldout_sets():
    from fluxir.config import load_config

    cfg = load_config("configs/smoke.yaml", ["data.val_crops_per_image=1"])
    val = evaluation_set(cfg, "val")
    assert set(val) == set(cfg.data.tasks)
    d = val["sr"]
    assert d["lq"].shape == d["gt"].shape == (len(bundled_images("train")), 3, 32, 32)
    assert torch.equal(d["gt"], (d["gt"] * 255).round() / 255)  # 8-bit, as the PNG test set
    assert torch.equal(in_memory_set(cfg, "val")["sr"]["lq"], d["lq"])  # deterministic
    held = evaluation_set(cfg, "heldout")
    assert held["denoise"]["names"] == ["grace_hopper_0.png"]
    with pytest.raises(ValueError, match="unknown evaluation split"):
        evaluation_set(cfg, "train")


def test_train_stream_rejects_bad_crop(stream_images):
    with pytest.raises(ValueError, match="multiple of 4"):
        TrainStream(stream_images, ["sr"], crop=30, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="unknown task 'dehaze'"):
        TrainStream(stream_images, ["dehaze"], crop=32, batch_size=2, seed=0)


# ---------------------------------------------------------------- textured crops


def test_textured_crops_prefers_texture():
    image = torch.full((3, 128, 128), 0.5)
    image[:, 64:96, 32:64] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    image[:, 8:40, 80:112] += 0.05 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert textured_crops(image, 32, 1) == [(64, 32)]
    boxes = textured_crops(image, 32, 3)
    assert boxes[:2] == [(64, 32), (8, 80)]
    for i, (t1, l1) in enumerate(boxes):
        for t2, l2 in boxes[i + 1 :]:
            assert abs(t1 - t2) >= 32 or abs(l1 - l2) >= 32


# ---------------------------------------------------------------- frozen test set

SPEC = dict(crop=32, crops_per_image=2, seed=5, scale=0.5)


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    return materialise_testset(tmp_path_factory.mktemp("sets") / "frozen", **SPEC)


def test_testset_round_trip(testset):
    manifest = json.loads((testset / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["spec"]["tasks"] == list(TASKS)
    assert len(manifest["pairs"]) == 7 * 2 * 2
    loaded = load_testset(testset)
    assert list(loaded) == list(TASKS)
    sources = dict(bundled_images("test", scale=SPEC["scale"]))
    for task, d in loaded.items():
        assert d["lq"].shape == d["gt"].shape == (4, 3, 32, 32)
        assert d["names"] == ["china_0.png", "china_1.png", "flower_0.png", "flower_1.png"]
        redone = degrade(task, d["gt"], d["seeds"])
        assert float((redone - d["lq"]).abs().max()) <= 1 / 255 + 1e-6, task
    for pair in manifest["pairs"][:4]:
        top, left, h, w = pair["box"]
        gt = loaded[pair["task"]]["gt"][loaded[pair["task"]]["names"].index(pair["name"])]
        window = sources[pair["source"]][:, top : top + h, left : left + w]
        assert float((window - gt).abs().max()) <= 0.5 / 255 + 1e-6
        assert float(window.std()) > 0.05, "test crops must be textured"


def test_testset_idempotent_and_rejects_other_spec(testset):
    files = sorted(p for p in testset.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert materialise_testset(testset, **SPEC) == testset
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert sorted(p for p in testset.rglob("*") if p.is_file()) == files
    with pytest.raises(ValueError, match=r"frozen was built with spec .*delete the folder or choose another"):
        materialise_testset(testset, **{**SPEC, "seed": 6})
    assert [p.name for p in testset.parent.iterdir()] == ["frozen"], "no temporary build folder left behind"


def test_stale_testset_is_refused_naming_the_task(testset, tmp_path):
    """A set whose LQ no longer matches what the current degradation makes of its GT and seed (built by an
    older version of the code) is refused on reuse instead of silently scoring against other inputs."""
    import shutil

    stale = shutil.copytree(testset, tmp_path / "frozen")
    lq = stale / "denoise" / "LQ" / "china_1.png"
    save_image(load_image(lq, min_size=1).flip(-1), lq)  # what an older noise model might have produced
    with pytest.raises(ValueError, match=r"is stale: denoise LQ of \['china_1.png'\] \(1 of 4\)"):
        materialise_testset(stale, **SPEC)
