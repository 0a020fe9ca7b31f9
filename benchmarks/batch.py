"""Batch segmentation benchmark: throughput, peak memory vs stack depth, local vs dask, and our
automatic segmentation vs SAM2's own ``SAM2AutomaticMaskGenerator``.

    python benchmarks/batch.py                 # full run (a few minutes on 2 cores)
    python benchmarks/batch.py --quick         # smaller stacks, fewer repeats

Every number in a table is measured in this run, side by side:

1. **Stack depth** — ``segment_files`` on stacks of 10, 40 and 160 planes, each run in a fresh
   subprocess that reports its own peak RSS (``VmHWM``): planes/s and peak RSS, which must
   stay flat (planes stream through a chunked store; nothing holds the stack).
2. **Local vs dask** — the 40-plane stack in this process vs a 2-worker ``LocalCluster`` on
   127.0.0.1 (throughput, peak RSS of the client and of each worker). On a 2-core machine two
   workers cannot beat one process using both cores by much; the point is that they scale out.
3. **vs SAM2AutomaticMaskGenerator** — same weights, same image, same 16x16 grid, batch size,
   thresholds and NMS. SAM2's generator needs a ``SAM2Base``; we hand it an adapter that exposes
   our model's own image encoder, prompt encoder and a plain SAM2 ``MaskDecoder`` holding our
   decoder's weights (our decoder subclasses it; the Bayesian head is the only extra), so both
   run the identical network. The image is square at the model's input size, so SAM2's resize
   is the identity. We report our deterministic mode (the same decoder computation as SAM2) and
   our analytic Bayesian mode (what we ship, with uncertainty). Median of interleaved repeats.
   Once with glibc's default allocator (3a), once in a fresh process with glibc told to keep
   freed memory (3b): SAM2's generator allocates far more fresh memory per batch than ours, so
   the ratio depends on the allocator and both are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

OPTIONS = dict(points_per_side=16, points_per_batch=64, pred_iou_thresh=0.5, stability_score_thresh=0.8,
               max_mean_uncertainty=1.0, box_nms_thresh=0.7)


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries it across exec, so
    a child (or a dask worker) would report its parent's peak when that was higher."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_stack(path: Path, n: int, size: int, seed: int = 0) -> None:
    """A stack of ``n`` planes of bright blobs on a noisy background, written page by page."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with tifffile.TiffWriter(path) as tw:
        for _ in range(n):
            img = rng.normal(100, 10, (size, size))
            for _ in range(12):
                cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 14)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 400
            tw.write(img.astype(np.uint16), photometric="minisblack", metadata=None)


# ---------------------------------------------------------------------------- 1. depth
def child(args) -> None:
    """Run one batch in this (fresh) process and print JSON with rate and peak RSS."""
    import torch

    from napari_ruac.batch import segment_files

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    out = tempfile.mkdtemp(prefix="ruac-bench-")
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    summary = segment_files([args.child], out, model=args.model, threads=args.threads,
                            workers=args.workers, **OPTIONS)
    elapsed = time.perf_counter() - t0
    n = summary.files[0].n_planes
    worker_rss = None
    print(json.dumps({"ok": summary.ok, "planes": n, "seconds": elapsed, "planes_per_s": n / elapsed,
                      "peak_rss_mb": peak_rss_mb(), "rss_after_import_mb": rss_before,
                      "worker_rss_mb": worker_rss}))


def run_child(stack: Path, model: str, threads: int, workers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(stack), "--model", model, "--threads", str(threads)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- 2. dask
def dask_run(stack: Path, model: str, workers: int) -> dict:
    """Batch on a LocalCluster this process starts; returns rate and per-worker peak RSS."""
    from distributed import Client

    from napari_ruac.batch import local_cluster, segment_files

    with local_cluster(workers) as cluster, Client(cluster) as client:
        # warm the workers up (imports, model load) outside the timed part: a cluster lives long
        tiny = Path(tempfile.mkdtemp()) / "warm.tif"
        synthetic_stack(tiny, workers * 2, 64)
        segment_files([tiny], tempfile.mkdtemp(), model=model, scheduler=cluster.scheduler_address,
                      threads=1, **OPTIONS)
        out = tempfile.mkdtemp()
        t0 = time.perf_counter()
        summary = segment_files([stack], out, model=model, scheduler=cluster.scheduler_address,
                                threads=1, **OPTIONS)
        elapsed = time.perf_counter() - t0
        rss = client.run(peak_rss_mb)
    n = summary.files[0].n_planes
    return {"planes_per_s": n / elapsed, "seconds": elapsed, "worker_rss_mb": sorted(rss.values())}


def local_run(stack: Path, model: str, threads: int) -> dict:
    from napari_ruac.batch import segment_files

    # warm-up (model load) outside the timed part, as for the cluster
    segment_files([stack], tempfile.mkdtemp(), model=model, threads=threads, **OPTIONS)
    t0 = time.perf_counter()
    summary = segment_files([stack], tempfile.mkdtemp(), model=model, threads=threads, resume=False, **OPTIONS)
    elapsed = time.perf_counter() - t0
    return {"planes_per_s": summary.files[0].n_planes / elapsed, "seconds": elapsed}


# ---------------------------------------------------------------------------- 3. vs SAM2
def sam2_view(model):
    """A ``SAM2Base`` look-alike over our model's modules, enough for SAM2's image predictor
    and automatic mask generator: same encoder, same prompt encoder, SAM2's ``MaskDecoder``
    with our decoder's weights."""
    import copy

    import torch
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam2_base import SAM2Base

    ours = model.sam_mask_decoder
    cfg = model.config
    decoder = MaskDecoder(
        transformer_dim=cfg.d_model, transformer=copy.deepcopy(ours.transformer), num_multimask_outputs=3,
        iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim, use_high_res_features=True,
        iou_prediction_use_sigmoid=cfg.iou_prediction_use_sigmoid, pred_obj_scores=cfg.pred_obj_scores,
        pred_obj_scores_mlp=cfg.pred_obj_scores_mlp,
    )
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("weibull_head.")}
    decoder.load_state_dict(state, strict=True)
    decoder.eval()

    class View(torch.nn.Module):
        image_size = cfg.image_size
        directly_add_no_mem_embed = True
        use_high_res_features_in_sam = True
        num_feature_levels = 3
        forward_image = SAM2Base.forward_image
        _prepare_backbone_features = SAM2Base._prepare_backbone_features

        def __init__(self):
            super().__init__()
            self.image_encoder = model.image_encoder
            self.sam_prompt_encoder = model.sam_prompt_encoder
            self.sam_mask_decoder = decoder
            self.no_mem_embed = model.no_mem_embed

        @property
        def device(self):
            return self.no_mem_embed.device

    return View().eval()


def same_network_check(model, size: int) -> float:
    """Max |logit difference| between SAM2's image predictor on the adapter and our model's
    deterministic decoder, for a few points on one image: ~0 means both run the same network."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from napari_ruac.model.sam import LABEL_POS

    rng = np.random.default_rng(1)
    rgb8 = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    predictor = SAM2ImagePredictor(sam2_view(model))
    s = size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    worst = 0.0
    with torch.inference_mode():
        predictor.set_image(rgb8)
        x = predictor._transforms(rgb8)[None]  # SAM2's own normalisation, undone for ours
        mean, std = model.pixel_mean, model.pixel_std
        emb = model.encode(x * std + mean)
        for r, c in rng.integers(0, size, (4, 2)):
            _, _, low = predictor.predict(np.array([[c, r]]), np.array([1]), multimask_output=True,
                                          return_logits=True)
            out = model.decode(emb, torch.tensor([[[float(c), float(r)]]]),
                               torch.tensor([[LABEL_POS]]), multimask_output=True, mode="deterministic")
            worst = max(worst, float(np.abs(out.logits[0].clamp(-32, 32).numpy() - low).max()))
    return worst


def versus_sam2(model, size: int, repeats: int, **thresholds) -> list[tuple[str, float, int]]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from napari_ruac.io.normalize import to_rgb_float
    from napari_ruac.model.automatic import AutomaticSegmenter

    path = Path(tempfile.mkdtemp()) / "one.tif"
    synthetic_stack(path, 1, size, seed=5)
    import tifffile

    plane = tifffile.imread(path)
    rgb8 = (to_rgb_float(plane) * 255).round().astype(np.uint8)  # what both see
    view = sam2_view(model)
    opts = {**OPTIONS, **thresholds}
    amg = SAM2AutomaticMaskGenerator(
        view, points_per_side=opts["points_per_side"], points_per_batch=opts["points_per_batch"],
        pred_iou_thresh=opts["pred_iou_thresh"], stability_score_thresh=opts["stability_score_thresh"],
        box_nms_thresh=opts["box_nms_thresh"], crop_n_layers=0, multimask_output=True,
        output_mode="binary_mask",
    )
    s = cfg_size = model.config.image_size
    amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    assert size == cfg_size, "the comparison image must be square at the model's input size"
    # SAM2's algorithm: its three masks per click, its IoU filter and ranking, one grid pass;
    # ours still merges overlapping fragments before resolving labels (on by default for our
    # models, a step SAM2 does not take: it only costs us time here). "ours default" adds what
    # our models are run with (the click must lie in its mask, one refinement round, confidence
    # ranking, single mask, every object re-clicked in four views), with the same thresholds
    as_sam2 = dict(multimask=True, point_in_mask=False, refine_rounds=0, rank_by="iou", reclick=False)
    ours = {mode: AutomaticSegmenter(model, mode=mode, **as_sam2, **opts) for mode in ("deterministic", "analytic")}
    ours["analytic, our defaults"] = AutomaticSegmenter(model, mode="analytic", **{**opts, "pred_iou_thresh": None})
    times: dict[str, list[float]] = {"sam2 AMG": [], "ours deterministic": [], "ours analytic": [],
                                     "ours analytic, our defaults": []}
    counts = {}
    import torch

    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            t0 = time.perf_counter()
            masks = amg.generate(rgb8)
            times["sam2 AMG"].append(time.perf_counter() - t0)
            counts["sam2 AMG"] = len(masks)
            for mode, seg in ours.items():
                t0 = time.perf_counter()
                res = seg.segment(rgb8)
                times[f"ours {mode}"].append(time.perf_counter() - t0)
                # masks after filters and NMS, comparable to SAM2's list of (overlapping) masks
                counts[f"ours {mode}"] = res.stats.n_after_nms
    return [(k, statistics.median(v[1:]), counts[k]) for k, v in times.items()]


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="micro")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="plane side (default: the model's input size)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--versus-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from napari_ruac import load_model

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = load_model(args.model)
    size = args.size or model.config.image_size
    if args.versus_only:  # part 3b's child process
        return print_versus_sam2(model, size, repeats=3 if args.quick else 7)
    trained = model.info.get("trained")
    depths = (5, 20, 80) if args.quick else (10, 40, 160)
    tmp = Path(tempfile.mkdtemp(prefix="ruac-bench-"))
    print(f"model {args.model} ({'trained' if trained else 'RANDOM weights: speed only'}), planes {size}x{size}, "
          f"grid {OPTIONS['points_per_side']}^2, torch threads {args.threads}, {os.cpu_count()} CPUs\n")

    print("1. stack depth (each run in a fresh process)")
    print(f"{'planes':>7} {'planes/s':>9} {'peak RSS MB':>12} {'RSS after import':>17}")
    rows = []
    for n in depths:
        path = tmp / f"stack{n}.tif"
        synthetic_stack(path, n, size)
        r = run_child(path, args.model, args.threads)
        rows.append(r)
        print(f"{n:>7} {r['planes_per_s']:>9.2f} {r['peak_rss_mb']:>12.0f} {r['rss_after_import_mb']:>17.0f}")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS ratio {depths[-1]} vs {depths[0]} planes: {growth:.2f}x (flat = 1.00)\n")

    print(f"2. local vs dask ({depths[1]} planes, warm model)")
    mid = tmp / f"stack{depths[1]}.tif"
    loc = local_run(mid, args.model, args.threads)
    dsk = dask_run(mid, args.model, 2)
    print(f"{'runner':<26} {'planes/s':>9} {'ratio':>6}")
    print(f"{'local, ' + str(args.threads) + ' thread(s)':<26} {loc['planes_per_s']:>9.2f} {1.0:>6.2f}")
    print(f"{'dask, 2 workers x 1 thread':<26} {dsk['planes_per_s']:>9.2f} {dsk['planes_per_s'] / loc['planes_per_s']:>6.2f}")
    print(f"worker peak RSS MB: {', '.join(f'{v:.0f}' for v in dsk['worker_rss_mb'])}\n")

    print("3. automatic segmentation vs SAM2AutomaticMaskGenerator (same network, image, grid)")
    print(f"  same-network check: max |logit(SAM2 predictor) - logit(ours)| = {same_network_check(model, size):.2e}")
    print("  3a. glibc's default allocator (what a plain `napari-ruac segment` runs with)")
    print_versus_sam2(model, size, repeats=3 if args.quick else 7)
    print(f"  3b. the same in a fresh process with {' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}")
    sys.stdout.flush()
    cmd = [sys.executable, __file__, "--versus-only", "--model", args.model, "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    subprocess.run(cmd, env={**os.environ, **TUNED_MALLOC}, check=True)


# glibc keeps freed memory for reuse instead of unmapping it: SAM2's generator allocates many
# fresh multi-MB tensors per batch (every mask upsampled to the image), each paid in page faults
# under the default settings, so the ratio depends on the allocator (jemalloc or tcmalloc
# behave more like this)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def print_versus_sam2(model, size: int, repeats: int) -> None:
    regimes = {
        f"thresholds iou {OPTIONS['pred_iou_thresh']}, stability {OPTIONS['stability_score_thresh']}": {},
        "every candidate passes the filters (iou 0, stability 0)": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
    }
    for title, thresholds in regimes.items():
        res = versus_sam2(model, size, repeats=repeats, **thresholds)
        base = res[0][1]
        print(f"  {title}")
        print(f"  {'method':<28} {'s/image':>8} {'speed-up':>9} {'masks':>6}")
        for name, sec, count in res:
            print(f"  {name:<28} {sec:>8.3f} {base / sec:>8.2f}x {count:>6}")
    sys.stdout.flush()

if __name__ == "__main__":
    main()
