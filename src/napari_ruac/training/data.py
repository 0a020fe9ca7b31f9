"""Training data: synthetic or annotated images -> batches of images, label maps and prompts.

A batch is a pure function of ``(seed, step)``: the trainer resumes on exactly the data it
would have seen, whichever worker process made the batch. Images are normalised exactly as the
predictor does (:func:`napari_ruac.io.normalize.to_rgb_float` on the whole plane), then cropped.

Batch dict (tensors):

* ``images`` (B, 3, S, S) float32 in [0, 1]; ``label_maps`` (B, S, S) int64 (0 background);
* ``image_index``, ``object_id``, ``kind`` (P,) int64; ``coords`` (P, N, 2) float32 (x, y);
  ``point_labels`` (P, N) int64; ``targets`` (P, S, S) float32 (the prompted objects' masks);
* ``edges`` (2, E) int64: spatial edges of the object graphs (overlap/adjacency), as global
  node ids ``image * (max_label + 1) + label``; ``num_nodes`` per image = ``max_label + 1``.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io.imageio import read_image
from ..io.normalize import ImageError, to_rgb_float
from .prompts import PromptConfig, sample_prompts
from .synthetic import SynthConfig, SyntheticMicroscopy

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # or a folder of images/ + masks/
    batch_size: int = 4
    crop_size: int = 256
    # a fraction of batches at larger crops: the model runs in frames of 256..1024 px
    large_sizes: tuple[int, ...] = (320, 384, 448, 512)
    p_large: float = 0.2
    # a fraction of images smaller than the crop, zero-padded bottom/right as the predictor pads
    p_small: float = 0.1
    graph_radius: int = 2  # objects closer than this many pixels are adjacent in the style graph
    workers: int = 1
    synthetic: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None) -> "DataConfig":
        data = dict(data or {})
        if "large_sizes" in data:
            data["large_sizes"] = tuple(data["large_sizes"])
        return cls(**data)


# ---------------------------------------------------------------------------------- folders
class AnnotatedImages:
    """Images with instance-label masks, held in memory as normalised planes.

    ``AnnotatedImages.from_folder(root)``: ``root/images/*`` with ``root/masks/<same stem>.*``
    (TIFF/PNG/JPEG); a TIFF stack (Z, H, W) with a label stack of the same shape gives Z samples.
    ``AnnotatedImages(images, labels)``: lists of planes (e.g. napari layers).
    """

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], names: list[str] | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label masks")
        self.names = names or [f"image {i}" for i in range(len(images))]
        self.images, self.labels = [], []
        for img, lab, name in zip(images, labels, self.names):
            img_planes, lab_planes = _planes(np.asarray(img), np.asarray(lab), name)
            for z, (p, q) in enumerate(zip(img_planes, lab_planes)):
                try:
                    self.images.append(to_rgb_float(p))
                except ImageError as e:  # name the file (and plane) the problem is in
                    where = f"{name}, plane {z}" if len(img_planes) > 1 else name
                    raise ImageError(f"{where}: {e}") from None
                self.labels.append(q.astype(np.int64))
        if not self.images:
            raise ValueError("no annotated images to train on")
        if not any(lab.max() > 0 for lab in self.labels):
            raise ValueError("the label masks hold no objects (all zero)")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> "AnnotatedImages":
        root = Path(root)
        img_dir, mask_dir = root / "images", root / "masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            raise FileNotFoundError(f"{root} must contain an images/ and a masks/ folder")
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        images, labels, names = [], [], []
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.stem not in masks:
                raise FileNotFoundError(f"no mask for {p.name} in {mask_dir} (expected {p.stem}.tif or .png)")
            images.append(read_image(p))
            labels.append(read_image(masks[p.stem]))
            names.append(p.name)
        if not images:
            raise FileNotFoundError(f"no images (*.tif, *.png, *.jpg) in {img_dir}")
        return cls(images, labels, names)


def _planes(img: np.ndarray, lab: np.ndarray, name: str):
    """Split an image/label pair into planes: (H, W[, C]) is one, (Z, H, W) a stack."""
    if lab.dtype.kind not in "biu":
        if lab.dtype.kind == "f" and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ImageError(f"{name}: the mask must hold integer instance labels, got {lab.dtype}")
    if lab.ndim == 2:
        if img.shape[:2] != lab.shape:
            raise ImageError(f"{name}: image {img.shape} and mask {lab.shape} differ in size")
        return [img], [lab]
    if lab.ndim == 3 and img.shape[: 3] == lab.shape:
        return list(img), list(lab)
    raise ImageError(f"{name}: cannot pair image {img.shape} with mask {lab.shape}")


# ---------------------------------------------------------------------------------- batches
class BatchMaker:
    """``maker[step]`` -> batch dict, deterministic in ``(seed, step)``.

    A map-style dataset over steps, so a ``DataLoader`` with workers keeps the order.
    """

    def __init__(self, config: DataConfig, seed: int = 0, annotated: AnnotatedImages | None = None,
                 length: int = 10**9) -> None:
        self.config = config
        self.seed = int(seed)
        self.prompts = PromptConfig.from_dict(config.prompts)
        self.length = length
        self.annotated = annotated
        if annotated is None:
            if config.source != "synthetic":
                self.annotated = AnnotatedImages.from_folder(config.source)
            else:
                self.synth = SyntheticMicroscopy(SynthConfig.from_dict(config.synthetic), seed=self.seed)

    def __len__(self) -> int:
        return self.length

    def crop_size(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, int(step), 1])
        if self.config.large_sizes and rng.random() < self.config.p_large:
            return int(rng.choice(self.config.large_sizes))
        return self.config.crop_size

    def __getitem__(self, step: int) -> dict:
        size = self.crop_size(step)
        rng = np.random.default_rng([self.seed, int(step), 2])
        images, labels = [], []
        for i in range(self.config.batch_size):
            img, lab = self._one(rng, step * self.config.batch_size + i, size)
            images.append(img)
            labels.append(lab)
        label_maps = np.stack(labels)
        prompts = sample_prompts(rng, label_maps, self.prompts)
        # object id 0 is a click on background: its target is empty, not the background
        targets = (label_maps[prompts.image_index] == prompts.object_id[:, None, None]) & (
            prompts.object_id[:, None, None] > 0)
        edges = spatial_edges_from_labels(label_maps, self.config.graph_radius)
        return {
            "images": torch.from_numpy(np.stack(images)),
            "label_maps": torch.from_numpy(label_maps),
            "image_index": torch.from_numpy(prompts.image_index),
            "object_id": torch.from_numpy(prompts.object_id),
            "kind": torch.from_numpy(prompts.kind),
            "coords": torch.from_numpy(prompts.coords),
            "point_labels": torch.from_numpy(prompts.labels),
            "targets": torch.from_numpy(targets.astype(np.float32)),
            "edges": torch.from_numpy(edges),
            "step": torch.tensor(int(step)),
        }

    def _one(self, rng, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(3, S, S) float32 image and (S, S) int64 labels; smaller images zero-padded."""
        inner = size
        if rng.random() < self.config.p_small:
            inner = int(rng.integers(max(32, size // 3), size))
        if self.annotated is None:
            s = self.synth.sample(index, inner)
            img, lab = to_rgb_float(s.image), s.labels.astype(np.int64)
        else:
            img, lab = self._crop(rng, inner)
        img, lab = _augment(rng, img, lab)
        out_img = np.zeros((size, size, 3), np.float32)
        out_lab = np.zeros((size, size), np.int64)
        h, w = lab.shape
        out_img[:h, :w], out_lab[:h, :w] = img, lab
        return np.ascontiguousarray(out_img.transpose(2, 0, 1)), out_lab

    def _crop(self, rng, size: int):
        """A random crop of an annotated plane that holds at least one object (if it can)."""
        data = self.annotated
        for _ in range(20):
            k = int(rng.integers(0, len(data)))
            img, lab = data.images[k], data.labels[k]
            h, w = lab.shape
            r = int(rng.integers(0, max(1, h - size + 1)))
            c = int(rng.integers(0, max(1, w - size + 1)))
            crop_lab = lab[r : r + size, c : c + size]
            if crop_lab.max() > 0:
                break
        return img[r : r + size, c : c + size], _compact(crop_lab)


def _compact(lab: np.ndarray) -> np.ndarray:
    """Renumber labels 1..n (crops keep few of many objects; the style graph has n + 1 nodes)."""
    ids, inv = np.unique(lab, return_inverse=True)
    if ids[0] != 0:
        return (inv + 1).reshape(lab.shape).astype(np.int64)
    return inv.reshape(lab.shape).astype(np.int64)


def _augment(rng, img, lab):
    """Random flips and 90-degree rotations (the image and its labels alike)."""
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if rng.random() < 0.5:
        img, lab = img[::-1], lab[::-1]
    k = int(rng.integers(0, 4))
    if k:
        img, lab = np.rot90(img, k), np.rot90(lab, k)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def spatial_edges_from_labels(label_maps: np.ndarray, radius: int = 2) -> np.ndarray:
    """Undirected adjacency edges of each image's object graph, from (B, H, W) label maps.

    Node ``b * (L + 1) + k`` is region ``k`` (0 = background) of image ``b``, ``L`` the largest
    label in the batch. Two regions are adjacent when pixels of both lie within ``radius``
    (Chebyshev) of each other. Returns (2, E) with both directions, no self-loops.
    """
    b, h, w = label_maps.shape
    n = int(label_maps.max()) + 1
    total = b * n
    codes = []
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue
            a = label_maps[:, : h - dy, max(0, -dx) : w - max(0, dx)]
            c = label_maps[:, dy:, max(0, dx) : w + min(0, dx)]
            diff = a != c
            if not diff.any():
                continue
            img = np.nonzero(diff)[0]
            # one int64 code per (node, node) pair: 1-D unique is far faster than unique(axis=1)
            codes.append(np.unique((img * n + a[diff]) * total + img * n + c[diff]))
    if not codes:
        return np.zeros((2, 0), np.int64)
    code = np.unique(np.concatenate(codes))
    src, dst = code // total, code % total
    e = np.unique(np.concatenate([code, dst * total + src]))
    return np.stack([e // total, e % total]).astype(np.int64)


def make_loader(maker: BatchMaker, start: int, stop: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches for steps ``start..stop-1`` in order, made by ``workers`` processes (0: inline)."""
    kwargs = {}
    if workers > 0:
        kwargs = dict(num_workers=workers, prefetch_factor=4, persistent_workers=False,
                      worker_init_fn=_worker_init, multiprocessing_context="fork")
    return torch.utils.data.DataLoader(maker, batch_size=None, sampler=range(start, stop), **kwargs)


def close_batches(batches) -> None:
    """Stop the workers behind a DataLoader iterator now (a no-op for one without workers).

    Collecting the iterator would do it, but an exception's traceback can keep the iterator
    alive until interpreter exit, and there the DataLoader leaves its workers to
    multiprocessing's SIGTERM, which ours ignore (:func:`_worker_init`) for a grace period."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def received_batches(batches):
    """The batches of a DataLoader iterator, each received whole: a Ctrl-C (SIGINT) that comes
    while a batch is on its way is raised as KeyboardInterrupt once it has arrived.

    A worker hands a batch's tensors over through file descriptors, fetched from the worker's
    resource-sharing thread with an authenticated handshake; a KeyboardInterrupt in the middle
    of it broke the connection under the worker, which then printed a traceback into a stop
    that had otherwise checkpointed cleanly. Waiting for a batch lasts a step's data time at
    most (the DataLoader itself notices dead workers)."""
    while True:
        with _sigint_deferred():
            try:
                batch = next(batches)
            except StopIteration:
                return
        yield batch


@contextmanager
def _sigint_deferred():
    """Hold a SIGINT back for the duration of the block and raise it after (only where Python's
    own KeyboardInterrupt handler is in place, in the main thread: elsewhere a no-op)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# how long a worker outlives a SIGTERM: enough for its trainer to checkpoint and stop it
WORKER_TERM_GRACE_S = 60.0


def _worker_init(_):
    # one thread per worker: the trainer's threads need the cores
    torch.set_num_threads(1)
    # A signal to the whole job (a scheduler's time limit, `pkill -f`, Ctrl-C in a terminal)
    # reaches the workers too; killed under the trainer, they turned its checkpointed stop into
    # a crash. The trainer stops them when it stops (and a worker whose trainer is gone exits).
    # A SIGTERM that no stop follows (a trainer that exits without stopping its workers, or
    # multiprocessing terminating them at exit) still ends the worker after a grace period.
    signal.signal(signal.SIGTERM, _term_after_grace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _term_after_grace(*_):
    if getattr(_term_after_grace, "timer", None) is None:
        _term_after_grace.timer = threading.Timer(WORKER_TERM_GRACE_S, os._exit, args=(0,))
        _term_after_grace.timer.daemon = True
        _term_after_grace.timer.start()
