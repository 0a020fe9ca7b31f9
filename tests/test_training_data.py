"""Training data (issue 3): synthetic microscopy, annotated folders/stacks, prompts, losses."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tifffile
import torch

from napari_ruac.io.normalize import ImageError
from napari_ruac.training import data as data_module
from napari_ruac.training.data import (AnnotatedImages, BatchMaker, DataConfig, close_batches, make_loader,
                                      received_batches)
from napari_ruac.training.losses import LossConfig, calibration_loss, dice_loss, multimask_loss, segmentation_loss
from napari_ruac.training.prompts import (KIND_BACKGROUND, KIND_BOX, PromptConfig, correction_clicks,
                                         sample_prompts)
from napari_ruac.training.synthetic import MODES, SynthConfig, SyntheticMicroscopy


@pytest.mark.parametrize("mode", MODES)
def test_every_synthetic_mode_gives_an_image_with_exact_instance_labels(mode):
    gen = SyntheticMicroscopy(seed=1)
    s = gen.sample(7, (96, 128), mode=mode)
    assert s.labels.shape == (96, 128) and s.labels.dtype == np.int32
    ids = np.unique(s.labels)
    assert ids[0] == 0 and len(ids) >= 2 and np.array_equal(ids, np.arange(len(ids)))  # 1..n, no gaps
    if mode == "histology":
        assert s.image.shape == (96, 128, 3) and s.image.dtype == np.uint8
        # stained nuclei absorb more light than the tissue around them
        assert s.image[s.labels > 0].mean() < s.image[s.labels == 0].mean()
    else:
        assert s.image.shape == (96, 128) and s.image.dtype == np.float32
    if mode in ("fluorescence", "cells"):
        assert s.image[s.labels > 0].mean() > s.image[s.labels == 0].mean()


def test_synthetic_images_are_a_pure_function_of_seed_and_index():
    a, b = SyntheticMicroscopy(seed=3), SyntheticMicroscopy(seed=3)
    s1, s2 = a.sample(11, 64), b.sample(11, 64)
    assert s1.mode == s2.mode and np.array_equal(s1.image, s2.image) and np.array_equal(s1.labels, s2.labels)
    assert not np.array_equal(a.sample(12, 64).labels, s1.labels)
    assert not np.array_equal(SyntheticMicroscopy(seed=4).sample(11, 64).image, s1.image)


def test_synthetic_nuclei_touch_and_vary_in_size():
    gen = SyntheticMicroscopy(seed=0)
    sizes, touching = [], 0
    for i in range(12):
        lab = gen.sample(i, 192, mode="fluorescence").labels
        counts = np.bincount(lab.ravel())[1:]
        sizes += list(counts[counts > 0])
        # two different objects side by side (horizontally) = touching or overlapping nuclei
        touching += int(((lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)).any())
    diam = 2 * np.sqrt(np.array(sizes) / np.pi)
    assert diam.min() < 12 and diam.max() > 40
    assert touching >= 3


def test_synthetic_elongation_makes_nuclei_longer_and_its_default_changes_nothing():
    from dataclasses import replace

    from skimage.measure import regionprops

    base = SynthConfig(edge_level=(0.35, 0.65))
    same, default = SyntheticMicroscopy(replace(base, elongation=None), seed=2), SyntheticMicroscopy(base, seed=2)
    assert np.array_equal(same.sample(4, 96).image, default.sample(4, 96).image)

    def axis_ratios(gen):
        out = []
        for i in range(10):
            lab = gen.sample(i, 160, mode="fluorescence").labels
            out += [p.axis_major_length / max(p.axis_minor_length, 1) for p in regionprops(lab) if p.area >= 30]
        return np.array(out)

    usual, long = axis_ratios(default), axis_ratios(SyntheticMicroscopy(replace(base, elongation=2.6), seed=2))
    assert np.median(long) > np.median(usual) + 0.2
    assert long.max() < 2.6 * 1.6  # the wobble on top of the ellipse stays bounded


def test_batches_are_deterministic_per_step_and_prompts_lie_on_their_objects():
    maker = BatchMaker(DataConfig(batch_size=2, crop_size=96, large_sizes=(128,), p_large=0.5,
                                  prompts={"objects_per_image": 3}), seed=5)
    a, b = maker[3], maker[3]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sizes = {maker[s]["images"].shape[-1] for s in range(12)}
    assert sizes == {96, 128}
    for s in range(4):
        batch = maker[s]
        img, lab = batch["images"], batch["label_maps"]
        assert img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        for p in range(batch["targets"].shape[0]):
            target = batch["targets"][p]
            obj = batch["object_id"][p]
            assert torch.equal(target > 0.5, lab[batch["image_index"][p]] == obj)
            pts, labels = batch["coords"][p], batch["point_labels"][p]
            if batch["kind"][p] == KIND_BOX:
                rows, cols = torch.nonzero(target, as_tuple=True)
                assert pts[0, 0] <= cols.min() + 0.5 + 5 and pts[1, 0] >= cols.max() + 0.5 - 5
                continue
            for (x, y), l in zip(pts.tolist(), labels.tolist()):
                if l == 1:
                    assert target[round(y), round(x)] == 1
                elif l == 0:
                    assert target[round(y), round(x)] == 0


def test_correction_clicks_target_the_larger_error():
    target = torch.zeros(2, 10, 10, dtype=torch.bool)
    target[:, 2:8, 2:8] = True
    pred = torch.zeros_like(target)
    pred[0, 2:8, 2:5] = True  # object 0: half missed -> a positive click in the missed part
    pred[1] = target[1]
    pred[1, 0:2, :] = True  # object 1: false positives only -> a negative click on them
    coords, labels = correction_clicks(pred, target, torch.Generator().manual_seed(0))
    x, y = coords[0, 0].long().tolist()
    assert labels[0, 0] == 1 and target[0, y, x] and not pred[0, y, x]
    x, y = coords[1, 0].long().tolist()
    assert labels[1, 0] == 0 and pred[1, y, x] and not target[1, y, x]
    same = correction_clicks(target, target)
    assert same[1].tolist() == [[-1], [-1]]  # nothing to correct: a padding click


def test_prompts_skip_images_without_objects_and_refuse_empty_batches():
    rng = np.random.default_rng(0)
    labels = np.zeros((2, 32, 32), np.int64)
    labels[1, 4:12, 4:12] = 1
    ps = sample_prompts(rng, labels, PromptConfig())
    assert ps.image_index.tolist() == [1]
    with pytest.raises(ValueError, match="no object"):
        sample_prompts(rng, np.zeros((1, 32, 32), np.int64), PromptConfig())


def test_annotated_folders_and_stacks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    lab = np.zeros((3, 40, 50), np.uint16)
    lab[:, 5:15, 5:20] = 1
    lab[:, 20:30, 25:40] = 2
    tifffile.imwrite(tmp_path / "images" / "stack.tif", (rng.random((3, 40, 50)) * 500).astype(np.uint16),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "masks" / "stack.tif", lab, photometric="minisblack")
    tifffile.imwrite(tmp_path / "images" / "single.tif", rng.random((40, 50)).astype(np.float32))
    tifffile.imwrite(tmp_path / "masks" / "single.tif", lab[0])
    data = AnnotatedImages.from_folder(tmp_path)
    assert len(data) == 4  # three planes of the stack + one image
    maker = BatchMaker(DataConfig(source=str(tmp_path), batch_size=2, crop_size=32, large_sizes=(), p_small=0.0),
                       seed=0)
    batch = maker[0]
    assert batch["images"].shape == (2, 3, 32, 32) and batch["targets"].shape[0] >= 1

    (tmp_path / "images" / "orphan.tif").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no mask for orphan.tif"):
        AnnotatedImages.from_folder(tmp_path)
    with pytest.raises(ImageError, match="differ in size"):
        AnnotatedImages([np.zeros((10, 10))], [np.zeros((10, 12), np.uint8)])
    with pytest.raises(ImageError, match="integer instance labels"):
        AnnotatedImages([np.zeros((10, 10))], [np.full((10, 10), 0.5)])
    with pytest.raises(ValueError, match="no objects"):
        AnnotatedImages([np.zeros((10, 10))], [np.zeros((10, 10), np.uint8)])

    # an image with NaN pixels is refused when loaded, naming its file and plane
    (tmp_path / "images" / "orphan.tif").unlink()
    img = (rng.random((3, 40, 50)) * 500).astype(np.float32)
    img[1, 7, 7] = np.nan
    tifffile.imwrite(tmp_path / "images" / "stack.tif", img, photometric="minisblack")
    with pytest.raises(ImageError, match=r"^stack\.tif, plane 1: image contains 1 NaN or infinite values"):
        AnnotatedImages.from_folder(tmp_path)


def test_segmentation_and_calibration_losses():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    good = (target * 2 - 1) * 8
    bad = -good
    cfg = LossConfig()
    iou = torch.tensor([1.0, 1.0])
    obj = torch.tensor([5.0, 5.0])
    lg, lb = segmentation_loss(good, target, iou, obj, cfg), segmentation_loss(bad, target, iou, obj, cfg)
    assert lg["seg"] < 0.1 < 2 < lb["seg"]
    assert lg["iou"] < 1e-6 and abs(lb["iou"] - 1) < 1e-6  # predicted IoU 1 vs actual 1 / 0
    focal = segmentation_loss(good, target, iou, obj, LossConfig(form="focal"))
    assert "focal" in focal and "bce" not in focal
    assert dice_loss(good, target).max() < 0.01
    with pytest.raises(ValueError, match="loss form"):
        LossConfig.from_dict({"form": "mse"})

    # calibration: L_cal = e exp(-u) + (1 - e) exp(u); a sure and wrong pixel (e = 1, u = 0)
    # costs exactly 1, and the uncertainty gets no gradient (stop-gradient): only e does
    t = torch.zeros(1, 1, 1)
    assert calibration_loss(torch.tensor([[[30.0]]]), t).item() == pytest.approx(1.0, abs=1e-6)
    t = torch.zeros(1, 1, 2)
    logit = torch.tensor([[[0.5, -0.5]]], requires_grad=True)
    calibration_loss(logit, t).backward()
    p = torch.sigmoid(logit.detach())
    from napari_ruac.model.weibull import binary_entropy_from_logit

    u = binary_entropy_from_logit(logit.detach())
    # d/dlogit of mean(e exp(-u) + (1 - e) exp(u)) with u fixed, e = p (target 0)
    expected = (torch.exp(-u) - torch.exp(u)) * p * (1 - p) / 2
    torch.testing.assert_close(logit.grad, expected)


def test_background_clicks_have_empty_targets_and_lie_off_every_object():
    maker = BatchMaker(DataConfig(batch_size=2, crop_size=96, prompts={"objects_per_image": 3,
                                                                       "background_per_image": 2}), seed=7)
    batch = maker[1]
    bg = batch["kind"] == KIND_BACKGROUND
    assert int(bg.sum()) == 4 and bool((batch["object_id"][bg] == 0).all())
    assert not bool(batch["targets"][bg].any())  # "no object", not the background as a mask
    assert bool(batch["targets"][~bg].flatten(1).any(1).all())
    for p in torch.nonzero(bg).flatten().tolist():
        x, y = batch["coords"][p, 0].tolist()
        lab = batch["label_maps"][batch["image_index"][p]]
        r, c = round(y), round(x)
        assert lab[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max() == 0  # not on or touching an object
        assert batch["point_labels"][p, 0] == 1
    # off by default: the recipes of the shipped models draw exactly the same batches as before
    plain = BatchMaker(DataConfig(batch_size=2, crop_size=96, prompts={"objects_per_image": 3}), seed=7)[1]
    assert not bool((plain["kind"] == KIND_BACKGROUND).any())


def test_object_score_learns_no_object_and_mask_terms_ignore_empty_targets():
    target = torch.zeros(2, 16, 16)
    target[0, 4:12, 4:12] = 1  # prompt set 1 clicked on background: empty target
    logits = (target * 2 - 1) * 8
    logits[1] = 8.0  # whatever it predicts for the background click...
    cfg = LossConfig()
    iou = torch.tensor([1.0, 0.0])
    yes_no = segmentation_loss(logits, target, iou, torch.tensor([6.0, -6.0]), cfg)
    yes_yes = segmentation_loss(logits, target, iou, torch.tensor([6.0, 6.0]), cfg)
    # ...its mask costs nothing, only saying "object" does
    assert yes_no["bce"] < 0.01 and yes_no["dice"] < 0.01 and yes_no["iou"] < 1e-6
    assert yes_no["obj"] < 0.01 < 2 < yes_yes["obj"]
    none = segmentation_loss(logits[1:], target[1:], iou[1:], torch.tensor([-6.0]), cfg)
    assert torch.isfinite(none["seg"]) and none["dice"] == 0


def test_multimask_loss_trains_the_best_mask_and_the_iou_head_on_all():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    good = (target[0] * 2 - 1) * 8
    logits = torch.stack([-good, good, torch.full_like(good, 8.0)])[None].requires_grad_(True)
    actual = torch.tensor([[0.0, 1.0, 64 / 256]])
    out = multimask_loss(logits, target, actual.clone(), LossConfig())
    assert out["mm_seg"] < 0.05 and out["mm_iou"] < 1e-6  # the min picks token 1; IoUs predicted exactly
    out["mm_seg"].backward()
    grads = logits.grad.flatten(2).abs().sum(2)[0]
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0  # only the best mask is trained
    wrong = multimask_loss(logits.detach(), target, torch.tensor([[1.0, 0.0, 1.0]]), LossConfig())
    assert wrong["mm_iou"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_synthetic_overlap_bounds_how_close_objects_are_placed():
    # overlap=None keeps the original layout (objects may hide most of one another); a number
    # keeps every pair of centres at least (1 - overlap) x the sum of their radii apart
    from napari_ruac.training.synthetic import SynthConfig, _object_set

    free, bounded = SynthConfig(touching=(0.6, 0.6)), SynthConfig(touching=(0.6, 0.6), overlap=0.1)
    closest = {}
    for name, cfg in (("free", free), ("bounded", bounded)):
        ratios = []
        for i in range(6):
            centres, radii = _object_set(np.random.default_rng(i), (256, 256), cfg, (16.0, 30.0))
            assert len(centres) == len(radii) >= 2
            d = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
            r = radii[:, None] + radii[None]
            off = ~np.eye(len(radii), dtype=bool)
            ratios.append((d[off] / r[off]).min())
        closest[name] = min(ratios)
    assert closest["bounded"] >= 0.9 - 1e-6
    assert closest["free"] < 0.85  # the unbounded layout does overlap objects this much
    # the bounded layout still makes touching nuclei, and labels stay exact 1..n
    s = SyntheticMicroscopy(bounded, seed=2).sample(0, 192, mode="fluorescence")
    ids = np.unique(s.labels)
    assert np.array_equal(ids, np.arange(len(ids))) and len(ids) > 3


def test_synthetic_edge_level_puts_label_edges_where_the_nucleus_fades_to_that_level():
    # edge_level=None labels a dome-shaped nucleus out to where its intensity meets the
    # background; a level labels it only where its own profile reaches that fraction of its
    # peak (the visible edge annotators draw), so labels shrink and the pixels just outside a
    # label are brighter relative to the nucleus
    from scipy import ndimage

    from napari_ruac.training.synthetic import SynthConfig

    def edge_levels(cfg):
        gen = SyntheticMicroscopy(cfg, seed=4)
        areas, outside = [], []
        for i in range(6):
            s = gen.sample(i, 128, mode="fluorescence")
            areas.append((s.labels > 0).sum())
            fg = s.labels > 0
            ring = ndimage.binary_dilation(fg) & ~fg
            far = ~ndimage.binary_dilation(fg, iterations=6)
            bg, peak = np.median(s.image[far]), np.percentile(s.image[fg], 90)
            outside.append((np.median(s.image[ring]) - bg) / (peak - bg))
        return np.sum(areas), np.median(outside)

    area_full, out_full = edge_levels(SynthConfig())
    area_half, out_half = edge_levels(SynthConfig(edge_level=(0.5, 0.5)))
    assert area_half < 0.9 * area_full
    assert out_half > out_full + 0.05


@pytest.mark.parametrize("inward", [1.0, 0.0])
def test_box_jitter_moves_corners_both_ways_or_only_outwards(inward):
    from napari_ruac.training.prompts import object_prompt

    mask = np.zeros((80, 80), bool)
    mask[20:50, 30:60] = True  # tight box: rows 20..50, cols 30..60 (pixel edges)
    cfg = PromptConfig(p_point=0, p_points=0, p_box=1, box_jitter_inward=inward)
    rng = np.random.default_rng(0)
    corners = np.array([object_prompt(rng, mask, cfg)[0] for _ in range(200)])  # (n, 2, (x, y))
    (x0, y0), (x1, y1) = corners[:, 0].T, corners[:, 1].T
    inside = (y0 > 20) | (x0 > 30) | (y1 < 50) | (x1 < 60)  # some corner moved into the object
    if inward == 0.0:
        assert not inside.any()
        assert (y0 < 20).mean() > 0.9 and (x1 > 60).mean() > 0.9  # the box still varies
    else:
        assert inside.mean() > 0.5
    assert np.abs(y0 - 20).max() <= 3.0 + 1e-4  # 10 % of the 30-px side


def test_neighbour_negatives_click_the_centre_of_the_nearest_other_object_and_default_off():
    from napari_ruac.training.prompts import neighbour_point, sample_prompts

    labels = np.zeros((60, 90), np.int32)
    labels[10:30, 10:30] = 1
    labels[10:30, 33:63] = 2  # 3 px from object 1; its deepest pixels lie 10 px inside
    labels[10:30, 66:70] = 4  # 3 px from object 2 as well, but farther from object 1
    labels[45:55, 10:20] = 3  # 15 px below object 1: beyond 6 px
    x, y = neighbour_point(labels == 1, labels, 6.0)
    assert labels[int(y), int(x)] == 2
    assert min(y - 10, 29 - y, x - 33, 62 - x) >= 9  # its interior centre, not the near edge
    assert neighbour_point(labels == 3, labels, 6.0) is None
    assert labels[tuple(int(v) for v in neighbour_point(labels == 3, labels, 20.0)[::-1])] == 1

    cfg = dict(objects_per_image=4, p_point=0, p_points=1, p_box=0, max_negative=0)
    off = sample_prompts(np.random.default_rng(0), labels[None], PromptConfig(**cfg))
    assert (off.labels != 0).all()  # no negatives unless asked for
    on = sample_prompts(np.random.default_rng(0), labels[None], PromptConfig(**cfg, p_neighbour_negative=1.0))
    for obj, coords, labs in zip(on.object_id, on.coords, on.labels):
        negatives = coords[labs == 0]
        if obj == 3:
            assert len(negatives) == 0
        else:
            assert len(negatives) == 1
            x, y = negatives[0]
            assert labels[int(y), int(x)] not in (0, obj)  # on another object, not background


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        os.kill(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        return False
    return True


def _wait_dead(pids, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_loader_workers_stop_when_closed_even_while_something_still_holds_the_iterator():
    # a KeyboardInterrupt's traceback holds the iterator until exit, where the DataLoader no
    # longer stops its workers; close_batches stops them while the iterator is still referenced
    maker = BatchMaker(DataConfig(batch_size=1, crop_size=32, large_sizes=()), seed=1, length=50)
    batches = iter(make_loader(maker, 0, 50, workers=1))
    next(batches)
    pids = [w.pid for w in batches._workers]
    assert pids and all(_alive(p) for p in pids)
    close_batches(batches)
    assert _wait_dead(pids, 15), "a worker outlived close_batches"
    close_batches(batches)  # closing twice is harmless, and so is a loader without workers
    close_batches(iter(make_loader(maker, 0, 2, workers=0)))


def test_a_loader_worker_outlives_sigterm_for_a_grace_period_then_exits(monkeypatch):
    # a signal to the whole training job must not kill the workers under their trainer (it
    # stops them after its checkpoint), but a SIGTERM no stop follows must not leave them behind
    monkeypatch.setattr(data_module, "WORKER_TERM_GRACE_S", 3.0)  # the forked worker inherits it
    maker = BatchMaker(DataConfig(batch_size=1, crop_size=32, large_sizes=()), seed=1, length=50)
    batches = iter(make_loader(maker, 0, 50, workers=1))
    next(batches)
    (pid,) = [w.pid for w in batches._workers]
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    time.sleep(1.0)
    assert _alive(pid), "SIGTERM/SIGINT killed a worker under its trainer"
    assert _wait_dead([pid], 20), "a SIGTERMed worker was still alive after its grace period"
    del batches


def test_a_sigint_while_a_batch_arrives_is_raised_once_the_batch_is_whole():
    # Ctrl-C in the middle of receiving a batch from a worker broke the worker's handshake and
    # made it print a traceback; the interrupt now waits for the batch to arrive.
    # Python's own handler, as the training CLI installs it (a background job, such as CI, starts
    # with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_a_sigint_waits_for_the_batch()
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_a_sigint_waits_for_the_batch():
    arrived = []

    def batches():
        yield "first"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # Python runs a signal's handler long before this ends
        arrived.append("second")
        yield "second"
        yield "third"

    received = received_batches(batches())
    assert next(received) == "first"
    with pytest.raises(KeyboardInterrupt):
        next(received)
    assert arrived == ["second"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_received_batches_yields_every_batch_in_order_and_ends():
    assert list(received_batches(iter(range(5)))) == [0, 1, 2, 3, 4]
    # outside the main thread (a napari thread worker) it cannot touch signals and just passes through
    import threading

    out = []
    t = threading.Thread(target=lambda: out.extend(received_batches(iter("abc"))))
    t.start()
    t.join()
    assert out == ["a", "b", "c"]
