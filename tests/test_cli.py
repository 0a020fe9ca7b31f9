"""The napari-ruac command line: info and predict."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_ruac.cli import main


@pytest.fixture
def image_file(tmp_path):
    img = np.zeros((90, 120), np.uint16)
    img[30:60, 40:80] = 1000
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, img)
    return path


def test_info_lists_models_and_versions(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and info["sam2"] == "1.1.0" and "cpu" in info["devices"]
    assert {"micro", "micro-det", "micro-bayes", "test-tiny", "sam2.1_hiera_large"} <= set(info["models"])


def test_predict_writes_mask_and_uncertainty(image_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(image_file), "--point", "45,60", "--negative", "10,10",
               "--box", "25,35,65,85", "--model", "test-tiny", "-o", str(out)])
    assert rc == 0
    mask = tifffile.imread(out / "cells_mask.tif")
    unc = tifffile.imread(out / "cells_uncertainty.tif")
    assert mask.shape == unc.shape == (90, 120)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert unc.dtype == np.float32 and 0 <= unc.min() and unc.max() <= 1
    printed = capsys.readouterr().out
    assert f"cells: mask area {int(mask.sum())} px, " in printed and "wrote" in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # our napari reader opens the uncertainty map with its mask beside it
    from napari_ruac._reader import get_reader

    layers = get_reader(str(out / "cells_uncertainty.tif"))(str(out / "cells_uncertainty.tif"))
    assert [(meta["name"], kind) for _, meta, kind in layers] == [("cells mask", "labels"),
                                                                  ("cells uncertainty", "image")]
    np.testing.assert_array_equal(layers[0][0], mask)


def test_predict_reports_the_predicted_iou_only_where_the_iou_head_was_trained(image_file, tmp_path, capsys):
    for model, shown in (("test-tiny", True), ("micro", False)):  # micro's IoU head is untrained
        assert main(["predict", str(image_file), "--point", "45,60", "--model", model, "-o", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "mean uncertainty in mask" in out
        assert ("predicted IoU" in out) == shown, (model, out)


def test_predict_plane_of_a_stack(tmp_path):
    stack = np.random.default_rng(0).integers(0, 255, (3, 64, 64)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    assert main(["predict", str(tmp_path / "stack.tif"), "--plane", "1", "--point", "5,5",
                 "--model", "test-tiny", "-o", str(tmp_path / "o")]) == 0
    assert tifffile.imread(tmp_path / "o" / "stack_plane1_mask.tif").shape == (64, 64)
    # another plane gets its own files; a dotted name keeps its dots
    (tmp_path / "stack.tif").rename(tmp_path / "cells.2024-01-05.tif")
    assert main(["predict", str(tmp_path / "cells.2024-01-05.tif"), "--plane", "2", "--point", "5,5",
                 "--model", "test-tiny", "-o", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "cells.2024-01-05_plane2_mask.tif", "cells.2024-01-05_plane2_uncertainty.tif",
        "stack_plane1_mask.tif", "stack_plane1_uncertainty.tif"]


def test_predict_on_a_stack_asks_for_a_plane_and_a_colour_image_has_none(tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 255, (5, 64, 64)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    cases = [("stack.tif", [], "choose one with --plane 0..4"), ("stack.tif", ["--plane", "5"], "planes 0..4"),
             ("rgb.tif", ["--plane", "2"], "a single plane (shape (64, 64, 3), axes YXS)")]
    for name, extra, message in cases:
        out = tmp_path / f"o_{name}_{len(extra)}"
        assert main(["predict", str(tmp_path / name), "--point", "5,5", *extra, "--model", "test-tiny",
                     "-o", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
    # a colour image is one plane: no --plane needed
    assert main(["predict", str(tmp_path / "rgb.tif"), "--point", "5,5", "--model", "test-tiny",
                 "-o", str(tmp_path / "ok")]) == 0
    assert tifffile.imread(tmp_path / "ok" / "rgb_mask.tif").shape == (64, 64)


def test_predict_reads_a_plane_of_a_hyperstack_as_the_batch_numbers_it(tmp_path, capsys):
    # T=2, Z=3, C=5 (more channels than a colour image has): plane 4 is T=1, Z=1, as in the
    # batch's objects CSV; one channel is chosen with --channel; a NaN plane is named
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (2, 3, 5, 48, 40)).astype(np.float32)
    data[1, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "hyper.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    base = ["predict", str(tmp_path / "hyper.tif"), "--point", "5,5", "--model", "test-tiny"]
    assert main([*base, "--plane", "4", "-o", str(tmp_path / "a")]) == 1
    assert "5 channels" in capsys.readouterr().err
    assert main([*base, "--plane", "4", "--channel", "3", "-o", str(tmp_path / "b")]) == 0
    mask = tifffile.imread(tmp_path / "b" / "hyper_plane4_mask.tif")
    assert f"hyper_plane4 (plane 4 (T=1, Z=1)): mask area {int(mask.sum())} px" in capsys.readouterr().out
    assert mask.shape == (48, 40)
    assert main([*base, "--plane", "6", "--channel", "0", "-o", str(tmp_path / "c")]) == 1
    assert "planes 0..5" in capsys.readouterr().err
    assert main([*base, "--plane", "5", "--channel", "3", "-o", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "plane 5 (T=1, Z=2)" in err and "NaN" in err and not (tmp_path / "d").exists()
    # --axes names the axes of a file that does not
    tifffile.imwrite(tmp_path / "plain.tif", data[:, :, 0], photometric="minisblack")
    assert main(["predict", str(tmp_path / "plain.tif"), "--axes", "TZYX", "--plane", "4", "--point", "5,5",
                 "--model", "test-tiny", "-o", str(tmp_path / "e")]) == 0
    assert "plane 4 (T=1, Z=1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--point", "500,5"], "outside the image"),
        (["--point", "a,b"], "ROW,COL"),
        (["--box", "1,2,3"], "4 numbers"),
        ([], "at least one --point"),
        (["--point", "5,5", "--model", "/no/such.pt"], "not found"),
        (["--point", "5,5", "--plane", "3"], "--plane 3"),
        (["--point", "5,5", "--zoom", "0"], "zoom must be between"),
        (["--point", "5,5", "--window", "wide"], "window must be"),
        (["--point", "5,5", "--window", "16"], "window must be"),
        (["--box", "1,1,9,9", "--box-size", "huge"], "box_size must be"),
        (["--point", "5,5", "--views", "3"], "views must be"),
        (["--point", "5,5", "--scales", "2"], "scales must be"),
    ],
)
def test_predict_errors_are_clear_and_write_nothing(image_file, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    model = [] if "--model" in args else ["--model", "test-tiny"]
    assert main(["predict", str(image_file), *args, *model, "-o", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("damage", ["no pages", "truncated zlib", "truncated raw", "truncated zlib pages",
                                    "truncated raw pages", "last page cut"])
def test_corrupt_image_file(tmp_path, capsys, damage):
    # "pages": a 3-plane stack as microscopes write it (one grey page per plane; a file cut
    # short keeps whole pages, which tifffile returned as a shorter stack); otherwise one
    # planar 3-sample page
    bad = tmp_path / "bad.tif"
    if damage == "no pages":
        bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    else:
        kw = {"compression": "zlib"} if "zlib" in damage else {}
        if "page" in damage:
            kw.update(photometric="minisblack")
        else:
            kw.update(photometric="rgb", planarconfig="separate")
        tifffile.imwrite(bad, np.random.default_rng(0).random((3, 100, 100)).astype(np.float32), **kw)
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) - 100] if damage == "last page cut" else data[: len(data) // 2])
    assert main(["predict", str(bad), "--point", "1,1", "--model", "test-tiny", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and ("corrupt" in err or "truncated" in err), err
    assert not (tmp_path / "o").exists()


def test_predict_reads_a_file_whose_metadata_only_is_broken(tmp_path, capsys):
    from napari_ruac.io.imageio import ImageWarning

    src = tmp_path / "meta.tif"
    img = np.zeros((48, 48), np.uint16)
    img[10:30, 12:32] = 1000
    tifffile.imwrite(src, img, extratags=[(50838, "I", 1, [8], True), (50839, "B", 8, b"IJIJjunk", True)])
    with pytest.warns(ImageWarning, match="imagej_metadata"):
        code = main(["predict", str(src), "--point", "20,20", "--model", "test-tiny", "-o", str(tmp_path / "o")])
    assert code == 0 and any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("message, metadata_only", [
    ("<tifffile.TiffPage 0 @8> <tifffile.imagej_metadata> raised ValueError('bad')", True),
    ("<tifffile.TiffTag 270 @26> coercing invalid ASCII to bytes, due to UnicodeDecodeError()", True),
    ("<tifffile.read_tags> could not read all values for tag #305", True),
    ("<tifffile.TiffTag 273 @50> could not read all values", False),  # StripOffsets: where the data is
    ("<tifffile.read_tags> could not read all values for tag #279", False),  # StripByteCounts
    ("<tifffile.TiffPages @8> invalid page offset 196885", False),
    ("<tifffile.TiffFile 'x.tif'> ImageJ series metadata invalid or corrupted file", False),
    ("<tifffile.TiffFile 'x.tif'> MMStack is missing 3 pages. Missing data are zeroed", False),
    ("something tifffile may log in a later version", False),
])
def test_only_known_metadata_problems_are_forgiven(message, metadata_only):
    from napari_ruac.io.imageio import is_metadata_problem

    assert is_metadata_problem(message) is metadata_only


def test_console_script_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_ruac.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip()
    result = subprocess.run([sys.executable, "-m", "napari_ruac.cli", "bogus"], capture_output=True, text=True)
    assert result.returncode == 2


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_unknown_model_name_is_a_message_not_a_traceback(tmp_path, capsys, command):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    if command == "predict":
        argv = ["predict", str(tmp_path / "a.tif"), "--point", "5,5", "-o", str(tmp_path / "o")]
    else:
        (tmp_path / "m").mkdir()
        tifffile.imwrite(tmp_path / "m" / "a.tif", np.zeros((32, 32), np.uint8))
        argv = ["evaluate", "--images", str(tmp_path), "--masks", str(tmp_path / "m")]
    assert main(argv + ["--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert f"napari-ruac {command}: error: unknown model 'nope': expected a checkpoint path or one of" in err
    assert "micro-det" in err and "Traceback" not in err


def test_predict_with_auto_zoom_says_the_zoom_it_chose(tmp_path, capsys):
    """A 70 px nucleus, larger than the ones the shipped model learned: with --zoom auto the
    plane is seen at the zoom of its objects' size, and one click takes most of it."""
    yy, xx = np.mgrid[:200, :200]
    nucleus = (yy - 100) ** 2 + (xx - 100) ** 2 < 35**2
    img = (100 + 900 * nucleus).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", img)
    for zoom in ("1", "auto"):
        out = tmp_path / zoom
        assert main(["predict", str(tmp_path / "big.tif"), "--point", "115,90", "--zoom", zoom, "-o", str(out)]) == 0
        printed = capsys.readouterr().out
        mask = tifffile.imread(out / "big_mask.tif") > 0
        iou = (mask & nucleus).sum() / (mask | nucleus).sum()
        if zoom == "auto":
            assert "seen at zoom 0.42 (auto)" in printed and iou > 0.85, (printed, iou)
        else:
            assert "seen at zoom" not in printed and iou < 0.6, (printed, iou)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(tmp_path / "big.tif"), "--point", "115,90", "--zoom", "big", "-o", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--zoom must be a number or 'auto'" in capsys.readouterr().err


def _predict_argv(image, out, point="45,60"):
    return ["predict", str(image), "--point", point, "--model", "test-tiny", "-o", str(out)]


def _fail_second_write(monkeypatch, error):
    """Fault injection: the second TIFF written (the uncertainty map) fails with ``error``, as
    the one low-level write does on a full disk; the first (the mask) is written for real."""
    real = tifffile.imwrite
    calls = []

    def imwrite(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    return calls


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   OSError("16384 requested and 5052 written")])  # numpy's short write
def test_predict_on_a_full_disk_keeps_the_old_pair_and_says_so(image_file, tmp_path, capsys, monkeypatch, error):
    """A full disk while the uncertainty map is written (fault-injected: tifffile.imwrite raises
    at the second file; for numpy's short write, which has no errno, the disk is reported full
    too). The old code left the NEW mask beside the OLD uncertainty map, with a traceback."""
    out = tmp_path / "out"
    assert main(_predict_argv(image_file, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    calls = _fail_second_write(monkeypatch, error)
    if error.errno is None:
        monkeypatch.setattr("napari_ruac._cli_predict._free_bytes", lambda folder: 100)
    assert main(_predict_argv(image_file, out, point="10,10")) == 1
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert f"no space left on device writing {out / 'cells_uncertainty.tif'}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pair, no temporaries

    # a first run into an empty folder leaves nothing at all (the old code left the mask)
    _fail_second_write(monkeypatch, OSError(28, "No space left on device"))
    assert main(_predict_argv(image_file, tmp_path / "new")) == 1
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_predict_writes_both_files_only_when_both_are_complete(image_file, tmp_path, monkeypatch):
    """Neither file is renamed into place before the second is written."""
    seen = []
    real = tifffile.imwrite

    def imwrite(f, *args, **kwargs):
        seen.append(sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")))
        return real(f, *args, **kwargs)

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    assert main(_predict_argv(image_file, tmp_path / "out")) == 0
    assert seen == [[], []]


@pytest.mark.parametrize("where, message", [
    ("file", "output folder {out} is a file, not a folder"),
    ("under a file", "output folder {out} cannot be created: {file} is a file, not a folder"),
    ("read-only", "output folder {out} is not writable: read-only file system"),
    ("sys", "output folder {out} is not writable: "),
])
def test_predict_output_folder_problems_are_one_line_messages(image_file, tmp_path, capsys, monkeypatch, where,
                                                              message):
    """-o on an existing file, under a file, on a read-only file system (fault-injected: the
    probe file cannot be created; tests may run as root) or under /sys: the old code printed an
    OSError traceback (FileExistsError, NotADirectoryError, OSError) after the prediction."""
    file = tmp_path / "cells.ome.tif"
    out = {"file": file, "under a file": file / "sub", "read-only": tmp_path / "ro",
           "sys": "/sys/napari-ruac-test"}[where]
    if where == "sys" and not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys here")
    if where == "read-only":
        def mkstemp(*args, **kwargs):
            raise OSError(30, "Read-only file system", str(out))

        monkeypatch.setattr("napari_ruac.io.imageio.tempfile.mkstemp", mkstemp)
    before = file.read_bytes()
    assert main(_predict_argv(image_file, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("napari-ruac predict: error: " + message.format(out=out, file=file)), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert file.read_bytes() == before and not (tmp_path / "ro").exists()


def test_system_errors_of_every_subcommand_name_the_path_and_the_problem(tmp_path, capsys):
    """An OSError from the system is a one-line message with the path and the problem, not a
    traceback, for every subcommand (here: train into a --run-dir that is a file)."""
    from napari_ruac.cli import error_message

    assert error_message(PermissionError(13, "Permission denied", "/data/x")) == "/data/x: Permission denied"
    assert error_message(FileNotFoundError("image file not found: a.tif")) == "image file not found: a.tif"
    assert error_message(OSError(28, "No space left on device")) == "No space left on device"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {spec: test-tiny, init: scratch}\noptim: {steps: 1, warmup: 1}\n"
                      "data: {workers: 0, batch_size: 1, crop_size: 64, p_large: 0.0}\n"
                      "val: {images: 1, size: 64, batch_size: 1}\ntrain: {val_every: 0, threads: 1}\n")
    (tmp_path / "run").write_text("not a folder")
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"napari-ruac train: error: {tmp_path / 'run'}: File exists" in err, err
    assert (tmp_path / "run").read_text() == "not a folder"
