"""Training: the hinge loss, the batch step (all pairs or mined), the trainer and its curves.

Checkpoints live below this package (:mod:`imram.checkpoint`), so that evaluation, indexes,
the service and the analyses load models without importing the trainer.
"""

from imram.training.loss import triplet_loss
from imram.training.trainer import TrainResult, train

__all__ = ["TrainResult", "train", "triplet_loss"]
