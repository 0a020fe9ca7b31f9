"""Training in a child process (the napari fine-tune widget's way to train).

Why a child and not a thread of the viewer: the full RUAC trainer imports torch_geometric, which
imports torch._dynamo and triton, and triton imported after napari made an OpenGL context
segfaults (LLVM vs Mesa); and a crash or an out-of-memory kill in training must not take the
viewer, with the user's unsaved annotations, down with it. Both variants take this one path.

The parent writes the annotated planes as TIFFs into the run folder (``data/images/NNNN.tif`` and
``data/masks/NNNN.tif``, the folder layout :meth:`AnnotatedImages.from_folder` reads) and the
recipe as ``recipe.yaml``, then runs ``python -m napari_ruac.cli train recipe.yaml --run-dir DIR
--output MODEL --progress-json --stop-on-stdin``. The child prints one JSON object per line on
stdout (``start``, ``step``, ``warning``, ``done``); its stderr goes to ``DIR/stderr.log``, whose
last lines become the error message when it fails. Closing the child's stdin asks it to stop after
the current step (it still checkpoints and exports); the parent's death closes that pipe as well,
so a crashed viewer never leaves a child training on.

No torch and no Qt here: the widget imports this module when napari loads it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..io.imageio import atomic_write_text, write_tiff_atomic

STDERR_LOG = "stderr.log"
RECIPE_FILE = "recipe.yaml"
DATA_DIR = "data"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # what AnnotatedImages.from_folder reads
_OURS = re.compile(r"^\d{4,}\.tif$")  # the names write_annotated_folder gives its planes


class TrainingProcessError(Exception):
    """The training child failed: its exit status and the last lines it wrote to stderr.

    Not a RuntimeError on purpose: superqt's thread worker takes a RuntimeError for a deleted
    Qt object and swallows it with a warning instead of emitting ``errored``."""


@dataclass
class StepProgress:
    """One training step the child reported (``step`` counts from 1)."""

    step: int
    total: int
    row: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- run folder
def write_annotated_folder(root: str | os.PathLike, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                           rgb: bool = False) -> Path:
    """Write image/label plane pairs as ``root/images/NNNN.tif`` + ``root/masks/NNNN.tif``.

    Each file is written atomically. Planes left by an earlier run in the same folder are
    removed (the child would train on them too); a file this function did not write is refused
    rather than deleted, as it may be the user's. Returns ``root``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} image planes but {len(labels)} label planes")
    if not len(images):
        raise ValueError("no annotated planes to write")
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    names = {f"{i:04d}.tif" for i in range(len(images))}
    for folder in (img_dir, mask_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not _OURS.match(p.name):
                raise ValueError(f"{folder} holds {p.name}, which the fine-tune did not write: "
                                 "choose an empty or new run folder")
            if p.name not in names:
                p.unlink()
    for i, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        if lab.shape != img.shape[: lab.ndim]:
            raise ValueError(f"plane {i}: image {img.shape} and labels {lab.shape} differ in size")
        if lab.dtype.kind not in "biu":
            raise ValueError(f"plane {i}: labels must be integers, got {lab.dtype}")
        colour = rgb and img.ndim == 3 and img.shape[-1] in (3, 4)
        write_tiff_atomic(img_dir / f"{i:04d}.tif", img, photometric="rgb" if colour else "minisblack")
        write_tiff_atomic(mask_dir / f"{i:04d}.tif", lab, photometric="minisblack")
    return root


def prepare_run(run_dir: str | os.PathLike, recipe: dict, images: Sequence[np.ndarray],
                labels: Sequence[np.ndarray], rgb: bool = False) -> Path:
    """Write the planes under ``run_dir/data`` and the recipe, pointed at them, as
    ``run_dir/recipe.yaml``; returns the recipe's path."""
    import yaml

    run_dir = Path(run_dir)
    data_dir = write_annotated_folder(run_dir / DATA_DIR, images, labels, rgb)
    recipe = {**recipe, "data": {**recipe.get("data", {}), "source": str(data_dir.resolve())}}
    path = run_dir / RECIPE_FILE
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_command(recipe_path: str | os.PathLike, run_dir: str | os.PathLike, output: str | os.PathLike,
                  device: str | None = None, threads: int | None = None) -> list[str]:
    """The child's command line: the same ``napari-ruac train`` a user can run in a terminal."""
    cmd = [sys.executable, "-m", "napari_ruac.cli", "train", str(recipe_path), "--run-dir", str(run_dir),
           "--output", str(output), "--workers", "0", "--progress-json", "--stop-on-stdin"]
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd


# ---------------------------------------------------------------------------------- the child
_LIVE: "weakref.WeakSet[TrainingProcess]" = weakref.WeakSet()


class TrainingProcess:
    """A ``napari-ruac train`` child: start it, iterate its events, stop it.

    ``events()`` runs in the worker thread (it blocks on the child's stdout);
    ``request_stop()`` and ``stop()`` are safe from any other thread, also before ``start()``.
    """

    def __init__(self, command: Sequence[str], run_dir: str | os.PathLike, env: dict | None = None) -> None:
        self.command = [str(c) for c in command]
        self.run_dir = Path(run_dir)
        self.env = env
        self.stop_requested = False
        self.abandoned = False  # stop() was called: do not start, failures are expected
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stdout_tail: deque[str] = deque(maxlen=20)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / STDERR_LOG

    def start(self) -> None:
        with self._lock:
            if self.abandoned:
                raise TrainingProcessError("the fine-tune was stopped before its training process started")
            if self._proc is not None:
                raise RuntimeError("this training process was already started")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.stderr_path, "wb") as err:
                self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=err, text=True, bufsize=1, env=self.env)
            _LIVE.add(self)
            if self.stop_requested:  # cancelled while the planes were being written
                self._close_stdin()

    def events(self) -> Iterator[dict]:
        """The child's JSON events until it exits; raises :class:`TrainingProcessError` when it
        fails (non-zero exit, killed by a signal) or ends without having exported a model."""
        if self._proc is None:
            raise RuntimeError("start() the training process first")
        done = False
        with self._proc.stdout as out:
            for line in out:
                event = _parse_event(line)
                if event is None:
                    if line.strip():
                        self._stdout_tail.append(line.rstrip())
                    continue
                done = done or event.get("event") == "done"
                yield event
        code = self._proc.wait()
        _LIVE.discard(self)
        if code != 0:
            raise TrainingProcessError(self.failure_message(code))
        if not done:
            raise TrainingProcessError("the training process ended without exporting a model" + self._tail_text())

    def request_stop(self) -> None:
        """Ask the child to stop after its current step (it checkpoints and exports first)."""
        with self._lock:
            self.stop_requested = True
            self._close_stdin()

    def stop(self, grace_s: float = 5.0) -> int | None:
        """Ask the child to stop; if it has not exited within ``grace_s``, terminate it, then
        kill it. For the viewer closing: no child may outlive it. Returns the exit status."""
        with self._lock:
            self.abandoned = True
        self.request_stop()
        proc = self._proc
        if proc is None:
            return None
        for action, wait_s in ((None, grace_s), (proc.terminate, 3.0), (proc.kill, 10.0)):
            if action is not None:
                try:
                    action()
                except ProcessLookupError:
                    pass
            try:
                return proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def failure_message(self, code: int) -> str:
        if code < 0:
            name = _signal_name(-code)
            text = f"the training process was killed by {name}"
            if -code == getattr(signal, "SIGKILL", 9):
                text += " (out of memory? the system kills the largest process when memory runs out)"
        else:
            text = f"the training process failed (exit code {code})"
        tail = self._tail_text()
        if is_out_of_memory(tail):
            text += "; out of memory: try fewer images per step, a smaller crop size or another device"
        return text + tail

    def stderr_tail(self, lines: int = 8) -> list[str]:
        """The child's last non-empty stderr lines (where its error message is)."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]

    def _tail_text(self) -> str:
        tail = self.stderr_tail() or list(self._stdout_tail)[-8:]
        return (":\n" + "\n".join(tail)) if tail else f" (no output; see {self.stderr_path})"

    def _close_stdin(self) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.closed:
            return
        try:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child is gone already
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass


def is_out_of_memory(text: str) -> bool:
    """Whether an error message says memory ran out (CUDA: "CUDA out of memory"; CPU:
    "DefaultCPUAllocator: can't allocate memory")."""
    lowered = text.lower()
    return "out of memory" in lowered or "can't allocate memory" in lowered


def _parse_event(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@atexit.register
def _stop_all_children() -> None:
    """The interpreter is exiting: no training child may outlive it."""
    for proc in list(_LIVE):
        proc.stop(grace_s=2.0)
