"""Checkpoints: our format (state dict + metadata + digest) and official SAM2.1 files.

Every load uses ``torch.load(..., weights_only=True)``. Ours carry a SHA-256 digest of the
weights, so an edited file is told apart from a corrupt one; writes are atomic. Weights that
hold NaN or infinity (what a diverged training leaves) are refused both ways: a digest only
says the file is what was saved, not that it is usable.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MODEL_SPECS, ModelConfig

FORMAT = "napari-ruac-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: corrupt, truncated, tampered or mismatched."""


@dataclass
class CheckpointInfo:
    config: ModelConfig
    variant: str = "custom"
    recipe: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    official: bool = False


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or +-inf, else None."""
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return key
    return None


def _nonfinite_kind(t: torch.Tensor) -> str:
    nan = bool(torch.isnan(t).any())
    inf = bool(torch.isinf(t).any())
    return "NaN and infinite values" if nan and inf else "NaN values" if nan else "infinite values"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a half-written file (temporary file, fsync, rename)."""
    from ..io.imageio import atomic_file

    with atomic_file(path) as f:
        torch.save(obj, f)


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    variant: str = "custom",
    recipe: dict | None = None,
    metadata: dict | None = None,
    half: bool = False,
) -> None:
    """Save ``model`` (a RuacSam) in our format; ``half=True`` stores floats as fp16."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"refusing to save {path}: the model's weight {bad} holds {_nonfinite_kind(state[bad])} "
            f"(a diverged training?); a model with such weights predicts nothing"
        )
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        bad = first_nonfinite(state)
        if bad is not None:
            raise CheckpointError(
                f"refusing to save {path} in fp16: the model's weight {bad} holds values beyond fp16's range "
                f"(+-65504); save it in full precision"
            )
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "variant": variant,
        "recipe": recipe or {},
        "metadata": metadata or {},
        "digest": state_digest(state),
        "model": state,
    }
    atomic_torch_save(ckpt, path)


def read_checkpoint(
    path: str | os.PathLike, official_config: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read and verify a checkpoint; returns its float32 state dict and what it says of itself.

    An official (Meta) file carries no config: ``official_config`` names the one expected,
    else it is inferred from the tensor shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file is truncated")
    with path.open("rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK...); files from before torch 1.6 are a raw pickle (0x80)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle): it starts with {head!r}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    except Exception as exc:  # pickle.UnpicklingError for disallowed objects, etc.
        raise CheckpointError(
            f"checkpoint {path} could not be loaded safely with weights_only=True (it holds more "
            f"than tensors and plain data, e.g. pickled code): {_unpickler_reason(exc)}"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(
            f"{path} is not a SAM2 or napari-ruac checkpoint (no 'model' state dict inside)"
        )
    state = obj["model"]
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(_malformed(path, "model", f"entry {key!r} to be a tensor", value))
    if obj.get("format") == FORMAT:
        _check_fields(obj, path)
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {obj['format_version']}; this napari-ruac "
                f"reads up to {FORMAT_VERSION}: upgrade napari-ruac"
            )
        expected = obj.get("digest")
        actual = state_digest(state)
        if expected != actual:
            raise CheckpointError(
                f"checkpoint {path} has been tampered with or damaged: the weights' SHA-256 "
                f"{actual[:12]}... does not match the digest {str(expected)[:12]}... recorded when it was saved"
            )
        try:
            config = ModelConfig.from_dict(obj["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid model config: {exc}") from exc
        info = CheckpointInfo(
            config=config,
            variant=obj.get("variant", "custom"),
            recipe=obj.get("recipe", {}),
            metadata=obj.get("metadata", {}),
        )
    else:
        config = official_config or infer_official_config(state, path)
        info = CheckpointInfo(config=config, variant="sam2.1", official=True)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is unusable: its weight {bad} holds {_nonfinite_kind(state[bad])} "
            f"(what a diverged training leaves); a model with such weights predicts nothing"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, info


# fields of our format besides "model" and "format": (type, what is expected); "format_version"
# may be missing in files of the first version
_FIELDS = {
    "format_version": (int, "an integer"),
    "digest": (str, "a SHA-256 hex string"),
    "config": (dict, "a mapping of model config fields"),
    "variant": (str, "a name"),
    "recipe": (dict, "a mapping"),
    "metadata": (dict, "a mapping"),
}
_REQUIRED = ("digest", "config")


def _check_fields(obj: dict, path: Path) -> None:
    """Our format's fields have the types it writes (a hand-edited or foreign file may not)."""
    for name, (kind, what) in _FIELDS.items():
        if name not in obj:
            if name in _REQUIRED:
                raise CheckpointError(f"{path} is not a valid napari-ruac checkpoint: field {name!r} is missing")
            continue
        value = obj[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(_malformed(path, name, what, value))


def _malformed(path: Path, name: str, what: str, value) -> str:
    shown = repr(value) if not isinstance(value, torch.Tensor) else f"tensor {tuple(value.shape)}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return (f"{path} is not a valid napari-ruac checkpoint: malformed field {name!r}: expected {what}, "
            f"got {shown} ({type(value).__name__})")


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's long ``weights_only`` message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error"):
            rest = line.split(":", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else type(exc).__name__


def infer_official_config(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """Which official SAM2.1 architecture a Meta checkpoint holds, from its tensor shapes."""
    key = "image_encoder.trunk.patch_embed.proj.weight"
    if key not in state:
        raise CheckpointError(f"{path} is not a SAM2 checkpoint: it has no Hiera image encoder ({key})")
    embed_dim = state[key].shape[0]
    n_blocks = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    for spec in MODEL_SPECS.values():
        cfg = spec.config
        if spec.url and cfg.embed_dim == embed_dim and sum(cfg.stages) == n_blocks:
            return cfg
    raise CheckpointError(
        f"{path}: no known SAM2.1 architecture has embed_dim={embed_dim} and {n_blocks} Hiera blocks"
    )


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model``; returns the keys of ours the file lacked.

    Keys of SAM2's video parts (memory attention/encoder, object pointers) are ignored. A shape
    mismatch or any other missing key means the file holds another architecture.
    """
    own = model.state_dict()
    video_prefixes = ("memory_attention.", "memory_encoder.", "obj_ptr", "mask_downsample", "maskmem_tpos_enc",
                      "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")
    filtered = {k: v for k, v in state.items() if not k.startswith(video_prefixes)}
    unexpected = sorted(set(filtered) - set(own))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in filtered.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(filtered))
    bayes_missing = [k for k in missing if k.startswith("sam_mask_decoder.weibull_head.")]
    other_missing = [k for k in missing if k not in bayes_missing]
    if mismatched or unexpected or other_missing:
        details = (mismatched + [f"unexpected {k}" for k in unexpected] + [f"missing {k}" for k in other_missing])
        raise CheckpointError(
            f"{source} holds a different architecture than the model it is loaded into "
            f"({len(details)} problems, e.g. {'; '.join(details[:3])})"
        )
    model.load_state_dict(filtered, strict=False)
    return bayes_missing
