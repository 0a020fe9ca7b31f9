"""Help texts of command-line options shared by several subcommands (no torch import: --help
stays fast). The values are checked where they are used (``resolve_window``/``resolve_box_size``
in :mod:`napari_ruac.model.predictor`), so a bad one fails with the same message everywhere."""

import argparse

WINDOW_HELP = ("context a native-scale model sees around each prompt, in model pixels: 'auto' (the size it was "
               "trained on), 0 for the whole plane, or a side in pixels")
VIEWS_HELP = ("test-time views each prompt (and each re-clicked object of automatic segmentation) is decoded in "
              "and averaged over (the token grid moved by half a "
              "token, the window mirrored): 'auto' (4 for our models, 1 for SAM2.1's), 1, 2, 4 or 8")
SCALES_HELP = ("zooms each prompt (and each re-clicked object of automatic segmentation) is decoded at, a quarter "
               "octave apart around its own, in all its views, and "
               "averaged over: 1 (default; fastest), 3 or 5 (better masks and uncertainty, each one more set of "
               "encoder passes per window), or 'auto' (3 for our models, 1 for SAM2.1's)")
RECENTRE_HELP = ("decode a single positive click again from the centre of its first mask (kept when it still "
                 "holds the click); default: on for our models, off for SAM2.1's")
BOX_SIZE_HELP = ("size in model pixels a box prompt's object is shown at (the box sets its own zoom): 'auto' "
                 "(32 for our models), 0 to use --zoom for boxes too, or a size")

BOX_MARGIN_HELP = ("a box bounds its object: mask pixels more than this many pixels outside the box are background "
                   "('auto' = 0); 'off' keeps what the model predicts outside the box")


def zoom_value(text: str) -> float | str:
    """``--zoom`` of the commands: a number, or 'auto' (each plane's own
    zoom from the size of its objects). The number's range is checked where it is used."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--zoom must be a number or 'auto', got {text!r}") from None


def window_step_value(text: str) -> float:
    """``--window-step``: a fraction of the window in (0, 0.5] (``Predictor(window_step=...)``)."""
    try:
        step = float(text)
    except ValueError:
        step = float("nan")
    if not 0 < step <= 0.5:
        raise argparse.ArgumentTypeError(f"--window-step must be a fraction of the window in (0, 0.5], got {text!r}")
    return step
