"""fluxir's Ray path on one GPU, with Ray + DeepSpeed + NCCL: run on the GPU machine, from the repository root.

    python3 benchmarks/ray_gpu_check.py --out "$OUT"     # after benchmarks/pack_gpu_deps.py, build/gpu-deps carried

It installs what benchmarks/pack_gpu_deps.py packed (the wheels with `pip install --no-index --no-deps
--target`, the slim Ray unpacked beside them; each file's sha256 checked against the manifest first) into
--site, puts that folder and the repository on PYTHONPATH, and runs `fluxir pretrain` and `fluxir rl` of
configs/smoke.yaml with `overrides`: bf16 under configs/deepspeed/zero2_bf16.json (ZeRO-2), one Ray Train
worker on the GPU, and one colocated stage-1 slot where the learner (0.5 GPU), the rollout actor (0.45) and
the reward worker (0.05) share the GPU. Ray is local and bound to 127.0.0.1; wandb is off.

DeepSpeed compiles its fused Adam for the GPU on first use. It is built once before the stages (at most
--build-timeout-s); when that fails, or with --torch-adam, both stages run on a copy of the JSON with
torch's AdamW, and the log and the summary say so. The whole check stops within --budget-s (540 s).

Writes into --out: ray_gpu_check.log (all output), ray_gpu_check_excerpt.txt (versions, NCCL's
initialisation, each stage's accelerator, backend and ZeRO stage, the steps and iterations) and
ray_gpu_check.json (the same facts). Only the standard library is imported before the install.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/smoke.yaml"
DS_JSON = "configs/deepspeed/zero2_bf16.json"


def overrides(ds_json: str, output_dir: str) -> list[str]:
    """The smoke config on one GPU: stage 0 on one Ray Train worker, stage 1 in one colocated slot."""
    return [
        "name=gpu-check", f"output_dir={output_dir}", "model.dtype=bfloat16", "ray.dashboard=false",
        "wandb.mode=disabled",
        "pretrain.num_workers=1", "pretrain.worker_resources={CPU: 4, GPU: 1}", f"pretrain.deepspeed={ds_json}",
        f"rl.deepspeed={ds_json}", "rl.colocate=true", "rl.num_learners=1", "rl.num_rollout_actors=1",
        "rl.num_reward_workers=1", "rl.learner_resources={CPU: 4, GPU: 0.5}",
        "rl.rollout_resources={CPU: 2, GPU: 0.45}", "rl.reward_resources={CPU: 1, GPU: 0.05}",
    ]


class Log:
    """Echoes each line to stdout and appends it to a file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run(label: str, cmd: list[str], log: Log, env: dict | None = None,
        timeout_s: float = 300) -> tuple[int, float, list[str]]:
    """Run `cmd` with its output logged line by line; kill its process group after `timeout_s`.
    Returns (exit code, seconds, output lines); the code is 124 when it timed out."""
    log(f"ray_gpu_check: {label}")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    lines = []
    for raw in proc.stdout:
        lines.append(raw.rstrip("\n").split("\r")[-1])
        log(lines[-1])
    code = proc.wait()
    timer.cancel()
    seconds = time.perf_counter() - started
    if fired.is_set():
        log(f"ray_gpu_check: timed out after {timeout_s:.0f} s")
        code = 124
    log(f"ray_gpu_check: exit {code} after {seconds:.1f} s")
    return code, seconds, lines


# ------------------------------------------------------------------------------------------ install

def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(deps: Path) -> dict:
    """The packed folder's manifest, after checking every file in it against its sha256."""
    manifest = json.loads((deps / "manifest.json").read_text())
    files = [(w["file"], w["sha256"]) for w in manifest["wheels"]]
    files.append((manifest["ray"]["archive"], manifest["ray"]["sha256"]))
    for rel, digest in files:
        if sha256(deps / rel) != digest:
            raise SystemExit(f"ray_gpu_check: {deps / rel} does not match its sha256 in the manifest; pack again")
    return manifest


def install(deps: Path, site: Path, manifest: dict, log: Log) -> None:
    """The wheels with pip into `site`, then the slim Ray unpacked there (file modes kept)."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    wheels = [str(deps / w["file"]) for w in manifest["wheels"]]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    code, _, _ = run("pip install the packed wheels", [*pip, "--target", str(site), *wheels], log, timeout_s=180)
    if code:
        raise SystemExit("ray_gpu_check: pip could not install the packed wheels")
    with tarfile.open(deps / manifest["ray"]["archive"]) as tar:
        tar.extractall(site, filter="data")
    log(f"ray_gpu_check: installed {len(wheels)} wheels and {manifest['ray']['archive']} into {site}")


def environment(site: Path) -> dict:
    """This process's environment for the stages: the packed folder and the repository first on the path,
    DeepSpeed on CUDA, wandb off, NCCL's initialisation logged, no Ray address inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RAY_ADDRESS")}
    paths = [str(site), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    nvcc = shutil.which("nvcc", path=env["PATH"] + os.pathsep + "/usr/local/cuda/bin")
    if nvcc and "CUDA_HOME" not in env:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parent.parent)
    return env


# ------------------------------------------------------------------------------------------ checks

PREFLIGHT = """
import json, re, sys, importlib.metadata as md, torch
from packaging.requirements import Requirement
packed, skip = json.loads(sys.argv[1])
facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
for name in ("ray", "deepspeed", "diffusers", "peft", "pydantic", "transformers", "numpy", "huggingface-hub"):
    facts[name] = md.version(name)
unmet = []
for name in packed:
    extras = ("", "train", "tune") if name == "ray" else ("",)
    for req in map(Requirement, md.requires(name) or []):
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in skip or req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{name} needs {req.name}{req.specifier}, found {have}")
facts["unmet"] = unmet
import ray, ray.train.torch, ray.tune, deepspeed, diffusers
print("PREFLIGHT " + json.dumps(facts))
"""

FUSED_ADAM = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('FUSED_ADAM ok')"


def preflight(env: dict, packed: list[str], skip: list[str], log: Log, timeout_s: float) -> dict:
    """Versions, the GPU, NCCL's version and the requirements of packed distributions left unmet here (those in
    `skip` are known not to be needed)."""
    status, _, lines = run("preflight: versions, GPU, NCCL, requirements",
                           [sys.executable, "-c", PREFLIGHT, json.dumps([packed, skip])], log, env=env,
                           timeout_s=timeout_s)
    found = [json.loads(line[len("PREFLIGHT "):]) for line in lines if line.startswith("PREFLIGHT ")]
    return {**(found[0] if found else {}), "exit": status}


def torch_adam_json(scratch: Path) -> str:
    """A copy of configs' DeepSpeed JSON with torch's AdamW in place of DeepSpeed's fused Adam."""
    config = json.loads((ROOT / DS_JSON).read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    copy = scratch / "zero2_bf16_torch_adam.json"
    copy.write_text(json.dumps(config, indent=1))
    return str(copy)


def deepspeed_json(env: dict, log: Log, timeout_s: float, scratch: Path, skip_build: bool) -> tuple[str, str]:
    """(the DeepSpeed JSON the stages use, how Adam runs): configs' own JSON when DeepSpeed's fused Adam
    builds here, else a copy of it with torch's Adam."""
    if skip_build:
        log("ray_gpu_check: --torch-adam: FusedAdam not built; the stages use torch's Adam")
        return torch_adam_json(scratch), "torch AdamW (--torch-adam)"
    code, seconds, _ = run("build DeepSpeed's FusedAdam", [sys.executable, "-c", FUSED_ADAM], log, env=env,
                           timeout_s=timeout_s)
    if code == 0:
        return DS_JSON, f"DeepSpeed FusedAdam (built in {seconds:.0f} s)"
    copy = torch_adam_json(scratch)
    log(f"ray_gpu_check: FusedAdam did not build (exit {code}); the stages use torch's Adam ({copy})")
    return copy, "torch AdamW (FusedAdam did not build)"


def fluxir(*args: str) -> list[str]:
    """The `fluxir` command line, from the entry point pyproject.toml names (fluxir is not installed)."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["fluxir"]
    module, function = target.split(":")
    code = f"import sys; from {module} import {function}; sys.argv[0] = 'fluxir'; sys.exit({function}())"
    return [sys.executable, "-c", code, *args]


# ------------------------------------------------------------------------------------------ facts

EXCERPT = re.compile(r"ray_gpu_check:|PREFLIGHT|FUSED_ADAM|NCCL INFO (NCCL version|.*Init COMPLETE|cudaDriverVersion)"
                     r"|learner group|backend|ZeRO|zero_stage|finished at step|pretrained policy|RL: \d+ iterations"
                     r"|Error|error:|Traceback|report: ")
NOISE = re.compile(r"PlacementGroupCleaner|State API may be temporarily unavailable")


def excerpt(lines: list[str]) -> list[str]:
    """The lines worth committing from the full log."""
    return [line for line in lines if EXCERPT.search(line) and not NOISE.search(line)]


def pretrain_facts(run_dir: Path) -> dict:
    """Stage 0's last report as Ray Train stored it: accelerator, collective backend, ZeRO stage, step."""
    snapshot = run_dir / "pretrain" / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return {}
    metrics = json.loads(snapshot.read_text()).get("latest_checkpoint_result", {}).get("metrics", {})
    keys = ("accelerator", "dist_backend", "zero_stage", "step", "loss", "steps_per_s", "engine_startup_s")
    return {k: metrics[k] for k in keys if k in metrics}


def rl_facts(run_dir: Path, lines: list[str]) -> dict:
    """Stage 1's learner setup (the `learner group` log line) and its iterations (rl/history.json)."""
    facts = {}
    for line in lines:
        if "learner group:" in line and "rank(s), " in line:
            facts["learner"] = ast.literal_eval(line.split("rank(s), ", 1)[1].strip())
    history = run_dir / "rl" / "history.json"
    if history.is_file():
        rows = json.loads(history.read_text())
        facts.update(iterations=len(rows), policy_version=rows[-1].get("version") if rows else None,
                     iteration_s=[round(r.get("iteration_s", 0.0), 3) for r in rows])
    return facts


# ------------------------------------------------------------------------------------------ main

class Deadline:
    """Seconds left of the whole check's budget, for each step's timeout."""

    def __init__(self, budget_s: float):
        self.end = time.perf_counter() + budget_s

    def cap(self, seconds: float) -> float:
        return max(1.0, min(seconds, self.end - time.perf_counter()))


def prepare(args, log: Log, deadline: Deadline) -> tuple[dict, dict]:
    """The packed folder checked and installed; (the stages' environment, the preflight's facts)."""
    deps = args.deps.resolve()
    manifest = verify(deps)
    if args.no_install:
        log("ray_gpu_check: --no-install: the running Python's own packages")
    else:
        install(deps, args.site.resolve(), manifest, log)
    env = environment(args.site.resolve())
    skip = [re.sub(r"[-_.]+", "-", line.split(" ", 1)[0]).lower() for line in manifest.get("not_needed", [])]
    facts = {"preflight": preflight(env, list(manifest["packed"]), skip, log, deadline.cap(120)),
             "ray_archive": manifest["ray"]["archive"]}
    return env, facts


def run_stages(stage_args: list[str], env: dict, log: Log, deadline: Deadline, timeout_s: float) -> dict:
    """`fluxir pretrain`, then (if it passed) `fluxir rl`: exit code and seconds of each."""
    facts = {}
    for stage in ("pretrain", "rl"):
        code, seconds, _ = run(f"fluxir {stage} {' '.join(stage_args)}", fluxir(stage, *stage_args), log, env=env,
                               timeout_s=deadline.cap(timeout_s))
        facts[stage] = {"exit": code, "seconds": round(seconds, 1)}
        if code:
            break
    return facts


def check(args) -> dict:
    """Install, preflight, build fused Adam, run both stages; write the log, the excerpt and the facts."""
    deadline = Deadline(args.budget_s)
    out, runs = args.out.resolve(), args.runs.resolve()
    log = Log(out / "ray_gpu_check.log")
    env, facts = prepare(args, log, deadline)
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    ds_json, facts["adam"] = deepspeed_json(env, log, deadline.cap(args.build_timeout_s), runs, args.torch_adam)
    stage_args = [CONFIG, *overrides(ds_json, str(runs)), *args.overrides]
    facts["overrides"] = stage_args[1:]
    facts.update(run_stages(stage_args, env, log, deadline, args.stage_timeout_s))
    facts["pretrain"].update(pretrain_facts(runs / "gpu-check"))
    log(f"ray_gpu_check: stage 0 (Ray Train + DeepSpeed): {facts['pretrain']}")
    if "rl" in facts:
        facts["rl"].update(rl_facts(runs / "gpu-check", log.path.read_text().splitlines()))
        log(f"ray_gpu_check: stage 1 (colocated slot, DeepSpeed learner): {facts['rl']}")
    (out / "ray_gpu_check_excerpt.txt").write_text("\n".join(excerpt(log.path.read_text().splitlines())) + "\n")
    (out / "ray_gpu_check.json").write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="more config overrides, applied last")
    p.add_argument("--deps", type=Path, default=ROOT / "build" / "gpu-deps", help="the packed folder")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "ray-gpu-check")),
                   help="where the log, excerpt and JSON go (default: $OUT)")
    p.add_argument("--site", type=Path, default=Path("/tmp/fluxir-site"), help="install prefix for the packed folder")
    p.add_argument("--runs", type=Path, default=Path("/tmp/fluxir-gpu-runs"), help="output_dir of the stages")
    p.add_argument("--budget-s", type=float, default=540, help="the whole check; each step stops within it")
    p.add_argument("--build-timeout-s", type=float, default=150, help="DeepSpeed's fused Adam build")
    p.add_argument("--stage-timeout-s", type=float, default=240, help="each of fluxir pretrain and fluxir rl")
    p.add_argument("--torch-adam", action="store_true", help="skip the FusedAdam build: torch's AdamW in both stages")
    p.add_argument("--no-install", action="store_true",
                   help="use the running Python's packages (to try the script where they are installed)")
    args = p.parse_args(argv)
    facts = check(args)
    ok = facts["pretrain"]["exit"] == 0 and facts.get("rl", {}).get("exit") == 0
    print(f"ray_gpu_check: {'passed' if ok else 'FAILED'}; log, excerpt and facts in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
