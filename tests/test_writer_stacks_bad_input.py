"""Bad input for the napari writer and the stack reader, with real files: a failed re-save
keeps the pair saved before, labels beyond uint32 are not wrapped, a malformed OME-Zarr is a
clear per-file failure (not a crash of the batch), zarr dimension names that repeat or lack
Y/X are not trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_ruac.io.normalize import ImageError
from napari_ruac.io.stacks import open_stack


def test_a_failed_resave_keeps_the_pair_saved_before(tmp_path):
    from napari_ruac._writer import write_results

    labels = np.zeros((4, 4), np.int32)
    labels[1, 1] = 3
    unc = np.full((4, 4), 0.25, np.float32)
    write_results(str(tmp_path / "cells.tif"), [(labels, {}, "labels"), (unc, {}, "image")])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["cells_labels.tif", "cells_uncertainty.tif"]
    with pytest.raises(ValueError, match=r"uncertainty map shape \(5, 4\) does not match"):
        write_results(str(tmp_path / "cells.tif"), [(labels * 2, {}, "labels"), (np.zeros((5, 4), np.float32), {}, "image")])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a rename that fails (the uncertainty's name is taken by a folder) after the labels were
    # written: no temporary is left, and the error names both files
    (tmp_path / "other_uncertainty.tif").mkdir()
    with pytest.raises(OSError, match="other_labels.tif was replaced but .*other_uncertainty.tif could not be"):
        write_results(str(tmp_path / "other.tif"), [(labels, {}, "labels"), (unc, {}, "image")])
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []


def test_labels_beyond_uint32_are_saved_as_they_are(tmp_path):
    from napari_ruac._writer import write_results

    labels = np.zeros((4, 4), np.int64)
    labels[0, 0] = 2**32 + 5
    labels[1, 1] = 7
    (path,) = write_results(str(tmp_path / "big.tif"), [(labels, {}, "labels")])
    np.testing.assert_array_equal(tifffile.imread(path), labels)


def _ome_group(path, multiscales):
    group = zarr.open_group(str(path), mode="w")
    group.attrs["multiscales"] = multiscales
    return group


@pytest.mark.parametrize("multiscales", [
    [{"datasets": [{"path": "0"}], "axes": ["z", "y", "x"]}],  # names an array the store lacks
    [{"version": "0.4"}],  # no datasets
    "nonsense",
])
def test_malformed_ome_zarr_metadata_is_an_image_error_naming_the_store(tmp_path, multiscales):
    _ome_group(tmp_path / "cells.zarr", multiscales)
    with pytest.raises(ImageError, match=f"{tmp_path / 'cells.zarr'}: its OME-Zarr multiscales metadata is malformed"):
        open_stack(tmp_path / "cells.zarr")


def test_a_malformed_ome_zarr_fails_its_file_and_the_batch_goes_on(tmp_path):
    from napari_ruac.batch import segment_files

    _ome_group(tmp_path / "broken.zarr", [{"datasets": [{"path": "0"}]}])
    tifffile.imwrite(tmp_path / "fine.tif", (np.random.default_rng(0).random((32, 32)) * 900).astype(np.uint16))
    summary = segment_files([tmp_path / "broken.zarr", tmp_path / "fine.tif"], tmp_path / "out", model="test-tiny",
                            points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0, threads=1)
    assert [f.status for f in summary.files] == ["failed", "done"]
    assert "multiscales metadata is malformed" in summary.files[0].reason


def test_zarr_dimension_names_that_repeat_or_lack_y_and_x_are_not_trusted(tmp_path):
    data = np.arange(2 * 3 * 8 * 8, dtype=np.uint16).reshape(2, 3, 8, 8)
    z = zarr.open_array(str(tmp_path / "dup.zarr"), mode="w", shape=data.shape, dtype=data.dtype)
    z[:] = data
    z.attrs["_ARRAY_DIMENSIONS"] = ["z", "zoom", "y", "x"]  # both read as "Z"
    with open_stack(tmp_path / "dup.zarr") as stack:
        assert stack.n_planes == 6
        # every plane is its own, in C order (a repeated "Z" read plane (1, 1) for index 4 and 5)
        for i in range(6):
            np.testing.assert_array_equal(stack.read_plane(i), data.reshape(6, 8, 8)[i])
    x = zarr.open_array(str(tmp_path / "xr.zarr"), mode="w", shape=(2, 8, 8), dtype="u2")
    x.attrs["_ARRAY_DIMENSIONS"] = ["dim_0", "dim_1", "dim_2"]  # xarray's default names
    with open_stack(tmp_path / "xr.zarr") as stack:
        assert stack.axes == "ZYX" and stack.n_planes == 2


def test_zarr_dimension_names_are_still_used_when_they_fit(tmp_path):
    z = zarr.open_array(str(tmp_path / "tz.zarr"), mode="w", shape=(2, 3, 8, 8), dtype="u2")
    z.attrs["_ARRAY_DIMENSIONS"] = ["t", "z", "y", "x"]
    with open_stack(Path(tmp_path / "tz.zarr")) as stack:
        assert stack.axes == "TZYX" and stack.plane_coords(4) == {"T": 1, "Z": 1}
