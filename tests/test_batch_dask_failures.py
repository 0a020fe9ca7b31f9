"""Bad clusters for ``segment_files(scheduler=..., workers=...)``, on real dask.distributed
clusters on 127.0.0.1: an address nobody answers, a malformed address, a scheduler without
workers, a worker killed mid-file and a scheduler that goes away mid-file. Each gives a clear
message (a BatchError before any work, or a failed file that names the plane), never a hang or
a crash of the whole batch, and the planes already computed stay in the work store."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
import tifffile

from napari_ruac import batch
from napari_ruac.batch import BatchError, local_cluster, segment_files

FAST = dict(model="test-tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            max_mean_uncertainty=1.0, threads=1)


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.tif")
        tifffile.imwrite(paths[-1], (rng.random((4, 32, 32)) * 1000).astype(np.uint16), metadata={"axes": "ZYX"})
    return paths


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(batch, "SCHEDULER_TIMEOUT_S", 2.0)


def stored_planes(out, stem):
    return sorted(p.name for p in (out / ".ruac-work" / stem / "planes").glob("*.json"))


def segment_while(inputs, out, action):
    """``segment_files`` on a one-worker LocalCluster on 127.0.0.1 (threads, so the test can act
    on it), with ``action(cluster)`` run in a thread once the first plane is stored (the next is
    on the worker then). Returns the summary and the scheduler's address."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                           host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL)
    address = cluster.scheduler_address
    acting = []

    def act_once(progress):
        if not acting:
            acting.append(threading.Thread(target=action, args=(cluster,)))
            acting[0].start()

    try:
        summary = segment_files(inputs, out, scheduler=address, progress=act_once, **FAST)
    finally:
        for t in acting:
            t.join()
        cluster.close()
    return summary, address


def test_an_unreachable_or_malformed_scheduler_address_is_a_batch_error(inputs, tmp_path, short_timeout):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(BatchError, match=f"cannot reach the dask scheduler at {address}"):
        segment_files(inputs, tmp_path / "out", scheduler=address, **FAST)
    with pytest.raises(BatchError, match="cannot reach the dask scheduler at no-port-here"):
        segment_files(inputs, tmp_path / "out", scheduler="no-port-here", **FAST)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_scheduler_without_workers_is_a_batch_error_not_a_hang(inputs, tmp_path, short_timeout):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        with pytest.raises(BatchError, match=f"the dask scheduler at {address} has no workers"):
            segment_files(inputs, tmp_path / "out", scheduler=address, **FAST)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_worker_killed_mid_file_fails_that_file_keeps_its_planes_and_the_batch_goes_on(inputs, tmp_path):
    import dask
    import distributed  # noqa: F401 (loads its config defaults, which the override below edits)

    out = tmp_path / "out"
    # the scheduler gives up on a plane at its worker's first death (dask's default retries 3 times)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = local_cluster(1, silence_logs=logging.CRITICAL)
    killed = []

    def kill_the_worker(progress):
        if not killed:  # the first plane is stored; the next one is on the worker now
            killed.extend(nanny.process.pid for nanny in cluster.workers.values())
            for pid in killed:
                os.kill(pid, 9)

    try:
        summary = segment_files(inputs, out, scheduler=cluster.scheduler_address, progress=kill_the_worker, **FAST)
    finally:
        cluster.close()
    assert killed
    a, b = summary.files
    assert a.status == "failed" and b.status == "done", summary.format()
    assert "a dask worker died while segmenting plane" in a.reason and str(inputs[0]) in a.reason
    assert "a rerun resumes" in a.reason
    assert "0.json" in stored_planes(out, "a")
    assert not (out / "a_labels.tif").exists() and (out / "b_labels.tif").is_file()
    # the rerun (here in this process) resumes from the stored planes and finishes the file
    again = segment_files(inputs[:1], out, **FAST)
    assert again.ok and again.files[0].resumed_planes >= 1, again.format()


def test_a_scheduler_that_goes_away_mid_file_fails_the_rest_with_a_message(inputs, tmp_path, short_timeout):
    out = tmp_path / "out"
    summary, address = segment_while(inputs, out, lambda cluster: cluster.close())
    a, b = summary.files
    assert a.status == b.status == "failed", summary.format()
    assert f"lost the connection to the dask scheduler at {address}" in a.reason
    assert "plane" in a.reason and str(inputs[0]) in a.reason
    assert "not segmented" in b.reason and address in b.reason
    assert stored_planes(out, "a")  # kept for a rerun
    assert not (out / ".ruac-work" / "b").exists()  # b got no plane: no store left behind
    assert sorted(p.name for p in out.iterdir()) == [".ruac-work"]


def test_a_cluster_left_without_workers_mid_file_fails_the_rest_instead_of_waiting(inputs, tmp_path, short_timeout):
    """All workers gone and nothing to restart them (workers started by hand, a job scheduler's
    time limit): the planes would wait for ever. After SCHEDULER_TIMEOUT_S without a worker the
    file fails naming what was left, its stored planes are kept, and the next file fails at once."""
    out = tmp_path / "out"
    summary, address = segment_while(inputs, out, lambda cluster: cluster.scale(0))  # its only worker goes
    a, b = summary.files
    assert a.status == b.status == "failed", summary.format()
    assert f"the dask scheduler at {address} has had no workers for 2 s: plane" in a.reason, a.reason
    assert str(inputs[0]) in a.reason and "a rerun (with workers) resumes" in a.reason
    assert "not segmented" in b.reason and "has had no workers" in b.reason
    assert stored_planes(out, "a")  # kept for a rerun
    assert not (out / "a_labels.tif").exists() and not (out / "b_labels.tif").exists()
