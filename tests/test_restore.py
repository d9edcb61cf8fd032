"""`fluxir restore` and the export's restore.py: a failed write never harms an existing file, every bad input
ends in one line on stderr and exit code 2 before the model is loaded, large images show progress. No Ray."""
import errno
import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actors.cli import main
from fluxir.codec import build_codec
from fluxir.config import load_config
from fluxir.data import load_image, save_image
from fluxir.policy import build_policy, save_policy
from fluxir.codec import token_channels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(policy folder, export folder) of the smoke policy with the default's 32 px tiles: `--policy` and
    `--model` targets."""
    cfg = load_config(ROOT / "configs/smoke.yaml", ["eval.tile=32"])
    policy = build_policy(cfg, token_channels(build_codec(cfg)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():  # a fresh x0-residual policy returns its input; make it restore something
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run = tmp_path_factory.mktemp("run")
    save_policy(policy, run / "rl" / "model", cfg, {"stage": "rl"})
    export = tmp_path_factory.mktemp("exports") / "model"
    assert main(["export", str(run), str(export)]) == 0
    return run / "rl" / "model", export


class Restore:
    """`fluxir restore --policy`, `fluxir restore --model` or the export's restore.py (`kind`), run in this
    process: `restore(*args)` -> exit code; `forbid_loading()` makes loading the model fail the test."""

    def __init__(self, kind: str, policy_dir: Path, export: Path, folder: Path, monkeypatch):
        self.kind, self.monkeypatch = kind, monkeypatch
        if kind == "standalone":
            script = folder / "exported_restore.py"  # a copy: no bytecode cache lands in the export
            shutil.copyfile(export / "restore.py", script)
            spec = importlib.util.spec_from_file_location("exported_restore", script)
            self.module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.module)
            self.argv = ["--model", str(export), "--task", "denoise"]
        else:
            target = ["--policy", str(policy_dir)] if kind == "policy" else ["--model", str(export)]
            self.argv = ["restore", *target, "--task", "denoise"]

    def __call__(self, *args: str) -> int:
        return (self.module.main if self.kind == "standalone" else main)([*self.argv, *args])

    def forbid_loading(self) -> None:
        def refuse(*_, **__):
            raise AssertionError("the model was loaded before the inputs were checked")

        if self.kind == "standalone":
            self.monkeypatch.setattr(self.module, "load_model", refuse)
        else:
            self.monkeypatch.setattr("fluxir.export.load_export", refuse)
            self.monkeypatch.setattr("fluxir.policy.load_trained", refuse)


@pytest.fixture(params=["policy", "model", "standalone"])
def restore(request, trained, tmp_path_factory, monkeypatch):
    return Restore(request.param, *trained, tmp_path_factory.mktemp("script"), monkeypatch)


def _png(path: Path, array: np.ndarray, **params) -> Path:
    Image.fromarray(array).save(path, **params)
    return path


def _photo(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _one_line_naming(err: str, name: str, after_progress: bool = False) -> None:
    if after_progress:  # the progress bar's line comes first
        err = err.split("\n", 1)[1]
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert name in err, err


# ---------------------------------------------------------------- writing the output


def _failing_png_encoder(monkeypatch):
    """PNG saving that writes part of the file, then fails as a full disk does."""
    def encode(im, fp, filename):
        fp.write(b"\x89PNG\r\n\x1a\n" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setitem(Image.SAVE, "PNG", encode)


def test_a_failed_write_leaves_the_existing_output_as_it_was(restore, tmp_path, monkeypatch, capsys):
    source = _png(tmp_path / "in.png", _photo())
    target = _png(tmp_path / "out.png", _photo(seed=1))
    before, files = target.read_bytes(), sorted(os.listdir(tmp_path))
    _failing_png_encoder(monkeypatch)
    assert restore(str(source), str(target)) == 2
    _one_line_naming(capsys.readouterr().err, "out.png", after_progress=True)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == files  # no partial file left beside it


def test_save_image_replaces_the_target_whole(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(torch.rand(3, 16, 20), target)
    before = target.read_bytes()
    _failing_png_encoder(monkeypatch)
    with pytest.raises(ValueError, match="out.png: not written .*No space left on device"):
        save_image(torch.rand(3, 16, 20), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]
    monkeypatch.undo()
    image = torch.rand(3, 16, 20)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    save_image(image, link)  # through a symlink: the file it points to is replaced, the link stays
    assert link.is_symlink() and torch.equal(load_image(target), (image * 255).round() / 255)


def test_output_must_not_be_the_input_unless_overwrite(restore, tmp_path, monkeypatch, capsys):
    source = _png(tmp_path / "in.png", _photo())
    before = source.read_bytes()
    (tmp_path / "alias.png").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    restore.forbid_loading()
    for output in ("in.png", str(source), "alias.png", f"../{tmp_path.name}/in.png"):
        assert restore("in.png", output) == 2
        _one_line_naming(capsys.readouterr().err, "--overwrite")
        assert source.read_bytes() == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert restore("--overwrite", "in.png", "alias.png") == 0
    assert (tmp_path / "alias.png").is_symlink() and source.read_bytes() != before
    assert load_image(source).shape == (3, 40, 56)


def test_output_extension_and_folder_are_checked_first(restore, tmp_path, capsys):
    source = _png(tmp_path / "in.png", _photo())
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "file").write_text("x")
    restore.forbid_loading()
    for output in ("out.xyz", "out", "out.txt", "taken.png", "file/out.png"):
        assert restore(str(source), str(tmp_path / output)) == 2
        _one_line_naming(capsys.readouterr().err, output)
    assert not (tmp_path / "out.xyz").exists()


# ---------------------------------------------------------------- bad inputs


def _bad_inputs(folder: Path) -> dict[str, str]:
    """{file name: what the one-line error must say} for every kind of unusable input."""
    whole_png = _png(folder / "whole.png", _photo(64, 64)).read_bytes()
    (folder / "truncated.png").write_bytes(whole_png[: len(whole_png) // 2])
    whole_jpg = _png(folder / "whole.jpg", _photo(64, 64), quality=90).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole_jpg[: len(whole_jpg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    rgba = np.dstack([_photo(), np.full((40, 56), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    _png(folder / "transparent.png", rgba)
    _png(folder / "small.png", _photo(8, 8))
    return {"missing.png": "no such file", "empty.png": "empty", "truncated.png": "truncated",
            "truncated.jpg": "truncated", "notes.png": "not an image", "transparent.png": "transparent",
            "small.png": "smaller than"}


def test_every_bad_input_is_one_line_and_exit_2_before_loading(restore, tmp_path, capsys):
    restore.forbid_loading()
    for name, says in _bad_inputs(tmp_path).items():
        assert restore(str(tmp_path / name), str(tmp_path / "out.png")) == 2, name
        err = capsys.readouterr().err
        _one_line_naming(err, name)
        assert says in err, err
        assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("nfe", ["0", "-1", "3"])
def test_steps_must_be_a_positive_known_budget(restore, tmp_path, capsys, nfe):
    """`--nfe` (restore.py: `--budget`) 0 or negative is an error before loading, not the default; an export
    refuses a budget it has no schedule for (a `--policy` runs any positive NFE on its configured schedule)."""
    source = _png(tmp_path / "in.png", _photo())
    flag = "--budget" if restore.kind == "standalone" else "--nfe"
    if nfe == "3" and restore.kind == "policy":
        assert restore(flag, nfe, str(source), str(tmp_path / "out.png")) == 0
        return
    if nfe != "3":
        restore.forbid_loading()
    assert restore(flag, nfe, str(source), str(tmp_path / "out.png")) == 2
    _one_line_naming(capsys.readouterr().err, f"{flag} {nfe}")


def test_exif_orientation_is_honoured(restore, tmp_path):
    array = _photo(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    source = _png(tmp_path / "in.png", array, exif=exif.tobytes())
    upright = np.rot90(array, k=-1)
    assert load_image(source).shape == (3, 40, 24)
    np.testing.assert_array_equal((load_image(source) * 255).round().byte().permute(1, 2, 0).numpy(), upright)
    assert restore(str(source), str(tmp_path / "out.png")) == 0
    assert Image.open(tmp_path / "out.png").size == (24, 40)  # (width, height): upright


# ---------------------------------------------------------------- large images


def test_progress_over_tiles_on_stderr(restore, tmp_path, capsys):
    source = _png(tmp_path / "in.png", _photo(80, 120))
    assert restore(str(source), str(tmp_path / "out.png")) == 0
    done = re.findall(r"restore: 100%.* (\d+)/(\d+) ", capsys.readouterr().err)
    assert done and done[-1][0] == done[-1][1] and int(done[-1][0]) > 1, done


def test_thin_image_is_restored_whole(restore, tmp_path):
    """A side shorter than the tile (32 here) is one tile of that side's length, not an error."""
    source = _png(tmp_path / "in.png", _photo(20, 100))
    assert restore(str(source), str(tmp_path / "out.png")) == 0
    assert Image.open(tmp_path / "out.png").size == (100, 20)


def test_fast_tiling_takes_a_quarter_of_the_evaluations_tiles():
    """`--fast` on the default's 1024×768 photo: 32 px tiles overlapping by 3 px (stride 29, odd), not the evaluation's
    17 px (stride 15); tiles the size of the training crop (docs/BENCHMARKS.md, "Speed")."""
    from fluxir.codec import PixelCodec
    from fluxir.evaluate import eval_tiling, fast_tiling
    from fluxir.sampling import tile_boxes

    cfg = load_config(ROOT / "configs/tiny.yaml", [])
    tiling = fast_tiling(cfg, PixelCodec())
    assert tiling == {"tile": 32, "overlap": 3}
    assert len(tile_boxes(768, 1024, **tiling)[2]) == 972
    assert len(tile_boxes(768, 1024, **eval_tiling(cfg))[2]) == 3468
    flux = load_config(ROOT / "configs/tiny.yaml", ["eval.tile=512", "eval.overlap=64"])
    assert fast_tiling(flux, type("Vae", (), {"downsample": 8})()) == {"tile": 512, "overlap": 64}


def test_tiles_go_through_the_model_several_at_a_time(trained, tmp_path, monkeypatch):
    from fluxir import sampling

    batches, real = [], sampling.sample_trajectory

    def counting(policy, lq_tokens, *args, **kwargs):
        batches.append(lq_tokens.shape[0])
        return real(policy, lq_tokens, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_trajectory", counting)
    source = _png(tmp_path / "in.png", _photo(240, 320))  # 108 tiles of 32 px, 64 per forward
    assert main(["restore", "--policy", str(trained[0]), "--task", "sr", str(source), str(tmp_path / "o.png")]) == 0
    assert len(batches) > 1 and min(batches) > 1


@pytest.mark.parametrize("fast", [False, True], ids=["evaluation tiling", "--fast"])
@pytest.mark.parametrize("size", [(20, 24), (20, 100), (45, 70)], ids=["one tile", "thin", "tiled"])
def test_restore_py_tiles_as_fluxir_does(trained, tmp_path, monkeypatch, size, fast):
    from fluxir.evaluate import fast_tiling, restore_image
    from fluxir.export import load_export

    export = trained[1]
    module = Restore("standalone", *trained, tmp_path, monkeypatch).module
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(3))
    policy, codec, cfg, _, schedules = load_export(export)
    ours = restore_image(policy, codec, image, "denoise", cfg, schedules[2],
                         tiling=fast_tiling(cfg, codec) if fast else None)
    theirs = module.restore(module.load_model(export), image, "denoise", 2, fast=fast)
    assert theirs.shape == ours.shape == (3, *size)
    assert (theirs - ours).abs().max() < 1e-4
