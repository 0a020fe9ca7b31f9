"""``napari-ruac segment`` / ``segment_files``: formats, outputs, resume state, cancellation,
progress and every kind of bad input, on real files with the ``test-tiny`` model."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_ruac.batch import BatchError, BatchProgress, model_loads, segment_files
from napari_ruac.io.normalize import ImageError
from napari_ruac.io.stacks import open_stack

FAST = dict(model="test-tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            max_mean_uncertainty=1.0, threads=1)


def stack(shape, seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(dtype)


def outputs(out: Path, stem: str) -> dict[str, Path]:
    return {k: out / f"{stem}_{k}.{ext}" for k, ext in
            (("labels", "tif"), ("uncertainty", "tif"), ("objects", "csv"), ("metadata", "json"))}


def leftovers(out: Path) -> list[str]:
    """Anything that is not a final output: temporary files, work stores."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith(".tmp") or ".ruac-work" in p.parts)


# ---------------------------------------------------------------------------- readers
def test_readers_know_the_axes_of_each_format(tmp_path):
    a = stack((3, 4, 24, 32))
    tifffile.imwrite(tmp_path / "ome.ome.tif", a, metadata={"axes": "TZYX"})
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, metadata={"axes": "TZYX"})
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:  # plain multi-page, one write per page
        for page in a[0]:
            tw.write(page, metadata=None, photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", stack((2, 24, 32, 3), dtype=np.uint8), photometric="rgb")
    z = zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=(5, 24, 32), chunks=(1, 24, 32), dtype="f4")
    z[:] = 1.0
    expect = {"ome.ome.tif": ("TZYX", 12), "ij.tif": ("TZYX", 12), "pages.tif": ("ZYX", 4),
              "rgb.tif": ("ZYXS", 2), "z.zarr": ("ZYX", 5)}
    for name, (axes, n) in expect.items():
        with open_stack(tmp_path / name) as s:
            assert (s.axes, s.n_planes, s.plane_shape) == (axes, n, (24, 32)), name
    with open_stack(tmp_path / "ome.ome.tif") as s:
        assert s.plane_coords(6) == {"T": 1, "Z": 2}
        assert np.array_equal(s.read_plane(6), a[1, 2])
    with open_stack(tmp_path / "rgb.tif") as s:
        assert s.read_plane(1).shape == (24, 32, 3)


def test_axes_override_and_channel_choice(tmp_path):
    a = stack((2, 6, 20, 20))  # Z, C with 6 channels
    tifffile.imwrite(tmp_path / "zc.tif", a, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageError, match="6 channels.*--channel"):
        open_stack(tmp_path / "zc.tif")
    with open_stack(tmp_path / "zc.tif", channel=4) as s:
        assert s.n_planes == 2 and np.array_equal(s.read_plane(1), a[1, 4])
    with open_stack(tmp_path / "zc.tif", axes="TZYX") as s:
        assert s.n_planes == 12
    with pytest.raises(ImageError, match="do not fit"):
        open_stack(tmp_path / "zc.tif", axes="ZYX")
    # five named axes with two channels: the model needs one of them chosen
    tifffile.imwrite(tmp_path / "tzc.ome.tif", stack((2, 2, 2, 16, 16)), metadata={"axes": "TZCYX"})
    with pytest.raises(ImageError, match="2 channels"):
        open_stack(tmp_path / "tzc.ome.tif")
    with open_stack(tmp_path / "tzc.ome.tif", channel=1) as s:
        assert s.n_planes == 4 and s.output_shape == (2, 2, 16, 16) and s.read_plane(3).shape == (16, 16)


# ---------------------------------------------------------------------------- outputs
def test_a_model_with_an_untrained_iou_head_writes_no_predicted_iou(tmp_path):
    # micro's IoU head was never trained: its number sits near the training data's mean IoU
    # whatever the mask, so the objects table leaves it out (nan) rather than mislead
    yy, xx = np.mgrid[:96, :96]
    img = np.zeros((96, 96), np.float32)
    for cy, cx in ((30, 30), (60, 66)):
        img += ((yy - cy) ** 2 + (xx - cx) ** 2 < 100) * 800.0
    img += np.random.default_rng(0).normal(100, 10, img.shape)
    src = tmp_path / "nuclei.tif"
    tifffile.imwrite(src, img.astype(np.uint16))
    summary = segment_files([src], tmp_path / "out", model="micro", points_per_side=4, threads=1)
    assert summary.ok
    rows = list(csv.DictReader(outputs(tmp_path / "out", "nuclei")["objects"].open()))
    assert rows and all(np.isnan(float(r["iou_score"])) for r in rows)
    assert all(int(r["area"]) > 0 for r in rows)


def test_outputs_of_a_time_and_z_stack(tmp_path):
    a = stack((2, 3, 40, 48))
    src = tmp_path / "cells.ome.tif"
    tifffile.imwrite(src, a, metadata={"axes": "TZYX"})
    seen: list[BatchProgress] = []
    summary = segment_files([src], tmp_path / "out", progress=seen.append, **FAST)
    assert summary.ok and summary.files[0].status == "done"
    files = outputs(tmp_path / "out", "cells")
    labels = tifffile.imread(files["labels"])
    unc = tifffile.imread(files["uncertainty"])
    assert labels.shape == unc.shape == (2, 3, 40, 48)
    assert labels.dtype == np.int32 and unc.dtype == np.float32
    assert 0 <= unc.min() and unc.max() <= 1
    with tifffile.TiffFile(files["labels"]) as tf:
        assert tf.series[0].axes == "TZYX"
        assert tf.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE  # labels are deflated
    rows = list(csv.DictReader(files["objects"].open()))
    assert files["objects"].read_text().splitlines()[0] == "label,plane,area,mean_uncertainty,iou_score"
    assert rows
    assert all(0 <= float(r["iou_score"]) <= 1.5 for r in rows)  # SAM2-style heads: the decoder's IoU
    for r in rows:  # every row describes a label that exists in its plane
        plane = labels.reshape(6, 40, 48)[int(r["plane"])]
        assert (plane == int(r["label"])).sum() == int(r["area"])
    meta = json.loads(files["metadata"].read_text())
    assert meta["model"]["name"] == "test-tiny" and meta["parameters"]["points_per_side"] == 4
    assert meta["plane_zooms"] == [1.0] * 6
    assert meta["input"]["axes"] == "TZYX" and meta["napari_ruac_version"]
    # progress after every plane, with an ETA
    assert [p.done_planes for p in seen] == list(range(1, 7))
    assert seen[-1].total_planes == 6 and seen[-1].eta_s == 0 and seen[2].current_file == str(src)
    assert leftovers(tmp_path / "out") == []


def test_a_three_plane_stack_is_written_as_three_grey_pages(tmp_path):
    # (3, Y, X) is also the shape of planar RGB: outputs must stay one grey page per plane
    src = tmp_path / "z3.tif"
    tifffile.imwrite(src, stack((3, 40, 48)), metadata={"axes": "ZYX"}, photometric="minisblack")
    assert segment_files([src], tmp_path / "out", **FAST).ok
    for name in ("labels", "uncertainty"):
        with tifffile.TiffFile(outputs(tmp_path / "out", "z3")[name]) as tf:
            assert len(tf.pages) == 3 and tf.series[0].axes == "ZYX"
            assert tf.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK and tf.pages[0].samplesperpixel == 1


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    # a lab shares results: atomic writes must not leave mkstemp's owner-only 0o600 files
    src = tmp_path / "one.tif"
    tifffile.imwrite(src, stack((40, 48)))
    old = os.umask(0o022)
    try:
        assert segment_files([src], tmp_path / "out", **FAST).ok
    finally:
        os.umask(old)
    for f in outputs(tmp_path / "out", "one").values():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    from napari_ruac.io.imageio import atomic_write_text, write_tiff_atomic

    target = tmp_path / "labels.tif"
    write_tiff_atomic(target, np.zeros((4, 4), np.uint8))
    target.chmod(0o640)
    write_tiff_atomic(target, np.ones((4, 4), np.uint8))
    assert target.stat().st_mode & 0o777 == 0o640 and tifffile.imread(target).max() == 1
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_2d_rgb_and_zarr_inputs(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", stack((30, 34)))
    tifffile.imwrite(tmp_path / "colour.tif", stack((30, 34, 3), dtype=np.uint8), photometric="rgb")
    z = zarr.open_array(str(tmp_path / "vol.zarr"), mode="w", shape=(3, 30, 34), chunks=(1, 30, 34), dtype="u2")
    z[:] = stack((3, 30, 34))
    summary = segment_files([tmp_path / "flat.tif", tmp_path / "colour.tif", tmp_path / "vol.zarr"],
                            tmp_path / "out", **FAST)
    assert summary.ok, summary.format()
    assert tifffile.imread(tmp_path / "out" / "flat_labels.tif").shape == (30, 34)
    assert tifffile.imread(tmp_path / "out" / "colour_uncertainty.tif").shape == (30, 34)
    assert tifffile.imread(tmp_path / "out" / "vol_labels.tif").shape == (3, 30, 34)


def test_a_finished_input_is_not_redone_and_changed_parameters_redo_it(tmp_path):
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack((2, 32, 32)))
    first = segment_files([src], tmp_path / "out", **FAST)
    mtime = outputs(tmp_path / "out", "s")["labels"].stat().st_mtime_ns
    again = segment_files([src], tmp_path / "out", **FAST)
    assert again.files[0].status == "complete"
    assert outputs(tmp_path / "out", "s")["labels"].stat().st_mtime_ns == mtime
    changed = segment_files([src], tmp_path / "out", **{**FAST, "points_per_side": 3})
    assert changed.files[0].status == "done" and first.ok
    meta = json.loads(outputs(tmp_path / "out", "s")["metadata"].read_text())
    assert meta["parameters"]["points_per_side"] == 3
    zoomed = segment_files([src], tmp_path / "out", **{**FAST, "points_per_side": 3, "zoom": 0.5})
    assert zoomed.files[0].status == "done"  # a new zoom is a new result, not a resume
    meta = json.loads(outputs(tmp_path / "out", "s")["metadata"].read_text())
    assert meta["parameters"]["zoom"] == 0.5
    assert tifffile.imread(outputs(tmp_path / "out", "s")["labels"]).shape == (2, 32, 32)


def test_the_model_is_loaded_once_per_process(tmp_path):
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack((3, 32, 32)), photometric="minisblack")
    segment_files([src], tmp_path / "a", **FAST)
    before = model_loads()
    segment_files([src], tmp_path / "b", **FAST)
    segment_files([src], tmp_path / "c", **{**FAST, "points_per_side": 3})  # other options, same model
    assert model_loads() == before


def test_a_stale_work_store_is_not_mixed_in(tmp_path):
    """A store left by a run with other parameters (or another input) is discarded."""
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack((4, 32, 32)), photometric="minisblack")
    out = tmp_path / "out"
    cancel = threading.Event()

    def stop_after_two(p):
        if p.done_planes == 2:
            cancel.set()

    kept = segment_files([src], out, progress=stop_after_two, cancel=cancel, keep_work=True,
                         **{**FAST, "points_per_side": 3})
    assert kept.cancelled and (out / ".ruac-work" / "s" / "planes" / "1.json").exists()
    fresh = segment_files([src], out, **FAST)
    assert fresh.files[0].resumed_planes == 0  # other parameters: started over
    reference = segment_files([src], tmp_path / "ref", **FAST)
    for k in ("labels", "uncertainty", "objects"):
        assert outputs(out, "s")[k].read_bytes() == outputs(tmp_path / "ref", "s")[k].read_bytes()
    assert reference.ok


def test_a_changed_input_is_not_resumed_from_the_old_store(tmp_path):
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack((4, 32, 32), seed=1), photometric="minisblack")
    out = tmp_path / "out"
    cancel = threading.Event()
    kept = segment_files([src], out, progress=lambda p: cancel.set(), cancel=cancel, keep_work=True, **FAST)
    assert kept.cancelled and (out / ".ruac-work" / "s" / "planes" / "0.json").exists()
    tifffile.imwrite(src, stack((4, 32, 32), seed=2), photometric="minisblack")  # same name and shape, new pixels
    redone = segment_files([src], out, **FAST)
    assert redone.ok and redone.files[0].resumed_planes == 0
    segment_files([src], tmp_path / "ref", **FAST)
    for k in ("labels", "uncertainty", "objects"):
        assert outputs(out, "s")[k].read_bytes() == outputs(tmp_path / "ref", "s")[k].read_bytes()


def test_cancel_leaves_nothing_partial(tmp_path):
    srcs = []
    for i in range(3):
        srcs.append(tmp_path / f"s{i}.tif")
        tifffile.imwrite(srcs[-1], stack((5, 32, 32), seed=i))
    cancel = threading.Event()

    def stop_in_second_file(p):
        if p.done_planes == 7:
            cancel.set()

    out = tmp_path / "out"
    summary = segment_files(srcs, out, progress=stop_in_second_file, cancel=cancel, **FAST)
    assert summary.cancelled and not summary.ok
    assert [f.status for f in summary.files] == ["done", "cancelled", "cancelled"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in outputs(out, "s0").values())
    # resume state is kept only when asked for
    cancel.clear()
    summary = segment_files(srcs[1:2], out, progress=lambda p: cancel.set(), cancel=cancel,
                            keep_work=True, **FAST)
    assert (out / ".ruac-work" / "s1" / "planes" / "0.json").exists()
    resumed = segment_files(srcs[1:2], out, **FAST)
    assert resumed.files[0].resumed_planes == 1 and resumed.ok


# ---------------------------------------------------------------------------- bad inputs
def write_with_bad_metadata(path: Path, data: np.ndarray, tag: str) -> None:
    """A readable TIFF whose metadata some software wrote wrong: ImageJ's binary metadata tag
    with a broken header, or a GDAL no-data tag that is not a number."""
    extra = {"imagej": [(50838, "I", 1, [8], True), (50839, "B", 8, b"IJIJjunk", True)],
             "gdal": [(42113, "s", 0, "n/a", True)]}[tag]
    tifffile.imwrite(path, data, extratags=extra)


@pytest.mark.parametrize("tag", ["imagej", "gdal"])
def test_a_file_with_broken_metadata_only_is_segmented_with_a_warning(tmp_path, tag):
    from napari_ruac.io.imageio import ImageWarning

    src = tmp_path / "meta.tif"
    write_with_bad_metadata(src, stack((2, 32, 32)), tag)
    with pytest.warns(ImageWarning, match="metadata problem"):
        summary = segment_files([src], tmp_path / "out", **FAST)
    assert summary.ok and [f.status for f in summary.files] == ["done"]
    assert tifffile.imread(outputs(tmp_path / "out", "meta")["labels"]).shape == (2, 32, 32)


def test_each_bad_input_gets_a_clear_reason_and_the_rest_still_runs(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, stack((2, 32, 32)))
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "corrupt.tif").write_bytes(b"this is not a tiff file" * 10)
    pages = tmp_path / "full.tif"
    tifffile.imwrite(pages, stack((6, 64, 64)))
    data = pages.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    pages.unlink()
    tifffile.imwrite(tmp_path / "complex.tif", np.zeros((2, 16, 16), np.complex64))
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((2, 2, 2, 16, 16), np.uint8))
    (tmp_path / "notes.txt").write_text("hello")
    names = ["empty", "corrupt", "truncated", "complex", "five", "good"]
    inputs = [tmp_path / f"{n}.tif" for n in names] + [tmp_path / "notes.txt", tmp_path / "missing.tif"]
    summary = segment_files(inputs, tmp_path / "out", **FAST)
    reasons = {Path(f.input).name: f.reason for f in summary.failures}
    assert "empty (0 bytes)" in reasons["empty.tif"]
    assert "not a readable TIFF" in reasons["corrupt.tif"]
    assert "truncated" in reasons["truncated.tif"]
    assert "unsupported dtype complex64" in reasons["complex.tif"]
    assert "5-D" in reasons["five.tif"] and "--axes" in reasons["five.tif"]
    assert "unsupported format" in reasons["notes.txt"]
    assert "no such file" in reasons["missing.tif"]
    assert [f.status for f in summary.succeeded] == ["done"]
    text = summary.format()
    assert "FAILED" in text and "truncated.tif" in text and "1 of 8" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in outputs(tmp_path / "out", "good").values())


def test_a_plane_that_fails_to_read_fails_only_its_file(tmp_path):
    """Damage inside the pixel data (not the header) shows while reading planes."""
    z = zarr.open_array(str(tmp_path / "broken.zarr"), mode="w", shape=(3, 32, 32), chunks=(1, 32, 32), dtype="u2")
    z[:] = stack((3, 32, 32))
    chunk = sorted(p for p in (tmp_path / "broken.zarr").rglob("*") if p.is_file() and "zarr.json" not in p.name)[1]
    chunk.write_bytes(b"garbage")
    tifffile.imwrite(tmp_path / "fine.tif", stack((32, 32)))
    summary = segment_files([tmp_path / "broken.zarr", tmp_path / "fine.tif"], tmp_path / "out", **FAST)
    assert [f.status for f in summary.files] == ["failed", "done"]
    assert "could not be read" in summary.files[0].reason
    assert leftovers(tmp_path / "out") == []


def test_nan_pixels_name_their_plane_and_fail_only_their_file(tmp_path):
    a = stack((2, 3, 32, 32)).astype(np.float32)
    a[1, 2, :4] = np.nan  # registration padding in one plane of a TZYX stack
    tifffile.imwrite(tmp_path / "padded.ome.tif", a, metadata={"axes": "TZYX"})
    tifffile.imwrite(tmp_path / "fine.tif", stack((32, 32)))
    summary = segment_files([tmp_path / "padded.ome.tif", tmp_path / "fine.tif"], tmp_path / "out", **FAST)
    assert [f.status for f in summary.files] == ["failed", "done"]
    reason = summary.files[0].reason
    assert "plane 5 (T=1, Z=2) contains 128 NaN or infinite values of 1024" in reason
    assert "replace them" in reason
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / "padded_labels.tif").exists()


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    tifffile.imwrite(tmp_path / "s.tif", stack((32, 32)))
    with pytest.raises(BatchError, match=f"cannot be created: {blocker} is a file, not a folder"):
        segment_files([tmp_path / "s.tif"], blocker / "out", **FAST)
    with pytest.raises(BatchError, match=f"{blocker} is a file, not a folder"):  # -o naming a file
        segment_files([tmp_path / "s.tif"], blocker, **FAST)
    ro = tmp_path / "ro"
    ro.mkdir()
    if _mount(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]):
        try:
            with pytest.raises(BatchError, match="not writable"):
                segment_files([tmp_path / "s.tif"], ro, **FAST)
        finally:
            _mount(["-u", str(ro)])


def test_disk_full_fails_the_file_cleanly_and_keeps_its_planes_for_a_rerun(tmp_path):
    """A real full disk (a small tmpfs): the file fails with a message that says so, leaves no
    final or temporary file, and keeps the planes it computed, so that the rerun after space
    was freed resumes from them (an input that got no plane stored keeps nothing)."""
    out = tmp_path / "small_disk"
    out.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=160k", "tmpfs", str(out)]):
        pytest.skip("cannot mount a small tmpfs here (needs root): no way to fill a disk safely")
    try:
        big = tmp_path / "big.tif"
        tifffile.imwrite(big, stack((12, 96, 96)))
        small = tmp_path / "small.tif"
        tifffile.imwrite(small, stack((24, 24)))
        summary = segment_files([big, small], out, **FAST)
        assert summary.files[0].status == "failed"
        assert "disk full (no space left on device)" in summary.files[0].reason
        assert "a rerun resumes" in summary.files[0].reason
        assert not (out / "big_labels.tif").exists()
        assert [p.name for p in out.rglob("*.tmp")] == []
        kept = len(list((out / ".ruac-work" / "big" / "planes").glob("*.json")))
        assert 0 < kept < 12
        assert _mount(["-o", "remount,size=8m", str(out)])
        again = segment_files([big, small], out, **FAST)
        assert again.ok and again.files[0].resumed_planes == kept, again.format()
        assert leftovers(out) == []
        segment_files([big], tmp_path / "ref", **FAST)
        for kind, path in outputs(out, "big").items():
            assert path.read_bytes() == outputs(tmp_path / "ref", "big")[kind].read_bytes(), kind
    finally:
        _mount(["-u", str(out)])


def _mount(args: list[str]) -> bool:
    cmd = ["umount", args[1]] if args[0] == "-u" else ["mount", *args]
    if os.geteuid() != 0:
        return False
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_bad_options_stop_before_any_work(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", stack((32, 32)))
    with pytest.raises(BatchError, match="unknown option"):
        segment_files([tmp_path / "s.tif"], tmp_path / "out", model="test-tiny", points_per_sid=3)
    with pytest.raises(BatchError, match="unknown model 'nope'"):
        segment_files([tmp_path / "s.tif"], tmp_path / "out", model="nope")
    # official weights not fetched yet are downloaded (or refused, naming where to put them)
    # when the model loads: no "UNTRAINED model" warning ahead of that (there was one)
    from napari_ruac.batch import ModelSpec, model_identity
    from napari_ruac.model.build import UntrainedWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWeightsWarning)
        identity = model_identity(ModelSpec("sam2.1_hiera_tiny", "cpu", None, {}))
    assert identity["name"] == "sam2.1_hiera_tiny" and identity["weights"]  # the file's hash, or where it is missing
    # a path is a missing file, not an unknown name (as predict and load_model say it)
    for kw in ({"model": str(tmp_path / "gone.pt")}, {"model": "micro", "checkpoint": str(tmp_path / "gone.pt")}):
        with pytest.raises(BatchError, match=f"^checkpoint file not found: {re.escape(str(tmp_path / 'gone.pt'))}$"):
            segment_files([tmp_path / "s.tif"], tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "s_labels.tif").exists()
    with pytest.raises(BatchError, match="either workers"):
        segment_files([tmp_path / "s.tif"], tmp_path / "out", model="test-tiny", workers=2, scheduler="tcp://x:1")


def test_cli_segment_prints_progress_and_summary(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", stack((3, 32, 32)), photometric="minisblack")
    (tmp_path / "bad.tif").write_bytes(b"")
    cmd = [sys.executable, "-m", "napari_ruac.cli", "segment", str(tmp_path / "s.tif"), str(tmp_path / "bad.tif"),
           "-o", str(tmp_path / "out"), "--model", "test-tiny", "--points-per-side", "4", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # one input failed
    assert "3/3 planes" in proc.stderr and "ETA" in proc.stderr
    assert "FAILED" in proc.stdout and "bad.tif" in proc.stdout and "ok " in proc.stdout
    assert (tmp_path / "out" / "s_labels.tif").exists()


def test_cli_zoom_is_auto_unless_given_and_a_bad_zoom_is_named(tmp_path):
    from napari_ruac.cli import main

    tifffile.imwrite(tmp_path / "s.tif", stack((2, 32, 32)), photometric="minisblack")
    args = ["segment", str(tmp_path / "s.tif"), "-o", str(tmp_path / "out"), "--model", "test-tiny",
            "--points-per-side", "4", "--threads", "1"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "out" / "s_metadata.json").read_text())
    assert meta["parameters"]["zoom"] == "auto" and meta["plane_zooms"] == [1.0, 1.0]  # noise: nothing to measure
    assert meta["parameters"]["scales"] == "1"
    assert main([*args, "--zoom", "0.5", "--scales", "3"]) == 0
    meta = json.loads((tmp_path / "out" / "s_metadata.json").read_text())
    assert meta["parameters"]["zoom"] == 0.5 and meta["plane_zooms"] == [0.5, 0.5]
    assert meta["parameters"]["scales"] == "3"
    proc = subprocess.run([sys.executable, "-m", "napari_ruac.cli", *args, "--zoom", "large"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--zoom must be a number or 'auto', got 'large'" in proc.stderr


def test_metadata_records_each_planes_own_zoom(tmp_path):
    # plane 0: discs ~50 px across (twice what our models learned) -> shrunk; plane 1 empty -> 1
    yy, xx = np.mgrid[:128, :128]
    plane = np.full((128, 128), 100, np.uint16)
    for cy, cx in ((32, 32), (32, 96), (96, 32), (96, 96)):
        plane[(yy - cy) ** 2 + (xx - cx) ** 2 < 25**2] = 900
    src = tmp_path / "z.tif"
    tifffile.imwrite(src, np.stack([plane, np.full_like(plane, 100)]), photometric="minisblack")
    assert segment_files([src], tmp_path / "out", **{**FAST, "zoom": "auto"}).ok
    zooms = json.loads((tmp_path / "out" / "z_metadata.json").read_text())["plane_zooms"]
    assert 0.5 <= zooms[0] < 0.75 and zooms[1] == 1.0


def test_results_written_into_the_input_folder_are_not_inputs_of_the_next_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "cells.tif", stack((2, 32, 32)), photometric="minisblack")
    # a user's own annotation file with a results-like name is an input like any other
    tifffile.imwrite(data / "truth_labels.tif", stack((32, 32), seed=1), photometric="minisblack")
    first = segment_files([data], data, **FAST)
    assert first.ok and sorted(f.status for f in first.files) == ["done", "done"]
    names = sorted(p.name for p in data.iterdir())
    # again, over the folder and over a shell glob of it: our outputs are skipped, nothing new
    for inputs in ([data], sorted(data.glob("*.tif"))):
        again = segment_files(inputs, data, **FAST)
        assert again.ok
        status = {Path(f.input).name: f.status for f in again.files}
        assert status == {"cells.tif": "complete", "truth_labels.tif": "complete", "cells_labels.tif": "skipped",
                          "cells_uncertainty.tif": "skipped", "truth_labels_labels.tif": "skipped",
                          "truth_labels_uncertainty.tif": "skipped"}
        assert "skipped" in again.format() and "cells_metadata.json" in again.format()
        assert sorted(p.name for p in data.iterdir()) == names
