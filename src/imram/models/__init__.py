"""Models and their registry: ``build_model(name, **overrides)``. Each model registers its
names beside its definition; importing this package imports them all."""

from imram.models.imram import IMRAM, BranchTrace, iterative_matching
from imram.models.interface import CrossAttentionModel, EmbeddingModel, RetrievalModel
from imram.models.member import MEMBER
from imram.models.registry import build_model, list_models, model_config, register_model
from imram.models.scan import SCAN
from imram.models.vsepp import VSEPP

__all__ = [
    "IMRAM",
    "MEMBER",
    "SCAN",
    "VSEPP",
    "BranchTrace",
    "CrossAttentionModel",
    "EmbeddingModel",
    "RetrievalModel",
    "build_model",
    "iterative_matching",
    "list_models",
    "model_config",
    "register_model",
]
