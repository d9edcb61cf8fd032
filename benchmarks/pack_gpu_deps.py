"""Pack what the GPU machine lacks for fluxir's Ray path into one folder small enough to carry to it.

    .venv/bin/python benchmarks/pack_gpu_deps.py [--out build/gpu-deps] [--cache build/gpu-deps-cache]
    .venv/bin/python benchmarks/pack_gpu_deps.py --emulate -- .venv/bin/fluxir pretrain configs/smoke.yaml ...

The GPU machine runs Python 3.12 on x86-64 with torch, peft, pyarrow and most of the scientific stack,
but without Ray, DeepSpeed, diffusers or pydantic, and it reaches no package index. This script
- downloads the cp312 manylinux wheels of what it lacks (`PACKED`), at constraints.txt's pins and without
  their dependencies, and builds DeepSpeed's pure-Python wheel from its sdist (DeepSpeed publishes none);
- checks every requirement of those wheels (Ray's with its train and tune extras) and of fluxir itself:
  each must be packed, on the GPU machine (`GPU_MACHINE`) or named in `NOT_NEEDED` with the reason;
- slims Ray: unpacks its wheel with the file modes kept (raylet and gcs_server are executables), drops
  what fluxir never loads (`RAY_DROP`) and packs the rest as tar.xz;
- writes `<out>/wheels/*.whl`, `<out>/ray-<version>-slim.tar.xz` and `<out>/manifest.json` and prints
  every size, with the repository files that travel beside them, against the 64 MiB one call carries.

fluxir needs no packing: the working tree travels with every call, fluxir and actors import from it, and
`configs/` is found beside the package of a source checkout. benchmarks/ray_gpu_check.py installs the
folder on the GPU machine and runs stages 0 and 1 there.

`--emulate -- CMD` runs CMD here with an import guard in every Python process it starts, Ray's workers
included: a module of a distribution that is neither on the GPU machine nor packed, or a part of Ray the
slim copy drops, cannot be imported. It checks the packed set against what the code imports, on the CPU
path and with this machine's versions; the refused imports are printed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "gpu-deps"
DEFAULT_CACHE = ROOT / "build" / "gpu-deps-cache"
MIB = 2 ** 20
CARRY_LIMIT = 64 * MIB  # what one call of the device tool carries: the working tree plus carried paths

PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MARKERS = {"python_version": PYTHON, "python_full_version": PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "platform_release": "", "platform_version": "", "implementation_version": PYTHON + ".3"}

# What the GPU machine lacks and the Ray path imports, with the reason each is packed.
PACKED = {
    "ray": "stages 0-2 run on Ray (core, train, tune)",
    "deepspeed": "the engine of Ray Train's workers and of the RL learners",
    "diffusers": "FluxTransformer2DModel and the VAE classes",
    "peft": "LoRA, at the pinned version (the GPU machine's may differ)",
    "pydantic": "fluxir's config, DeepSpeed's config and Ray Train",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs >= 4.16; the GPU machine's version is not known",
    "hjson": "DeepSpeed reads its config with it",
    "jsonschema": "ray.runtime_env imports it",
    "jsonschema-specifications": "jsonschema",
    "referencing": "jsonschema",
    "rpds-py": "jsonschema",
}
SDIST_ONLY = ("deepspeed",)
RAY_EXTRAS = ("train", "tune")
# Parts of Ray's wheel that fluxir never loads: Java workers' jars, RLlib, Serve, Ray's LLM library, the
# dashboard's web client (ray_gpu_check runs with ray.dashboard=false). The guard refuses their modules.
RAY_DROP = ("ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/dashboard/client")
RAY_DROPPED_MODULES = ("ray.rllib", "ray.serve", "ray.llm")
# Requirements that are neither packed nor on the GPU machine, and why the GPU check does without them.
NOT_NEEDED = {
    "tensorboardx": "Ray Tune's TensorBoard logger, which Tune skips when tensorboardX is missing",
    "importlib-metadata": "diffusers imports it only on Python < 3.8",
    "lpips": "fluxir's LPIPS metric: off in configs/smoke.yaml (eval.lpips false, no LPIPS reward)",
    "wandb": "fluxir's tracker: the GPU check runs with wandb.mode=disabled",
}

# fluxir's pins that the GPU machine overrides with its own CUDA builds (constraints.txt pins the CPU install).
MACHINE_OWN = {"torch": "2.11.0+cu130", "torchvision": "0.26.0"}

# The Python packages of the GPU machine's image (python3 3.12.3; torch 2.11.0+cu130).
GPU_MACHINE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
# Versions known there; the others are checked on the GPU machine itself (ray_gpu_check.py).
GPU_MACHINE_VERSIONS = {"torch": "2.11.0", "numpy": "2.5.2", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
                        "safetensors": "0.8.0", "accelerate": "1.15.0", "tokenizers": "0.23.2",
                        "torchvision": "0.26.0", "triton": "3.6.0"}


def normalize(name: str) -> str:
    """A distribution name in its comparable form (PEP 503): `Pydantic_Core` -> `pydantic-core`."""
    return re.sub(r"[-_.]+", "-", name).lower()


GPU_MACHINE = frozenset(normalize(n) for n in GPU_MACHINE_LIST.split())


# ------------------------------------------------------------------------------------------ files

def read_pins(constraints: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, by normalized name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def repo_travel_bytes(root: Path = ROOT) -> dict[str, int]:
    """Bytes of the repository files that travel with every call: tracked, and untracked but not ignored."""
    def listed(*args: str) -> int:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True).stdout
        return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())
    return {"tracked": listed(), "untracked": listed("--others", "--exclude-standard")}


# ------------------------------------------------------------------------------------------ wheels

def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def find_wheel(folder: Path, name: str, version: str) -> Path:
    """The wheel of `name` at `version` in `folder`."""
    for path in sorted(folder.glob("*.whl")):
        dist, ver = path.name.split("-")[:2]
        if normalize(dist) == name and ver == version:
            return path
    raise FileNotFoundError(f"no wheel of {name}=={version} in {folder}")


def download_wheels(names: list[str], pins: dict[str, str], cache: Path) -> dict[str, Path]:
    """The GPU machine's wheels (cp312, manylinux x86-64) of `names` at their pins, without dependencies."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
        *platforms, "-d", str(cache), *(f"{n}=={pins[n]}" for n in names))
    return {n: find_wheel(cache, n, pins[n]) for n in names}


def build_sdist_wheel(name: str, version: str, cache: Path) -> Path:
    """A pure-Python wheel built here from the sdist (DeepSpeed: no ops compiled, so it fits any machine;
    its CUDA ops are compiled where they run, on first use)."""
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu"}
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(cache), f"{name}=={version}", env=env)
    wheel = find_wheel(cache, name, version)
    if not wheel.name.endswith("-py3-none-any.whl"):
        raise RuntimeError(f"{wheel.name} is not a pure-Python wheel")
    return wheel


def check_no_prebuilt_ops(wheel: Path) -> None:
    """DeepSpeed's wheel must carry no compiled ops: ops built here would not load on the GPU machine."""
    with zipfile.ZipFile(wheel) as z:
        info = z.read("deepspeed/git_version_info_installed.py").decode()
    ops = re.search(r"installed_ops=(\{.*?\})", info)
    if ops is None or "True" in ops.group(1):
        raise RuntimeError(f"{wheel.name} was built with compiled ops ({ops.group(1) if ops else info[:200]}); "
                           f"rebuild it with DS_BUILD_OPS=0")


def wheel_metadata(wheel: Path):
    """The METADATA of a wheel, as an email message."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(name).decode())


def requirements(wheel: Path, extras: tuple[str, ...] = ()) -> list:
    """The wheel's requirements that apply on the GPU machine's Python, with `extras`."""
    from packaging.requirements import Requirement

    reqs = []
    for raw in wheel_metadata(wheel).get_all("Requires-Dist") or []:
        req = Requirement(raw)
        if req.marker is None or any(req.marker.evaluate({**MARKERS, "extra": e}) for e in ("", *extras)):
            reqs.append(req)
    return reqs


def fluxir_requirements(root: Path = ROOT) -> list:
    """fluxir's own dependencies (pyproject.toml)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def judge(req, owner: str, packed: dict[str, str]) -> tuple[str, str]:
    """('ok' | 'machine's own' | 'unverified' | 'not needed' | 'missing', why) for one requirement of `owner`."""
    name, spec = normalize(req.name), req.specifier
    if name in MACHINE_OWN:
        return "machine's own", f"{req.name}{spec} (for {owner}): the GPU machine's {MACHINE_OWN[name]} is used"
    if name in packed:
        ok = spec.contains(packed[name], prereleases=True)
        return ("ok", "") if ok else ("missing", f"{owner} needs {req}; packed {packed[name]}")
    if name in GPU_MACHINE:
        if name in GPU_MACHINE_VERSIONS:
            have = GPU_MACHINE_VERSIONS[name]
            return ("ok", "") if spec.contains(have, prereleases=True) else \
                ("missing", f"{owner} needs {req}; GPU machine has {have}")
        return ("unverified", f"{req.name}{spec} (for {owner})") if str(spec) else ("ok", "")
    if name in NOT_NEEDED:
        return "not needed", f"{req.name} (for {owner}): {NOT_NEEDED[name]}"
    return "missing", f"{owner} needs {req}: neither packed nor on the GPU machine"


def check_closure(wheels: dict[str, Path], packed: dict[str, str]) -> dict[str, list[str]]:
    """Every requirement of the packed wheels and of fluxir, judged (see `judge`); 'ok' ones left out."""
    verdicts: dict[str, list[str]] = {"missing": [], "machine's own": [], "unverified": [], "not needed": []}
    pairs = [(req, "fluxir") for req in fluxir_requirements()]
    for name, wheel in wheels.items():
        pairs += [(req, name) for req in requirements(wheel, RAY_EXTRAS if name == "ray" else ())]
    for req, owner in pairs:
        verdict, why = judge(req, owner, packed)
        if verdict != "ok" and why not in verdicts[verdict]:
            verdicts[verdict].append(why)
    return verdicts


# ------------------------------------------------------------------------------------------ Ray

def unpack_wheel(wheel: Path, dest: Path) -> None:
    """Unzip a wheel into `dest` as pip lays it out, keeping each file's mode (executables stay executable)."""
    with zipfile.ZipFile(wheel) as z:
        if any(n.split("/")[0].endswith(".data") for n in z.namelist()):
            raise RuntimeError(f"{wheel.name} has a .data folder; install it with pip instead")
        for info in z.infolist():
            path = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)


def slim(root: Path, drop: tuple[str, ...] = RAY_DROP) -> dict[str, int]:
    """Remove `drop` (paths relative to `root`); returns the bytes each one held."""
    removed = {}
    for rel in drop:
        path = root / rel
        if path.exists():
            removed[rel] = tree_bytes(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def pack_xz(root: Path, archive: Path) -> None:
    """Everything under `root` into `archive` (tar.xz, xz's strongest preset), paths relative to `root`."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    partial.replace(archive)


def slim_ray(wheel: Path, out: Path, work: Path, previous: dict) -> dict:
    """Ray's wheel unpacked, slimmed and xz-packed into `out`; the sizes of each step. An archive of the same
    wheel and drop list from an earlier run (`previous`, its manifest entry) is kept as it is."""
    digest = sha256(wheel)
    archive = out / f"ray-{wheel.name.split('-')[1]}-slim.tar.xz"
    for stale in out.glob("ray-*-slim.tar.xz*"):  # another version's archive, or a partial one
        if stale != archive:
            stale.unlink()
    if previous.get("wheel_sha256") == digest and previous.get("drop") == list(RAY_DROP) and archive.is_file() \
            and sha256(archive) == previous.get("sha256"):
        print(f"kept {archive.name} (same wheel, same drop list)", flush=True)
        return previous
    site = work / "ray-site"
    shutil.rmtree(site, ignore_errors=True)
    unpack_wheel(wheel, site)
    unpacked = tree_bytes(site)
    dropped = slim(site)
    slimmed = tree_bytes(site)
    print(f"xz-packing the slim Ray ({slimmed / MIB:.1f} MiB; a few minutes)...", flush=True)
    pack_xz(site, archive)
    shutil.rmtree(site)
    return {"wheel": wheel.name, "wheel_sha256": digest, "wheel_bytes": wheel.stat().st_size,
            "unpacked_bytes": unpacked, "drop": list(RAY_DROP), "dropped_bytes": dropped, "slim_bytes": slimmed,
            "archive": archive.name, "archive_bytes": archive.stat().st_size, "sha256": sha256(archive)}


# ------------------------------------------------------------------------------------------ packing

def gather_wheels(pins: dict[str, str], cache: Path) -> dict[str, Path]:
    """Every packed distribution's wheel, by name (downloaded or built into `cache`)."""
    missing = [n for n in PACKED if n not in pins]
    if missing:
        raise SystemExit(f"pack_gpu_deps: constraints.txt pins none of {missing}")
    binary = [n for n in PACKED if n not in SDIST_ONLY]
    wheels = download_wheels(binary, pins, cache)
    for name in SDIST_ONLY:
        wheels[name] = build_sdist_wheel(name, pins[name], cache)
    check_no_prebuilt_ops(wheels["deepspeed"])
    return wheels


def copy_wheels(wheels: dict[str, Path], folder: Path) -> list[dict]:
    """The wheels other than Ray's into `folder` (emptied first); name, bytes and sha256 of each."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    listed = []
    for name, wheel in sorted(wheels.items()):
        if name != "ray":
            target = folder / wheel.name
            shutil.copy2(wheel, target)
            listed.append({"file": f"wheels/{wheel.name}", "bytes": target.stat().st_size, "sha256": sha256(target)})
    return listed


def size_rows(manifest: dict, out: Path) -> list[tuple[str, int]]:
    """(what, bytes) for the printed table."""
    ray, travel = manifest["ray"], manifest["repo_bytes"]
    carried = tree_bytes(out)
    repo = travel["tracked"] + travel["untracked"]
    return [("ray wheel (zip, as downloaded)", ray["wheel_bytes"]),
            ("ray unpacked", ray["unpacked_bytes"]),
            *((f"  dropped {rel}", b) for rel, b in ray["dropped_bytes"].items()),
            ("ray slim, unpacked", ray["slim_bytes"]),
            (f"ray slim, {ray['archive']}", ray["archive_bytes"]),
            (f"other wheels ({len(manifest['wheels'])})", sum(w["bytes"] for w in manifest["wheels"])),
            (f"carried folder {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", carried),
            ("repo: tracked files", travel["tracked"]),
            ("repo: untracked, not ignored", travel["untracked"]),
            ("total per call (limit 64 MiB)", carried + repo)]


def print_sizes(rows: list[tuple[str, int]]) -> None:
    print(f"{'what':<48} {'bytes':>12} {'MiB':>8}")
    for what, n in rows:
        print(f"{what:<48} {n:>12} {n / MIB:>8.2f}")


def print_closure(verdicts: dict[str, list[str]]) -> None:
    for verdict in ("machine's own", "not needed", "unverified", "missing"):
        for line in verdicts[verdict]:
            print(f"{verdict}: {line}")


def pack(out: Path, cache: Path) -> dict:
    """Everything above; returns the manifest (also written to `<out>/manifest.json`)."""
    pins = read_pins(ROOT / "constraints.txt")
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()).get("ray", {}) if manifest_path.is_file() else {}
    wheels = gather_wheels(pins, cache)
    packed = {n: pins[n] for n in PACKED}
    verdicts = check_closure(wheels, packed)
    manifest = {"python": PYTHON, "platforms": list(PLATFORMS), "packed": packed, "reasons": PACKED,
                "wheels": copy_wheels(wheels, out / "wheels"), "ray": slim_ray(wheels["ray"], out, cache, previous),
                "machine_own": verdicts["machine's own"], "not_needed": verdicts["not needed"],
                "unverified": verdicts["unverified"],
                "fluxir": "not packed: fluxir/, actors/ and configs/ travel with the working tree",
                "repo_bytes": repo_travel_bytes()}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print_closure(verdicts)
    print_sizes(size_rows(manifest, out))
    if verdicts["missing"]:
        raise SystemExit("pack_gpu_deps: requirements neither packed nor on the GPU machine (see 'missing' above)")
    return manifest


# ------------------------------------------------------------------------------------------ emulation

class GpuMachineGuard(importlib.abc.MetaPathFinder):
    """Refuses to import a module whose distribution the GPU machine would not have (neither there nor packed),
    or a part of Ray that the slim copy drops; notes each refusal in `log` (one `pid name` line)."""

    def __init__(self, allowed: set[str], owners: dict[str, list[str]], log: str | None):
        self.allowed, self.owners, self.log = allowed, owners, log

    def refused(self, name: str) -> bool:
        if any(name == m or name.startswith(m + ".") for m in RAY_DROPPED_MODULES):
            return True
        dists = self.owners.get(name.partition(".")[0])
        return bool(dists) and not any(normalize(d) in self.allowed for d in dists)

    def find_spec(self, name, path=None, target=None):
        if not self.refused(name):
            return None
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine, nor packed)", name=name)


def install_guard() -> None:
    """Put the guard first on this process's import path (called from the emulation's sitecustomize). The
    probes libraries make before an optional import, `importlib.util.find_spec` and
    `importlib.metadata.distribution` (behind `version`), answer as on the GPU machine: not there."""
    import importlib.metadata
    import importlib.util

    also = filter(None, os.environ.get("FLUXIR_GUARD_ALSO", "").split(","))
    allowed = set(GPU_MACHINE) | set(PACKED) | {"fluxir"} | set(also)
    guard = GpuMachineGuard(allowed, importlib.metadata.packages_distributions(), os.environ.get("FLUXIR_GUARD_LOG"))
    sys.meta_path.insert(0, guard)
    find_spec, distribution = importlib.util.find_spec, importlib.metadata.distribution

    def probe_spec(name, package=None):
        return None if guard.refused(importlib.util.resolve_name(name, package)) else find_spec(name, package)

    def probe_distribution(name):
        if normalize(name) not in allowed:
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    importlib.util.find_spec, importlib.metadata.distribution = probe_spec, probe_distribution


SITECUSTOMIZE = """import sys
sys.path.insert(0, {bench!r})
import pack_gpu_deps
pack_gpu_deps.install_guard()
del sys.path[0]
"""


def local_dependencies(roots: set[str]) -> set[str]:
    """Distributions that this machine's versions of `roots` need, transitively. The GPU machine's own versions
    bring what they need, which may differ from this machine's (another HTTP client, say)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen, todo = set(roots), list(roots)
    while todo:
        try:
            reqs = [Requirement(r) for r in requires(todo.pop()) or []]
        except PackageNotFoundError:
            continue
        for name in {normalize(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})}:
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen - roots


def emulate(command: list[str]) -> int:
    """Run `command` with the guard in each of its Python processes; print what was refused; its exit code."""
    also = sorted(local_dependencies(set(GPU_MACHINE) - set(PACKED)) - set(PACKED) - GPU_MACHINE)
    with tempfile.TemporaryDirectory(prefix="fluxir-guard-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(SITECUSTOMIZE.format(bench=str(Path(__file__).parent)))
        log = Path(tmp, "refused.txt")
        paths = [tmp, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "FLUXIR_GUARD_LOG": str(log),
               "FLUXIR_GUARD_ALSO": ",".join(also)}
        print(f"emulate: also allowed, as what this machine's versions of the GPU machine's packages need: "
              f"{also}", flush=True)
        code = subprocess.run(command, env=env).returncode
        names = sorted({line.split(" ", 1)[1] for line in log.read_text().splitlines()} if log.is_file() else set())
    print(f"emulate: exit {code}; imports refused (not on the GPU machine, nor packed): {names or 'none'}")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder to carry (default build/gpu-deps)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="downloads and work files, not carried (default build/gpu-deps-cache)")
    p.add_argument("--emulate", action="store_true", help="run the command after -- under the import guard")
    p.add_argument("command", nargs=argparse.REMAINDER, help="with --emulate: -- CMD ARGS...")
    args = p.parse_args(argv)
    if args.emulate:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            p.error("--emulate needs a command after --")
        return emulate(command)
    pack(args.out.resolve(), args.cache.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
