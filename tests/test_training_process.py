"""Training in a child process (napari_ruac.training.process): the run folder the parent writes,
and how the child's failures, signals and stops come back. The fine-tune widget's tests run the
real `napari-ruac train` child end to end."""

from __future__ import annotations

import signal
import sys

import numpy as np
import pytest

from napari_ruac.training.process import (TrainingProcess, TrainingProcessError, prepare_run, train_command,
                                          write_annotated_folder)


def planes():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 4000, (40, 48)).astype(np.uint16)
    rgb = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
    lab = np.zeros((40, 48), np.uint32)
    lab[5:15, 5:20], lab[20:30, 25:40] = 1, 7
    return grey, rgb, lab


def test_annotated_folder_reads_back_as_the_same_training_data(tmp_path):
    from napari_ruac.training.data import AnnotatedImages

    grey, rgb, lab = planes()
    root = write_annotated_folder(tmp_path / "data", [grey, rgb], [lab, lab[::-1].copy()], rgb=True)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["0000.tif", "0001.tif"]
    from_folder = AnnotatedImages.from_folder(root)
    in_memory = AnnotatedImages([grey, rgb], [lab, lab[::-1]])
    assert len(from_folder) == 2
    for a, b in zip(from_folder.images, in_memory.images):
        np.testing.assert_array_equal(a, b)  # same normalisation: the dtypes and values survived
    for a, b in zip(from_folder.labels, in_memory.labels):
        np.testing.assert_array_equal(a, b)


def test_rewriting_a_run_folder_drops_stale_planes_and_refuses_foreign_files(tmp_path):
    grey, _, lab = planes()
    write_annotated_folder(tmp_path, [grey, grey, grey], [lab, lab, lab])
    write_annotated_folder(tmp_path, [grey], [lab])
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["0000.tif"]
    (tmp_path / "images" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="mine.png, which the fine-tune did not write"):
        write_annotated_folder(tmp_path, [grey], [lab])
    assert (tmp_path / "images" / "mine.png").is_file()
    with pytest.raises(ValueError, match="differ in size"):
        write_annotated_folder(tmp_path / "b", [grey], [lab[:10]])
    with pytest.raises(ValueError, match="labels must be integers"):
        write_annotated_folder(tmp_path / "c", [grey], [lab.astype(np.float32)])
    with pytest.raises(ValueError, match="2 image planes but 1 label planes"):
        write_annotated_folder(tmp_path / "d", [grey, grey], [lab])


def test_the_recipe_points_at_the_written_planes(tmp_path):
    from napari_ruac.training.trainer import load_config

    grey, _, lab = planes()
    path = prepare_run(tmp_path / "run", {"name": "t", "data": {"batch_size": 1}}, [grey], [lab])
    cfg = load_config(path)
    assert cfg["data"]["source"] == str((tmp_path / "run" / "data").resolve())
    assert cfg["data"]["batch_size"] == 1
    cmd = train_command(path, tmp_path / "run", tmp_path / "m.pt", device="cpu", threads=1)
    assert cmd[:4] == [sys.executable, "-m", "napari_ruac.cli", "train"]
    assert {"--progress-json", "--stop-on-stdin", "--output"} <= set(cmd)


def test_a_bad_recipe_fails_with_the_childs_own_message(tmp_path):
    grey, _, lab = planes()
    path = prepare_run(tmp_path / "run", {"name": "t", "optimiser": {}}, [grey], [lab])
    proc = TrainingProcess(train_command(path, tmp_path / "run", tmp_path / "m.pt", "cpu", 1), tmp_path / "run")
    proc.start()
    with pytest.raises(TrainingProcessError) as err:
        list(proc.events())
    text = str(err.value)
    assert "failed (exit code 1)" in text
    assert "unknown training config sections ['optimiser']" in text
    assert not (tmp_path / "m.pt").exists()


def test_a_child_killed_by_a_signal_is_reported_as_such(tmp_path):
    proc = TrainingProcess([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], tmp_path)
    proc.start()
    with pytest.raises(TrainingProcessError, match=r"killed by SIGKILL \(out of memory\?"):
        list(proc.events())
    assert proc.returncode == -signal.SIGKILL


def test_a_child_that_exits_without_exporting_is_an_error(tmp_path):
    proc = TrainingProcess([sys.executable, "-c", "print('hello'); print('{\"event\": \"step\", \"step\": 1}')"],
                           tmp_path)
    proc.start()
    events = []
    with pytest.raises(TrainingProcessError, match="ended without exporting a model:\nhello"):
        for event in proc.events():
            events.append(event)
    assert events == [{"event": "step", "step": 1}]


def test_stop_terminates_a_child_that_does_not_stop_by_itself(tmp_path):
    # ignores stdin: closing it asks in vain, so stop() has to terminate it
    proc = TrainingProcess([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path)
    proc.start()
    assert proc.alive and proc.pid is not None
    assert proc.stop(grace_s=0.5) == -signal.SIGTERM
    assert not proc.alive
    late = TrainingProcess([sys.executable, "-c", "pass"], tmp_path)
    late.stop()
    with pytest.raises(TrainingProcessError, match="stopped before"):
        late.start()
