"""A warm start (``train.init_from``): begin a run from the weights of another trained run.

Every model builds its fragment encoders the same way (``models.towers``), so an embedding
model's trained region and word projections are a cross-attention model's starting fragments:
the weights whose names match are copied, the rest (IMRAM's memory units, MEMBER's
banks) keep their fresh initialisation. A checkpoint that shares no trained weight, or reads
other tokens or other sizes, is refused rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imram.checkpoint import (
    WEIGHTS_NAME,
    read_meta,
    read_tensors,
    resolve_checkpoint,
    saved_config,
)
from imram.data.text import Tokenizer, tokenizer_from_json
from imram.errors import ConfigError, DataError
from imram.files import check_sealed


def warm_start(model: nn.Module, path: str | Path, vocab: Tokenizer) -> list[str]:
    """Copy into ``model`` every trainable weight of the checkpoint at ``path`` (a run folder
    means its ``best/``) that has the same name; returns the names copied. A shared name of
    another shape is an error (the two were built with other sizes). Frozen weights (a
    pretrained transformer) are the same in both and are not counted."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    source = folder / "checkpoint.json"
    theirs = tokenizer_from_json(meta["vocab"], str(source))
    if theirs.fingerprint() != vocab.fingerprint():
        raise DataError(
            f"{source}: train.init_from reads other tokens than this run (its vocabulary "
            "differs); warm-start from a run with the same vocabulary settings"
        )
    weights = read_tensors(folder / WEIGHTS_NAME, meta)
    check_sealed(meta, source)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = model.state_dict()
    shared = sorted(name for name in weights if name in trainable)
    for name in shared:
        if own[name].shape != weights[name].shape:
            raise ConfigError(
                f"train.init_from={path}: {name} has shape {tuple(weights[name].shape)} there, "
                f"{tuple(own[name].shape)} here (model.embed_dim, model.img_dim and the text "
                "encoder must match)"
            )
    if not shared:
        name = saved_config(meta).get("model", {}).get("name", "?")
        raise ConfigError(
            f"train.init_from={path}: its {name} model shares no trainable weight name with "
            "this model (model.img_dim, model.embed_dim and model.text_encoder must match)"
        )
    with torch.no_grad():
        for name in shared:
            own[name].copy_(weights[name].to(own[name].device))
    return shared
