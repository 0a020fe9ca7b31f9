"""Evaluation metrics, GT prompts, baselines and the evaluate CLI."""

import json

import numpy as np
import pytest
import tifffile

from napari_ruac import evaluate as ev
from napari_ruac.cli import main


def disk(shape, center, radius):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def test_iou_and_boundary_f():
    a = disk((64, 64), (32, 32), 10)
    assert ev.iou(a, a) == 1.0 and ev.boundary_f(a, a) == 1.0
    b = np.roll(a, 6, axis=1)
    assert 0 < ev.iou(a, b) < 0.7
    assert ev.boundary_f(a, b, tolerance=1) < 0.5 < ev.boundary_f(a, b, tolerance=7)
    assert ev.boundary_f(a, np.zeros_like(a)) == 0.0


def test_auroc_pavpu_ece_nll():
    rng = np.random.default_rng(0)
    err = rng.random(2000) < 0.3
    assert ev.auroc(err.astype(float), err) == 1.0
    assert ev.auroc(-err.astype(float), err) == 0.0
    assert abs(ev.auroc(rng.random(2000), err) - 0.5) < 0.05
    assert np.isnan(ev.auroc(np.ones(3), np.zeros(3, bool)))
    assert ev.pavpu(err.astype(float), err) == 1.0
    prob = rng.random(20000)
    calibrated = rng.random(20000) < prob
    assert ev.ece(prob, calibrated) < 0.02
    assert ev.ece(np.full(1000, 0.9), np.zeros(1000)) == pytest.approx(0.9)
    assert ev.nll(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(np.log(2))


def test_correction_click_targets_largest_error():
    gt = disk((80, 80), (40, 40), 20)
    pred = gt & (np.mgrid[:80, :80][1] < 35)  # missed the right part
    (r, c), label = ev.correction_click(pred, gt)
    assert label == 1 and gt[r, c] and not pred[r, c]
    fp = gt | disk((80, 80), (10, 10), 8)
    (r, c), label = ev.correction_click(fp, gt)
    assert label == 0 and fp[r, c] and not gt[r, c]
    assert ev.correction_click(gt, gt) is None


def test_baselines_on_a_disk():
    gt = disk((60, 60), (30, 28), 12)
    image = 10 + 100 * gt.astype(float)
    box = ev.tight_box(gt)
    assert ev.iou(ev.ellipse_in_box(gt.shape, box), gt) > 0.9
    assert ev.iou(ev.otsu_in_box(image, box), gt) == 1.0
    assert ev.iou(ev.otsu_region_under_point(image, (30, 28)), gt) == 1.0


def _two_nuclei():
    labels = np.zeros((96, 128), np.uint16)
    labels[disk(labels.shape, (30, 30), 12)] = 1
    labels[disk(labels.shape, (60, 90), 15)] = 2
    image = (20 + 200 * (labels > 0)).astype(np.uint8)
    return image, labels


def test_evaluate_model_report(tiny_model):
    image, labels = _two_nuclei()
    stack = np.stack([labels, labels])
    report = ev.evaluate_model(tiny_model, [("a", image, labels), ("b", np.stack([image, image]), stack)],
                               prompt_modes=("point1", "box"))
    assert set(report.results) == {"point1", "box"}
    for r in report.results.values():
        assert r["n_objects"] == 6  # 2 in the 2D image + 2 in each of 2 planes
        assert 0 <= r["miou"] <= 1 and 0 <= r["auroc"] <= 1 or np.isnan(r["auroc"])
        assert set(r) == {"n_objects", "miou", "jf", "pcc", "auroc", "pavpu", "ece", "nll"}
    assert report.baselines["otsu_in_box"]["miou"] == 1.0
    again = ev.evaluate_model(tiny_model, [("a", image, labels)], prompt_modes=("point1",), baselines=False)
    first = [r.iou for r in report.rows if r.image == "a" and r.prompt == "point1" and r.method == "model"]
    assert first == [r.iou for r in again.rows]  # fixed seed: same prompts, same result


def test_evaluate_cli_writes_json_and_csv(tmp_path):
    image, labels = _two_nuclei()
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    tifffile.imwrite(tmp_path / "img" / "cell.tif", image)
    tifffile.imwrite(tmp_path / "msk" / "cell_labels.tif", labels)
    tifffile.imwrite(tmp_path / "img" / "no_mask.tif", image)  # unmatched: ignored
    out = tmp_path / "res" / "eval.json"
    rc = main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
               "--model", "test-tiny", "--prompts", "point1,point3", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["model"] == "test-tiny" and data["n_images"] == 1
    assert set(data["results"]) == {"point1", "point3"}
    assert data["results"]["point3"]["n_objects"] == 2
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("image,plane,label,prompt,method") and len(rows) == 1 + 2 * 2 + 2 * 3
    assert data["zoom"] == 1.0
    zoomed = tmp_path / "res" / "zoomed.json"
    assert main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                 "--model", "test-tiny", "--prompts", "box", "--zoom", "0.5", "--json", str(zoomed)]) == 0
    data = json.loads(zoomed.read_text())
    assert data["zoom"] == 0.5 and data["results"]["box"]["n_objects"] == 2
    assert data["window"] == 128  # test-tiny's own input size ('auto')
    whole = tmp_path / "res" / "whole.json"
    assert main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                 "--model", "test-tiny", "--prompts", "box", "--window", "0", "--box-size", "0",
                 "--json", str(whole)]) == 0
    assert json.loads(whole.read_text())["window"] is None and json.loads(whole.read_text())["box_size"] is None
    assert data["box_size"] == 32.0 and data["views"] == 4  # test-time views: 'auto' for a native model
    one = tmp_path / "res" / "one.json"
    assert main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                 "--model", "test-tiny", "--prompts", "box", "--views", "1", "--json", str(one)]) == 0
    assert json.loads(one.read_text())["views"] == 1 and data["recentre"] is True
    assert data["scales"] == 1  # off by default
    three = tmp_path / "res" / "three.json"
    assert main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                 "--model", "test-tiny", "--prompts", "point1", "--views", "1", "--scales", "3",
                 "--json", str(three)]) == 0
    data3 = json.loads(three.read_text())
    assert data3["scales"] == 3 and data3["results"]["point1"]["n_objects"] == 2
    plain = tmp_path / "res" / "plain.json"
    assert main(["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                 "--model", "test-tiny", "--prompts", "point1", "--no-recentre", "--json", str(plain)]) == 0
    assert json.loads(plain.read_text())["recentre"] is False


def test_evaluate_cli_window_step_is_recorded_and_moves_windows_on_large_images(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    labels = np.zeros((300, 300), np.uint16)  # larger than test-tiny's 128 px window
    for k, centre in enumerate([(40, 60), (150, 230), (250, 110)], 1):
        labels[disk((300, 300), centre, 10)] = k
    tifffile.imwrite(tmp_path / "img" / "big.tif", (labels > 0).astype(np.uint16) * 800 + 100)
    tifffile.imwrite(tmp_path / "msk" / "big.tif", labels)
    args = ["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--model",
            "test-tiny", "--prompts", "point1", "--views", "1", "--no-baselines"]
    reports = {}
    for step in ("0.5", "0.125"):
        out = tmp_path / f"step{step}.json"
        assert main(args + ["--window-step", step, "--json", str(out)]) == 0
        reports[step] = json.loads(out.read_text())
    assert reports["0.5"]["window_step"] == 0.5 and reports["0.125"]["window_step"] == 0.125
    # the clicks sit in other windows (other context, normalisation), so the random model's masks differ
    assert reports["0.5"]["results"]["point1"] != reports["0.125"]["results"]["point1"]
    with pytest.raises(SystemExit):
        main(args + ["--window-step", "0.9"])
    assert "--window-step must be a fraction of the window in (0, 0.5], got '0.9'" in capsys.readouterr().err


def test_evaluate_cli_errors(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["evaluate", "--images", str(tmp_path / "a"), "--masks", str(tmp_path / "b"), "--model", "test-tiny"]) == 1
    assert "no image" in capsys.readouterr().err
    assert main(["evaluate", "--images", str(tmp_path / "x"), "--masks", str(tmp_path / "b")]) == 1
    with pytest.raises(ValueError, match="unknown prompt mode"):
        ev.evaluate_model(None, [], prompt_modes=("point7",))


def test_evaluate_cli_checks_every_pair_before_it_starts(tmp_path, capsys):
    """Pairs that cannot be scored are all named up front (not a numpy error minutes in);
    images without a mask are listed as skipped."""
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    good = disk((48, 48), (24, 24), 8).astype(np.uint16)
    image = (good * 800 + 100).astype(np.uint16)
    for name in ("a", "b", "c", "d", "e"):
        tifffile.imwrite(tmp_path / "img" / f"{name}.tif", image)
    tifffile.imwrite(tmp_path / "img" / "rgb.tif", np.stack([image] * 3, -1), photometric="rgb")
    tifffile.imwrite(tmp_path / "msk" / "a.tif", good)
    tifffile.imwrite(tmp_path / "msk" / "rgb.tif", good)  # an RGB image's mask has no colour axis
    tifffile.imwrite(tmp_path / "msk" / "b.tif", good[:40])  # wrong shape
    tifffile.imwrite(tmp_path / "msk" / "c.tif", good.astype(np.float32) * 0.5)  # a probability map
    tifffile.imwrite(tmp_path / "msk" / "d.tif", good.astype(np.int16) - 1)  # negative ids
    stack = np.stack([image, image, image]).astype(np.float32)
    stack[2, 5, 5] = np.nan  # registration padding in one plane
    tifffile.imwrite(tmp_path / "img" / "f.tif", stack)
    tifffile.imwrite(tmp_path / "msk" / "f.tif", np.stack([good] * 3))
    tifffile.imwrite(tmp_path / "img" / "g.tif", image)
    tifffile.imwrite(tmp_path / "msk" / "g.tif", good)
    whole = (tmp_path / "msk" / "g.tif").read_bytes()
    (tmp_path / "msk" / "g.tif").write_bytes(whole[: len(whole) // 3])  # truncated
    args = ["evaluate", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
            "--model", "test-tiny", "--prompts", "box", "--no-baselines"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "skipping 1 image(s) without a mask" in captured.out and "e.tif" in captured.out
    err = captured.err
    assert "5 of 7 image/mask pairs cannot be evaluated" in err
    assert "b.tif / b.tif: image of shape (48, 48) and mask of shape (40, 48) do not match" in err
    assert "c.tif / c.tif: mask holds non-integer values" in err
    assert "d.tif / d.tif: mask holds negative values" in err
    assert "f.tif / f.tif: image holds 1 NaN or infinite values in plane(s) 2" in err
    assert "g.tif / g.tif: " in err  # unreadable: named with the others, not the first error alone
    assert "a.tif" not in err and "rgb.tif" not in err
    for name in ("b", "c", "d", "f", "g"):
        (tmp_path / "msk" / f"{name}.tif").unlink()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    assert main(args + ["--json", str(blocker / "r.json")]) == 1  # refused before the run, not after it
    assert "--json" in capsys.readouterr().err
    assert main(args + ["--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_images"] == 2 and report["results"]["box"]["n_objects"] == 2


def test_automatic_segmentation_is_matched_to_the_truth():
    from napari_ruac.model.automatic import AutoResult

    truth = np.zeros((64, 96), np.uint16)
    truth[disk(truth.shape, (20, 20), 8)] = 1
    truth[disk(truth.shape, (40, 60), 8)] = 2
    truth[disk(truth.shape, (40, 77), 8)] = 3  # touches 2
    found = np.zeros_like(truth, dtype=np.int32)
    found[truth == 1] = 5  # a perfect match
    found[(truth == 2) | (truth == 3)] = 7  # 2 and 3 merged into one label
    found[disk(truth.shape, (55, 15), 4)] = 9  # nothing there
    wrong = (truth == 3) | (found == 9)  # the merge belongs to 2 (ties: first), 9 is a false object
    unc = np.where(wrong, 0.9, 0.05).astype(np.float32)
    tally = ev._AutomaticTally()
    rows = []
    tally.add("x", 0, AutoResult(found, unc, []), truth, rows)
    m = tally.metrics()
    assert (m["n_objects"], m["n_found"]) == (3, 3)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["auroc"] == 1.0 and m["pcc"] > 0.9  # uncertainty exactly on the wrong pixels
    ious = {r.label: r.iou for r in rows}
    assert ious[1] == 1.0 and 0.45 < ious[2] <= 0.5 and 0.45 < ious[3] <= 0.5


def test_evaluate_automatic_with_the_trained_model(micro):
    labels = np.zeros((128, 128), np.uint16)
    for i, (r, c, rad) in enumerate(((30, 30, 10), (30, 90, 12), (90, 40, 9), (95, 100, 14)), start=1):
        labels[disk(labels.shape, (r, c), rad)] = i
    rng = np.random.default_rng(0)
    image = (0.1 + 0.8 * (labels > 0) + rng.normal(0, 0.03, labels.shape)).astype(np.float32)
    report = ev.evaluate_model(micro, [("d", image, labels)], prompt_modes=("automatic", "box"))
    auto = report.results["automatic"]
    assert auto["n_objects"] == 4 and auto["recall"] >= 0.75 and auto["miou"] > 0.6
    assert report.results["box"]["n_objects"] == 4  # prompts still evaluated beside it
    assert sum(r.prompt == "automatic" for r in report.rows) == 4


def test_evaluate_with_auto_zoom_sees_each_plane_at_its_objects_size(micro):
    """``zoom="auto"`` applies to prompts too: four 64-84 px nuclei, far larger than the ones
    the shipped model learned, are taken whole by one click only at their plane's own zoom."""
    labels = np.zeros((320, 320), np.uint16)
    for i, (r, c, rad) in enumerate(((80, 80, 36), (80, 235, 42), (235, 80, 32), (235, 240, 38)), start=1):
        labels[disk(labels.shape, (r, c), rad)] = i
    rng = np.random.default_rng(0)
    image = (0.1 + 0.7 * (labels > 0) + rng.normal(0, 0.02, labels.shape)).astype(np.float32)
    reports = {zoom: ev.evaluate_model(micro, [("big", image, labels)], prompt_modes=("point1",), zoom=zoom,
                                       baselines=False)
               for zoom in (1.0, "auto")}
    assert reports["auto"].zoom == "auto" and reports[1.0].zoom == 1.0
    one, auto = reports[1.0].results["point1"]["miou"], reports["auto"].results["point1"]["miou"]
    assert auto > 0.85 and auto > one + 0.2, (one, auto)


def test_point2_is_the_click_and_its_first_correction(micro):
    """``point2`` (on request): the point1 click and the first of point3's two corrections."""
    from napari_ruac import Predictor

    image, labels = _two_nuclei()
    labels[disk(labels.shape, (30, 52), 9)] = 1  # nucleus 1 with a lobe: a click misses part of it
    image = (20 + 200 * (labels > 0)).astype(np.uint8)
    report = ev.evaluate_model(micro, [("cell", image, labels)], prompt_modes=("point1", "point2", "point3"),
                               baselines=False)
    assert {r: report.results[r]["n_objects"] for r in ("point1", "point2", "point3")} == {
        "point1": 2, "point2": 2, "point3": 2}
    got = {(r.label, r.prompt): r.iou for r in report.rows}
    p = Predictor(micro)
    p.set_image(image)
    rng = np.random.default_rng([0, 0, len("cell")])  # the draws evaluate_model makes
    for obj in (1, 2):
        truth = labels == obj
        point = ev.random_point_inside(truth, rng)
        points, kinds = [point], [1]
        mask = p.predict(points=points).mask
        assert got[obj, "point1"] == pytest.approx(ev.iou(mask, truth))
        fix = ev.correction_click(mask, truth)
        if fix is not None:
            points.append(fix[0])
            kinds.append(fix[1])
            mask = p.predict(points=points, labels=kinds).mask
        assert got[obj, "point2"] == pytest.approx(ev.iou(mask, truth))
    with pytest.raises(ValueError, match="unknown prompt mode"):
        ev.evaluate_model(micro, [("cell", image, labels)], prompt_modes=("point4",))
