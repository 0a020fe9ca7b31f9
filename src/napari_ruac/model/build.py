"""``load_model``: a model by name (registry) or from a checkpoint file."""

from __future__ import annotations

import os
import sys
import urllib.request
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError, file_sha256, load_state_into, read_checkpoint
from .config import MODEL_SPECS, ModelConfig, ModelSpec, resolve_spec
from .sam import RuacSam, align_prompt_attention

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class UntrainedWeightsWarning(UserWarning):
    """The model runs with weights that were never trained (or a head that was not)."""


def cache_dir() -> Path:
    """Where downloaded official weights live: $NAPARI_RUAC_CACHE or ~/.cache/napari-ruac."""
    root = os.environ.get("NAPARI_RUAC_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-ruac"


def build_model(config: ModelConfig, seed: int | None = 0) -> RuacSam:
    """A freshly initialised model (deterministic for a given seed)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = RuacSam(config)
        align_prompt_attention(model)
    return model


def with_head(model: RuacSam, head: str, seed: int | None = 0) -> RuacSam:
    """A copy of ``model`` whose config says ``head`` ("bayesian" or "deterministic").

    Every weight is kept; only the decoder used at inference changes. This is how a Bayesian
    head is fine-tuned on top of a deterministic model (as RUAC fine-tunes pretrained SAM2): the
    deterministic model's Weibull head was never trained, so it is freshly initialised.
    """
    from dataclasses import replace

    if head == model.config.head:
        return model
    new = build_model(replace(model.config, head=head), seed=seed)
    state = model.state_dict()
    if model.config.head == "deterministic":
        fresh = new.sam_mask_decoder.weibull_head.state_dict()
        state.update({f"sam_mask_decoder.weibull_head.{k}": v for k, v in fresh.items()})
    new.load_state_dict(state)
    new.info = dict(getattr(model, "info", {}), head_converted_from=model.config.head)
    return new.to(model.device)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    if dev.type == "mps" and not _mps_available():
        raise RuntimeError("device 'mps' was requested but Apple MPS is not available")
    return dev


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if _mps_available():
        devices.append("mps")
    return devices


def load_model(
    name_or_path: str | os.PathLike = "micro",
    device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | None = None,
    download: bool = True,
) -> RuacSam:
    """Build a model by registered name or load one from a checkpoint file.

    * a path to our checkpoint (config inside) or to an official SAM2.1 ``.pt`` file;
    * ``micro`` / ``micro-bayes`` / ``micro-det``: our models shipped in the package;
    * ``sam2.1_hiera_tiny|small|base_plus|large``: official weights from ``checkpoint``, from
      the cache folder, or downloaded (``download=True``) from Meta's URL;
    * ``test-tiny``: random weights (seed 0), or ``checkpoint``'s, for tests.

    The returned model is in eval mode on ``device``; ``model.info`` says where it came from.
    """
    dev = resolve_device(device)
    if names_a_file(name_or_path):
        model = _from_file(Path(name_or_path), None)
    else:
        spec = resolve_spec(str(name_or_path))
        model = _from_spec(spec, checkpoint, download)
    return model.to(dev).eval()


def names_a_file(name_or_path: str | os.PathLike) -> bool:
    """Whether :func:`load_model` reads ``name_or_path`` as a checkpoint file (which may be
    missing: then it says so) rather than as a registered model name."""
    path = Path(name_or_path)
    return str(name_or_path) not in MODEL_SPECS and (path.suffix in {".pt", ".pth", ".ckpt"} or path.exists())


def _from_file(path: Path, expected: ModelConfig | None) -> RuacSam:
    state, info = read_checkpoint(path, official_config=expected)
    config = expected or info.config
    if expected is not None and not info.official and info.config != expected:
        raise CheckpointError(
            f"checkpoint {path} was saved for another architecture than the one requested"
        )
    model = build_model(config)
    missing = load_state_into(model, state, str(path))
    model.info = {"source": str(path), "variant": info.variant, "recipe": info.recipe,
                  "metadata": info.metadata, "official": info.official, "trained": True}
    if missing:
        model.info["trained"] = False
        warnings.warn(
            f"{path} has no RUAC Bayesian head (official SAM2 weights): the head is untrained, so "
            "its masks and uncertainty mean little until it is fine-tuned with `napari-ruac train`; "
            "mode='deterministic' runs SAM2's own decoder meanwhile",
            UntrainedWeightsWarning,
            stacklevel=3,
        )
    return model


def _from_spec(spec: ModelSpec, checkpoint, download: bool) -> RuacSam:
    if spec.random_init:
        if checkpoint is not None:  # weights trained on this (test) architecture
            model = _from_file(Path(checkpoint), spec.config)
            model.info["variant"] = spec.name
            return model
        model = build_model(spec.config)
        model.info = {"source": "random (seed 0)", "variant": spec.name, "trained": False}
        return model
    if spec.packaged:
        file = WEIGHTS_DIR / spec.packaged
        if checkpoint is not None:
            file = Path(checkpoint)
        if not file.is_file():
            warnings.warn(
                f"the weights of {spec.name!r} are not in this installation ({file} is missing): "
                "the model is UNTRAINED (random weights) and its masks are meaningless",
                UntrainedWeightsWarning,
                stacklevel=3,
            )
            model = build_model(spec.config)
            model.info = {"source": "random (weights missing)", "variant": spec.name, "trained": False,
                          "weights_missing": True}
            return model
        model = _from_file(file, spec.config)
        model.info["variant"] = spec.name
        return model
    file = Path(checkpoint) if checkpoint is not None else cache_dir() / spec.filename
    if checkpoint is not None:
        # a checkpoint passed explicitly may be the user's own fine-tune, not Meta's file
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {file}")
        verify_cached_hash(file)
    elif file.is_file():
        # in the cache: downloaded earlier, or fetched by hand as the offline message says
        verify_official_file(spec, file)
    elif download:
        _download(spec, file)  # checked against the published hash as it arrives
    else:
        raise FileNotFoundError(_missing_official_message(spec, file))
    return _from_file(file, spec.config)


def _missing_official_message(spec: ModelSpec, file: Path, reason: str = "") -> str:
    why = f" ({reason})" if reason else ""
    return (
        f"the official weights of {spec.name} are not available{why}. Download {spec.url} "
        f"and put it at {file} (or pass its path as checkpoint=..., or --checkpoint on the CLI)"
    )


def _download(spec: ModelSpec, dest: Path) -> None:
    """Download to a temporary file with a progress bar, verify the hash, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(1 << 20):
                out.write(block)
                done += len(block)
                _progress(spec.filename, done, total)
        sys.stderr.write("\n")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(_missing_official_message(spec, dest, f"download failed: {exc}")) from exc
    try:
        digest = _check_official(spec, tmp, f"downloaded {spec.url}")
    except CheckpointError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    # record the hash so later loads can tell whether the cached file changed
    _hash_record(dest).write_text(digest + "\n")


def verify_official_file(spec: ModelSpec, file: Path) -> None:
    """The cached official file must be Meta's: its size and SHA-256 are checked once and the
    hash recorded beside it (``verify_cached_hash`` then catches later changes)."""
    record = _hash_record(file)
    if record.is_file() and record.read_text().strip() == spec.sha256:
        verify_cached_hash(file)
        return
    digest = _check_official(spec, file, str(file))
    record.write_text(digest + "\n")


def _check_official(spec: ModelSpec, file: Path, what: str) -> str:
    """SHA-256 of ``file`` after checking its size and hash against ``spec``'s published values."""
    size = file.stat().st_size
    if spec.size is not None and size != spec.size:
        raise CheckpointError(
            f"{what} has {size:,} bytes, but {spec.filename} has {spec.size:,}: the file is truncated or "
            f"not the official one. Delete it and fetch {spec.url} again"
        )
    digest = file_sha256(file)
    if spec.sha256 is not None and digest != spec.sha256:
        raise CheckpointError(
            f"{what} has SHA-256 {digest}, expected {spec.sha256} for {spec.filename}: refusing to use it "
            f"(corrupted or tampered). Delete it and fetch {spec.url} again"
        )
    return digest


def _hash_record(file: Path) -> Path:
    """Where the SHA-256 a file was verified with is kept: beside it."""
    return file.with_name(file.name + ".sha256")


def verify_cached_hash(file: Path) -> None:
    """If a download recorded a hash beside ``file``, the file must still match it."""
    record = _hash_record(file)
    if record.is_file():
        expected = record.read_text().strip()
        if file_sha256(file) != expected:
            raise CheckpointError(f"{file} no longer matches the SHA-256 recorded when it was downloaded")


def _progress(name: str, done: int, total: int) -> None:
    if total:
        frac = done / total
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{name} [{bar:<30}] {done / 1e6:.0f}/{total / 1e6:.0f} MB")
    else:
        sys.stderr.write(f"\r{name} {done / 1e6:.0f} MB")
    sys.stderr.flush()
