"""Training recipes that are wrong: broken YAML, a section of the wrong type, a value of the
wrong type. Each is one message naming the file, the key and what was expected (they were
a yaml ParserError, an AttributeError and a TypeError), and no training starts."""

from __future__ import annotations

import re

import pytest

from napari_ruac.cli import main
from napari_ruac.training.trainer import load_config

# a tiny valid recipe: were a bad line not caught, the run would stop after one step
TINY = """\
model: {spec: test-tiny, init: scratch}
data: {workers: 0, batch_size: 1, crop_size: 64, p_large: 0.0}
train: {val_every: 0, threads: 1}
val: {images: 1, size: 64, batch_size: 1}
"""


@pytest.mark.parametrize("text, message", [
    ("foo: [1\n", r"{path} is not valid YAML: .*expected ',' or '\]'.* \(line 2, column 1\)"),
    ("optim:\n  lr: 1\n   steps: 2\n", r"{path} is not valid YAML: mapping values are not allowed here \(line 3"),
    ("model: nosuch\n", r"{path}: model must be a mapping of keys such as spec, init, checkpoint .*got 'nosuch' \(str\)"),
    (TINY + "optim: {lr: abc}\n", r"{path}: optim.lr must be a number, got 'abc' \(str\)"),
    (TINY + "optim: {steps: 10.5}\n", r"{path}: optim.steps must be an integer, got 10.5 \(float\)"),
    (TINY + "optim: {lrr: 0.1}\n", r"{path}: unknown key optim.lrr; expected some of \['betas', 'clip'"),
    ("data: [1, 2]\n", r"{path}: data must be a mapping of keys such as source, batch_size"),
    ("data: {large_sizes: [320, big]}\n", r"{path}: data.large_sizes\[1\] must be an integer, got 'big'"),
    ("data: {prompts: {p_box: lots}}\n", r"{path}: data.prompts.p_box must be a number, got 'lots'"),
    ("loss: {kl_weight: [1]}\n", r"{path}: loss.kl_weight must be a number, got \[1\] \(list\)"),
    ("adversaries: {style: maybe}\n", r"{path}: adversaries.style must be true or false, got 'maybe'"),
    ("seed: one\n", r"{path}: seed must be an integer, got 'one'"),
    ("model: {spec: test-tiny, checkpoint: 3}\n", r"{path}: model.checkpoint must be a file path, got 3"),
    ("- a list\n", r"{path}: a training config must be a YAML mapping"),
])
def test_a_bad_recipe_is_one_message_naming_the_file_the_key_and_what_was_expected(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("napari-ruac train: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message.format(path=re.escape(str(path))), err), err
    assert not (tmp_path / "run").exists()


def test_binary_junk_is_not_valid_yaml(tmp_path):
    path = tmp_path / "junk.yaml"
    path.write_bytes(b"\x00\x01\xff\xfe garbage")
    with pytest.raises(ValueError, match=f"{path} is not valid YAML"):
        load_config(str(path))


def test_good_recipes_still_load_and_empty_sections_are_empty(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model: {spec: test-tiny}\nloss:\noptim: {lr: 1, encoder_lr: null, trainable: [sam_mask_decoder]}\n"
                    "val: {source: synthetic, images: 2}\n")
    cfg = load_config(str(path))
    assert cfg["optim"]["lr"] == 1 and cfg["loss"] == {} and cfg["val"]["images"] == 2
    # a dict (the widget's, a resumed run's saved recipe) is checked too, and named as such
    with pytest.raises(ValueError, match=r"^training config: train.multimask must be true or false, got 1"):
        load_config({"train": {"multimask": 1}})
