"""``napari-ruac info`` and ``napari-ruac predict``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
from pathlib import Path

import numpy as np

from ._cli_options import (BOX_MARGIN_HELP, BOX_SIZE_HELP, RECENTRE_HELP, SCALES_HELP, VIEWS_HELP, WINDOW_HELP,
                           zoom_value)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "info":
        parser.add_argument("--json", action="store_true", help="print as JSON")
        return
    parser.add_argument("image", help="a 2D image (TIFF/PNG/zarr); for a stack, pick the plane with --plane")
    parser.add_argument("--point", action="append", default=[], metavar="ROW,COL", help="object point (repeatable)")
    parser.add_argument("--negative", action="append", default=[], metavar="ROW,COL", help="background point (repeatable)")
    parser.add_argument("--box", metavar="ROW0,COL0,ROW1,COL1", help="bounding box of the object, top-left corner first")
    parser.add_argument("--plane", type=int, default=None,
                        help="plane of a 3D/time stack: its index in C order over every axis but Y, X and colour "
                             "(as in the batch's objects CSV); only that plane is read")
    parser.add_argument("--axes", default=None, help="axes of a TIFF/zarr input, e.g. TZCYX (default: from the file)")
    parser.add_argument("--channel", type=int, default=None, help="channel to segment when there are more than 4")
    parser.add_argument("--model", default="micro", help="model name or checkpoint path (default: micro)")
    parser.add_argument("--checkpoint", default=None, help="weights file for an official SAM2.1 model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--mode", choices=["analytic", "mc"], default="analytic", help="uncertainty mode")
    parser.add_argument("--samples", type=int, default=20, help="Monte-Carlo samples (mode mc)")
    parser.add_argument("--zoom", type=zoom_value, default=1.0,
                        help="resize the image by this factor before the model sees it (0.5 for objects twice the "
                             "size the model was trained on); outputs keep the image's size. 'auto': the zoom that "
                             "shows the plane's typical object at the size the model learned (from the size of its "
                             "blobs)")
    parser.add_argument("--window", default="auto", help=WINDOW_HELP)
    parser.add_argument("--box-size", default="auto", help=BOX_SIZE_HELP)
    parser.add_argument("--box-margin", default="auto", help=BOX_MARGIN_HELP)
    parser.add_argument("--views", default="auto", help=VIEWS_HELP)
    parser.add_argument("--scales", default="1", help=SCALES_HELP)
    parser.add_argument("--recentre", action=argparse.BooleanOptionalAction, default=None, help=RECENTRE_HELP)
    parser.add_argument("-o", "--output", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    return _info(args) if args.command == "info" else _predict(args)


def _info(args) -> int:
    import torch

    from . import __version__
    from ._versions import package_version
    from .model import MODEL_SPECS, available_devices
    from .model.build import WEIGHTS_DIR, cache_dir

    models = {}
    for name, spec in MODEL_SPECS.items():
        if spec.packaged:
            status = "shipped" if (WEIGHTS_DIR / spec.packaged).is_file() else "weights missing (untrained)"
        elif spec.url:
            status = "cached" if (cache_dir() / spec.filename).is_file() else f"not downloaded ({spec.url})"
        else:
            status = "random weights"
        models[name] = {"description": spec.description, "weights": status}
    info = {
        "napari-ruac": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "devices": available_devices(),
        "cache": str(cache_dir()),
        "models": models,
    }
    info["sam2"] = package_version("sam2")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("napari-ruac", "python", "torch", "sam2"):
        print(f"{key:<12} {info[key]}")
    print(f"{'devices':<12} {', '.join(info['devices'])}")
    print(f"{'cache':<12} {info['cache']}")
    print("models:")
    for name, m in models.items():
        print(f"  {name:<24} {m['weights']:<28} {m['description']}")
    return 0


def _parse_pair(text: str, what: str) -> tuple[float, float]:
    try:
        r, c = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be ROW,COL (two numbers), got {text!r}") from None
    return r, c


def _read_plane(args):
    """The plane to segment (only that plane is read from a stack), its name for messages and
    the file's pixel size. A TIFF or zarr stack is read as the batch command reads it: its axes
    from the file (or --axes), planes numbered in C order over every axis but Y, X and colour,
    as in the batch's objects CSV."""
    from .io.imageio import read_image
    from .io.stacks import TIFF_SUFFIXES, ZARR_SUFFIXES, open_stack, plane_name

    path = Path(args.image)
    if path.suffix.lower() not in TIFF_SUFFIXES + ZARR_SUFFIXES:  # PNG, JPEG: one plane
        if args.plane not in (None, 0):
            raise ValueError(f"--plane {args.plane}: {path} is a single plane")
        return read_image(path), "the image", None
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    with open_stack(path, axes=args.axes, channel=args.channel) as stack:
        n = stack.n_planes
        shape = f"shape {stack.shape}, axes {stack.axes}"
        if args.plane is None:
            if n > 1:
                raise ValueError(f"{path} is a stack of {n} planes ({shape}): choose one with --plane 0..{n - 1}")
            index = 0
        elif n == 1:
            raise ValueError(f"--plane {args.plane}: {path} is a single plane ({shape}), not a stack")
        elif not 0 <= args.plane < n:
            raise ValueError(f"--plane {args.plane} does not exist: {path} has planes 0..{n - 1} ({shape})")
        else:
            index = args.plane
        return stack.read_plane(index), plane_name(stack, index), stack.pixel_size


def _predict(args) -> int:
    from .io.imageio import prepare_output_folder, remove_if_empty
    from .io.normalize import validate_plane

    points = [_parse_pair(p, "--point") for p in args.point]
    negatives = [_parse_pair(p, "--negative") for p in args.negative]
    box = _parse_box(args.box)
    if not points and not negatives and box is None:
        raise ValueError("give at least one --point or a --box")

    image, plane, size = _read_plane(args)
    validate_plane(image, name=f"{args.image}, {plane}")  # bad pixels: name the file and plane first
    out = Path(args.output)
    created = prepare_output_folder(out)  # before the model and the prediction: fail early
    try:
        return _predict_into(args, out, image, plane, size, points, negatives, box)
    except BaseException:
        if created:  # a failed run leaves no empty folder behind
            remove_if_empty(out)
        raise


def _predict_into(args, out: Path, image, plane: str, size, points, negatives, box) -> int:
    from .io.calibration import PixelSize, tiff_write_kwargs
    from .io.stacks import stack_stem
    from .model import Predictor, load_model
    from .model.automatic import reported_iou

    model = load_model(args.model, device=args.device, checkpoint=args.checkpoint)
    predictor = Predictor(model, zoom=args.zoom, window=args.window,
                          box_size=args.box_size, views=args.views, box_margin=args.box_margin,
                          recentre="auto" if args.recentre is None else args.recentre, scales=args.scales)
    predictor.set_image(image)
    pts = points + negatives
    labels = [1] * len(points) + [0] * len(negatives)
    pred = predictor.predict(points=pts or None, labels=labels or None, box=box, mode=args.mode, samples=args.samples)

    # "a.2024-01-05.ome.tif" -> "a.2024-01-05"; one file per plane, so planes do not overwrite
    stem = stack_stem(args.image) + ("" if args.plane is None else f"_plane{args.plane}")
    # the input's pixel size, so the mask measures in its units (a plane: no Z spacing)
    calibration = tiff_write_kwargs(size and PixelSize(size.x, size.y))
    mask_path, unc_path = out / f"{stem}_mask.tif", out / f"{stem}_uncertainty.tif"
    write_tiffs_together({mask_path: pred.mask.astype(np.uint8),
                          unc_path: pred.uncertainty.astype(np.float32)}, **calibration)
    iou = reported_iou(model, pred.iou_score)
    print(
        f"{stem}" + (f" ({plane})" if args.plane is not None else "") + f": mask area {int(pred.mask.sum())} px, "
        + ("" if np.isnan(iou) else f"predicted IoU {iou:.3f}, ")
        + f"mean uncertainty in mask {pred.mean_uncertainty:.3f}"
        + (f", seen at zoom {predictor.zoom:.3g} (auto)" if predictor.auto_zoom else "")
    )
    print(f"wrote {mask_path} and {unc_path}")
    return 0


def _parse_box(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box must be ROW0,COL0,ROW1,COL1, got {text!r}") from None
    if len(box) != 4:
        raise ValueError(f"--box must have 4 numbers, got {text!r}")
    return box


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return 1 << 62
    return st.f_bavail * st.f_frsize


def write_tiffs_together(files: dict[Path, np.ndarray], **kwargs) -> None:
    """Write several TIFFs as one result: each first to a temporary file beside it, and only
    when all are complete (flushed and fsynced) are they renamed into place. On any failure
    (a full disk) every temporary is removed and files of an earlier run stay as they were,
    so a mask never sits beside the uncertainty of another prediction.

    Raises OSError with a message naming the file and the problem."""
    import tifffile

    from .io.imageio import FileSet, PartlyReplaced, os_reason

    kwargs.setdefault("photometric", "minisblack")  # grey pages, as write_tiff_atomic writes them
    new, current = FileSet(), None
    try:
        for path, data in files.items():
            current = path
            with new.open(path) as f:
                try:
                    tifffile.imwrite(f, data, **kwargs)
                except OSError as exc:
                    # numpy's tofile reports a short write without errno ("N requested and M
                    # written"): on a full disk, say so (checked before the temporaries go)
                    if exc.errno is None and _free_bytes(path.parent) < data.nbytes:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
                    raise
        current = None  # every file is complete: the renames follow
        new.commit()
    except (OSError, PartlyReplaced) as caught:
        exc = caught.error if isinstance(caught, PartlyReplaced) else caught
        names = " and ".join(p.name for p in files)
        if current is None:  # the files were complete; a rename failed
            raise OSError(exc.errno, f"{os_reason(exc)} moving {names} into {next(iter(files)).parent}") from exc
        raise OSError(exc.errno, f"{os_reason(exc)} writing {current}; nothing was written ({names} of an "
                                 f"earlier run, if any, are unchanged)") from exc
    finally:
        new.discard()
