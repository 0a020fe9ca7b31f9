"""``napari-ruac train CONFIG --run-dir DIR [--resume] [--max-steps N] [--threads T] [--export PATH]``.

Under ``torchrun --nproc_per_node K -m napari_ruac.cli train ...`` every process joins a
process group (NCCL on CUDA, gloo on CPU) and the model is wrapped in DDP.

``--output PATH --progress-json --stop-on-stdin`` is how the napari fine-tune widget runs a
training in a child process (:mod:`napari_ruac.training.process`): export when the run ends,
one JSON object per line on stdout, stop between steps when the parent closes stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
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
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="when the run ends (finished or stopped), export the model to PATH as a package checkpoint")
    parser.add_argument("--progress-json", action="store_true",
                        help="report on stdout as one JSON object per line: events start, step (step, total, row "
                             "of losses), warning, done (steps, stopped, path); for a parent process")
    parser.add_argument("--stop-on-stdin", action="store_true",
                        help="stop after the current step (checkpoint and --output still written) when stdin "
                             "reads 'stop' or closes, e.g. because the parent process died")


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
    stop = threading.Event()
    if not distributed:  # under torchrun, the agent's SIGTERM must not leave ranks waiting on each other
        install_stop_signals(stop)
    if args.stop_on_stdin:
        watch_stdin(stop)
    report = JsonReporter(stop) if args.progress_json else None
    if report is not None:
        report.capture_warnings()
    total = None

    def after_step(result) -> bool:
        if report is not None and trainer.rank == 0:
            report.emit({"event": "step", "step": result.step, "total": total, "row": result.row})
        return stop.is_set()

    trainer, completed = None, False
    try:
        trainer = Trainer(args.config, run_dir, resume=args.resume, device=device, workers=args.workers,
                          callback=after_step, quiet=report is not None)
        total = trainer.cfg["optim"]["steps"]
        target = min(total, args.max_steps) if args.max_steps is not None else total
        if report is not None and trainer.rank == 0:
            report.emit({"event": "start", "step": trainer.step, "total": total, "pid": os.getpid(),
                         "variant": trainer.variant, "device": str(trainer.device)})
        step = trainer.fit(max_steps=args.max_steps)
        completed = True
        if trainer.rank == 0:
            path = trainer.export(args.output, half=not args.full_precision) if args.output else None
            if report is not None:
                report.emit({"event": "done", "steps": step, "total": total, "stopped": step < target,
                             "path": str(path) if path else None, "run_dir": str(run_dir)})
            else:
                print(f"stopped at step {step}; checkpoint {run_dir / 'last.pt'}, log {run_dir / 'log.csv'}"
                      + (f"; model {path}" if path else ""))
    finally:
        if distributed:
            shutdown_distributed(trainer, completed)
    return 0


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM (``kill``, a job scheduler's time limit) stops the run after its current step,
    checkpointed and exported like a finished run, instead of losing the steps since the last
    checkpoint. SIGINT keeps raising KeyboardInterrupt (the trainer still checkpoints), also in a
    background job (``cmd &`` from a script), which starts with SIGINT ignored."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def watch_stdin(stop: threading.Event) -> threading.Thread:
    """Set ``stop`` when stdin reads a line 'stop' or reaches its end. A parent that dies closes
    the pipe too, so its child stops (after a checkpoint) instead of training on unseen."""

    def watch():
        try:
            for line in sys.stdin:
                if line.strip().lower() == "stop":
                    break
        except (OSError, ValueError):
            pass
        stop.set()

    thread = threading.Thread(target=watch, name="stop-on-stdin", daemon=True)
    thread.start()
    return thread


class JsonReporter:
    """One JSON object per line on stdout. A parent that no longer reads (broken pipe) is
    treated as a stop request: the run checkpoints and exports rather than crashing."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def emit(self, event: dict) -> None:
        try:
            print(json.dumps(event, default=_jsonable), flush=True)
        except (BrokenPipeError, OSError, ValueError):
            self.stop.set()

    def capture_warnings(self) -> None:
        """Our own warnings (e.g. untrained weights) become events the parent shows the user;
        library warnings stay on stderr."""
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if category.__module__.startswith("napari_ruac"):
                self.emit({"event": "warning", "message": str(message), "category": category.__name__})
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning


def _jsonable(value):
    # tensors and numpy scalars in a log row
    return value.item() if hasattr(value, "item") else str(value)
