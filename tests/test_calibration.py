"""Pixel sizes travel from an input's metadata (ImageJ, OME-TIFF, OME-Zarr, resolution tags)
into the batch and predict outputs, so labels measure in the input's units in Fiji; real
files, ``test-tiny`` model."""

from __future__ import annotations

import json
from importlib.metadata import version

import numpy as np
import pytest
import tifffile
import zarr

from napari_ruac.batch import segment_files
from napari_ruac.cli import main
from napari_ruac.io.calibration import PixelSize, file_pixel_size
from napari_ruac.io.stacks import open_stack

FAST = dict(model="test-tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            max_mean_uncertainty=1.0, threads=1)


def image(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.uint16)


def approx(size: PixelSize | None) -> tuple | None:
    return None if size is None else tuple(None if v is None else round(v, 9) for v in (size.x, size.y, size.z))


def test_readers_find_the_pixel_size_of_each_format(tmp_path):
    a = image((3, 32, 40))
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"})
    tifffile.imwrite(tmp_path / "ome.ome.tif", a, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250.0,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 2.0})
    tifffile.imwrite(tmp_path / "cm.tif", a[0], resolution=(20000, 20000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi.tif", a[0], resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "plain.tif", a, photometric="minisblack")
    tifffile.imwrite(tmp_path / "ij_pixels.tif", a, imagej=True, metadata={"axes": "ZYX"})
    root = zarr.open_group(str(tmp_path / "ngff.zarr"), mode="w")
    root.create_array("0", shape=a.shape, chunks=(1, 32, 40), dtype=a.dtype)[:] = a
    root.attrs["multiscales"] = [{
        "axes": [{"name": "z", "type": "space", "unit": "micrometer"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [3.0, 0.1, 0.1]}]}],
    }]
    expect = {
        "ij.tif": (0.25, 0.5, 1.5), "ome.ome.tif": (0.25, 0.25, 2.0), "cm.tif": (0.5, 0.5, None),
        "ngff.zarr": (0.1, 0.1, 3.0),
        # 72 dpi is a writer's default, not a pixel size; no unit means pixels
        "dpi.tif": None, "plain.tif": None, "ij_pixels.tif": None,
    }
    for name, size in expect.items():
        with open_stack(tmp_path / name) as s:
            assert approx(s.pixel_size) == size, name


def test_batch_outputs_keep_the_inputs_calibration(tmp_path):
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, image((2, 48, 56)), imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"})
    tifffile.imwrite(tmp_path / "bare.tif", image((48, 56), seed=1))
    summary = segment_files([src, tmp_path / "bare.tif"], tmp_path / "out", **FAST)
    assert summary.ok, summary.format()
    for kind in ("labels", "uncertainty"):
        path = tmp_path / "out" / f"cells_{kind}.tif"
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            # Fiji and any TIFF reader: pixels per centimetre
            assert page.tags["ResolutionUnit"].value == 3
            assert page.tags["XResolution"].value == (40000, 1)
            assert tf.series[0].axes == "ZYX"
        with open_stack(path) as s:  # our own reader gets the Z spacing too
            assert approx(s.pixel_size) == (0.25, 0.25, 1.5)
        # an uncalibrated input gives uncalibrated outputs, not a made-up size
        assert file_pixel_size(tmp_path / "out" / f"bare_{kind}.tif") is None
    meta = json.loads((tmp_path / "out" / "cells_metadata.json").read_text())
    assert meta["input"]["pixel_size"] == {"x": 0.25, "y": 0.25, "z": 1.5, "unit": "µm"}
    assert meta["sam2_version"] == version("sam2")
    assert json.loads((tmp_path / "out" / "bare_metadata.json").read_text())["input"]["pixel_size"] is None


@pytest.mark.parametrize("plane", [None, 1])
def test_predict_outputs_keep_the_inputs_pixel_size(tmp_path, plane):
    data = image((48, 56)) if plane is None else image((3, 48, 56))
    axes = "YX" if plane is None else "ZYX"
    tifffile.imwrite(tmp_path / "img.tif", data, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": axes, "spacing": 3.0, "unit": "um"})
    args = ["predict", str(tmp_path / "img.tif"), "--point", "20,20", "--model", "test-tiny", "-o", str(tmp_path / "o")]
    assert main(args + ([] if plane is None else ["--plane", str(plane)])) == 0
    stem = "img" if plane is None else f"img_plane{plane}"
    for kind in ("mask", "uncertainty"):
        # a single plane has no Z spacing
        assert approx(file_pixel_size(tmp_path / "o" / f"{stem}_{kind}.tif")) == (0.5, 0.5, None)
