"""The training loop, readable top to bottom: data order, step, validation, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved config), ``vocab.json``, ``metrics.jsonl``
(one JSON object per log event), ``last/`` (resumable) and ``best/`` (highest validation rsum).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from imram.config import Config, save_config
from imram.data import PrecompDataset, Vocabulary, collate, read_captions
from imram.data.glove import embedding_matrix, glove_vocabulary
from imram.errors import ConfigError, DataError
from imram.evaluation import evaluate_model
from imram.models import build_model
from imram.precision import autocast
from imram.scoring import block_similarity
from imram.training.checkpoint import (
    load_trainer_state,
    load_weights,
    read_meta,
    save_checkpoint,
)
from imram.training.loss import triplet_loss


@dataclass
class TrainResult:
    """Where a run ended: its best validation rsum, position, and whether a budget stopped it."""

    run_dir: Path
    best_rsum: float
    epoch: int
    iteration: int
    stopped_early: bool
    last_metrics: dict[str, Any]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The caption order of an epoch: a function of (seed, epoch) only, so resume replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _vocabulary(config: Config, data: Path, run: Path, vocab_path: str | Path | None) -> Vocabulary:
    if vocab_path is not None:
        return Vocabulary.load(vocab_path)
    if (run / "vocab.json").is_file():
        return Vocabulary.load(run / "vocab.json")
    files = [
        data / f"{split}_caps.txt" for split in (config.data.train_split, config.data.val_split)
    ]
    for f in files:
        if not f.is_file():
            raise DataError(f"{data}: split {f.name.removesuffix('_caps.txt')!r} has no {f.name}")
    if config.data.vocab_glove_top:
        captions = [c for f in files for c in read_captions(f)]
        return glove_vocabulary(captions, config.data.vocab_threshold, config.data.vocab_glove_top)
    return Vocabulary.from_caption_files(files, config.data.vocab_threshold)


def init_word_embeddings(model: torch.nn.Module, config: Config, vocab: Vocabulary) -> int:
    """Load ``model.word_vectors`` into the word embeddings (before training; a resumed run has
    them in its weights) and return how many vocabulary words the vectors covered."""
    if not config.model.word_vectors:
        return 0
    matrix, found = embedding_matrix(vocab, config.model.word_dim, config.train.seed)
    embed = model.text_encoder.embed.weight
    with torch.no_grad():
        embed.copy_(torch.from_numpy(matrix).to(embed.device))
    return found


class _Log:
    """Appends JSON lines to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **event: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


def train(
    config: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    vocab_path: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``data_dir``; with ``resume`` continue ``run_dir/last`` exactly."""
    data, run = Path(data_dir), Path(run_dir)
    device = torch.device(device) if device is not None else default_device()
    last_dir, best_dir = run / "last", run / "best"
    if resume:
        if not (last_dir / "checkpoint.json").is_file():
            raise DataError(f"{run}: nothing to resume (no last/checkpoint.json)")
        meta = read_meta(last_dir)
        saved = Config.from_dict(meta["config"], str(last_dir / "checkpoint.json"))
        if replace(config.model, vocab_size=saved.model.vocab_size) != saved.model:
            raise ConfigError(
                f"{run}: the model config differs from the checkpoint's; resume "
                "with the run's config.yaml (only train.* may change)"
            )
    elif (last_dir / "checkpoint.json").is_file():
        raise ConfigError(f"{run} already holds a run; pass --resume or choose another --out")
    run.mkdir(parents=True, exist_ok=True)

    vocab = _vocabulary(config, data, run, vocab_path)
    if resume and vocab.fingerprint() != meta["vocab_fingerprint"]:
        raise DataError(
            f"{vocab_path or run / 'vocab.json'}: vocabulary differs from the checkpoint's"
        )
    config = replace(config, model=replace(config.model, vocab_size=len(vocab)))
    config.validate()
    train_set = PrecompDataset(data, config.data.train_split, vocab)
    val_set = PrecompDataset(data, config.data.val_split, vocab)
    for split in (train_set, val_set):
        if split.feature_dim != config.model.img_dim:
            raise DataError(
                f"{split.features_path}: features are {split.feature_dim}-d but "
                f"model.img_dim={config.model.img_dim}"
            )
    vocab.save(run / "vocab.json")
    save_config(config, run / "config.yaml")

    torch.manual_seed(config.train.seed)
    model = build_model(config.model).to(device)
    found = 0 if resume else init_word_embeddings(model, config, vocab)
    if config.model.freeze_words:
        model.text_encoder.embed.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.train.lr)
    state = {"epoch": 0, "batch": 0, "iteration": 0, "best_rsum": -math.inf}
    if resume:
        weights = last_dir / "model.safetensors"
        load_weights(model, load_file(weights, device=str(device)), str(weights))
        load_trainer_state(last_dir, optimizer)
        state.update(meta["state"])
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    log = _Log(run / "metrics.jsonl")
    if found:
        log.write(
            event="word_vectors", name=config.model.word_vectors, found=found, vocab=len(vocab)
        )
    tc = config.train
    start_time = time.monotonic()
    last_metrics: dict[str, Any] = {}

    def checkpoint(epoch: int, batch: int) -> None:
        state.update(epoch=epoch, batch=batch)  # the position a resume starts from
        save_checkpoint(last_dir, model, config, vocab, dict(state), optimizer)

    def validate(epoch: int) -> None:
        nonlocal last_metrics
        metrics, _, _ = evaluate_model(
            model,
            val_set,
            "1k",
            config.data.val_captions,
            budget_mb=tc.score_budget_mb,
            device=device,
        )
        last_metrics = metrics
        log.write(event="val", epoch=epoch, iteration=state["iteration"], **metrics)
        if metrics["rsum"] > state["best_rsum"]:
            state["best_rsum"] = metrics["rsum"]
            save_checkpoint(best_dir, model, config, vocab, {**state, "metrics": metrics})

    stopped = False
    n = len(train_set)
    for epoch in range(state["epoch"], tc.epochs):
        lr = tc.lr * tc.lr_decay ** (epoch // tc.lr_decay_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        hardest = tc.hardest_negative and epoch >= tc.warmup_epochs
        order = epoch_order(n, tc.seed, epoch)
        batches = [order[s : s + tc.batch_size] for s in range(0, n, tc.batch_size)]
        bar = tqdm(
            range(state["batch"], len(batches)),
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            disable=not progress,
            leave=False,
        )
        model.train()
        for b in bar:
            tick = time.perf_counter()
            batch = collate([train_set[int(j)] for j in batches[b]])
            with autocast(config.precision, device):
                img = model.encode_images(batch.images.to(device))
                cap = model.encode_captions(batch.tokens.to(device), batch.lengths.to(device))
                sims = block_similarity(
                    model, img, cap, batch.lengths.to(device), budget_mb=tc.score_budget_mb
                )
            loss = triplet_loss(sims.float(), tc.margin, hardest)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            state["iteration"] += 1
            rate = len(batches[b]) / (time.perf_counter() - tick)
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
            if state["iteration"] % tc.log_every == 0:
                log.write(
                    event="train",
                    epoch=epoch,
                    iteration=state["iteration"],
                    loss=loss.item(),
                    lr=lr,
                    hardest=hardest,
                    samples_per_s=rate,
                )
            if tc.val_every and state["iteration"] % tc.val_every == 0:
                validate(epoch)
                checkpoint(epoch, b + 1)
            if tc.max_minutes and time.monotonic() - start_time > 60 * tc.max_minutes:
                checkpoint(epoch, b + 1)
                stopped = True
                break
        bar.close()
        if stopped:
            break
        state["batch"] = 0
        validate(epoch)
        checkpoint(epoch + 1, 0)
    return TrainResult(
        run, state["best_rsum"], state["epoch"], state["iteration"], stopped, last_metrics
    )
