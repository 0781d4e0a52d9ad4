"""Models and their registry: ``build_model(name, **overrides)``."""

from imram.models.imram import IMRAM, BranchTrace, iterative_matching
from imram.models.member import MEMBER
from imram.models.registry import build_model, list_models, model_config, register_model
from imram.models.scan import SCAN
from imram.models.vsepp import VSEPP

register_model("imram_full", IMRAM, branch="full")
register_model("imram_text", IMRAM, branch="text")
register_model("imram_image", IMRAM, branch="image")
register_model("scan_t2i", SCAN, branch="text", steps=1, lambda_softmax=9.0, lambda_lse=6.0)
register_model("scan_i2t", SCAN, branch="image", steps=1, lambda_softmax=4.0, lambda_lse=5.0)
register_model("vsepp", VSEPP)
register_model("member", MEMBER)

__all__ = [
    "IMRAM",
    "MEMBER",
    "SCAN",
    "VSEPP",
    "BranchTrace",
    "build_model",
    "iterative_matching",
    "list_models",
    "model_config",
    "register_model",
]
