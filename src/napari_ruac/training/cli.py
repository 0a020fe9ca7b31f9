"""``napari-ruac train CONFIG --run-dir DIR [--resume] [--max-steps N] [--threads T] [--export PATH]``.

Under ``torchrun --nproc_per_node K -m napari_ruac.cli train ...`` every process joins a
process group (NCCL on CUDA, gloo on CPU) and the model is wrapped in DDP.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (YAML), e.g. training/micro-ruac.yaml")
    parser.add_argument("--run-dir", required=True, help="folder for checkpoints, log.csv and curves.png")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from last.pt")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this step (the schedule still spans the recipe's optim.steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=None, help="data worker processes (default: recipe)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="only export the latest checkpoint of --run-dir as an fp16 package checkpoint")
    parser.add_argument("--full-precision", action="store_true", help="export in fp32 instead of fp16")


def run(args: argparse.Namespace) -> int:
    import torch

    from .trainer import Trainer, load_config, shutdown_distributed

    threads = args.threads or load_config(args.config)["train"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    run_dir = Path(args.run_dir)
    if args.export:
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to export: {run_dir / 'last.pt'} does not exist")
        trainer = Trainer(args.config, run_dir, resume=True, device="cpu", workers=0, quiet=True)
        path = trainer.export(args.export, half=not args.full_precision)
        print(f"exported step {trainer.step} of {run_dir} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    trainer, completed = None, False
    try:
        trainer = Trainer(args.config, run_dir, resume=args.resume, device=device, workers=args.workers)
        step = trainer.fit(max_steps=args.max_steps)
        completed = True
        if trainer.rank == 0:
            print(f"stopped at step {step}; checkpoint {run_dir / 'last.pt'}, log {run_dir / 'log.csv'}")
    finally:
        if distributed:
            shutdown_distributed(trainer, completed)
    return 0
