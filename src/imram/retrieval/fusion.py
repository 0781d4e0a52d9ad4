"""Score fusion for two-stage search: the shortlist's final score adds both models' views.

An embedding model and a cross-attention model err differently, so re-ranking a shortlist by
the second model's score alone throws away what the first one knew. Fusion ranks it by
``(s₁ − μ₁)/σ₁ + w · (s₂ − μ₂)/σ₂``: each model's score standardised with its mean and standard
deviation over shortlisted pairs of a split, and the weight ``w`` of the second chosen on that
split. The five numbers travel with the pair (a JSON file), so that evaluation, search and the
service rank alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imram.errors import DataError
from imram.files import atomic_write_text, sha256_file

if TYPE_CHECKING:
    from imram.checkpoint import Checkpoint

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class Fusion:
    """How two stages' scores combine: ``(s₁ − first_mean)/first_std + weight · (s₂ −
    second_mean)/second_std``. ``weight`` 0 keeps the first model's ranking."""

    weight: float
    first_mean: float
    first_std: float
    second_mean: float
    second_std: float

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not math.isfinite(value):
                raise DataError(f"fusion {key}={value!r} must be finite")
        if self.first_std <= 0 or self.second_std <= 0 or self.weight < 0:
            raise DataError("fusion: standard deviations must be > 0 and the weight >= 0")

    def combine(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The fused scores of pairs whose first- and second-stage scores are given."""
        a = (np.asarray(first, np.float64) - self.first_mean) / self.first_std
        b = (np.asarray(second, np.float64) - self.second_mean) / self.second_std
        return (a + self.weight * b).astype(np.float32)

    def with_weight(self, weight: float) -> Fusion:
        return Fusion(weight, self.first_mean, self.first_std, self.second_mean, self.second_std)

    @classmethod
    def standardising(cls, first: np.ndarray, second: np.ndarray, weight: float = 1.0) -> Fusion:
        """The statistics of the scores two stages gave the same pairs."""
        first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
        if first.shape != second.shape or first.size < 2:
            raise DataError("fusion needs both stages' scores of the same two or more pairs")
        return cls(
            weight,
            float(first.mean()),
            float(first.std()) or 1.0,
            float(second.mean()),
            float(second.std()) or 1.0,
        )


def weights_digest(checkpoint: Checkpoint) -> str:
    """The SHA-256 of a checkpoint's weights file, which names the pair a fusion belongs to."""
    from imram.checkpoint import WEIGHTS_NAME, read_meta

    path = Path(checkpoint.path)
    if path.is_file():  # a release checkpoint
        return sha256_file(path)[0]
    return read_meta(path)["files_sha256"][WEIGHTS_NAME]


def save_fusion(
    path: str | Path, fusion: Fusion, first: Checkpoint, second: Checkpoint, **fitted: Any
) -> None:
    """Write the fusion of ``first`` (the shortlisting model) and ``second`` (the re-ranker)
    as JSON, with both checkpoints' weight digests and how it was ``fitted`` (split,
    shortlist, the rsum of each weight)."""
    pair = {
        "first": {"path": str(first.path), "weights_sha256": weights_digest(first)},
        "second": {"path": str(second.path), "weights_sha256": weights_digest(second)},
    }
    text = json.dumps({"fusion": asdict(fusion), **pair, "fitted": fitted}, indent=1)
    atomic_write_text(path, text)


def load_fusion(
    path: str | Path, first: Checkpoint | None = None, second: Checkpoint | None = None
) -> Fusion:
    """Read a file :func:`save_fusion` wrote, refused (DataError naming it) when damaged,
    foreign, or fitted for other weights than ``first`` and ``second`` (when given)."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        values = saved["fusion"]
        fusion = Fusion(**{key: float(values[key]) for key in Fusion.__dataclass_fields__})
        for role, checkpoint in (("first", first), ("second", second)):
            if checkpoint is not None and saved[role]["weights_sha256"] != weights_digest(
                checkpoint
            ):
                raise DataError(
                    f"fitted for other {role}-stage weights ({saved[role]['path']}) than "
                    f"{checkpoint.path}; fit it again (imram evaluate --rerank --fit-fusion)"
                )
        return fusion
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a fusion file ({type(err).__name__}: {err})") from None


def best_weight(rsums: dict[float, float]) -> float:
    """The weight of the highest rsum (the smallest weight among equals)."""
    return max(sorted(rsums), key=lambda w: rsums[w])
