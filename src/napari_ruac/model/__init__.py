"""Model core: pure torch, no Qt or napari."""

from .automatic import AutomaticSegmenter, AutoResult, ObjectInfo
from .build import UntrainedWeightsWarning, available_devices, build_model, cache_dir, load_model
from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .config import MODEL_SPECS, ModelConfig, resolve_spec
from .mask_decoder import BayesianMaskDecoder, DecoderOutput
from .predictor import Prediction, Predictor, Prompt, PromptError
from .sam import ImageEmbedding, RuacSam

__all__ = [
    "AutoResult", "AutomaticSegmenter", "ObjectInfo", "BayesianMaskDecoder", "CheckpointError", "DecoderOutput", "ImageEmbedding", "MODEL_SPECS",
    "ModelConfig", "Prediction", "Predictor", "Prompt", "PromptError", "RuacSam",
    "UntrainedWeightsWarning", "available_devices", "build_model", "cache_dir", "load_model",
    "read_checkpoint", "resolve_spec", "save_checkpoint",
]
