"""Training-step cost: clean vs full RUAC steps on the `micro` config, and generator speed.

    python benchmarks/train_step.py [--size 256] [--batch 4] [--objects 8] [--repeats 5] [--threads 2]

Prints one table. Step times are measured side by side in one process (clean and RUAC steps
alternate on the same batches, so machine load hits both alike); the ratio column is
RUAC / clean. Peak memory: CUDA's max allocated on a GPU; on CPU the growth of the peak
resident set of a forked child that runs only that kind of step. Target: full RUAC <= 3x clean.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch


def recipe(variant: str, args) -> dict:
    return {
        "name": f"bench-{variant}",
        "variant": variant,
        "model": {"spec": "micro", "init": "scratch"},
        "data": {"batch_size": args.batch, "crop_size": args.size, "p_large": 0.0, "p_small": 0.0,
                 "workers": 0, "prompts": {"objects_per_image": args.objects}},
        "optim": {"steps": 1000, "warmup": 1},
        # adversarial from step 0 at full weight; "clean" trainers are the same with gamma 0
        "curriculum": {"kl_start": 0, "adv_start": 0, "adv_ramp": 1, "gamma": 0.5},
        "train": {"checkpoint_every": 10**9, "val_every": 0, "correction_prob": 0.0},
    }


def make_trainers(args, device):
    from napari_ruac.training.trainer import Trainer

    out = {}
    for label, variant, gamma in (("det clean", "det", 0.0), ("bayes clean", "bayes", 0.0),
                                  ("ruac full", "ruac", 0.5)):
        cfg = recipe(variant, args)
        cfg["curriculum"]["gamma"] = gamma
        out[label] = Trainer(cfg, f"/tmp/napari-ruac-bench-{variant}", device=device, quiet=True)
    return out


def peak_memory_mb(trainer, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    # CPU: a forked child runs two steps; report how far its peak RSS rose above the fork point
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        # OpenMP's thread pool does not survive fork(): the child's first parallel region
        # waited forever on the parent's threads. One thread keeps torch out of OpenMP.
        torch.set_num_threads(1)
        base = _rss_now_mb()
        for _ in range(2):
            trainer.train_step(batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(w, f"{peak - base:.1f}".encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    return float(data)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from napari_ruac.training.data import BatchMaker, DataConfig
    from napari_ruac.training.synthetic import generator_images_per_second

    trainers = make_trainers(args, device)
    maker = BatchMaker(DataConfig(batch_size=args.batch, crop_size=args.size, p_large=0.0, p_small=0.0,
                                  prompts={"objects_per_image": args.objects}), seed=1)
    batches = [maker[i] for i in range(args.repeats + 1)]
    times = {k: [] for k in trainers}
    for i, batch in enumerate(batches):
        for label, tr in trainers.items():  # alternate: load changes hit every kind alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first step of each warms caches up
                times[label].append(time.perf_counter() - t0)
    memory = {k: peak_memory_mb(tr, batches[0], device) for k, tr in trainers.items()}
    gen_rate = generator_images_per_second(n=40, size=args.size)

    n_prompts = int(batches[0]["targets"].shape[0])
    print(f"micro config, {args.batch} images x {args.size}^2, {n_prompts} prompts/step, "
          f"{args.threads} threads, {device}, {args.repeats} timed steps each")
    print(f"{'step':<14}{'median s/step':>14}{'min s':>9}{'x bayes clean':>15}{'peak MB':>10}")
    ref = statistics.median(times["bayes clean"])
    for label in trainers:
        med = statistics.median(times[label])
        print(f"{label:<14}{med:>14.3f}{min(times[label]):>9.3f}{med / ref:>15.2f}{memory[label]:>10.0f}")
    ratio = statistics.median(times["ruac full"]) / ref
    print(f"full RUAC / clean (bayes) = {ratio:.2f}  (target <= 3.0: {'met' if ratio <= 3.0 else 'NOT met'})")
    need = args.batch / ref
    print(f"synthetic generator: {gen_rate:.1f} images/s on one core at {args.size}^2 "
          f"(a clean step consumes {need:.1f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
