"""Reading/writing images and normalising intensities."""

from .normalize import ImageError, percentile_normalize, to_rgb_float, validate_plane

__all__ = ["ImageError", "percentile_normalize", "to_rgb_float", "validate_plane"]
