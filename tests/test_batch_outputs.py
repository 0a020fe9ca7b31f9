"""``segment``'s output set on disk: written as one set (never old and new files mixed), kept
resumable when writing fails, only called complete when the files are the ones its metadata
describes, and never taken over by another input that has the same name. Real TIFF files and
the ``test-tiny`` model; a full disk is simulated by fault injection where said."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_ruac.batch as batch
from napari_ruac.batch import segment_files

FAST = dict(model="test-tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            max_mean_uncertainty=1.0, threads=1)
# other settings, other results: the random model's objects here fill their 40x48 planes
OTHER = {**FAST, "min_area": 2000}
KINDS = ("labels", "uncertainty", "objects", "metadata")


def stack(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(np.uint16)


def outputs(out: Path, stem: str) -> dict[str, Path]:
    return {k: out / f"{stem}_{k}.{ext}" for k, ext in
            zip(KINDS, ("tif", "tif", "csv", "json"))}


def snapshot(out: Path, stem: str) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in outputs(out, stem).items()}


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.tmp"))


def done_planes(out: Path, stem: str) -> int:
    return len(list((out / ".ruac-work" / stem / "planes").glob("*.json")))


def assert_consistent(out: Path, stem: str, n_planes: int) -> None:
    """Every CSV row describes a label of labels.tif, every label has a row, and the metadata
    describes these files."""
    files = outputs(out, stem)
    labels = tifffile.imread(files["labels"])
    labels = labels.reshape(n_planes, *labels.shape[-2:])
    rows = {(int(r["plane"]), int(r["label"])): int(r["area"]) for r in csv.DictReader(files["objects"].open())}
    present = {(i, int(v)) for i in range(n_planes) for v in np.unique(labels[i]) if v}
    assert set(rows) == present
    for (i, label), area in rows.items():
        assert (labels[i] == label).sum() == area
    meta = json.loads(files["metadata"].read_text())
    assert meta["n_objects"] == len(rows)
    for kind in ("labels", "uncertainty", "objects"):
        assert meta["output_files"][kind]["bytes"] == files[kind].stat().st_size


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack((3, 40, 48)), photometric="minisblack")
    return path


@pytest.fixture
def reference(src, tmp_path):
    """The results of ``OTHER`` written in one go into a folder of their own."""
    ref = tmp_path / "reference"
    assert segment_files([src], ref, **OTHER).ok
    return snapshot(ref, "cells")


# ---------------------------------------------------------------------------- a full disk
def test_a_full_disk_while_writing_the_outputs_leaves_the_earlier_set_whole(src, tmp_path, monkeypatch, reference):
    """Fault injection: tifffile's one call that writes uncompressed pixel data (numpy's
    ``tofile``) fails as numpy does on a full disk, with an OSError that has no errno. The
    labels (deflated, written through another call) are written before it: the old code had
    already put the new labels.tif in place beside the old uncertainty, CSV and metadata, and
    deleted the work store."""
    out = tmp_path / "out"
    assert segment_files([src], out, **FAST).ok
    before = snapshot(out, "cells")

    def no_space(self, data, dtype=None, /):
        raise OSError("16384 requested and 5048 written")

    with monkeypatch.context() as m:
        m.setattr(tifffile.FileHandle, "write_array", no_space)
        failed = segment_files([src], out, **OTHER)
    result = failed.files[0]
    assert result.status == "failed"
    assert "disk full" in result.reason and "no space left on device" in result.reason
    assert "unchanged" in result.reason and "kept" in result.reason
    assert snapshot(out, "cells") == before  # the earlier set, whole and untouched
    assert temporaries(out) == []
    assert done_planes(out, "cells") == 3  # every computed plane kept

    # space again: the rerun only writes the files, and they are what one run writes
    again = segment_files([src], out, **OTHER)
    assert again.ok and again.files[0].status == "done" and again.files[0].resumed_planes == 3
    assert snapshot(out, "cells") == reference
    assert not (out / ".ruac-work").exists()
    assert_consistent(out, "cells", 3)


def test_a_full_disk_while_storing_planes_keeps_those_done_for_a_rerun(src, tmp_path, monkeypatch, reference):
    """Fault injection: writing the third plane into the work store fails with ENOSPC. The old
    code deleted the store, so the two planes already computed were lost."""
    out = tmp_path / "out"
    write_plane = batch.WorkStore.write_plane

    def fill_up(self, result):
        if result.index == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_plane(self, result)

    with monkeypatch.context() as m:
        m.setattr(batch.WorkStore, "write_plane", fill_up)
        failed = segment_files([src], out, **OTHER)
    assert failed.files[0].status == "failed"
    assert "disk full (no space left on device)" in failed.files[0].reason
    assert "2 planes computed so far are kept" in failed.files[0].reason
    assert done_planes(out, "cells") == 2 and not outputs(out, "cells")["labels"].exists()
    again = segment_files([src], out, **OTHER)
    assert again.ok and again.files[0].resumed_planes == 2
    assert snapshot(out, "cells") == reference


def test_a_failure_between_the_renames_is_never_called_complete(src, tmp_path, monkeypatch, reference):
    """Fault injection: renaming the new uncertainty file into place fails after the new labels
    file was renamed (the one moment a mixed set can exist on disk). The set must then not pass
    for complete, and the planes stay for a rerun; the old code reported the first settings'
    files 'already complete' beside the second settings' labels, and had deleted the store."""
    out = tmp_path / "out"
    assert segment_files([src], out, **FAST).ok
    replace = os.replace

    def fail_on_uncertainty(a, b, *args, **kwargs):
        if str(b).endswith("cells_uncertainty.tif") and str(a).endswith(".tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return replace(a, b, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail_on_uncertainty)
        failed = segment_files([src], out, **OTHER)
    assert failed.files[0].status == "failed"
    assert "already replaced" in failed.files[0].reason and "incomplete" in failed.files[0].reason
    assert temporaries(out) == [] and done_planes(out, "cells") == 3
    # the first settings' metadata now sits beside the second settings' labels
    again = segment_files([src], out, **FAST)
    assert again.files[0].status == "done"
    assert_consistent(out, "cells", 3)
    # and from scratch: the second settings again
    assert segment_files([src], out, **OTHER).files[0].status == "done"
    assert snapshot(out, "cells") == reference


def test_a_mixed_or_changed_set_is_redone_not_called_complete(src, tmp_path):
    """The audit's set on disk: the labels of one run beside the CSV, uncertainty and metadata
    of another. The old code only compared the metadata's fingerprint and said 'already
    complete'. A file changed after the run is not vouched for either; the same bytes copied
    elsewhere still are."""
    out, other = tmp_path / "out", tmp_path / "other"
    assert segment_files([src], out, **FAST).ok
    assert segment_files([src], other, **OTHER).ok
    first = snapshot(out, "cells")
    assert json.loads(first["metadata"])["n_objects"] == 3
    assert first["labels"] != snapshot(other, "cells")["labels"]
    shutil.copy2(outputs(other, "cells")["labels"], outputs(out, "cells")["labels"])
    again = segment_files([src], out, **FAST)
    assert again.files[0].status == "done"
    assert snapshot(out, "cells") == first
    assert_consistent(out, "cells", 3)
    # the same set again: complete, without writing anything
    mtime = outputs(out, "cells")["labels"].stat().st_mtime_ns
    assert segment_files([src], out, **FAST).files[0].status == "complete"
    assert outputs(out, "cells")["labels"].stat().st_mtime_ns == mtime
    # a file changed after the run, even in one byte and not in size: redone
    unc = outputs(out, "cells")["uncertainty"]
    data = bytearray(unc.read_bytes())
    data[-1] ^= 0x01
    unc.write_bytes(bytes(data))
    assert segment_files([src], out, **FAST).files[0].status == "done"
    assert snapshot(out, "cells") == first
    # copied elsewhere (new modification times, same bytes): still complete
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copyfile)
    assert segment_files([src], copy, **FAST).files[0].status == "complete"


# ---------------------------------------------------------------------------- another input, same name
def two_days(tmp_path) -> tuple[Path, Path]:
    paths = []
    for day, seed in (("day1", 1), ("day2", 2)):
        (tmp_path / day).mkdir()
        paths.append(tmp_path / day / "cell.tif")
        tifffile.imwrite(paths[-1], stack((2, 32, 32), seed=seed), photometric="minisblack")
    return paths[0], paths[1]


def test_another_input_with_the_same_name_does_not_overwrite_the_results(tmp_path, monkeypatch):
    """day1/cell.tif, then day2/cell.tif into the same folder: the old code silently replaced all
    four cell_* files."""
    day1, day2 = two_days(tmp_path)
    out = tmp_path / "out"
    assert segment_files([day1], out, **FAST).ok
    before = snapshot(out, "cell")
    refused = segment_files([day2], out, **FAST)
    reason = refused.files[0].reason
    assert refused.files[0].status == "failed" and not refused.ok
    assert str(day1) in reason and str(day2) in reason
    assert "another output folder" in reason and "--overwrite" in reason
    assert snapshot(out, "cell") == before and temporaries(out) == []
    # the same input is still the same input: spelled another way, moved, or re-run
    monkeypatch.chdir(tmp_path)
    assert segment_files([Path("day1/cell.tif")], out, **FAST).files[0].status == "complete"
    moved = tmp_path / "archive" / "cell.tif"
    moved.parent.mkdir()
    shutil.copy2(day1, moved)  # content and modification time kept
    assert segment_files([moved], out, **FAST).files[0].status == "complete"
    assert segment_files([day1], out, **OTHER).files[0].status == "done"  # new settings, same input
    # asked for: replaced, and from then on day2's
    taken = segment_files([day2], out, overwrite=True, **FAST)
    assert taken.ok and taken.files[0].status == "done"
    assert json.loads(outputs(out, "cell")["metadata"].read_text())["source"]["path"] == str(day2.resolve())
    assert segment_files([day2], out, **FAST).files[0].status == "complete"
    assert segment_files([day1], out, **FAST).files[0].status == "failed"


def test_another_input_does_not_take_over_an_unfinished_runs_work_store(tmp_path):
    day1, day2 = two_days(tmp_path)
    out = tmp_path / "out"
    cancel = threading.Event()
    kept = segment_files([day1], out, progress=lambda p: cancel.set(), cancel=cancel, keep_work=True, **FAST)
    assert kept.cancelled and done_planes(out, "cell") == 1
    refused = segment_files([day2], out, **FAST)
    assert refused.files[0].status == "failed" and "work store" in refused.files[0].reason
    assert str(day1) in refused.files[0].reason
    resumed = segment_files([day1], out, **FAST)
    assert resumed.ok and resumed.files[0].resumed_planes == 1


def test_cli_overwrite_flag(tmp_path, capsys):
    from napari_ruac.cli import main

    day1, day2 = two_days(tmp_path)
    out = tmp_path / "out"
    args = ["-o", str(out), "--model", "test-tiny", "--points-per-side", "4", "--threads", "1"]
    assert main(["segment", str(day1), *args]) == 0
    capsys.readouterr()
    assert main(["segment", str(day2), *args]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "--overwrite" in printed and str(day1) in printed
    assert main(["segment", str(day2), *args, "--overwrite"]) == 0
    assert json.loads(outputs(out, "cell")["metadata"].read_text())["input"]["path"] == str(day2)
