"""SCAN baselines (Lee et al., ECCV 2018): one attention step, no memory, AVG or LSE pooling.

SCAN t-i is IMRAM's text branch with K=1 and SCAN i-t its image branch with K=1, so both reuse
the IMRAM model; this class only pins those choices.
"""

from __future__ import annotations

from imram.errors import ConfigError
from imram.models.imram import IMRAM
from imram.models.registry import register_model
from imram.schema import ModelConfig


class SCAN(IMRAM):
    """Stacked cross attention: t-i (words attend to regions) or i-t (regions attend to words)."""

    def __init__(self, config: ModelConfig) -> None:
        if config.steps != 1:
            raise ConfigError(
                f"{config.name}: SCAN has one attention step, got model.steps={config.steps}"
            )
        if config.branch == "full":
            raise ConfigError(
                f"{config.name}: SCAN scores one direction; model.branch must be text or image"
            )
        super().__init__(config)


register_model("scan_t2i", SCAN, branch="text", steps=1, lambda_softmax=9.0, lambda_lse=6.0)
register_model("scan_i2t", SCAN, branch="image", steps=1, lambda_softmax=4.0, lambda_lse=5.0)
