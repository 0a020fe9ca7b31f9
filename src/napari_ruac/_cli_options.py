"""Command-line options shared by several subcommands (no torch import: --help stays fast)."""

from __future__ import annotations

WINDOW_HELP = ("context a native-scale model sees around each prompt, in model pixels: 'auto' (the size it was "
               "trained on), 0 for the whole plane, or a side in pixels")
BOX_SIZE_HELP = ("size in model pixels a box prompt's object is shown at (the box sets its own zoom): 'auto' "
                 "(32 for our models), 0 to use --zoom for boxes too, or a size")


def parse_window(text: str) -> int | str | None:
    """A ``--window`` value: 'auto', 0/'none' (whole plane) or a side in pixels."""
    return _auto_off_or(text, int, "window", "0 (whole plane) or a side in pixels")


def parse_box_size(text: str) -> float | str | None:
    """A ``--box-size`` value: 'auto', 0/'none' (use --zoom) or a size in pixels."""
    return _auto_off_or(text, float, "box_size", "0 (use --zoom) or a size in pixels")


def _auto_off_or(text: str, convert, name: str, expected: str):
    """'auto' stays 'auto', 0/none/off become None, anything else goes through ``convert``."""
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("0", "none", "off"):
        return None
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"{name} must be 'auto', {expected}, got {text!r}") from None
