"""Bad pixel sizes: a PixelSize that cannot be written is refused when it is made, not written as
negative or NaN resolution tags (or a ZeroDivisionError in the writer's arguments)."""

import math

import pytest

from napari_ruac.io.calibration import PixelSize, tiff_write_kwargs


@pytest.mark.parametrize(
    "args,name",
    [((0, 1), "x"), ((1, -1), "y"), ((math.nan, 1), "x"), ((1, math.inf), "y"), (("0.5", 1), "x"),
     ((1, 1, 0), "z"), ((1, 1, -2), "z")],
)
def test_bad_pixel_sizes_are_refused(args, name):
    with pytest.raises(ValueError, match=f"pixel size {name} must be a finite number of micrometres > 0"):
        PixelSize(*args)


def test_good_pixel_sizes_are_kept():
    size = PixelSize(0.5, 0.25, None)
    assert tiff_write_kwargs(size)["resolution"] == (2e4, 4e4)
    assert PixelSize.from_dict(size.as_dict()) == size
    assert PixelSize.from_dict({"x": 0, "y": 1}) is None  # metadata is read leniently, as before
