"""``imram prepare``: pictures and captions (a folder, or the Tux Paint stamps) into a precomp
folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from imram.cli.common import pick
from imram.errors import ConfigError


def _extractor(args: argparse.Namespace):
    from imram.features.extract import ExtractorConfig

    return ExtractorConfig(**pick(args, "backbone", "input_size", "batch_size", "resize"))


def _trunk_cache(args: argparse.Namespace) -> None:
    """``--tower-stages N``: the trunk cache a tuned image tower reads, added to ``--out``."""
    from imram.workflows.trunk import add_trunk_cache

    record = add_trunk_cache(
        args.out, args.tower_stages, args.tower_dtype, not args.no_progress, args.device
    )
    shape = "x".join(map(str, record["shape"]))
    print(
        f"trunk cache for {args.tower_stages} tower stage(s) of {record['backbone']} in "
        f"{args.out}: {shape} {record['dtype']} per picture, splits " + ", ".join(record["splits"])
    )


def _prepare(args: argparse.Namespace) -> int:
    from imram.data.precomp import META_NAME
    from imram.workflows.prepare import prepare_folder, prepare_tuxpaint

    if args.tower_stages and not args.overwrite and (Path(args.out) / META_NAME).is_file():
        _trunk_cache(args)  # a prepared folder gains the cache; its features stay as they are
        return 0

    common = dict(
        extractor=_extractor(args),
        progress=not args.no_progress,
        **pick(args, "dev_fraction", "test_fraction", "seed", "device", "overwrite"),
    )
    if args.source == "tuxpaint":
        report = prepare_tuxpaint(args.out, cache=args.cache, **common)
    else:
        if not args.images or not args.captions:
            raise ConfigError("prepare folder needs --images DIR and --captions FILE")
        report = prepare_folder(
            args.images,
            args.captions,
            args.format,
            args.out,
            **pick(args, "max_dev_images", "max_test_images", "max_captions_per_image"),
            **common,
        )
    print(report.summary())
    if args.tower_stages:
        _trunk_cache(args)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``prepare`` to the ``imram`` command."""
    from imram.data.formats import FORMATS
    from imram.features.efficientnet_lite import VARIANTS
    from imram.features.extract import RESIZE_MODES

    prep = commands.add_parser("prepare", help="images and captions -> a precomp folder")
    prep.add_argument(
        "source", choices=["folder", "tuxpaint"], help="folder: your images; tuxpaint: the stamps"
    )
    prep.add_argument("--out", required=True, help="precomp folder to write")
    prep.add_argument("--images", help="folder the caption file's image names are relative to")
    prep.add_argument("--captions", help="caption file")
    prep.add_argument(
        "--format",
        choices=FORMATS,
        help="caption format (default: detected from the file)",
    )
    prep.add_argument(
        "--backbone",
        choices=sorted(VARIANTS),
        default="efficientnet_lite0",
    )
    prep.add_argument(
        "--input-size", type=int, default=224, help="pixels (224: a 7x7 grid of regions)"
    )
    prep.add_argument("--resize", choices=RESIZE_MODES, default="pad")
    prep.add_argument("--batch-size", type=int, default=32)
    prep.add_argument("--dev-fraction", type=float, default=0.1)
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--max-dev-images", type=int, help="cap the hashed dev split")
    prep.add_argument("--max-test-images", type=int, help="cap the hashed test split")
    prep.add_argument("--max-captions-per-image", type=int, help="keep an image's first N captions")
    prep.add_argument("--seed", default="imram", help="mixed into the split hash")
    prep.add_argument("--cache", help="tuxpaint: cache folder (default ~/.cache/imram)")
    prep.add_argument(
        "--tower-stages",
        type=int,
        default=0,
        help="also cache what enters the backbone's last N stages, the input of a tuned image "
        "tower (model.image_tower: tuned, model.tower_stages N); with an already prepared "
        "--out, only the cache is added",
    )
    prep.add_argument(
        "--tower-dtype", choices=["float16", "float32"], default="float16", help="trunk cache"
    )
    prep.add_argument("--overwrite", action="store_true", help="replace an existing precomp")
    prep.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)
