"""The npe2 manifest: napari finds the plugin after a plain install, every contribution resolves,
sample data opens, and the writer/reader round-trip labels + uncertainty."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import npe2  # noqa: F401  (npe2's own import-time deprecation warnings are not ours)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent


def manifest():
    pm = npe2.PluginManager.instance()
    pm.discover()
    return pm.get_manifest("napari-ruac")


def test_discovered_without_warnings_and_valid():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = manifest()
    ours = [w for w in caught if "ruac" in str(w.message).lower() or "ruac" in str(w.filename).lower()]
    assert ours == []
    assert m.display_name == "RUAC segmentation"
    widgets = {w.display_name for w in m.contributions.widgets}
    assert widgets == {"RUAC annotator", "Batch segmentation", "Fine-tune RUAC"}
    assert {s.key for s in m.contributions.sample_data} == {"nuclei2d", "nuclei3d"}
    assert len(m.contributions.writers) == 1 and len(m.contributions.readers) == 1
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-ruac"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr


def test_top_level_manifest_is_the_package_one():
    top = ROOT / "napari.yaml"
    assert top.is_symlink() and top.resolve() == (ROOT / "src/napari_ruac/napari.yaml").resolve()


@pytest.mark.parametrize("command", [c.id for c in npe2.PluginManifest.from_file(ROOT / "src/napari_ruac/napari.yaml").contributions.commands])
def test_every_command_resolves(command):
    m = npe2.PluginManifest.from_file(ROOT / "src/napari_ruac/napari.yaml")
    python_name = next(c.python_name for c in m.contributions.commands if c.id == command)
    module, attr = python_name.split(":")
    if module.endswith(".finetune") and importlib.util.find_spec(module) is None:
        pytest.skip("the fine-tune widget is written by another part of the project")
    assert callable(getattr(importlib.import_module(module), attr))


def test_widget_modules_keep_triton_and_torch_geometric_out():
    code = ("import sys, napari_ruac._widgets.annotator, napari_ruac._widgets.batch, "
            "napari_ruac._reader, napari_ruac._writer, napari_ruac._sample_data;"
            "print(sorted(m for m in ('triton', 'torch_geometric') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sample_data_opens_in_the_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-ruac", "nuclei2d")
    viewer.open_sample("napari-ruac", "nuclei3d")
    assert viewer.layers["nuclei2d"].data.shape == (512, 512)
    assert viewer.layers["nuclei3d"].data.shape == (20, 256, 256)
    assert viewer.layers["nuclei3d ground truth"].data.shape == (20, 256, 256)


def test_writer_and_reader_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((3, 16, 20), np.uint32)
    labels[1, 2:6, 3:9] = 7
    unc = np.random.default_rng(0).random((3, 16, 20)).astype(np.float32)
    viewer.add_labels(labels, name="objects")
    viewer.add_image(unc, name="uncertainty")
    viewer.layers.select_all()
    written = viewer.layers.save(str(tmp_path / "cells.tif"), selected=True, plugin="napari-ruac")
    assert sorted(Path(p).name for p in written) == ["cells_labels.tif", "cells_uncertainty.tif"]
    assert tifffile.imread(tmp_path / "cells_labels.tif").dtype == np.uint16
    for name in ("cells_labels.tif", "cells_uncertainty.tif"):  # 3 grey planes, not one RGB page
        with tifffile.TiffFile(tmp_path / name) as tf:
            assert len(tf.pages) == 3 and tf.pages[0].samplesperpixel == 1
    layers = viewer.open(str(tmp_path / "cells_uncertainty.tif"), plugin="napari-ruac")
    by_name = {l.name: l for l in layers}
    np.testing.assert_array_equal(by_name["cells labels"].data, labels)
    np.testing.assert_allclose(by_name["cells uncertainty"].data, unc)
    assert tuple(by_name["cells uncertainty"].contrast_limits) == (0.0, 1.0)


def test_writer_keeps_a_calibrated_layers_pixel_size(make_napari_viewer, tmp_path):
    from napari_ruac.io.calibration import file_pixel_size

    viewer = make_napari_viewer()
    labels = np.zeros((3, 16, 20), np.uint16)
    labels[1, 2:6, 3:9] = 1
    viewer.add_labels(labels, name="objects", scale=(2.0, 0.5, 0.25), units=("um", "um", "nm"))
    viewer.add_image(np.zeros((3, 16, 20), np.float32), name="uncertainty")
    viewer.layers.select_all()
    viewer.layers.save(str(tmp_path / "cal.tif"), selected=True, plugin="napari-ruac")
    for name in ("cal_labels.tif", "cal_uncertainty.tif"):
        size = file_pixel_size(tmp_path / name)
        assert (size.x, size.y, size.z) == pytest.approx((0.00025, 0.5, 2.0))
    # napari's default unit is the pixel: no made-up calibration
    viewer.layers.clear()
    viewer.add_labels(labels, name="objects", scale=(2.0, 0.5, 0.5))
    viewer.layers.select_all()
    viewer.layers.save(str(tmp_path / "px.tif"), selected=True, plugin="napari-ruac")
    assert file_pixel_size(tmp_path / "px_labels.tif") is None


def test_writer_refuses_mismatched_layers_without_leaving_files(tmp_path):
    from napari_ruac._writer import write_results

    labels = np.ones((8, 8), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        write_results(str(tmp_path / "x.tif"), [(labels, {}, "labels"), (np.zeros((4, 4), np.float32), {}, "image")])
    with pytest.raises(ValueError, match="one labels layer"):
        write_results(str(tmp_path / "x.tif"), [(np.zeros((4, 4)), {}, "image")])
    assert list(tmp_path.iterdir()) == []


def test_reader_claims_only_uncertainty_maps(tmp_path):
    from napari_ruac._reader import get_reader

    assert get_reader(str(tmp_path / "cells_uncertainty.tif")) is not None
    assert get_reader(str(tmp_path / "cells.tif")) is None
    assert get_reader(str(tmp_path / "cells_labels.tif")) is None
