"""Image features: EfficientNet-Lite grid features of image files for precomp folders."""

from imram.features.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    grid_shape,
    load_efficientnet_lite,
    weights_path,
)
from imram.features.extract import (
    NORMALISATION,
    RESIZE_MODES,
    ExtractorConfig,
    ExtractResult,
    ImageError,
    extract_features,
    extractor_meta,
    load_image,
)

__all__ = [
    "NORMALISATION",
    "RESIZE_MODES",
    "VARIANTS",
    "EfficientNetLite",
    "ExtractResult",
    "ExtractorConfig",
    "ImageError",
    "extract_features",
    "extractor_meta",
    "grid_shape",
    "load_efficientnet_lite",
    "load_image",
    "weights_path",
]
