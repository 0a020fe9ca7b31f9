"""``napari-ruac predict`` on one plane of a deep stack: peak memory and time vs stack depth.

    python benchmarks/predict_stack.py            # 1, 100 and 400 planes of 512² uint16
    python benchmarks/predict_stack.py --quick    # 1 and 100 planes

predict reads only the plane it segments (the batch's lazy stack reader), so peak RSS and time
should not grow with the number of planes in the file. Each run is a fresh subprocess that
reports its own peak RSS (``VmHWM``); all rows come from this one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

# Peak RSS from /proc's VmHWM, the high-water mark of this process's own memory map: Linux
# carries ru_maxrss across exec, so a child started by a parent that once held more memory would
# report the parent's peak (subprocess starts children with vfork/posix_spawn).
CHILD = r"""
import json, sys, time
from napari_ruac.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
dt = time.perf_counter() - t0
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "s": dt, "rss_mb": int(hwm.split()[1]) / 1024}))
"""


def run(path: Path, plane: int | None, out: Path) -> dict:
    args = ["predict", str(path), "--point", "100,100", "-o", str(out)]
    if plane is not None:
        args += ["--plane", str(plane)]
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    if row["rc"] != 0:
        raise SystemExit(f"predict failed on {path}: {res.stderr}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    depths = [1, 100] if args.quick else [1, 100, 400]
    rng = np.random.default_rng(0)
    print("| planes in file | file MB | predict s (incl. model load) | peak RSS MB |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in depths:
            path = tmp / f"stack{n}.tif"
            # written plane by plane, so that this process stays small
            planes = ((rng.random((512, 512)) * 4000).astype(np.uint16) for _ in range(n))
            shape = (n, 512, 512) if n > 1 else (512, 512)
            tifffile.imwrite(path, data=planes, shape=shape, dtype=np.uint16, photometric="minisblack")
            row = run(path, n // 2 if n > 1 else None, tmp / f"out{n}")
            print(f"| {n} | {path.stat().st_size / 2**20:.0f} | {row['s']:.2f} | {row['rss_mb']:.0f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
