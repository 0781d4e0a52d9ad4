"""Benchmarks that measure the engine against a baseline in the same run (``imram bench``,
``benchmarks/``): one module per benchmark, the release-style baseline in ``release``."""

from imram.bench.memory import bench_topk_memory
from imram.bench.release import release_style_similarity
from imram.bench.scoring import (
    LowPrecisionResult,
    ScoringResult,
    bench_low_precision_scoring,
    bench_scoring,
    format_low_precision,
    format_scoring,
    low_precision_rsum,
)
from imram.bench.training import (
    TIME_TO_ACCURACY_PRESETS,
    TrainingResult,
    TrainingShape,
    bench_time_to_accuracy,
    bench_training,
    format_training,
    is_embedding,
)
from imram.bench.two_stage import bench_two_stage, bench_two_stage_synthetic

__all__ = [
    "TIME_TO_ACCURACY_PRESETS",
    "LowPrecisionResult",
    "ScoringResult",
    "TrainingResult",
    "TrainingShape",
    "bench_low_precision_scoring",
    "bench_scoring",
    "bench_time_to_accuracy",
    "bench_topk_memory",
    "bench_training",
    "bench_two_stage",
    "bench_two_stage_synthetic",
    "format_low_precision",
    "format_scoring",
    "format_training",
    "is_embedding",
    "low_precision_rsum",
    "release_style_similarity",
]
