"""Stage-0 throughput: the Ray Train + DeepSpeed path against a plain single-process loop of the same
recipe on the same cores, measured in one run.

    python benchmarks/stage0_throughput.py [configs/tiny.yaml] [--steps 400] [--warmup 50] [key=value ...]

Layouts: the config's own (`pretrain.num_workers` × `pretrain.worker_resources`), every other
workers × threads split of the machine's cores (e.g. 2 × 1 on 2 cores), and the reference: one process,
`FlowMatchingRecipe` batches and loss, torch AdamW with DeepSpeed JSON's betas/eps/weight decay and
gradient clipping, all cores. Steps/s are taken after `warmup` steps (Ray: the mean of the reported
windows after the first). Writes benchmarks/results/stage0_throughput.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from common import RESULTS, ROOT, config_parser, machine, write_result  # noqa: E402  (puts the repo on sys.path)
from fluxir.config import load_config  # noqa: E402


def single_process(cfg, steps: int, warmup: int) -> dict:
    from fluxir.pretrain import FlowMatchingRecipe

    torch.set_num_threads(os.cpu_count())
    recipe = FlowMatchingRecipe(cfg)
    model = recipe.build_model().train()
    ds = json.loads((ROOT / cfg.pretrain.deepspeed).read_text())
    opt_params = ds["optimizer"]["params"]
    params = recipe.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.pretrain.lr, betas=tuple(opt_params["betas"]), eps=opt_params["eps"],
                            weight_decay=cfg.pretrain.weight_decay)
    start = None
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        loss, _ = recipe.loss(model, recipe.batch(step, 0, 1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ds.get("gradient_clipping", 1.0))
        opt.step()
    return {"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}


def ray_train(cfg, workers: int, cpus: float, steps: int, warmup: int) -> dict:
    from actors.pretrain import run_pretrain
    from fluxir.config import config_from_dict

    log_every = max(1, warmup)
    tree = cfg.model_dump(mode="json")
    tree["name"] = f"throughput-{workers}x{cpus:g}"
    tree["output_dir"] = str(ROOT / "runs" / "stage0_throughput")
    tree["pretrain"].update(steps=steps + warmup, num_workers=workers, worker_resources={"CPU": cpus},
                            log_every=log_every, checkpoint_every=steps + warmup)
    tree["wandb"]["mode"] = "disabled"
    windows: list[float] = []

    def record(metrics: dict) -> None:  # every full window's steps/s (the last, checkpointing one excluded)
        if "steps_per_s" in metrics and metrics.get("step", 0) < steps + warmup:
            windows.append(float(metrics["steps_per_s"]))

    out = run_pretrain(config_from_dict(tree), show_progress=False, resume=False, on_metrics=record)
    measured = windows[1:] or windows
    return {"steps_per_s": statistics.mean(measured), "windows": windows, "wall_s": out["seconds"],
            "workers": workers, "cpus_per_worker": cpus}


def main() -> int:
    parser = config_parser(__doc__, config="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = load_config(args.config, args.overrides)
    cores = os.cpu_count()
    own = (cfg.pretrain.num_workers, float(cfg.pretrain.worker_resources.get("CPU", 1)))
    layouts = [own] + [(w, cores / w) for w in (1, cores) if (w, cores / w) != own and cores % w == 0]
    reference = single_process(cfg, args.steps, args.warmup)
    print(f"single process, {reference['threads']} threads: {reference['steps_per_s']:.2f} steps/s", flush=True)
    rows = []
    for workers, cpus in layouts:
        row = ray_train(cfg, workers, cpus, args.steps, args.warmup)
        row["ratio_to_single_process"] = row["steps_per_s"] / reference["steps_per_s"]
        row["config_layout"] = (workers, cpus) == own
        rows.append(row)
        print(f"Ray Train + DeepSpeed, {workers} worker(s) x {cpus:g} CPU: {row['steps_per_s']:.2f} steps/s "
              f"({row['ratio_to_single_process']:.2f}x the single process)", flush=True)
    out = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
           "single_process": reference, "ray_train": rows, "machine": machine(),
           "date": time.strftime("%Y-%m-%d")}
    write_result(RESULTS / "stage0_throughput.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
