"""Training: the hinge loss, the trainer, checkpoints."""

from imram.training.checkpoint import (
    Checkpoint,
    import_release_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from imram.training.loss import triplet_loss

__all__ = [
    "Checkpoint",
    "import_release_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "triplet_loss",
]
