"""``napari-ruac`` command line: one command per job, flags mirroring the Python API.

Subcommands live in their own modules and are imported only when used (the training stack
pulls in torch-geometric, which is slow to import). A subcommand module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("napari_ruac._cli_predict", "models, devices and versions"),
    "predict": ("napari_ruac._cli_predict", "segment one object in an image from point/box prompts"),
    "segment": ("napari_ruac.batch", "batch automatic segmentation of TIFF/zarr stacks"),
    "train": ("napari_ruac.training.cli", "train or fine-tune a model from a YAML config"),
    "evaluate": ("napari_ruac.evaluate", "accuracy and uncertainty metrics on image/mask folders"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-ruac",
        description="Bayesian SAM2 segmentation with per-pixel uncertainty for microscopy.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", choices=list(SUBCOMMANDS), help="what to do")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] == "--version":
            from . import __version__

            print(__version__)
            return 0
        top.print_help()
        print("\ncommands:")
        for name, (_, help_text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"napari-ruac {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser, name) if _takes_name(module.add_arguments) else module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command = name
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        # user-facing problems (bad file, bad prompt, missing weights, a read-only or full
        # disk, an output path that is a file): a message, not a trace
        print(f"napari-ruac {name}: error: {error_message(exc)}", file=sys.stderr)
        return 1


def error_message(exc: BaseException) -> str:
    """One line for the user. An OSError from the system reads as the path and the problem
    ("/data/out: Read-only file system"), without Python's "[Errno 30]"."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {exc.strerror}" if paths else exc.strerror
    return str(exc) or type(exc).__name__


def _takes_name(func) -> bool:
    import inspect

    return len(inspect.signature(func).parameters) >= 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
