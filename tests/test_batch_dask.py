"""Scale-out: a 2-worker dask LocalCluster on 127.0.0.1 gives the same files as the local run,
loads the model once per worker, and a cluster can be attached to by its address."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_ruac.batch import ModelSpec, local_cluster, model_loads, segment_files

FAST = dict(model="test-tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            max_mean_uncertainty=1.0, threads=1, reclick=True)  # every stage, the re-click included


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_inputs")
    rng = np.random.default_rng(7)
    paths = []
    for i, shape in enumerate([(6, 40, 40), (2, 3, 36, 44)]):
        p = root / f"stack{i}.tif"
        axes = "ZYX" if len(shape) == 3 else "TZYX"
        tifffile.imwrite(p, (rng.random(shape) * 3000).astype(np.uint16), metadata={"axes": axes},
                         photometric="minisblack")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summary = segment_files(inputs, out, **FAST)
    assert summary.ok, summary.format()
    return out


def _same_outputs(a, b, stems):
    for stem in stems:
        for suffix in ("labels.tif", "uncertainty.tif", "objects.csv", "metadata.json"):
            assert (a / f"{stem}_{suffix}").read_bytes() == (b / f"{stem}_{suffix}").read_bytes(), (stem, suffix)


def test_two_local_workers_give_the_local_result(inputs, local_run, tmp_path):
    seen = []
    summary = segment_files(inputs, tmp_path, workers=2, progress=seen.append, **FAST)
    assert summary.ok, summary.format()
    assert [p.done_planes for p in seen] == list(range(1, 13))
    _same_outputs(local_run, tmp_path, ["stack0", "stack1"])


def test_attach_to_a_running_scheduler_and_load_the_model_once_per_worker(inputs, local_run, tmp_path):
    from distributed import Client

    with local_cluster(2) as cluster, Client(cluster) as client:
        summary = segment_files(inputs, tmp_path, scheduler=cluster.scheduler_address, **FAST)
        assert summary.ok, summary.format()
        loads = client.run(model_loads)
        # 12 planes on 2 workers: each worker that worked loaded the model exactly once
        assert sorted(loads.values()) in ([1, 1], [0, 1]) and sum(loads.values()) >= 1
        # the cluster belongs to the caller: still running after the batch
        assert client.submit(sum, [1, 2]).result() == 3
    _same_outputs(local_run, tmp_path, ["stack0", "stack1"])


def test_local_workers_keep_glibc_adaptive_malloc():
    """dask's default MALLOC_TRIM_THRESHOLD_ made torch 2-3x slower in workers."""
    import os

    from distributed import Client

    with local_cluster(1) as cluster, Client(cluster) as client:
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(env.values()) == [os.environ.get("MALLOC_TRIM_THRESHOLD_")]


def test_model_spec_travels_to_workers():
    import pickle

    spec = ModelSpec("test-tiny", "cpu", None, {"points_per_side": 4}, 1)
    assert pickle.loads(pickle.dumps(spec)).key == spec.key
