"""``imram train``: train a model on a precomp folder (also under ``torchrun``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from imram.errors import ConfigError


def _train(args: argparse.Namespace) -> int:
    from imram.config import load_config
    from imram.devices import local_device
    from imram.distributed import process_group
    from imram.training import train

    source = args.config
    if source is None:
        if not args.resume:
            raise ConfigError("train needs --config (or --resume with an existing --out)")
        source = str(Path(args.out) / "config.yaml")
    config = load_config(source, args.set)
    with process_group() as (rank, world):  # torchrun: gloo on CPU, NCCL on GPU
        device = args.device or (local_device() if world > 1 else None)
        result = train(
            config, args.data, args.out, args.vocab, args.resume, device, not args.no_progress
        )
    if rank != 0:
        return 0
    if result.interrupted:
        state = "interrupted (checkpointed; continue with --resume)"
    elif result.stopped_early:
        state = "stopped at the time budget"
    elif result.plateaued:
        state = f"stopped early ({config.train.patience} validations without a better rsum)"
    else:
        state = "finished"
    skipped = (
        f", {result.nonfinite_steps} non-finite steps skipped" if result.nonfinite_steps else ""
    )
    print(
        f"{state}: epoch {result.epoch}, iteration {result.iteration}, "
        f"best validation rsum {result.best_rsum:.1f}{skipped}; checkpoints in {result.run_dir}"
    )
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``imram`` command."""
    train = commands.add_parser("train", help="train a model on a precomp folder")
    train.add_argument("--config", help="preset name or YAML file (default with --resume: RUN's)")
    train.add_argument("--data", required=True, help="precomp folder")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--vocab", help="vocabulary JSON (default: built from train+dev)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. model.steps=1 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue RUN/last exactly")
    train.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
