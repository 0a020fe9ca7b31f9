"""Installed versions of our dependencies, for provenance in metadata files and ``info``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version(name: str) -> str:
    """The installed distribution's version (``sam2`` has no ``__version__`` attribute)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"
