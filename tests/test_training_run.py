"""Training runs end to end (issue 3): the loss falls, kill-and-resume reproduces the log,
a 2-process gloo DDP run completes with agreeing replicas, export loads back."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from napari_ruac.cli import main
from napari_ruac.model import load_model
from napari_ruac.model.config import MODEL_SPECS
from napari_ruac.training.trainer import LOSS_FIELDS, Trainer, load_config, read_log

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(variant="ruac", steps=30, **over) -> dict:
    cfg = {
        "name": f"test-{variant}",
        "variant": variant,
        "seed": 3,
        "model": {"spec": "test-tiny", "init": "scratch"},
        "data": {"batch_size": 2, "crop_size": 128, "large_sizes": [160], "p_large": 0.2, "p_small": 0.1,
                 "workers": 0, "synthetic": {"max_objects": 30},
                 "prompts": {"objects_per_image": 4}},
        "loss": {"form": "bce", "kl_weight": 0.001, "cal_weight": 0.1},
        "optim": {"steps": steps, "lr": 2e-3, "warmup": 3, "min_lr_ratio": 0.1},
        "curriculum": {"kl_start": 2, "adv_start": 4, "adv_ramp": 4, "gamma": 0.5},
        "train": {"checkpoint_every": 4, "val_every": 0, "correction_prob": 0.5, "threads": 1},
        "val": {"images": 2, "size": 128, "batch_size": 2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    return cfg


def test_a_30_step_run_on_synthetic_data_lowers_the_loss(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_recipe("bayes", steps=30, data={"p_large": 0.0, "p_small": 0.0})
    trainer = Trainer(cfg, tmp_path, quiet=True)
    assert trainer.fit() == 30
    rows = read_log(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(30))
    seg = [float(r["seg"]) for r in rows]
    first, last = sum(seg[:8]) / 8, sum(seg[-8:]) / 8
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "curves.png").stat().st_size > 0
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 30


def test_full_ruac_step_trains_attackers_and_model(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_recipe("ruac", steps=6, curriculum={"adv_start": 0, "adv_ramp": 1})
    trainer = Trainer(cfg, tmp_path, quiet=True)
    before = {k: v.clone() for k, v in trainer.adversaries.state_dict().items()}
    trainer.fit()
    rows = read_log(tmp_path / "log.csv")
    assert all(float(r["gamma"]) > 0 and r["adv_seg"] and r["cal"] for r in rows)
    after = trainer.adversaries.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # parameters the variant never uses are out of the optimiser
    dec = trainer.model.sam_mask_decoder
    assert not any(p.requires_grad for p in dec.output_hypernetworks_mlps.parameters())
    assert all(p.requires_grad for p in dec.weibull_head.parameters())


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "napari_ruac.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _communicate(proc, timeout: float = 240) -> str:
    """The CLI's output once it has exited; one that hangs fails the test and is killed with
    its workers (a hung trainer otherwise outlives the test run)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out = proc.communicate(timeout=30)[0]
        pytest.fail(f"the training CLI did not exit within {timeout} s; its output:\n{out}")


def _wait_for_logged_steps(proc, log: Path, n: int, timeout_s: float = 240) -> None:
    """Until the running CLI ``proc`` has logged ``n`` steps; it must still be running then."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 1 + n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"


def _losses(rows):
    return [[r["step"]] + [r[k] for k in LOSS_FIELDS] + [r["size"], r["prompts"], r["lr"]] for r in rows]


def test_heads_recipe_trains_multimask_tokens_and_background_clicks(tmp_path):
    from napari_ruac.training.data import BatchMaker

    torch.set_num_threads(1)
    for variant in ("det", "bayes"):
        grads = {}
        for multimask in (False, True):
            cfg = tiny_recipe(variant, steps=3, data={"prompts": {"objects_per_image": 4, "background_per_image": 2}},
                              train={"multimask": multimask, "correction_prob": 0.0})
            trainer = Trainer(cfg, tmp_path / f"{variant}{multimask}", quiet=True)
            row = trainer.train_step(BatchMaker(trainer.data_cfg, seed=1)[0])
            # the IoU head's outputs 1..3 score the multimask tokens' masks
            iou_out = trainer.model.sam_mask_decoder.iou_prediction_head.layers[-1].weight.grad
            grads[multimask] = float(iou_out[1:].abs().sum())
            assert ("mm_seg" in row) == multimask
        # the predicted IoUs of the three multimask masks learn only from the multimask loss
        assert grads[False] == 0 < grads[True], (variant, grads)
    assert trainer.fit() == 3
    rows = read_log(trainer.run_dir / "log.csv")
    assert all(float(r["mm_seg"]) > 0 for r in rows)


def test_validation_on_a_held_out_folder_logs_the_evaluation_metrics(tmp_path):
    import numpy as np
    import tifffile

    from napari_ruac.training.trainer import validation_batches

    torch.set_num_threads(1)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "masks").mkdir()
    for k in range(2):
        lab = np.zeros((128, 128), np.uint16)
        lab[20:50, 30:60], lab[70:110, 60 + 10 * k:100 + 10 * k] = 1, 2
        img = (40 + 150 * (lab > 0) + np.random.default_rng(k).normal(0, 5, lab.shape)).clip(0, 255).astype(np.uint8)
        tifffile.imwrite(tmp_path / "val" / "images" / f"v{k}.tif", img)
        tifffile.imwrite(tmp_path / "val" / "masks" / f"v{k}.tif", lab)
    cfg = tiny_recipe("bayes", steps=2, train={"val_every": 2},
                      val={"source": str(tmp_path / "val"), "images": 2, "size": 96, "batch_size": 2})
    batches = validation_batches(load_config(cfg))
    assert {kind for kind, _ in batches} == {"point", "box"}
    for _, batch in batches:  # crops of the folder's two objects, not synthetic images
        assert set(torch.unique(batch["label_maps"]).tolist()) <= {0, 1, 2}
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    trainer.fit()
    row = read_log(tmp_path / "run" / "log.csv")[-1]
    for key in ("val_miou_point", "val_miou_box", "val_auroc", "val_ece"):
        assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])
    assert -1.0 <= float(row["val_pcc"]) <= 1.0


def test_kill_and_resume_reproduces_the_uninterrupted_loss_log(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("ruac", steps=10, train={"checkpoint_every": 3},
                                                 curriculum={"adv_start": 3, "adv_ramp": 3})))
    full, broken = tmp_path / "full", tmp_path / "broken"

    # the uninterrupted reference runs in this process (one thread, as the CLI runs below)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(str(recipe), full, quiet=True).fit()
    finally:
        torch.set_num_threads(threads)

    # the same run, SIGKILLed after step 5 (its last checkpoint is step 3), then resumed
    proc = _cli([str(recipe), "--run-dir", str(broken), "--threads", "1"])
    log = broken / "log.csv"
    _wait_for_logged_steps(proc, log, 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_rows = read_log(log)
    assert 5 <= len(killed_rows) < 10
    ckpt = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] in (3, 6, 9)

    proc = _cli([str(recipe), "--run-dir", str(broken), "--threads", "1", "--resume"])
    out = _communicate(proc)
    assert proc.returncode == 0, out
    assert f"resumed {broken / 'last.pt'} at step {ckpt['step']}" in out

    a, b = read_log(full / "log.csv"), read_log(broken / "log.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(10)]
    assert _losses(a) == _losses(b)
    assert any(float(r["gamma"]) > 0 for r in a)  # the adversarial phase was part of it


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signalled_run_checkpoints_the_step_it_reached(tmp_path, sig):
    # no periodic checkpoint before the signal: whatever is saved comes from the stop itself.
    # The child starts with SIGINT ignored, as a background job (`cmd &`) from a script does.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("bayes", steps=500, train={"checkpoint_every": 1000})))
    run = tmp_path / "run"
    proc = _cli([str(recipe), "--run-dir", str(run), "--threads", "1", "--output", str(tmp_path / "m.pt")],
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = run / "log.csv"
    _wait_for_logged_steps(proc, log, 3)
    proc.send_signal(getattr(signal, sig))
    out = _communicate(proc)
    assert proc.returncode == (0 if sig == "SIGTERM" else 130), out
    rows = read_log(log)
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert 3 <= ckpt["step"] < 500 and ckpt["step"] >= len(rows)
    if sig == "SIGTERM":  # a graceful stop also exports, like a finished run
        assert load_model(tmp_path / "m.pt").info["trained"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_job_stops_it_as_cleanly_as_one_to_the_trainer(tmp_path, sig):
    # A job scheduler's time limit, `pkill -f` and Ctrl-C in a terminal signal every process of
    # the job, the data-loading workers too. A worker killed under the trainer made the stop a
    # crash ("DataLoader worker ... is killed by signal") after the checkpoint; the workers now
    # leave stopping to the trainer.
    recipe = tmp_path / "recipe.yaml"
    cfg = tiny_recipe("bayes", steps=500, train={"checkpoint_every": 1000})
    cfg["data"]["workers"] = 1
    recipe.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = _cli([str(recipe), "--run-dir", str(run), "--threads", "1"], start_new_session=True)
    _wait_for_logged_steps(proc, run / "log.csv", 3)
    os.killpg(proc.pid, getattr(signal, sig))
    out = _communicate(proc)
    assert proc.returncode == (0 if sig == "SIGTERM" else 130), out
    assert "killed by signal" not in out and "Traceback" not in out, out
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert 3 <= ckpt["step"] < 500
    deadline = time.time() + 30  # and no worker is left behind
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a data-loading worker outlived its trainer")


def test_export_writes_an_fp16_package_checkpoint_that_loads(tmp_path):
    from napari_ruac.model import read_checkpoint

    torch.set_num_threads(1)
    cfg = tiny_recipe("bayes", steps=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    Trainer(str(recipe), tmp_path / "run", quiet=True).fit()
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "m.pt")]) == 0
    raw = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())
    _, info = read_checkpoint(tmp_path / "m.pt")
    assert info.variant == "test-bayes" and info.metadata["steps"] == 2
    assert info.recipe["model"]["spec"] == "test-tiny"
    model = load_model(tmp_path / "m.pt")
    assert model.info["trained"]


def test_exports_record_whether_the_heads_were_ever_trained_over_the_models_lineage(tmp_path):
    """Automatic segmentation trusts the multimask outputs and IoU head only where they were
    trained: a model fine-tuned from one of ours that never trained them must not pass for
    SAM2's weights (it did: its recipe's init was not 'scratch', and every grid mask was then
    filtered by an IoU head that predicts the mean)."""
    from napari_ruac.model import build_model, save_checkpoint
    from napari_ruac.model.automatic import AutomaticSegmenter, trained_heads

    torch.set_num_threads(1)

    def stage(name, model, **train):
        trainer = Trainer(tiny_recipe("bayes", steps=1, model=model, train=train), tmp_path / name, quiet=True)
        trainer.fit()
        return load_model(trainer.export(tmp_path / f"{name}.pt"))

    plain = stage("scratch", {})
    assert plain.info["metadata"]["trained_heads"] is False and not trained_heads(plain)
    later = stage("later", {"init": "pretrained", "checkpoint": str(tmp_path / "scratch.pt")})
    assert not trained_heads(later)
    assert AutomaticSegmenter(later).rank_by == "confidence"
    heads = stage("heads", {"init": "pretrained", "checkpoint": str(tmp_path / "later.pt")}, multimask=True)
    assert trained_heads(heads)
    assert trained_heads(stage("after-heads", {"init": "pretrained", "checkpoint": str(tmp_path / "heads.pt")}))
    # weights that come without our recipe (SAM2's) keep SAM2's heads through fine-tuning
    foreign = build_model(MODEL_SPECS["test-tiny"].config, seed=5)
    save_checkpoint(foreign, tmp_path / "foreign.pt")
    loaded = load_model("test-tiny", checkpoint=tmp_path / "foreign.pt")  # its weights, not the spec's seed-0 ones
    assert loaded.info["source"] == str(tmp_path / "foreign.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), foreign.state_dict().values()))
    assert trained_heads(loaded)
    assert trained_heads(stage("tuned", {"init": "pretrained", "checkpoint": str(tmp_path / "foreign.pt")}))


def test_export_without_a_run_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("bayes", steps=2)))
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "none"), "--export", str(tmp_path / "m.pt")]) == 1
    assert "nothing to export" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_bad_recipes_are_rejected_with_a_message(tmp_path):
    with pytest.raises(ValueError, match="unknown training config sections"):
        Trainer({"optimiser": {}}, tmp_path)
    with pytest.raises(ValueError, match="variant must be one of"):
        Trainer({"variant": "bayesian"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="training config not found"):
        Trainer(str(tmp_path / "missing.yaml"), tmp_path)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from napari_ruac.training.trainer import Trainer, shutdown_distributed
    cfg = json.loads(sys.argv[1])
    trainer = Trainer(cfg, sys.argv[2], quiet=True)
    assert isinstance(trainer.wrapped, torch.nn.parallel.DistributedDataParallel)
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.step_module.parameters()])
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, [float(flat.sum()), float(flat.abs().sum()), trainer.step])
    if dist.get_rank() == 0:
        open(sys.argv[3], "w").write(json.dumps(digests))
    shutdown_distributed(trainer, completed=True)
    """
)


def test_two_process_gloo_ddp_run_completes_and_replicas_agree(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cfg = tiny_recipe("ruac", steps=3, curriculum={"adv_start": 1, "adv_ramp": 1})
    result = tmp_path / "digests.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",  # a free port
         str(script), json.dumps(cfg), str(tmp_path / "run"), str(result)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = json.loads(result.read_text())
    assert len(digests) == 2
    assert digests[0][2] == digests[1][2] == 3
    assert digests[0][0] == pytest.approx(digests[1][0], rel=1e-6, abs=1e-6)
    assert digests[0][1] == pytest.approx(digests[1][1], rel=1e-6)
    rows = read_log(tmp_path / "run" / "log.csv")  # only rank 0 writes
    assert len(rows) == 3


def test_warm_start_from_a_det_run_then_distil_the_bayesian_head(tmp_path):
    torch.set_num_threads(1)
    det = Trainer(tiny_recipe("det", steps=2), tmp_path / "det", quiet=True)
    det.fit()
    cfg = tiny_recipe("bayes", steps=2, model={"warm_start": str(tmp_path / "det" / "last.pt")},
                      loss={"distill_weight": 2.0, "distill_steps": 10})
    bayes = Trainer(cfg, tmp_path / "bayes", quiet=True)
    # before any step: the encoder and the teacher (hypernetwork MLPs) are the det run's
    for name in ("image_encoder.trunk.patch_embed.proj.weight",
                 "sam_mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"):
        torch.testing.assert_close(bayes.model.state_dict()[name], det.model.state_dict()[name])
    bayes.fit()
    rows = read_log(tmp_path / "bayes" / "log.csv")
    assert all(float(r["distill"]) > 0 for r in rows)
    with pytest.raises(FileNotFoundError, match="warm-start checkpoint not found"):
        Trainer(tiny_recipe("bayes", model={"warm_start": str(tmp_path / "nope.pt")}), tmp_path / "x")


# ---------------------------------------------------------------------------- recipes


RECIPES = Path(__file__).resolve().parent.parent / "training"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_names_its_variant(path):
    from napari_ruac.training.trainer import load_config

    cfg = load_config(path)
    variant = path.stem.split("-")[1]  # micro-<variant>[-stage].yaml
    assert cfg["variant"] == variant
    if cfg["model"]["init"] == "pretrained":
        # later stages start from the same variant's stage 1; stage 1d (-edge) from stage 1c,
        # stages 1e (-more) and 1f (-calib) from stage 1d, the stage-1g, 1h and 1i experiments
        # (-clicks, -elong, -elongctl, -negs, -negsctl, -negemb, -negembctl) from stage 1f
        start = {"edge": "stage1c", "more": "stage1d", "calib": "stage1d",
                 **dict.fromkeys(("clicks", "elong", "elongctl", "negs", "negsctl", "negemb", "negembctl"), "stage1f"),
                 }.get(path.stem.split("-")[-1], "stage1")
        assert cfg["model"]["checkpoint"] == f"runs/micro-{variant}-{start}.pt"


def test_shipped_variants_see_the_same_data_for_the_same_budget():
    from napari_ruac.training.trainer import load_config

    for stage in ("", "-cont", "-long", "-edge", "-more", "-heads", "-calib"):
        cfgs = {v: load_config(RECIPES / f"micro-{v}{stage}.yaml") for v in ("ruac", "bayes", "det")}
        # stage 1f trains each variant's output head only: the Weibull head, or the
        # deterministic decoder's hypernetwork MLPs (it has no Weibull head)
        heads = {v: cfgs[v]["optim"].pop("trainable") for v in cfgs}
        if stage == "-calib":
            assert heads == {"ruac": ["sam_mask_decoder.weibull_head"], "bayes": ["sam_mask_decoder.weibull_head"],
                             "det": ["sam_mask_decoder.output_hypernetworks_mlps"]}
        else:
            assert heads == {"ruac": None, "bayes": None, "det": None}, stage
        for section in ("data", "optim", "loss", "train", "val", "seed"):
            assert cfgs["ruac"][section] == cfgs["bayes"][section] == cfgs["det"][section], (stage, section)


def test_a_recipe_changes_fields_of_its_specs_architecture_and_the_export_keeps_them(tmp_path):
    from napari_ruac.model import read_checkpoint
    from napari_ruac.training.trainer import build_training_model, load_config

    torch.set_num_threads(1)
    over = {"model": {"spec": "test-tiny", "init": "scratch", "config": {"fpn_top_down_levels": [0, 1, 2, 3]}}}
    cfg = tiny_recipe("bayes", steps=1, **over)
    model = build_training_model(load_config(cfg))
    assert model.config.fpn_top_down_levels == (0, 1, 2, 3)
    assert model.config.embed_dim == MODEL_SPECS["test-tiny"].config.embed_dim  # the rest is the spec's
    # top-down fusion reaches the stride-4 features: they now depend on the coarsest stage
    x = torch.rand(1, 3, 128, 128)
    plain = build_training_model(load_config(tiny_recipe("bayes", steps=1)))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model.encode(x).high_res[0], plain.encode(x).high_res[0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    Trainer(str(recipe), tmp_path / "run", quiet=True).fit()
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "m.pt")]) == 0
    assert read_checkpoint(tmp_path / "m.pt")[1].config.fpn_top_down_levels == (0, 1, 2, 3)
    assert load_model(tmp_path / "m.pt").config.fpn_top_down_levels == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="unknown model config fields"):
        build_training_model(load_config(tiny_recipe("bayes", model={"config": {"fpn_levels": [0]}})))


def test_a_run_keeps_what_it_knew_of_its_source_after_the_source_file_is_gone(tmp_path):
    """Resuming or exporting a run must not need the weights it started from, nor change what it
    recorded about them: exported from a state whose start file was missing, a fine-tune of a
    scratch model passed for SAM2's trained heads (automatic segmentation then found nothing)."""
    from napari_ruac.model.automatic import trained_heads

    torch.set_num_threads(1)
    first = Trainer(tiny_recipe("bayes", steps=1), tmp_path / "scratch", quiet=True)
    first.fit()
    first.export(tmp_path / "scratch.pt")
    later_cfg = tiny_recipe("bayes", steps=2, model={"init": "pretrained", "checkpoint": str(tmp_path / "scratch.pt")})
    later = Trainer(later_cfg, tmp_path / "later", quiet=True)
    later.fit()
    assert later.trained_heads is False
    (tmp_path / "scratch.pt").unlink()
    resumed = Trainer(later_cfg, tmp_path / "later", resume=True, quiet=True)
    assert resumed.step == 2 and resumed.trained_heads is False
    for a, b in zip(resumed.model.state_dict().values(), later.model.state_dict().values()):
        assert torch.equal(a, b)  # the weights came from the run's own state
    assert not trained_heads(load_model(resumed.export(tmp_path / "later.pt")))
    # a new run cannot start from weights that are not there
    with pytest.raises(FileNotFoundError, match="scratch.pt"):
        Trainer(later_cfg, tmp_path / "fresh", quiet=True)


def test_trainable_prefixes_train_only_those_parameters(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_recipe("bayes", steps=3, optim={"trainable": ["sam_mask_decoder.weibull_head"]},
                      train={"bayes_logits": "analytic"})
    trainer = Trainer(cfg, tmp_path / "head", quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit() == 3
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("sam_mask_decoder.weibull_head.") for k in changed), sorted(changed)
    assert any(k.startswith("sam_mask_decoder.weibull_head.token_head") for k in changed)
    assert any(k.startswith("sam_mask_decoder.weibull_head.pixel_head") for k in changed)


@pytest.mark.parametrize("variant,trainable,problem", [
    ("bayes", ["sam_mask_decoder.weibul_head"], "names no trainable parameter"),  # a typo
    ("det", ["sam_mask_decoder.weibull_head"], "names no trainable parameter"),  # det has no Weibull head
    ("bayes", "sam_mask_decoder", "non-empty list"),
    ("bayes", [], "non-empty list"),
])
def test_a_trainable_prefix_that_trains_nothing_is_an_error(tmp_path, variant, trainable, problem):
    with pytest.raises(ValueError, match=problem):
        Trainer(tiny_recipe(variant, steps=1, optim={"trainable": trainable}), tmp_path / "run", quiet=True)


@pytest.mark.parametrize("variant", ["ruac", "bayes", "det"])
def test_every_variant_trains_in_bf16_with_its_bayesian_parts_in_float32(tmp_path, variant):
    """The mixed precision a GPU run uses (train.precision 'auto' there), run with CPU autocast:
    every part of a step works in bf16 (attackers, corrections and KL on), the losses are
    finite and the weights learn and stay float32. Before, the deformation attacker raised a
    dtype error and the Weibull head ran in bf16."""
    torch.set_num_threads(1)
    cfg = tiny_recipe(variant, steps=3, data={"p_large": 0.0, "p_small": 0.0},
                      curriculum={"kl_start": 0, "adv_start": 0, "adv_ramp": 1, "gamma": 0.5},
                      train={"correction_prob": 1.0, "precision": "bf16"})
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rows = []
    trainer.callback = lambda r: rows.append(r.row)
    assert trainer.fit() == 3
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("loss", "seg", "kl", "grad_norm"))
    if variant == "ruac":
        assert all(math.isfinite(r["adv_seg"]) and r["gamma"] > 0 for r in rows)
    after = trainer.model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert any(not torch.equal(before[k], after[k]) for k in after)
    with pytest.raises(ValueError, match=r"train.precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"):
        Trainer(tiny_recipe(variant, train={"precision": "fp16"}), tmp_path / "x", quiet=True)


def test_a_run_saved_on_another_kind_of_device_resumes_with_its_generator_reseeded(tmp_path, capsys):
    """A GPU run's state holds a CUDA generator's state (16 bytes: seed and offset), which a
    CPU generator cannot take (and the other way round); training/README's device flow resumes
    GPU runs on the CPU. Simulated by giving last.pt a 16-byte generator state: the run resumes
    at its step, with the same batches, and says why it is not bit-identical."""
    torch.set_num_threads(1)
    cfg = tiny_recipe("det", steps=4, train={"checkpoint_every": 2})
    Trainer(cfg, tmp_path / "run", quiet=True).fit(max_steps=2)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    state["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, tmp_path / "run" / "last.pt")
    capsys.readouterr()
    trainer = Trainer(cfg, tmp_path / "run", resume=True)
    assert trainer.step == 2
    assert "was saved on another kind of device: its random generator is reseeded at step 2" in capsys.readouterr().out
    assert trainer.fit() == 4
    assert [int(r["step"]) for r in read_log(tmp_path / "run" / "log.csv")] == [0, 1, 2, 3]


def _nan_images_at(monkeypatch, steps):
    """Training batches whose images are NaN at the given steps (annotated folders refuse NaN
    images when loaded; this stands for an overflow): the loss and every gradient are NaN."""
    real_step = Trainer.train_step

    def train_step(self, batch):
        if self.step in steps:
            batch = dict(batch, images=batch["images"] * float("nan"))
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_step_with_a_nan_loss_is_skipped_and_leaves_the_weights_as_they_were(tmp_path, monkeypatch, capsys, clip):
    torch.set_num_threads(1)
    _nan_images_at(monkeypatch, {2})
    trainer = Trainer(tiny_recipe("det", steps=4, optim={"clip": clip}, train={"checkpoint_every": 100}),
                      tmp_path / "run")
    seen = []
    trainer.callback = lambda r: seen.append(({k: v.clone() for k, v in trainer.model.state_dict().items()},
                                              r.row["grad_norm"]))
    assert trainer.fit() == 4
    assert "step 3: the loss or its gradients are NaN or infinite; step skipped" in capsys.readouterr().out
    (after2, _), (after3, norm3), (after4, norm4) = seen[1:]
    assert math.isnan(norm3) and math.isfinite(norm4) and norm4 > 0
    assert all(torch.equal(after2[k], after3[k]) for k in after2)  # the NaN step changed nothing
    assert any(not torch.equal(after3[k], after4[k]) for k in after3)  # the next step learned again
    assert all(torch.isfinite(v).all() for v in after4.values() if v.is_floating_point())


def test_nan_losses_step_after_step_stop_the_run_with_the_last_good_weights(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr("napari_ruac.training.cli.install_stop_signals", lambda stop: None)  # in-process
    _nan_images_at(monkeypatch, set(range(2, 100)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("det", steps=20, train={"checkpoint_every": 100})))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert ("training diverged: the loss or its gradients were NaN or infinite in 5 steps in a row (to step 7)"
            in err) and "Traceback" not in err
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 6  # kept on the way out; its weights are step 2's, all finite
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_diverged_run_stops_with_a_message_and_writes_no_nan_checkpoint_or_model(tmp_path, monkeypatch, capsys):
    """A weight turned NaN (fault-injected in the third step: a real divergence takes long) stops
    the run at its next checkpoint with a message; last.pt keeps the last good step and no model
    is exported. Before, the NaN weights were checkpointed and exported with a valid digest, and
    the model predicted an empty mask with 'mean uncertainty 0.000'."""
    torch.set_num_threads(1)
    monkeypatch.setattr("napari_ruac.training.cli.install_stop_signals", lambda stop: None)  # in-process
    real_step = Trainer.train_step

    def train_step(self, batch):
        row = real_step(self, batch)
        if self.step == 2:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("det", steps=4, train={"checkpoint_every": 2})))
    run, model = tmp_path / "run", tmp_path / "model.pt"
    assert main(["train", str(recipe), "--run-dir", str(run), "--output", str(model)]) == 1
    err = capsys.readouterr().err
    assert "napari-ruac train: error: training diverged: by step 4 the weight " in err and "Traceback" not in err
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 2 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not model.exists()
    # a run whose last.pt an older version wrote with NaN weights is neither exported nor
    # resumed (which would train on NaN for a whole checkpoint interval), and is left as it was
    key = next(k for k, v in last["model"].items() if v.is_floating_point())
    last["model"][key].view(-1)[0] = float("nan")
    torch.save(last, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    for args in (["--export", str(model)], ["--resume"]):
        assert main(["train", str(recipe), "--run-dir", str(run), *args]) == 1
        err = capsys.readouterr().err
        assert f"cannot resume {run / 'last.pt'}: its weight {key} is NaN or infinite (step 2;" in err
        assert "Traceback" not in err
        assert not model.exists() and (run / "last.pt").read_bytes() == before
