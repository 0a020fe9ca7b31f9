"""Loading models: our checkpoints, official SAM2.1 files, and every way a file can be wrong."""

import warnings

import numpy as np
import pytest
import torch

from napari_ruac import Predictor, load_model
from napari_ruac.model import CheckpointError, UntrainedWeightsWarning, save_checkpoint
from napari_ruac.model.checkpoint import read_checkpoint


def _predict(model, img):
    p = Predictor(model)
    p.set_image(img)
    return p.predict(points=[(40, 50)], box=(10, 10, 90, 100))


@pytest.fixture
def saved(tiny_model, tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path, variant="test-tiny", recipe={"steps": 0}, metadata={"note": "x"})
    return path


def test_round_trip_gives_identical_predictions(tiny_model, saved):
    loaded = load_model(saved)
    assert loaded.config == tiny_model.config
    assert loaded.info["variant"] == "test-tiny" and loaded.info["recipe"] == {"steps": 0}
    img = np.random.default_rng(0).integers(0, 255, (120, 130)).astype(np.uint8)
    a, b = _predict(tiny_model, img), _predict(loaded, img)
    np.testing.assert_array_equal(a.probability, b.probability)


def test_fp16_checkpoint_is_close(tiny_model, tmp_path):
    path = tmp_path / "half.pt"
    save_checkpoint(tiny_model, path, half=True)
    assert path.stat().st_size < 0.7 * sum(p.numel() * 4 for p in tiny_model.state_dict().values())
    img = np.random.default_rng(1).integers(0, 255, (100, 100)).astype(np.uint8)
    a, b = _predict(tiny_model, img), _predict(load_model(path), img)
    assert np.abs(a.probability - b.probability).max() < 0.05


def test_tampered_weights_are_detected(saved):
    obj = torch.load(saved, weights_only=True)
    key = next(k for k, v in obj["model"].items() if v.is_floating_point())
    obj["model"][key] = obj["model"][key] + 1.0  # digest left as it was
    torch.save(obj, saved)
    with pytest.raises(CheckpointError, match="tampered"):
        load_model(saved)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_file_is_reported(saved, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    saved.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated|empty"):
        load_model(saved)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a SAM2 or napari-ruac checkpoint"):
        load_model(path)
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint .*starts with b'hello'"):
        load_model(path)


class Payload:
    """Stands for arbitrary pickled code: unpickling it would need to import this class."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_model(path)
    # the refused object is named, in one line instead of torch's page of advice
    assert "Payload" in str(info.value) and "\n" not in str(info.value)


def test_wrong_architecture_is_reported(saved):
    with pytest.raises(CheckpointError, match="another architecture|different architecture"):
        load_model("micro", checkpoint=saved)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("/nonexistent/model.pt")


def test_unknown_name():
    with pytest.raises(KeyError, match="unknown model 'nonsense'"):
        load_model("nonsense")


def test_official_weights_offline_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_RUAC_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as exc:
        load_model("sam2.1_hiera_small", download=False)
    msg = str(exc.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt" in msg
    assert str(tmp_path / "sam2.1_hiera_small.pt") in msg


def test_micro_without_weights_says_untrained(monkeypatch, tmp_path):
    from napari_ruac.model import build as build_module

    monkeypatch.setattr(build_module, "WEIGHTS_DIR", tmp_path)
    with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED"):
        model = load_model("micro")
    assert model.info["trained"] is False


def test_official_sam2_checkpoint_loads_with_untrained_head(tmp_path):
    """A real SAM2.1 Hiera-T model built by sam2's own builder, saved in Meta's format."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    # without the post-processing switch: its dynamic multimask fallback would pick another mask
    official = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", apply_postprocessing=False)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)
    with pytest.warns(UntrainedWeightsWarning, match="no RUAC Bayesian head"):
        model = load_model("sam2.1_hiera_tiny", checkpoint=path)
    assert model.info["official"] and not model.info["trained"]
    # every shared weight came from the file
    ours = model.state_dict()
    for key, value in official.state_dict().items():
        if key in ours:
            torch.testing.assert_close(ours[key], value)
    # same checkpoint, inferred architecture when loaded by path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWeightsWarning)
        assert load_model(path).config == model.config
    # SAM2's deterministic decoder in our model reproduces SAM2's own image predictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    img = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3)).astype(np.uint8)
    ref = SAM2ImagePredictor(official)
    ref.set_image(img)
    _, _, ref_low = ref.predict(point_coords=np.array([[300.0, 500.0]]), point_labels=np.array([1]),
                                multimask_output=False, return_logits=True)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        out = model.decode(model.encode(x), torch.tensor([[[300.0, 500.0]]]), torch.tensor([[1]]), mode="deterministic")
    np.testing.assert_allclose(out.logits[0, 0].numpy(), ref_low[0], atol=2e-3, rtol=1e-3)


def test_read_checkpoint_reports_metadata(saved):
    state, info = read_checkpoint(saved)
    assert info.metadata == {"note": "x"} and not info.official
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_with_head_keeps_weights_and_switches_decoder(tiny_model):
    from dataclasses import replace

    from napari_ruac.model import build_model
    from napari_ruac.model.build import with_head

    det = build_model(replace(tiny_model.config, head="deterministic"), seed=3).eval()
    bayes = with_head(det, "bayesian").eval()
    assert bayes.config.head == "bayesian" and bayes.default_mode == "analytic"
    shared = {k: v for k, v in det.state_dict().items() if ".weibull_head." not in k}
    for k, v in shared.items():
        torch.testing.assert_close(bayes.state_dict()[k], v)
    img = np.random.default_rng(0).integers(0, 255, (100, 100)).astype(np.uint8)
    a = Predictor(det)
    a.set_image(img)
    b = Predictor(bayes)
    b.set_image(img)
    np.testing.assert_allclose(a.predict(points=[(50, 50)]).probability,
                               b.predict(points=[(50, 50)], mode="deterministic").probability, atol=1e-6)
    assert with_head(bayes, "bayesian") is bayes


# ---------------------------------------------------------------------------- official downloads


def test_official_models_carry_their_published_sha256_and_size():
    from napari_ruac.model import MODEL_SPECS

    official = [s for s in MODEL_SPECS.values() if s.url]
    assert {s.name for s in official} == {f"sam2.1_hiera_{k}" for k in ("tiny", "small", "base_plus", "large")}
    for spec in official:
        assert spec.url.endswith("/" + spec.filename)
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert 100e6 < spec.size < 1e9
    assert len({s.sha256 for s in official}) == 4


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the files of a folder."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def _spec_for(content: bytes, url: str):
    """Hiera-T's spec with the URL, hash and size of a small stand-in file."""
    import hashlib
    from dataclasses import replace

    from napari_ruac.model import MODEL_SPECS

    return replace(MODEL_SPECS["sam2.1_hiera_tiny"], url=url, sha256=hashlib.sha256(content).hexdigest(),
                   size=len(content))


def test_download_is_checked_against_the_published_hash(http_folder, tmp_path):
    from napari_ruac.model.build import _download, verify_official_file

    root, base = http_folder
    content = np.random.default_rng(0).bytes(3 << 20)
    (root / "w.pt").write_bytes(content)
    spec = _spec_for(content, base + "w.pt")
    dest = tmp_path / "cache" / spec.filename
    _download(spec, dest)
    assert dest.read_bytes() == content
    assert (tmp_path / "cache" / (spec.filename + ".sha256")).read_text().strip() == spec.sha256
    verify_official_file(spec, dest)  # passes, and says nothing
    dest.write_bytes(content[:-1] + b"\0")  # changed after the download
    with pytest.raises(CheckpointError, match="no longer matches"):
        verify_official_file(spec, dest)


@pytest.mark.parametrize("served, message", [("tampered", "SHA-256 .* expected"), ("truncated", "truncated")])
def test_bad_download_is_refused_and_leaves_nothing(http_folder, tmp_path, served, message):
    from napari_ruac.model.build import _download

    root, base = http_folder
    content = np.random.default_rng(1).bytes(1 << 20)
    spec = _spec_for(content, base + "w.pt")
    bad = content[:-1] + b"x" if served == "tampered" else content[: len(content) // 2]
    (root / "w.pt").write_bytes(bad)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=message) as exc:
        _download(spec, cache / spec.filename)
    assert spec.url in str(exc.value)  # says what to fetch again
    assert list(cache.iterdir()) == []  # no half-written or unverified file stays


def test_hand_fetched_official_file_with_wrong_content_is_refused(tmp_path, monkeypatch):
    """The offline message tells users to fetch the file by hand: a wrong file is caught on load."""
    from napari_ruac.model import MODEL_SPECS

    content = b"not the weights" * 1000
    spec = _spec_for(content, MODEL_SPECS["sam2.1_hiera_tiny"].url)
    monkeypatch.setitem(MODEL_SPECS, spec.name, spec)
    monkeypatch.setenv("NAPARI_RUAC_CACHE", str(tmp_path))
    (tmp_path / spec.filename).write_bytes(content[:-1] + b"?")
    with pytest.raises(CheckpointError, match="corrupted or tampered"):
        load_model("sam2.1_hiera_tiny", download=False)
    (tmp_path / spec.filename).write_bytes(content[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model("sam2.1_hiera_tiny", download=False)


def _poisoned(model, value: float):
    """A copy of ``model`` with one weight set to ``value`` (what a diverged training leaves)."""
    import copy

    bad = copy.deepcopy(model)
    name, param = next((n, p) for n, p in bad.named_parameters() if n.startswith("sam_mask_decoder."))
    with torch.no_grad():
        param.view(-1)[0] = value
    return bad, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_neither_saved_nor_loaded(tiny_model, tmp_path, value):
    """Non-finite weights and a valid digest loaded before; predictions were then an all-NaN
    uncertainty map and an empty mask reported as 'mean uncertainty 0.000'."""
    from napari_ruac.model.checkpoint import state_digest

    bad, name = _poisoned(tiny_model, value)
    path = tmp_path / "diverged.pt"
    with pytest.raises(CheckpointError, match=rf"refusing to save {path}: the model's weight {name} holds"):
        save_checkpoint(bad, path)
    assert not path.exists() and not list(tmp_path.iterdir())
    # such a file written by an older version (the digest matches the weights it holds)
    good = tmp_path / "good.pt"
    save_checkpoint(tiny_model, good)
    obj = torch.load(good, weights_only=True)
    obj["model"] = {k: v.detach().clone() for k, v in bad.state_dict().items()}
    obj["digest"] = state_digest(obj["model"])
    torch.save(obj, path)
    kind = "NaN values" if value != value else "infinite values"
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is unusable: its weight {name} holds {kind}"):
        load_model(path)


def test_weights_beyond_fp16_are_not_saved_in_fp16(tiny_model, tmp_path):
    bad, name = _poisoned(tiny_model, 1e6)
    with pytest.raises(CheckpointError, match=f"in fp16: the model's weight {name} holds values beyond"):
        save_checkpoint(bad, tmp_path / "half.pt", half=True)
    save_checkpoint(bad, tmp_path / "full.pt")  # finite in fp32: fine
    assert not (tmp_path / "half.pt").exists()


@pytest.mark.parametrize("field, value, message", [
    ("format_version", "1", r"malformed field 'format_version': expected an integer, got '1' \(str\)"),
    ("format_version", 1.0, r"malformed field 'format_version': expected an integer, got 1.0 \(float\)"),
    ("model", "extra", r"malformed field 'model': expected entry 'extra' to be a tensor, got 3 \(int\)"),
    ("digest", None, r"field 'digest' is missing"),
    ("digest", 5, r"malformed field 'digest': expected a SHA-256 hex string, got 5 \(int\)"),
    ("config", "micro", r"malformed field 'config': expected a mapping of model config fields, got 'micro'"),
    ("metadata", [1], r"malformed field 'metadata': expected a mapping, got \[1\] \(list\)"),
])
def test_malformed_fields_are_named(saved, field, value, message):
    """A hand-edited or foreign file: a string format_version raised a TypeError, a non-tensor
    in the state dict an AttributeError in state_digest. Files stay weights_only-loadable."""
    obj = torch.load(saved, weights_only=True)
    if field == "model":
        obj["model"][value] = 3
    elif value is None:
        del obj[field]
    else:
        obj[field] = value
    torch.save(obj, saved)
    with pytest.raises(CheckpointError, match=rf"{saved} is not a valid napari-ruac checkpoint: {message}"):
        load_model(saved)
