"""Checkpoints that cannot run code on load, written atomically, and the release importer.

A checkpoint is a directory: ``model.safetensors`` (weights), ``checkpoint.json`` (the resolved
config, the vocabulary, the training position) and, for resuming, ``trainer.safetensors`` (the
optimizer's tensors and the RNG state). No pickle is written or read, except by the importer of
the original release's ``model_best.pth.tar``, which unpickles with ``weights_only=True`` and
only ``argparse.Namespace`` and numpy scalar types allowed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from imram import files
from imram.config import Config
from imram.data.precomp import PrecompDataset
from imram.data.text import Tokenizer, Vocabulary, tokenizer_from_json
from imram.errors import DataError
from imram.models import build_model

logger = logging.getLogger(__name__)
FORMAT = "imram-checkpoint/1"
WEIGHTS_NAME = "model.safetensors"
TRAINER_NAME = "trainer.safetensors"  # optimizer and RNG state


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config and vocabulary, and its position."""

    model: nn.Module
    config: Config
    vocab: Tokenizer | None
    path: Path
    state: dict[str, Any] = field(default_factory=dict)

    def open_split(self, data: str | Path, split: str) -> PrecompDataset:
        """``split`` of the precomp folder ``data`` as this model reads it: tokenised with its
        vocabulary, its images as region features or, for a tuned image tower, the trunk cache
        (checked against the model: never the frozen grid to a tuned tower)."""
        dataset = PrecompDataset(data, split, self.vocab, self.config.model.trunk_stages)
        dataset.require_input(self.config.model, f"the checkpoint {self.path}")
        return dataset


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, entries in state["state"].items():
        plain[str(idx)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[str(idx)][name] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, layout: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx, entries in layout["state"].items():
        state[int(idx)] = dict(entries)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})


def recover_swap(path: str | Path) -> None:
    """Put ``path`` back if a crash fell between the two renames of a checkpoint swap, and
    remove the half-written checkpoints a killed writer left beside it (``.NAME.tmp-*``)."""
    path = Path(path)
    old = files.recover_swap(path, "checkpoint.json")
    if old is not None:
        os.replace(old, path)
    files.remove_stale_siblings(path)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: Config,
    vocab: Tokenizer,
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint directory atomically: built beside ``path``, then swapped in."""
    path = Path(path)
    tmp = files.sibling_dir(path)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "config": config.to_dict(),
            "vocab": vocab.to_json(),
            "vocab_fingerprint": vocab.fingerprint(),
            "state": state or {},
        }
        if optimizer is not None:
            tensors, layout = _optimizer_tensors(optimizer)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, tmp / TRAINER_NAME, metadata={"format": FORMAT})
            meta["optimizer"] = layout
        meta["files_sha256"] = {
            f.name: files.sha256_file(f)[0] for f in sorted(tmp.glob("*.safetensors"))
        }
        (tmp / "checkpoint.json").write_text(
            json.dumps(files.sealed(meta), indent=1), encoding="utf-8"
        )
        files.swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory resolves to itself, a run directory to its ``best/``. A run
    with no ``best/`` yet (no validation has run) resolves to ``last/``, saying so; a damaged
    ``best/`` is an error, never silently replaced by ``last/``."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    old = files.recover_swap(path, "checkpoint.json")
    if old is not None:  # a crash between the two renames of a swap
        return old
    best, last = path / "best", path / "last"
    if (best / "checkpoint.json").is_file():
        return best
    old = files.recover_swap(best, "checkpoint.json")
    if old is not None:
        return old
    if best.is_dir():
        raise DataError(
            f"{best / 'checkpoint.json'}: missing, so the run's best checkpoint is damaged; "
            f"pass {last} to use the last checkpoint instead"
        )
    if (last / "checkpoint.json").is_file():
        logger.warning("%s: no best/ checkpoint (no validation has run yet); using last/", path)
        return last
    raise DataError(f"{path}: no checkpoint here (looked for checkpoint.json, best/, last/)")


def saved_config(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as written, with the meaning of keys added since: a MEMBER saved
    before ``model.member_fusion`` existed fused its fragments (``fragments``), and one saved
    before ``model.member_memory`` existed added its memory ``raw``, whatever the defaults are
    now."""
    config = copy.deepcopy(meta["config"])
    model = config.get("model", {})
    if model.get("name") == "member":
        model.setdefault("member_fusion", "fragments")
        model.setdefault("member_memory", "raw")
    return config


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path / 'checkpoint.json'}: unreadable ({err})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path / 'checkpoint.json'}: not an imram checkpoint ({FORMAT})")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a run or checkpoint directory, or a release ``.pth.tar`` (through the importer)."""
    path = Path(path)
    if path.is_file():
        return import_release_checkpoint(path)
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    config = Config.from_dict(saved_config(meta), str(path / "checkpoint.json"))
    vocab = tokenizer_from_json(meta["vocab"], str(path / "checkpoint.json"))
    model = build_model(config.model)
    weights = path / WEIGHTS_NAME
    load_weights(model, read_tensors(weights, meta, map_location), str(weights))
    files.check_sealed(meta, path / "checkpoint.json")  # last: the checks above name the fault
    return Checkpoint(model.eval(), config, vocab, path, meta.get("state", {}))


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, naming missing, unexpected and mis-shaped keys if it does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k} has shape {tuple(weights[k].shape)}, model has {tuple(own[k].shape)}"
            )
        raise DataError(f"{source}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(weights)


def read_tensors(
    path: Path, meta: dict[str, Any], device: str | torch.device = "cpu", what: str = "weights"
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, checked against the SHA-256 that
    ``meta`` (its checkpoint.json) records while it is read; a missing, truncated, damaged or
    changed file is a DataError naming it and ``what`` it holds."""
    if not path.is_file():
        raise DataError(f"{path}: unreadable {what} (the file is missing)")
    data = files.read_bytes(path)
    try:
        tensors = load_safetensors(data)
    except SafetensorError as err:
        raise DataError(f"{path}: unreadable {what} ({err})") from None
    files.check_sha256(path, data, meta.get("files_sha256", {}).get(path.name))
    return {k: v.to(device) for k, v in tensors.items()}


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer and the torch RNG saved beside a checkpoint's weights."""
    meta = read_meta(path)
    tensors = read_tensors(path / TRAINER_NAME, meta, what="trainer state")
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])


_RELEASE_MODES = {
    "full_IMRAM": "imram_full",
    "text_IMRAM": "imram_text",
    "image_IMRAM": "imram_image",
}
_RELEASE_KEYS = (
    ("img_enc.fc_local.", "image_encoder.fc."),
    ("img_enc.fc.", "image_encoder.fc."),
    ("txt_enc.embed.", "text_encoder.embed."),
    ("txt_enc.rnn.", "text_encoder.gru."),
    ("linear_t2i.", "text_memory.fuse."),
    ("gate_t2i.", "text_memory.gate."),
    ("linear_i2t.", "image_memory.fuse."),
    ("gate_i2t.", "image_memory.gate."),
)


def _release_globals() -> list:
    """The only classes a release checkpoint may instantiate: its options and numpy scalars."""
    multiarray = getattr(np, "_core", np).multiarray
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [argparse.Namespace, multiarray.scalar, np.dtype, *dtypes]


@dataclass
class ImportReport:
    """What the importer mapped, ignored and could not find."""

    loaded: list[str]
    unused: list[str]
    unknown: list[str]
    missing: list[str]


def import_release_checkpoint(path: str | Path, vocab: Vocabulary | None = None) -> Checkpoint:
    """Build our model from the original IMRAM release's ``model_best.pth.tar``.

    The release keeps ``{'model': state_dict, 'opt': Namespace, ...}`` with ``module.``-prefixed
    keys; the report lists every key we could not place (``state['import_report']``).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_release_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        # torch's own message may advise loading with weights_only=False, which would run
        # the file's code: only the error's kind is passed on.
        raise DataError(
            f"{path}: refused: not a release checkpoint loadable without executing code "
            f"({type(err).__name__}); imram never unpickles code, so such a file cannot be "
            "imported"
        ) from None
    if not isinstance(raw, dict) or "model" not in raw or "opt" not in raw:
        raise DataError(f"{path}: a release checkpoint is a dict with 'model' and 'opt'")
    opt = raw["opt"]
    state = raw["model"]
    if isinstance(state, (list, tuple)):  # SCAN's layout: [img_enc, txt_enc, ...]
        state = {
            f"{prefix}.{k}": v
            for prefix, part in zip(("img_enc", "txt_enc"), state, strict=False)
            for k, v in part.items()
        }
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mode = getattr(opt, "model_mode", "full_IMRAM")
    if mode not in _RELEASE_MODES:
        raise DataError(
            f"{path}: opt.model_mode={mode!r} is not one of {', '.join(_RELEASE_MODES)}"
        )
    if not getattr(opt, "bi_gru", True):
        raise DataError(f"{path}: opt.bi_gru is False; only the bidirectional GRU is supported")
    norm = getattr(opt, "raw_feature_norm", "clipped_l2norm")
    if norm not in ("clipped_l2norm",):
        raise DataError(f"{path}: opt.raw_feature_norm={norm!r} is not supported")
    overrides = dict(
        vocab_size=int(getattr(opt, "vocab_size", len(vocab) if vocab else 0)),
        word_dim=int(getattr(opt, "word_dim", 300)),
        embed_dim=int(getattr(opt, "embed_size", 1024)),
        img_dim=int(getattr(opt, "img_dim", 2048)),
        gru_layers=int(getattr(opt, "num_layers", 1)),
        steps=int(getattr(opt, "iteration_step", 3)),
        lambda_softmax=float(getattr(opt, "lambda_softmax", 9.0)),
        renorm=not bool(getattr(opt, "no_IMRAM_norm", True)),
    )
    if vocab is not None and len(vocab) != overrides["vocab_size"]:
        raise DataError(
            f"{path}: the vocabulary has {len(vocab)} words, "
            f"the checkpoint {overrides['vocab_size']}"
        )
    config = Config.from_dict({"model": {"name": _RELEASE_MODES[mode], **overrides}}, str(path))
    model = build_model(config.model)
    own = model.state_dict()
    mapped, unused, unknown = {}, [], []
    for key, value in state.items():
        ours = next(
            (new + key[len(old) :] for old, new in _RELEASE_KEYS if key.startswith(old)), None
        )
        if ours is None:
            unknown.append(key)
        elif ours not in own:
            unused.append(key)
        else:
            mapped[ours] = value
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise DataError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    load_weights(model, mapped, str(path))
    report = ImportReport(sorted(mapped), sorted(unused), sorted(unknown), missing)
    best = raw.get("best_rsum")
    info = {
        "import_report": report.__dict__,
        "epoch": raw.get("epoch"),
        "best_rsum": float(best) if best is not None else None,
    }
    return Checkpoint(model.eval(), config, vocab, path, info)
