"""Shared test set-up.

triton (pulled in by torch_geometric -> torch._dynamo) segfaults when imported after napari
has created an OpenGL context (LLVM clash with Mesa), so import it before any viewer exists.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NAPARI_RUAC_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "tests"))

try:  # pragma: no cover - depends on the optional GPU stack being importable
    import triton  # noqa: F401
except Exception:
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run opt-in slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_model():
    """The seeded random `test-tiny` model (real SAM2 modules, tiny widths)."""
    import torch

    from napari_ruac import load_model

    torch.set_num_threads(2)
    return load_model("test-tiny")


@pytest.fixture(scope="session")
def micro():
    """The shipped `micro` weights; tests of what a trained model finds skip without them."""
    import warnings

    from napari_ruac import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("micro")
    if not model.info.get("trained"):
        pytest.skip("the micro model's trained weights are not installed (random weights find nothing)")
    return model
