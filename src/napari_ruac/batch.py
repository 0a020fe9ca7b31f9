"""Batch automatic segmentation of TIFF/OME-TIFF/zarr stacks: ``napari-ruac segment``.

For every input stack the planes (every t, z, ... at one (Y, X)) are segmented one at a time by
:class:`~napari_ruac.model.automatic.AutomaticSegmenter` and written, plane by plane, into a
chunked zarr work store ``OUTDIR/.ruac-work/<stem>/``. A plane counts as done when its
objects file ``planes/<i>.json`` exists; it is written (atomically) after the plane's chunks,
so a killed run resumes at the first missing plane. When all planes are done the final files
are written from the store as one set: each under a temporary name beside its final one,
flushed to disk, and only when all of them are written renamed into place, the metadata last.
A failure before that (a full disk, say) removes the temporary files and leaves the earlier set
untouched; the work store is kept, so a rerun only writes the files again. Then the store is
removed:

* ``<stem>_labels.tif`` int32 and ``<stem>_uncertainty.tif`` float32, shaped like the input
  without its colour axis;
* ``<stem>_objects.csv`` with ``label, plane, area, mean_uncertainty, iou_score``
  (labels are numbered per plane; ``plane`` is the C-order index over the plane axes;
  ``iou_score`` is ``nan`` for a model whose IoU head is untrained, like our micro models);
* ``<stem>_metadata.json``: model, versions, parameters, input axes, the fingerprint and the
  size and SHA-256 of each of the other three files (``output_files``).

An input counts as complete when the metadata has its fingerprint *and* the three files are the
ones it describes (a set mixed by a crash between the renames, or a file changed later, is
redone). The results of another input with the same name (``day1/cell.tif`` then
``day2/cell.tif``, one output folder) are not overwritten unless ``overwrite=True``
(``--overwrite``).

The store records a fingerprint of the input file, the model and every parameter that changes
results; a store with another fingerprint is discarded rather than mixed in. Work runs in this
process, on a local dask cluster (``workers=N``) or on an existing one (``scheduler=ADDRESS``);
either way each process loads the model once. Peak memory does not grow with stack depth: a
plane is read, segmented, written and dropped, and at most a few planes are in flight.

Reproducibility: a resumed run writes the same bytes as an uninterrupted one (the final files
are built only from the store; planes are computed deterministically). The number of torch
threads changes float rounding in the last bits of the uncertainty (labels and the CSV are
unaffected); it is not part of the fingerprint, so give the same ``--threads`` (dask workers use
1) when bytes must match across differently configured runs.

The napari batch widget calls :func:`segment_files`, the same code as the CLI.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import numpy as np

from ._cli_options import zoom_value
from ._versions import package_version
from .io.imageio import FileSet, PartlyReplaced, atomic_write_bytes, remove_if_empty
from .io.normalize import ImageError
from .io.stacks import TIFF_SUFFIXES, ZARR_SUFFIXES, Stack, describe, open_stack, plane_name, stack_stem

WORK_DIR = ".ruac-work"
SEGMENTER_OPTIONS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
    "stability_score_offset", "max_mean_uncertainty", "box_nms_thresh", "crop_n_layers",
    "crop_overlap_ratio", "crop_n_points_downscale_factor", "crop_nms_thresh", "min_area",
    "multimask", "object_score_thresh", "mode", "samples", "tile_size", "tile_overlap", "seed", "zoom",
    "point_in_mask", "refine_rounds", "rank_by", "min_kept", "merge_overlap", "reclick", "views",
    "scales",
)
RUN_OPTIONS = ("axes", "channel", "checkpoint", "threads", "keep_work", "overwrite")
CSV_COLUMNS = ("label", "plane", "area", "mean_uncertainty", "iou_score")


class BatchError(RuntimeError):
    """A problem that stops the whole batch (output folder unusable, bad options)."""


# ---------------------------------------------------------------------------- results
@dataclass
class BatchProgress:
    """Reported after each plane. ``eta_s`` is None until a plane has been timed."""

    done_planes: int
    total_planes: int
    current_file: str
    eta_s: float | None
    file_index: int = 0
    n_files: int = 0
    elapsed_s: float = 0.0
    planes_per_s: float | None = None


@dataclass
class FileResult:
    """What happened to one input. ``status``: ``done`` (written now), ``complete`` (outputs
    from an earlier run are current), ``failed`` (see ``reason``), ``cancelled`` or ``skipped``
    (an output of an earlier run, e.g. picked up again by ``data/*.tif`` with ``-o data``)."""

    input: str
    status: str
    outputs: dict[str, str] = field(default_factory=dict)
    n_planes: int = 0
    n_objects: int = 0
    resumed_planes: int = 0
    reason: str | None = None


@dataclass
class BatchSummary:
    """Per-file outcomes of a batch run."""

    files: list[FileResult]
    output_dir: str
    cancelled: bool = False
    elapsed_s: float = 0.0

    @property
    def failures(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "failed"]

    @property
    def succeeded(self) -> list[FileResult]:
        return [f for f in self.files if f.status in ("done", "complete")]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.cancelled

    def format(self) -> str:
        lines = [
            f"{len(self.succeeded)} of {len(self.files)} inputs segmented into {self.output_dir} "
            f"in {self.elapsed_s:.1f} s" + (" (cancelled)" if self.cancelled else "")
        ]
        for f in self.files:
            if f.status == "failed":
                lines.append(f"  FAILED {f.input}: {f.reason}")
            elif f.status == "cancelled":
                lines.append(f"  cancelled {f.input}")
            elif f.status == "skipped":
                lines.append(f"  skipped {f.input}: {f.reason}")
            else:
                extra = f", {f.resumed_planes} resumed" if f.resumed_planes else ""
                extra += ", already complete" if f.status == "complete" else ""
                lines.append(f"  ok {f.input}: {f.n_planes} planes, {f.n_objects} objects{extra}")
        return "\n".join(lines)


@dataclass
class PlaneResult:
    """One segmented plane: ``labels`` int32 (H, W), ``uncertainty`` float32 (H, W),
    ``objects`` rows (label, area, mean_uncertainty, iou_score)."""

    index: int
    labels: np.ndarray
    uncertainty: np.ndarray
    objects: list[dict]
    zoom: float = 1.0  # the zoom the plane was seen at (its own with zoom="auto")


class _Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------- public API
def segment_files(
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    model: str = "micro",
    device: str = "cpu",
    workers: int | None = None,
    scheduler: str | None = None,
    resume: bool = True,
    progress: Callable[[BatchProgress], None] | None = None,
    cancel: threading.Event | None = None,
    **options: Any,
) -> BatchSummary:
    """Segment every plane of every input; see the module docstring for the outputs.

    ``options``: any :class:`~napari_ruac.model.automatic.AutomaticSegmenter` parameter
    (``points_per_side``, ``pred_iou_thresh``, ``max_mean_uncertainty``, ``tile_size``, ...) and
    ``axes`` (override the file's axes, e.g. ``"TZCYX"``), ``channel`` (pick one channel),
    ``checkpoint`` (weights file for ``model``), ``threads`` (torch threads per process),
    ``keep_work`` (keep the work store of a cancelled file so a later run resumes it),
    ``overwrite`` (replace results in ``output_dir`` that another input with the same name wrote
    there; by default such an input fails and those results stay).

    One bad input does not stop the batch: it is listed in ``BatchSummary.failures`` with the
    reason. An output folder that cannot be written raises :class:`BatchError`.
    """
    start = time.monotonic()
    unknown = sorted(set(options) - set(SEGMENTER_OPTIONS) - set(RUN_OPTIONS))
    if unknown:
        raise BatchError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(SEGMENTER_OPTIONS + RUN_OPTIONS)}")
    if workers is not None and scheduler is not None:
        raise BatchError("give either workers (a local dask cluster) or scheduler (an existing one), not both")
    if workers is not None and workers < 1:
        raise BatchError(f"workers must be at least 1, got {workers}")
    out = Path(output_dir)
    _check_writable(out)
    seg_options = {k: v for k, v in options.items() if k in SEGMENTER_OPTIONS and v is not None}
    run_options = {k: options.get(k) for k in RUN_OPTIONS}
    spec = ModelSpec(model, device, run_options["checkpoint"], seg_options, run_options["threads"])
    files = _expand_inputs(inputs)
    jobs, results = _plan_jobs(files, out, run_options)
    total = sum(job.n_planes for job in jobs)
    tracker = _Tracker(total, len(files), progress)
    executor = None
    cancelled = False
    try:
        if jobs:
            identity = model_identity(spec)
            spec.weights = str(identity.get("weights"))
            executor = _make_executor(spec, workers, scheduler)
            tracker.start = time.monotonic()  # the rate (and ETA) counts planes, not start-up
            for job in jobs:
                if cancelled or (cancel is not None and cancel.is_set()):
                    cancelled = True
                    results[job.order] = FileResult(str(job.path), "cancelled")
                    continue
                tracker.file_index = job.order + 1
                results[job.order] = _run_job(job, out, spec, identity, executor, resume, tracker, cancel, run_options)
                cancelled = results[job.order].status == "cancelled"
    finally:
        if executor is not None:
            executor.close()
        remove_if_empty(out / WORK_DIR)
    return BatchSummary([r for r in results if r is not None], str(out), cancelled, time.monotonic() - start)


# ---------------------------------------------------------------------------- planning
@dataclass
class ModelSpec:
    """How every process builds its segmenter (picklable: sent to dask workers)."""

    model: str
    device: str
    checkpoint: str | None
    options: dict
    threads: int | None = None
    weights: str | None = None  # the weights' identity (hash): a changed file is reloaded

    @property
    def key(self) -> str:
        return json.dumps([self.model, self.device, self.checkpoint, self.weights,
                           sorted(self.options.items())], default=str)


@dataclass
class _Job:
    order: int
    path: Path
    n_planes: int


def images_in_folder(folder: str | os.PathLike) -> list[Path]:
    """The TIFF files and zarr stores directly inside ``folder``, sorted (what a folder given
    to ``segment`` or to the batch widget stands for)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in TIFF_SUFFIXES or is_image_folder(p))


def is_image_folder(path: str | os.PathLike) -> bool:
    """True for a folder that is itself one image (a zarr store), not a folder of images."""
    return Path(path).is_dir() and _is_zarr(Path(path))


def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Inputs as given; a folder that is not a zarr store stands for the images inside it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not is_image_folder(path):
            files.extend(images_in_folder(path))
        else:
            files.append(path)
    return files


def earlier_run_output(path: str | os.PathLike) -> Path | None:
    """The metadata file that names ``path`` as one of its run's outputs, or None: results
    written into the input folder must not become inputs of the next run over that folder."""
    path = Path(path)
    stem = stack_stem(path)
    for kind in ("labels", "uncertainty"):
        if not stem.endswith(f"_{kind}"):
            continue
        # the names that run would have given its outputs, from the same function it used
        finals = _final_paths(path.parent, stem[: -len(kind) - 1])
        if finals[kind].name != path.name:
            continue
        try:
            outputs = json.loads(finals["metadata"].read_text()).get("outputs", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(outputs, dict) and outputs.get(kind) == path.name:
            return finals["metadata"]
    return None


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() in ZARR_SUFFIXES or any(
        (path / name).exists() for name in (".zarray", ".zgroup", "zarr.json")
    )


def _plan_jobs(files: list[Path], out: Path, run_options: dict) -> tuple[list[_Job], list[FileResult | None]]:
    """Open every input (metadata only); a file that cannot be used becomes a failure now."""
    jobs: list[_Job] = []
    results: list[FileResult | None] = [None] * len(files)
    stems: dict[str, Path] = {}
    for i, path in enumerate(files):
        earlier = earlier_run_output(path)
        if earlier is not None:
            results[i] = FileResult(str(path), "skipped", reason=f"an output of an earlier run (see {earlier.name})")
            continue
        stem = stack_stem(path)
        if stem in stems:
            results[i] = FileResult(
                str(path), "failed",
                reason=f"its outputs would overwrite those of {stems[stem]} (same name {stem!r}); rename one",
            )
            continue
        try:
            # metadata only, and closed again: hundreds of inputs must not hold hundreds of files open
            with open_stack(path, axes=run_options["axes"], channel=run_options["channel"]) as stack:
                n_planes = stack.n_planes
        except (ImageError, OSError) as exc:
            results[i] = FileResult(str(path), "failed", reason=_reason(exc))
            continue
        stems[stem] = path
        other = None if run_options.get("overwrite") else _other_inputs_results(out, stem, path)
        if other is not None:
            results[i] = FileResult(
                str(path), "failed",
                reason=f"{out} already holds {other}; segmenting {path} there would overwrite them "
                       f"(same name {stem!r}): choose another output folder (-o), rename one of the "
                       f"inputs, or pass --overwrite (overwrite=True) to replace them",
            )
            continue
        jobs.append(_Job(i, path, n_planes))
    return jobs, results


def _source(path: Path) -> dict:
    """Where an input is and what it holds (see :func:`_input_identity`), for the metadata and
    the work store: tells the same input (also moved or copied) from another of the same name."""
    return {"path": str(Path(os.path.abspath(path)).resolve()), **_input_identity(path)}


def _other_inputs_results(out: Path, stem: str, path: Path) -> str | None:
    """What of another input's ``out`` holds under ``stem`` (its results, or the work store of
    its unfinished run), or None when there is nothing or it is ``path``'s own."""
    finals = _final_paths(out, stem)
    stamp = out / WORK_DIR / stem / "fingerprint.json"
    for record, what in ((finals["metadata"], "the results"), (stamp, "the unfinished run's work store")):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # none, or unreadable: nothing that says whose it is
        if not isinstance(data, dict):
            continue
        source = data.get("source")
        if not isinstance(source, dict):  # written before sources were recorded
            given = data.get("input")
            given = given.get("path") if isinstance(given, dict) else given
            if not isinstance(given, str):
                continue
            source = {"path": str(Path(os.path.abspath(given)).resolve())}
        if _same_source(source, path):
            continue
        return f"{what} of another input with the same name, {source.get('path')} (see {record.name})"
    return None


def _same_source(source: dict, path: Path) -> bool:
    """Is ``path`` the input ``source`` describes: the same file, or one with the same content
    and modification time (the input moved or copied elsewhere)?"""
    try:
        if Path(os.path.abspath(path)).resolve() == Path(str(source.get("path"))):
            return True
        if "digest" not in source:
            return False
        ident = _input_identity(path)
    except OSError:
        return False
    return ident.get("digest") == source.get("digest") and ident.get("bytes") == source.get("bytes")


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile; its OSError has no errno


def _disk_full(exc: BaseException | None) -> str | None:
    """'no space left on device' or 'disk quota exceeded' when ``exc`` (or what caused it) says
    that the disk took no more, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOSPC or (exc.errno is None and _SHORT_WRITE.search(str(exc))):
                return "no space left on device"
            if exc.errno == errno.EDQUOT:
                return "disk quota exceeded"
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(exc: BaseException) -> str:
    full = _disk_full(exc)
    if full is not None:
        return f"disk full ({full}): {exc}"
    return str(exc) or type(exc).__name__


def _check_writable(out: Path) -> None:
    from .io.imageio import prepare_output_folder

    try:
        prepare_output_folder(out)
    except ValueError as exc:
        raise BatchError(str(exc)) from exc


# ---------------------------------------------------------------------------- fingerprints
def model_identity(spec: ModelSpec) -> dict:
    """What identifies the model's weights without loading it: the weights file's SHA-256,
    or the seed of a random-weight model."""
    from .model.build import WEIGHTS_DIR, cache_dir, names_a_file
    from .model.checkpoint import file_sha256
    from .model.config import resolve_spec

    identity: dict[str, Any] = {"name": spec.model}
    file: Path | None = None
    packaged = False  # weights that ship with the package (without them: random weights)
    if spec.checkpoint or names_a_file(spec.model):
        file = Path(spec.checkpoint or spec.model)
        if not file.is_file():  # as load_model would say it, before any work
            raise BatchError(f"checkpoint file not found: {file}")
    else:
        try:
            ms = resolve_spec(str(spec.model))
        except KeyError as exc:
            raise BatchError(str(exc.args[0])) from exc
        if ms.random_init:
            identity["weights"] = "random seed 0"
        elif ms.packaged:
            file, packaged = WEIGHTS_DIR / ms.packaged, True
        else:  # official weights: downloaded (or refused with a message) when the model loads
            file = cache_dir() / ms.filename
    if file is not None:
        identity["weights"] = file_sha256(file) if file.is_file() else f"missing: {file}"
    if packaged and not file.is_file():
        import warnings

        from .model.build import UntrainedWeightsWarning

        warnings.warn(
            f"the weights of {spec.model!r} are not installed ({file}): segmenting with an "
            "UNTRAINED model, whose masks are meaningless",
            UntrainedWeightsWarning, stacklevel=3,
        )
    return identity


def _fingerprint(stack: Stack, spec: ModelSpec, identity: dict, source: dict | None = None) -> str:
    """Digest of the input's identity and content sample, the model and the parameters
    (``source``: the input's :func:`_source`, when already known)."""
    from . import __version__

    ident = _input_identity(stack.path) if source is None else {k: source[k] for k in ("bytes", "digest")}
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": __version__,
        "input": ident,
        "stack": describe(stack) | {"path": None},
        "model": identity,
        "device": spec.device,
        "options": sorted(spec.options.items()),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _input_identity(path: Path) -> dict:
    """What changes when the input changes, without reading a huge input whole: for a file its
    size, modification time and first and last MiB; for a zarr store the metadata files'
    content and every chunk file's size and modification time."""
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
        return {"bytes": st.st_size, "digest": h.hexdigest()}
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        total += st.st_size
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.name in (".zarray", ".zattrs", ".zgroup", "zarr.json"):
            h.update(f.read_bytes())
    return {"bytes": total, "digest": h.hexdigest()}


# ---------------------------------------------------------------------------- one input
def _run_job(job: _Job, out: Path, spec: ModelSpec, identity: dict, executor, resume: bool,
             tracker: "_Tracker", cancel: threading.Event | None, run_options: dict) -> FileResult:
    tracker.current_file = str(job.path)
    try:
        stack = open_stack(job.path, axes=run_options["axes"], channel=run_options["channel"])
    except (ImageError, OSError) as exc:  # changed or removed since the batch was planned
        tracker.skip(job.n_planes)
        return FileResult(str(job.path), "failed", reason=_reason(exc))
    before = tracker.done
    with stack:
        result = _run_stack(job, stack, out, spec, identity, executor, resume, tracker, cancel, run_options)
    if result.status == "failed":
        tracker.done = before + job.n_planes  # its remaining planes will not come: keep the ETA honest
    return result


def _run_stack(job: _Job, stack: Stack, out: Path, spec: ModelSpec, identity: dict, executor, resume: bool,
               tracker: "_Tracker", cancel: threading.Event | None, run_options: dict) -> FileResult:
    stem = stack_stem(job.path)
    source = _source(stack.path)
    fingerprint = _fingerprint(stack, spec, identity, source)
    finals = _final_paths(out, stem)
    work = out / WORK_DIR / stem
    if resume and _outputs_current(finals, fingerprint):
        # the files are the ones its metadata describes: a store left beside them (a run with
        # other settings that failed, or one stopped between the renames and the clean-up) is
        # superseded, as a run with these settings would discard it too
        shutil.rmtree(work, ignore_errors=True)
        tracker.skip(stack.n_planes)
        meta = json.loads(finals["metadata"].read_text())
        return FileResult(str(job.path), "complete", {k: str(v) for k, v in finals.items()},
                          stack.n_planes, meta.get("n_objects", 0))
    try:
        store = _writing(WorkStore.open, work, stack, fingerprint, resume, source)
        todo = store.missing_planes()
        resumed = stack.n_planes - len(todo)
        tracker.skip(resumed)
        for result in executor.run(stack, todo, spec, cancel):
            _writing(store.write_plane, result)
            tracker.plane_done()
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        n_objects = _writing(_finalize, store, stack, finals, spec, identity, fingerprint, source)
        store.remove()
    except _Cancelled:
        if not run_options.get("keep_work"):
            shutil.rmtree(work, ignore_errors=True)
        return FileResult(str(job.path), "cancelled")
    except _OutputError as err:
        # the input is fine and the planes computed so far are good: keep them for a rerun
        return FileResult(str(job.path), "failed", reason=_output_reason(err.error, out, work, err.changed))
    except _ClusterLost as err:  # a dead worker or a lost scheduler: the stored planes are good
        if len(store.missing_planes()) == stack.n_planes:
            shutil.rmtree(work, ignore_errors=True)  # none stored: nothing to resume from
        return FileResult(str(job.path), "failed", reason=str(err))
    except (ImageError, OSError, ValueError, RuntimeError) as exc:
        # a damaged file stays damaged: drop its store so nothing partial is left behind
        shutil.rmtree(work, ignore_errors=True)
        return FileResult(str(job.path), "failed", reason=_reason(exc))
    return FileResult(str(job.path), "done", {k: str(v) for k, v in finals.items()},
                      stack.n_planes, n_objects, resumed)


class _OutputError(Exception):
    """Writing into the output folder (work store or final files) failed: not the input's fault.
    ``changed``: some final files were already replaced (a failure between the renames)."""

    def __init__(self, error: OSError, changed: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.changed = changed


def _writing(write: Callable, *args: Any) -> Any:
    """Call ``write``; an OSError it raises (disk full, quota, I/O error) becomes an _OutputError."""
    try:
        return write(*args)
    except OSError as exc:
        raise _OutputError(exc) from exc


def _output_reason(exc: OSError, out: Path, work: Path, changed: bool = False) -> str:
    full = _disk_full(exc)
    problem = f"disk full ({full})" if full else "could not write"
    text = f"{problem} while writing into {out}: {exc}; "
    text += ("some of its earlier results were already replaced, so that set is incomplete and will be redone"
             if changed else "its earlier results there, if any, are unchanged")
    done = len(list((work / "planes").glob("*.json"))) if (work / "fingerprint.json").is_file() else 0
    if done:
        text += f"; the {done} planes computed so far are kept in {work}, and a rerun resumes from them"
        text += " once space is freed" if full else " (--no-resume starts over)"
    else:  # nothing worth keeping: give its few bytes back
        shutil.rmtree(work, ignore_errors=True)
    return text


def _final_paths(out: Path, stem: str) -> dict[str, Path]:
    return {
        "labels": out / f"{stem}_labels.tif",
        "uncertainty": out / f"{stem}_uncertainty.tif",
        "objects": out / f"{stem}_objects.csv",
        "metadata": out / f"{stem}_metadata.json",
    }


def _outputs_current(finals: dict[str, Path], fingerprint: str) -> bool:
    """True when the metadata has ``fingerprint`` and the other files are byte for byte the ones
    it describes (sizes first, then SHA-256: reading them costs ~1 s per 1.5 GB here)."""
    if not all(p.is_file() for p in finals.values()):
        return False
    try:
        meta = json.loads(finals["metadata"].read_text())
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return False
        records = meta.get("output_files")
        if not isinstance(records, dict):
            return False  # written before the files were recorded: nothing vouches for them
        kinds = [k for k in finals if k != "metadata"]
        if any(not isinstance(records.get(k), dict) for k in kinds):
            return False
        if any(finals[k].stat().st_size != records[k].get("bytes") for k in kinds):
            return False
        return all(_file_sha256(finals[k]) == records[k].get("sha256") for k in kinds)
    except (OSError, ValueError):
        return False


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class WorkStore:
    """The chunked store of one input: ``labels``/``uncertainty`` zarr arrays (N, H, W), one
    chunk per plane (or per 2048² block), ``planes/<i>.json`` per finished plane, and
    ``fingerprint.json``."""

    def __init__(self, path: Path, labels, uncertainty, n_planes: int) -> None:
        self.path = path
        self.labels = labels
        self.uncertainty = uncertainty
        self.n_planes = n_planes

    @classmethod
    def open(cls, path: Path, stack: Stack, fingerprint: str, resume: bool,
             source: dict | None = None) -> "WorkStore":
        import zarr

        stamp = path / "fingerprint.json"
        if path.exists():
            try:
                same = json.loads(stamp.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not (resume and same):
                # inputs or parameters changed (or a fresh start was asked for): never mix
                shutil.rmtree(path)
        n = stack.n_planes
        h, w = stack.plane_shape
        chunks = (1, min(h, 2048), min(w, 2048))
        if not path.exists():
            (path / "planes").mkdir(parents=True)
            zarr.open_array(str(path / "labels.zarr"), mode="w", shape=(n, h, w), chunks=chunks,
                            dtype="int32", fill_value=0)
            zarr.open_array(str(path / "uncertainty.zarr"), mode="w", shape=(n, h, w), chunks=chunks,
                            dtype="float32", fill_value=0.0)
            # the source says whose store this is (see _other_inputs_results)
            stamp_data = {"fingerprint": fingerprint, "input": str(stack.path),
                          "source": source or _source(stack.path)}
            atomic_write_bytes(stamp, json.dumps(stamp_data).encode())
        labels = zarr.open_array(str(path / "labels.zarr"), mode="r+")
        unc = zarr.open_array(str(path / "uncertainty.zarr"), mode="r+")
        return cls(path, labels, unc, n)

    def missing_planes(self) -> list[int]:
        done = {int(p.stem) for p in (self.path / "planes").glob("*.json") if p.stem.isdigit()}
        return [i for i in range(self.n_planes) if i not in done]

    def write_plane(self, result: PlaneResult) -> None:
        self.labels[result.index] = result.labels
        self.uncertainty[result.index] = result.uncertainty
        # the marker last: its presence means the plane's chunks are complete
        marker = {"objects": result.objects, "zoom": result.zoom}
        atomic_write_bytes(self.path / "planes" / f"{result.index}.json", json.dumps(marker).encode())

    def _marker(self, i: int) -> dict:
        data = json.loads((self.path / "planes" / f"{i}.json").read_text())
        # stores written before markers held the zoom: a bare list of objects, at zoom 1
        return {"objects": data, "zoom": 1.0} if isinstance(data, list) else data

    def plane_objects(self, i: int) -> list[dict]:
        return self._marker(i)["objects"]

    def plane_zoom(self, i: int) -> float:
        return float(self._marker(i)["zoom"])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _finalize(store: WorkStore, stack: Stack, finals: dict[str, Path], spec: ModelSpec,
              identity: dict, fingerprint: str, source: dict | None = None) -> int:
    """Write the final files from the store as one set (see :class:`~.io.imageio.FileSet`): all of them
    under temporary names first, then renamed into place, metadata last (its fingerprint and
    the other files' sizes and digests mark the set as complete). Returns the number of objects."""
    import tifffile

    from . import __version__
    from .io.calibration import tiff_write_kwargs

    shape, axes = stack.output_shape, stack.output_axes
    n = stack.n_planes
    # the input's calibration, so labels measure in its units in Fiji and beside it
    calibration = tiff_write_kwargs(stack.pixel_size)
    calibration["metadata"] = {"axes": axes, **calibration["metadata"]}
    new = FileSet()
    try:
        # label images are mostly runs of one value: deflate makes them ~70x smaller (a 20-plane
        # 256^2 stack: 5.2 MB -> 75 kB, 55 ms) and every TIFF reader (Fiji, napari, tifffile,
        # skimage) reads it; uncertainty maps are float noise that deflate shrinks by only ~12 %
        for name, array, dtype, compression in (("labels", store.labels, np.int32, "zlib"),
                                                ("uncertainty", store.uncertainty, np.float32, None)):
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            with new.open(finals[name]) as f:
                # grey pages: a stack of 3 or 4 planes must not become one RGB(A) page
                tifffile.imwrite(f, _iter_planes(array, n), shape=shape, dtype=dtype, photometric="minisblack",
                                 bigtiff=nbytes > 2**31 - 2**25, compression=compression, **calibration)
        with new.open(finals["objects"], "w", newline="") as f:
            n_objects = _write_objects_csv(store, n, f)
        import torch

        meta = {
            "napari_ruac_version": __version__,
            "torch_version": torch.__version__,
            "sam2_version": package_version("sam2"),
            "model": identity,
            "device": spec.device,
            "parameters": spec.options,
            "input": describe(stack),
            "source": source or _source(stack.path),
            "plane_axes": stack.plane_axes,
            "plane_dims": list(stack.plane_dims),
            "outputs": {k: p.name for k, p in finals.items() if k != "metadata"},
            # what vouches for the files: a set mixed by a failure between the renames, or a
            # file changed since, does not match and is redone
            "output_files": {k: _file_record(new.temps[p]) for k, p in finals.items() if k != "metadata"},
            "csv_columns": list(CSV_COLUMNS),
            "n_objects": n_objects,
            # what each plane was seen at (differs between planes with --zoom auto)
            "plane_zooms": [store.plane_zoom(i) for i in range(n)],
            "fingerprint": fingerprint,
        }
        with new.open(finals["metadata"]) as f:
            f.write((json.dumps(meta, indent=2, default=str) + "\n").encode())
        try:
            new.commit()
        except PartlyReplaced as exc:
            raise _OutputError(exc.error, changed=True) from exc.error
    finally:
        new.discard()
    return n_objects


def _file_record(path: Path) -> dict:
    """Size and SHA-256 of a written file (what the metadata vouches for)."""
    return {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}


def _write_objects_csv(store: WorkStore, n: int, f: IO) -> int:
    """Stream every plane's objects into the open text file ``f``."""
    n_objects = 0
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i in range(n):
        for obj in store.plane_objects(i):
            writer.writerow([obj["label"], i, obj["area"], f"{obj['mean_uncertainty']:.6f}",
                             f"{obj['iou_score']:.6f}"])
            n_objects += 1
    return n_objects


def _iter_planes(array, n: int) -> Iterator[np.ndarray]:
    for i in range(n):
        yield np.asarray(array[i])


# ---------------------------------------------------------------------------- execution
_MODELS: "OrderedDict[tuple, Any]" = OrderedDict()  # (model, device, checkpoint, weights) -> model
_SEGMENTERS: "OrderedDict[str, Any]" = OrderedDict()
_MODEL_LOADS = 0
_CACHE_SIZE = 2  # a long-lived process (napari, a dask worker) keeps at most this many models
_SEGMENTER_LOCK = threading.Lock()


def get_segmenter(spec: ModelSpec):
    """This process's segmenter for ``spec``: the model is loaded once per process (and again
    only when its weights file changed)."""
    from .model.automatic import AutomaticSegmenter

    with _SEGMENTER_LOCK:
        seg = _SEGMENTERS.get(spec.key)
        if seg is None:
            seg = AutomaticSegmenter(_get_model(spec), **spec.options)
            _SEGMENTERS[spec.key] = seg
        _SEGMENTERS.move_to_end(spec.key)
        while len(_SEGMENTERS) > 4 * _CACHE_SIZE:
            _SEGMENTERS.popitem(last=False)
        return seg


def _get_model(spec: ModelSpec):
    global _MODEL_LOADS
    import warnings

    from .model import load_model
    from .model.build import UntrainedWeightsWarning

    key = (spec.model, spec.device, spec.checkpoint, spec.weights)
    model = _MODELS.get(key)
    if model is None:
        with warnings.catch_warnings():
            # said once per batch by the client, not once per worker
            warnings.simplefilter("ignore", UntrainedWeightsWarning)
            model = load_model(spec.model, device=spec.device, checkpoint=spec.checkpoint)
        _MODELS[key] = model
        _MODEL_LOADS += 1
        # segmenters of evicted models go with them
        while len(_MODELS) > _CACHE_SIZE:
            _MODELS.popitem(last=False)
            live = {id(m) for m in _MODELS.values()}
            for k in [k for k, sg in _SEGMENTERS.items() if id(sg.model) not in live]:
                del _SEGMENTERS[k]
    _MODELS.move_to_end(key)
    return model


def model_loads() -> int:
    """How many models this process has loaded (one per distinct spec)."""
    return _MODEL_LOADS


def segment_plane(plane: np.ndarray, index: int, spec: ModelSpec, where: str | None = None) -> PlaneResult:
    """Segment one plane with this process's cached segmenter (runs locally or on a worker);
    ``where`` names the plane in error messages (default ``plane <index>``)."""
    import torch

    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    # named, so that an error says which of a stack's planes is bad (e.g. holds NaNs)
    from .model.automatic import reported_iou

    segmenter = get_segmenter(spec)
    result = segmenter.segment(plane, name=where or f"plane {index}")
    objects = [
        {"label": o.label, "area": o.area, "mean_uncertainty": o.mean_uncertainty,
         "iou_score": reported_iou(segmenter.model, o.iou_score)}
        for o in result.objects
    ]
    return PlaneResult(index, result.labels, result.uncertainty, objects, float(result.zoom))


class _LocalExecutor:
    """Planes one after another in this process."""

    def __init__(self, spec: ModelSpec) -> None:
        get_segmenter(spec)  # load now: a bad model name fails before any file is touched

    def run(self, stack: Stack, todo: list[int], spec: ModelSpec, cancel) -> Iterator[PlaneResult]:
        for i in todo:
            if cancel is not None and cancel.is_set():
                return
            yield segment_plane(stack.read_plane(i), i, spec, plane_name(stack, i))

    def close(self) -> None:
        pass


class _ClusterLost(Exception):
    """The dask cluster lost a plane (its worker died) or the scheduler: not the input's fault,
    and the planes stored so far are good, so the file fails and its work store is kept."""


#: seconds to wait for a dask scheduler to answer (also to come back) and to have a worker
SCHEDULER_TIMEOUT_S = 30.0
#: how often a batch waiting for planes asks the scheduler whether it still has workers
WORKER_CHECK_S = 1.0


class _DaskExecutor:
    """Planes on a dask.distributed cluster; the client reads planes and sends them, so workers
    need no access to the input files, and keeps a few planes per worker in flight."""

    def __init__(self, spec: ModelSpec, workers: int | None, scheduler: str | None) -> None:
        import logging

        from distributed import Client

        self.cluster = None
        self.client = None
        self.lost: str | None = None  # why the scheduler is gone, once it is
        timeout = f"{SCHEDULER_TIMEOUT_S:g}s"
        try:
            if scheduler is not None:
                try:
                    self.client = Client(scheduler, timeout=timeout)
                except (OSError, ValueError, TypeError) as exc:  # refused, timed out, a malformed address
                    raise BatchError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from exc
            else:
                self.cluster = local_cluster(workers, silence_logs=logging.ERROR)
                self.client = Client(self.cluster, timeout=timeout)
            self.address = self.client.scheduler.address
            try:
                # planes sent to a cluster without workers would wait for ever
                self.client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT_S)
            except TimeoutError as exc:
                raise BatchError(
                    f"the dask scheduler at {self.address} has no workers (waited {SCHEDULER_TIMEOUT_S:g} s); "
                    f"start some, e.g. `dask worker {self.address}`"
                ) from exc
        except BaseException:
            self.close()
            raise
        self.window = max(2, 2 * self._n_workers())
        # threads per worker default to 1: processes, not threads, share the machine
        if spec.threads is None:
            spec.threads = 1

    def run(self, stack: Stack, todo: list[int], spec: ModelSpec, cancel) -> Iterator[PlaneResult]:
        from distributed import as_completed

        if self.lost is not None and todo:
            raise _ClusterLost(f"not segmented: {self.lost}")
        pending = iter(todo)
        futures = as_completed()
        planes = {}  # future key -> plane index, to name the plane a failure hit
        submitted = 0
        for i in pending:
            fut = self._submit(stack, i, spec)
            planes[fut.key] = i
            futures.add(fut)
            submitted += 1
            if submitted >= self.window:
                break
        watch = [None, time.monotonic()]  # for _check_workers
        try:
            while (fut := self._next_done(futures, watch, stack, planes)) is not None:
                try:
                    result = self._result(fut, watch, stack, planes)
                except Exception as exc:
                    lost = self._lost_plane(exc, stack, planes.get(fut.key))
                    if lost is exc:  # the plane's own error, as it is
                        raise
                    raise lost from exc
                planes.pop(fut.key, None)
                fut.release()
                yield result
                if cancel is not None and cancel.is_set():
                    return
                nxt = next(pending, None)
                if nxt is not None:
                    fut = self._submit(stack, nxt, spec)
                    planes[fut.key] = nxt
                    futures.add(fut)
        finally:
            for fut in list(futures.futures):
                fut.cancel()

    def _n_workers(self) -> int:
        info = self.client.scheduler_info(n_workers=-1) if _takes_n_workers(self.client) else self.client.scheduler_info()
        return len(info["workers"])

    def _next_done(self, futures, watch: list, stack: Stack, planes: dict):
        """The next finished plane's future (None when all are), waiting as long as the cluster
        has workers (see :meth:`_check_workers`)."""
        while not futures.has_ready():
            if futures.is_empty():
                return None
            self._check_workers(watch, stack, planes)
            with futures.thread_condition:
                futures.thread_condition.wait(timeout=0.1)
        return next(futures)

    def _result(self, fut, watch: list, stack: Stack, planes: dict):
        """``fut``'s result, waiting as long as the cluster has workers: a plane whose worker
        was retired is done for as_completed but computed again elsewhere."""
        while True:
            try:
                return fut.result(timeout=WORKER_CHECK_S)
            except TimeoutError:
                self._check_workers(watch, stack, planes)

    def _check_workers(self, watch: list, stack: Stack, planes: dict) -> None:
        """While planes wait: a cluster that has lost all its workers, with nothing to restart
        them (workers started by hand, a job scheduler's time limit), would leave them waiting
        for ever. After SCHEDULER_TIMEOUT_S without a worker the file fails (its stored planes
        kept) and so do the files after it, at once. ``watch``: [since when none, last asked]."""
        now = time.monotonic()
        if now - watch[1] < WORKER_CHECK_S:
            return
        watch[1] = now
        if self._n_workers():
            watch[0] = None
        elif watch[0] is None:
            watch[0] = now
        elif now - watch[0] >= SCHEDULER_TIMEOUT_S:
            waiting = [plane_name(stack, i) for i in sorted(planes.values())]
            more = f" and {len(waiting) - 3} more" if len(waiting) > 3 else ""
            self.lost = f"the dask scheduler at {self.address} has had no workers for {SCHEDULER_TIMEOUT_S:g} s"
            raise _ClusterLost(f"{self.lost}: {', '.join(waiting[:3])}{more} of {stack.path} were not segmented; "
                               "the planes finished so far are kept: a rerun (with workers) resumes from them")

    def _lost_plane(self, exc: Exception, stack: Stack, i: int | None) -> Exception:
        """``exc`` from a plane's future as the batch reports it: the plane's own error (a NaN
        plane, a bad checkpoint) as it is; a dead worker or a lost scheduler as _ClusterLost."""
        from distributed import KilledWorker

        where = f"{plane_name(stack, i) if i is not None else 'a plane'} of {stack.path}"
        kept = "the planes finished so far are kept: a rerun resumes from them"
        if isinstance(exc, KilledWorker):
            return _ClusterLost(f"a dask worker died while segmenting {where} (killed, or out of memory?); {kept}")
        if self.client.status in ("closing", "closed") or "scheduler-connection-lost" in str(exc):
            self.lost = f"lost the connection to the dask scheduler at {self.address}"
            return _ClusterLost(f"{self.lost} while segmenting {where}; {kept}")
        return exc

    def _submit(self, stack: Stack, i: int, spec: ModelSpec):
        plane = stack.read_plane(i)
        return self.client.submit(segment_plane, plane, i, spec, plane_name(stack, i), pure=False)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def local_cluster(n_workers: int, **kwargs):
    """A dask ``LocalCluster`` of single-threaded worker processes on 127.0.0.1, set up for torch.

    dask's nannies export ``MALLOC_TRIM_THRESHOLD_=65536`` to their workers; setting it at all
    turns off glibc's adaptive mmap threshold, so every large tensor is a fresh mmap and its
    page faults: segmentation ran 2-3x slower in workers than in this process (measured). The
    variable is left unset here. Workers you start yourself for ``--scheduler`` should not
    export it either.
    """
    import dask
    from distributed import LocalCluster

    options = dict(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                   dashboard_address=None)
    options.update(kwargs)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(**options)


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _make_executor(spec: ModelSpec, workers: int | None, scheduler: str | None):
    if workers is None and scheduler is None:
        return _LocalExecutor(spec)
    return _DaskExecutor(spec, workers, scheduler)


class _Tracker:
    """Counts planes and reports :class:`BatchProgress` with an ETA from this run's rate."""

    def __init__(self, total: int, n_files: int, callback) -> None:
        self.total = total
        self.n_files = n_files
        self.callback = callback
        self.done = 0
        self.computed = 0
        self.start = time.monotonic()
        self.current_file = ""
        self.file_index = 0

    def skip(self, n: int) -> None:
        self.done += n

    def plane_done(self) -> None:
        self.done += 1
        self.computed += 1
        if self.callback is None:
            return
        elapsed = time.monotonic() - self.start
        rate = self.computed / elapsed if elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        self.callback(BatchProgress(self.done, self.total, self.current_file, eta, self.file_index,
                                    self.n_files, elapsed, rate))


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Flags of ``napari-ruac segment`` (they mirror :func:`segment_files`)."""
    import argparse

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="TIFF/OME-TIFF/multi-page TIFF files, zarr stores, or folders of them")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument("--model", default="micro", help="model name or checkpoint path (default: micro)")
    parser.add_argument("--checkpoint", default=None, help="weights file for --model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="start a local dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="use an existing dask scheduler")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue an interrupted run from its work store (default: on)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results in OUTDIR that another input with the same file name wrote there "
                             "(default: that input fails and they stay); re-running the same input never needs it")
    parser.add_argument("--axes", default=None, help="axes of the inputs, e.g. TZCYX (default: from the file)")
    parser.add_argument("--channel", type=int, default=None, help="channel to segment when there are more than 4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    g = parser.add_argument_group("automatic segmentation")
    g.add_argument("--points-per-side", type=int, default=16,
                   help="grid of point prompts per tile/crop side (default: 16)")
    g.add_argument("--points-per-batch", type=int, default=64, help="at most this many points per decoder pass (fewer on a CPU, where ~1 MB of image tokens per pass stays in the caches)")
    g.add_argument("--iou-thresh", dest="pred_iou_thresh", type=float, default=None,
                   help="drop masks whose predicted IoU is not above this (default: 0.7 for SAM2's weights; "
                        "off for ours, whose IoU head was not trained for it)")
    g.add_argument("--stability-thresh", dest="stability_score_thresh", type=float, default=None,
                   help="drop masks whose stability score is below this (default: 0.8 for SAM2's weights, "
                        "0.5 for ours, whose logits are softer)")
    g.add_argument("--max-uncertainty", dest="max_mean_uncertainty", type=float, default=0.6,
                   help="drop masks whose mean uncertainty (bits) exceeds this")
    g.add_argument("--nms-thresh", dest="box_nms_thresh", type=float, default=0.7,
                   help="box IoU above which the weaker of two masks is dropped (default: 0.7)")
    g.add_argument("--refine-rounds", type=int, default=1,
                   help="re-click every mask at its centre this many times, so fragments from clicks near an "
                        "object's edge become the whole object (default: 1; 0 = one grid pass, as SAM2)")
    g.add_argument("--reclick", action=argparse.BooleanOptionalAction, default=None,
                   help="click every object found once more at its innermost pixel, as a user would, and decode "
                        "it like an interactive click (context window, test-time views); default: on for our "
                        "models (DSB2018 F1 0.32 -> 0.55), off for SAM2's weights")
    g.add_argument("--views", default=None,
                   help="test-time views of those clicks: 'auto' (4 for our models), 1, 2, 4 or 8")
    g.add_argument("--scales", default="1",
                   help="test-time scales of those clicks: 1 (default), 3 or 5 (zooms a quarter octave apart; "
                        "DSB2018 F1 0.728 -> 0.749 with 3, for ~1.6x the time), or 'auto' (3 for our models)")
    g.add_argument("--point-filter", dest="point_in_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a grid click's mask only if it holds the click (default: on)")
    g.add_argument("--rank-by", choices=("auto", "iou", "confidence"), default="auto",
                   help="what NMS prefers: predicted IoU (SAM2's weights) or stability x (1 - mean uncertainty) "
                        "(ours; default: auto)")
    g.add_argument("--crop-layers", dest="crop_n_layers", type=int, default=0,
                   help="zoomed crop layers for small objects")
    g.add_argument("--min-area", type=int, default=0, help="smallest object kept, in pixels")
    g.add_argument("--min-kept", type=float, default=None,
                   help="drop an object that kept less than this fraction of its own mask after overlaps "
                        "were resolved (a duplicate or fragment; default: 0 = keep)")
    g.add_argument("--merge-overlap", type=float, default=None,
                   help="merge masks overlapping by at least this fraction of the smaller one into one object "
                        "(pieces of one object; default: 0.5 for ours, 0 = off for SAM2's weights)")
    g.add_argument("--mode", choices=("analytic", "mc", "deterministic"), default=None,
                   help="uncertainty mode (default: the model's, analytic for Bayesian models)")
    g.add_argument("--samples", type=int, default=8, help="Monte-Carlo samples (mode mc)")
    g.add_argument("--tile-size", type=int, default=None,
                   help="planes larger than this are tiled (default: the model's input size, 256 for ours)")
    g.add_argument("--tile-overlap", type=int, default=None,
                   help="tile overlap in pixels, larger than the biggest object (default: tile/4)")
    g.add_argument("--zoom", type=zoom_value, default="auto",
                   help="'auto' (default): each plane at the zoom that shows its typical object at the size "
                        "the model learned (estimated from the plane), or a number to resize every plane by "
                        "(0.5: objects twice the size it was trained on; 1: as they are); outputs keep the "
                        "planes' size")


def run(args) -> int:
    # every segmenter or run option the command line has a flag for
    options = {k: getattr(args, k) for k in SEGMENTER_OPTIONS + RUN_OPTIONS if hasattr(args, k)}
    bar = ProgressBar(sys.stderr)
    try:
        summary = segment_files(
            args.inputs, args.output, model=args.model, device=args.device, workers=args.workers,
            scheduler=args.scheduler, resume=args.resume, progress=bar, **options,
        )
    except BatchError as exc:
        print(f"napari-ruac segment: error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.finish()
    print(summary.format())
    return 0 if summary.ok else 1


class ProgressBar:
    """A one-line text progress bar with rate and ETA."""

    def __init__(self, stream, width: int = 30, log_every_s: float = 10.0) -> None:
        self.stream = stream
        self.width = width
        self.used = False
        # redirected to a file or a cluster job log: whole lines now and then, no \r redraws
        self.interactive = hasattr(stream, "isatty") and stream.isatty()
        self.log_every_s = log_every_s
        self.last_line = -math.inf

    def __call__(self, p: BatchProgress) -> None:
        frac = p.done_planes / max(p.total_planes, 1)
        bar = "#" * int(self.width * frac)
        eta = _hms(p.eta_s) if p.eta_s is not None else "--:--"
        rate = f"{p.planes_per_s:.2f} planes/s" if p.planes_per_s else ""
        name = Path(p.current_file).name
        text = (f"[{bar:<{self.width}}] {p.done_planes}/{p.total_planes} planes "
                f"{rate} ETA {eta} file {p.file_index}/{p.n_files} {name}")
        if self.interactive:
            self.stream.write(f"\r{text}\x1b[K")
            self.used = True
        elif time.monotonic() - self.last_line >= self.log_every_s or p.done_planes == p.total_planes:
            self.stream.write(text + "\n")
            self.last_line = time.monotonic()
        self.stream.flush()

    def finish(self) -> None:
        if self.used:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


__all__ = [
    "BatchError", "BatchProgress", "BatchSummary", "FileResult", "ModelSpec", "PlaneResult",
    "add_arguments", "local_cluster", "model_loads", "run", "segment_files", "segment_plane",
]
