"""napari-ruac: click-to-segment microscopy with a Bayesian SAM2 that says where it is unsure."""

__version__ = "0.1.0"

from .model import Prediction, Predictor, Prompt, load_model  # noqa: E402

__all__ = ["Prediction", "Predictor", "Prompt", "load_model", "__version__"]
