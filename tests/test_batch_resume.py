"""A run killed with SIGKILL resumes from its work store and ends byte-identical to a run that
was never interrupted (real subprocess, real signal, real files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

N_PLANES = 40


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "napari_ruac.cli", "segment", str(src), "-o", str(out),
            "--model", "test-tiny", "--points-per-side", "6", "--iou-thresh", "-1",
            "--stability-thresh", "0", "--max-uncertainty", "1", "--threads", "1", "--reclick"]


def _done_planes(out: Path, stem: str) -> int:
    planes = out / ".ruac-work" / stem / "planes"
    return len(list(planes.glob("*.json"))) if planes.is_dir() else 0


def test_sigkill_midway_then_resume_is_byte_identical(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "movie.ome.tif"
    tifffile.imwrite(src, (rng.random((4, 10, 48, 56)) * 4000).astype(np.uint16), metadata={"axes": "TZYX"})
    killed_out, ref_out = tmp_path / "killed", tmp_path / "reference"

    proc = subprocess.Popen(_cmd(src, killed_out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _done_planes(killed_out, "movie") < 5:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _done_planes(killed_out, "movie")
    assert 5 <= done < N_PLANES, f"killed too late ({done} planes done)"
    assert not (killed_out / "movie_labels.tif").exists()  # no final file from a killed run

    resumed = subprocess.run(_cmd(src, killed_out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} resumed" in resumed.stdout, resumed.stdout
    reference = subprocess.run(_cmd(src, ref_out), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    for suffix in ("labels.tif", "uncertainty.tif", "objects.csv", "metadata.json"):
        a = (killed_out / f"movie_{suffix}").read_bytes()
        b = (ref_out / f"movie_{suffix}").read_bytes()
        assert a == b, f"{suffix} differs after resume"
    assert not (killed_out / ".ruac-work").exists()  # the store is gone once finished
    labels = tifffile.imread(killed_out / "movie_labels.tif")
    assert labels.shape == (4, 10, 48, 56)
