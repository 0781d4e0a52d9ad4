"""imram: cross-modal image-text retrieval (IMRAM, MEMBER, SCAN, VSE++)."""

from imram import data, metrics, models, scoring
from imram.models import build_model, list_models
from imram.schema import ModelConfig

__all__ = ["ModelConfig", "build_model", "data", "list_models", "metrics", "models", "scoring"]
__version__ = "0.1.0"
