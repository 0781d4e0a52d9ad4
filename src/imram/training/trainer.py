"""The training loop, readable top to bottom: data order, step, validation, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved config), ``vocab.json``, ``metrics.jsonl``
(one JSON object per log event), ``last/`` (resumable) and ``best/`` (highest validation rsum).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from imram.checkpoint import (
    load_trainer_state,
    load_weights,
    read_meta,
    read_tensors,
    recover_swap,
    save_checkpoint,
)
from imram.config import Config, save_config
from imram.data import PrecompBatch, PrecompDataset, Vocabulary, collate, read_captions
from imram.data.glove import embedding_matrix, glove_vocabulary
from imram.devices import resolve_device
from imram.distributed import any_rank, barrier, broadcast_object, sum_gradients, world
from imram.errors import ConfigError, DataError, TrainingError
from imram.evaluation import evaluate_model
from imram.files import atomic_write_text, check_sealed, is_sibling_of
from imram.models import build_model
from imram.precision import autocast, resolve_precision
from imram.training.batch import batch_scores, mined_batch_loss
from imram.training.loss import triplet_loss
from imram.training.manifest import (
    MANIFEST,
    data_files,
    describe,
    read_manifest,
    verify,
    write_manifest,
)


@dataclass
class TrainResult:
    """Where a run ended: its best validation rsum, position, and why it stopped early, if it
    did (the time budget, or a SIGTERM/SIGINT: ``interrupted``)."""

    run_dir: Path
    best_rsum: float
    epoch: int
    iteration: int
    stopped_early: bool
    last_metrics: dict[str, Any]
    interrupted: bool = False
    nonfinite_steps: int = 0


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


# What a run directory may hold: the files and folders train() writes, and the hidden siblings
# that atomic writes build beside them (files.atomic_output, files.sibling_dir, files.swap_in).
RUN_FILES = ("config.yaml", "vocab.json", "metrics.jsonl", MANIFEST, "last", "best")


def _is_run_file(name: str) -> bool:
    if name in RUN_FILES:
        return True
    return name.startswith(".") and any(
        is_sibling_of(name, own) or (name.startswith(f".{own}.") and name.endswith(".tmp"))
        for own in RUN_FILES
    )


def check_run_dir(run: Path, resume: bool) -> None:
    """Refuse an ``--out`` that is not a folder imram may write: a file, a finished run
    without ``--resume``, or a folder holding anything but an imram run's files (a user's own
    ``config.yaml``, say), so that nothing of the user's is overwritten or appended to."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"{run}: --out names a file, not a folder; choose another --out")
    if resume or not run.is_dir():
        return
    if (run / "last" / "checkpoint.json").is_file():
        raise ConfigError(f"{run} already holds a run; pass --resume or choose another --out")
    names = sorted(child.name for child in run.iterdir())
    # Without imram's manifest (the first file a run writes) nothing here is known to be ours.
    foreign = [n for n in names if not _is_run_file(n) or MANIFEST not in names]
    if foreign:
        raise ConfigError(
            f"{run} holds files that are not an imram run: {', '.join(foreign)}; "
            "choose another --out"
        )


class _Log:
    """Appends JSON lines to ``metrics.jsonl`` (nothing on ranks other than 0: ``path`` None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **event: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")

    def rewind(self, iteration: int) -> None:
        """Drop the events after ``iteration`` (and a line cut short): a resume replays the
        steps since the checkpoint, which would otherwise be logged twice."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("iteration", 0) <= iteration:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))


class _StopSignals:
    """While active, SIGTERM and SIGINT only set ``requested``: the loop finishes its step,
    checkpoints and returns. A second SIGINT interrupts at once. Only the main thread can
    install handlers; elsewhere signals keep their usual effect."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(
    config: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    vocab_path: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``data_dir``; with ``resume`` continue ``run_dir/last`` exactly.

    Under ``torchrun`` (an initialised process group) the ranks split each global batch of
    ``train.batch_size`` and only rank 0 writes; the run, its checkpoints and a resume are
    those of one process on the same global batches, whatever the number of processes.
    SIGTERM or SIGINT finishes the step, checkpoints and returns (``interrupted``).
    """
    rank, world_size = world()
    lead = rank == 0
    data, run = Path(data_dir), Path(run_dir)
    device = resolve_device(device)
    last_dir, best_dir = run / "last", run / "best"
    if resume:
        if lead:
            recover_swap(last_dir)
            recover_swap(best_dir)
        barrier()
        if not (last_dir / "checkpoint.json").is_file():
            raise DataError(f"{run}: nothing to resume (no last/checkpoint.json)")
        meta = read_meta(last_dir)
        saved = Config.from_dict(meta["config"], str(last_dir / "checkpoint.json"))
        given = replace(config.model, vocab_size=saved.model.vocab_size).to_dict()
        changed = [
            f"model.{k}: {given[k]!r} (checkpoint {v!r})"
            for k, v in saved.model.to_dict().items()
            if given.get(k) != v
        ]
        if changed:
            raise ConfigError(
                f"{run}: the model config differs from the checkpoint's ({'; '.join(changed)}); "
                "resume with the run's config.yaml (only train.* may change)"
            )
    check_run_dir(run, resume)
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
        split.require_feature_dim(config.model.img_dim, "the config")
    files = data_files(train_set, val_set)
    manifest = read_manifest(run) if resume else None
    if lead:
        if not resume:  # an earlier start that never checkpointed: its log ends with it
            (run / "metrics.jsonl").unlink(missing_ok=True)
        if manifest is not None:
            manifest = verify(manifest, files, run, full=True)
        else:
            manifest = describe(files)
        write_manifest(run, manifest)
        vocab.save(run / "vocab.json")
        save_config(config, run / "config.yaml")
    manifest = broadcast_object(manifest)

    torch.manual_seed(config.train.seed)
    model = build_model(config.model).to(device)
    found = 0 if resume else init_word_embeddings(model, config, vocab)
    if config.model.freeze_words:
        model.text_encoder.embed.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.train.lr)
    # train_seconds: wall time spent in training steps (not validation), summed over resumes.
    state = {
        "epoch": 0,
        "batch": 0,
        "iteration": 0,
        "best_rsum": -math.inf,
        "train_seconds": 0.0,
        "nonfinite_steps": 0,
    }
    if resume:
        weights = last_dir / "model.safetensors"
        load_weights(model, read_tensors(weights, meta, device), str(weights))
        load_trainer_state(last_dir, optimizer)
        state.update(meta["state"])
        check_sealed(meta, last_dir / "checkpoint.json")
    precision = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = _Log(run / "metrics.jsonl" if lead else None)
    if resume:
        log.rewind(state["iteration"])
    if precision != config.precision:
        log.write(event="precision", configured=config.precision, resolved=precision)
    if found:
        log.write(
            event="word_vectors", name=config.model.word_vectors, found=found, vocab=len(vocab)
        )
    if world_size > 1:
        log.write(
            event="distributed", world_size=world_size, backend=torch.distributed.get_backend()
        )
    tc = config.train
    start_time = time.monotonic()
    last_metrics: dict[str, Any] = {}

    def checkpoint(epoch: int, batch: int) -> None:
        state.update(epoch=epoch, batch=batch)  # the position a resume starts from
        if lead:
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
        log.write(
            event="val",
            epoch=epoch,
            iteration=state["iteration"],
            train_seconds=state["train_seconds"],
            **metrics,
        )
        if metrics["rsum"] > state["best_rsum"]:
            state["best_rsum"] = metrics["rsum"]
            if lead:
                save_checkpoint(best_dir, model, config, vocab, {**state, "metrics": metrics})

    def step(batch: PrecompBatch, hardest: bool) -> float | None:
        """One optimisation step; the loss, or None when the loss or the gradient norm is not
        finite (the step is skipped). Every rank takes the same decision: the loss comes from
        the gathered matrix and the norm from the summed gradients."""
        budget, recompute = tc.score_budget_mb, tc.activation_checkpointing
        with autocast(precision, device):
            negatives = 1 if hardest else tc.warmup_negatives
            if tc.mining != "off" and negatives > 0:
                shortlist = tc.mining_shortlist if tc.mining == "shortlist" else None
                loss = mined_batch_loss(
                    model, batch, device, budget, recompute, tc.margin, shortlist, negatives
                )
            else:
                sims = batch_scores(model, batch, device, budget, recompute)
                loss = triplet_loss(sims.float(), tc.margin, hardest)
        if not torch.isfinite(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / world_size).backward()
        if world_size > 1:
            sum_gradients(trainable)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        if not (torch.isfinite(norm) or scaler.is_enabled()):  # fp16: the scaler skips instead
            return None
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    stopped = interrupted = False
    bad_in_a_row = 0
    n = len(train_set)
    with _StopSignals() as signals:
        for epoch in range(state["epoch"], tc.epochs):
            verify(manifest, files, run, full=False)
            lr = tc.lr * tc.lr_decay ** (epoch // tc.lr_decay_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hardest = tc.hardest_negative and epoch >= tc.warmup_epochs
            order = epoch_order(n, tc.seed, epoch)
            batches = [order[s : s + tc.batch_size] for s in range(0, n, tc.batch_size)]
            bar = tqdm(
                range(state["batch"], len(batches)),
                desc=f"epoch {epoch + 1}/{tc.epochs}",
                disable=not (progress and lead),
                leave=False,
            )
            model.train()
            for b in bar:
                tick = time.perf_counter()
                batch = collate([train_set[int(j)] for j in batches[b]])
                loss = step(batch, hardest)
                state["iteration"] += 1
                seconds = time.perf_counter() - tick
                state["train_seconds"] += seconds
                rate = len(batches[b]) / seconds
                if loss is None:
                    bad_in_a_row += 1
                    state["nonfinite_steps"] += 1
                    log.write(
                        event="nonfinite",
                        epoch=epoch,
                        iteration=state["iteration"],
                        in_a_row=bad_in_a_row,
                        total=state["nonfinite_steps"],
                    )
                    if bad_in_a_row >= tc.max_nonfinite_steps:
                        raise TrainingError(
                            f"{run}: {bad_in_a_row} training steps in a row had a non-finite "
                            f"loss or gradient (epoch {epoch + 1}, iteration "
                            f"{state['iteration']}); each was skipped, and the run stops at "
                            f"train.max_nonfinite_steps={tc.max_nonfinite_steps}. {run / 'last'}"
                            " holds the last good checkpoint; lower train.lr, check the data, "
                            "or train in fp32"
                        )
                else:
                    bad_in_a_row = 0
                    bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}")
                    if state["iteration"] % tc.log_every == 0:
                        log.write(
                            event="train",
                            epoch=epoch,
                            iteration=state["iteration"],
                            loss=loss,
                            lr=lr,
                            hardest=hardest,
                            samples_per_s=rate,
                            train_seconds=state["train_seconds"],
                        )
                if tc.val_every and state["iteration"] % tc.val_every == 0:
                    validate(epoch)
                    checkpoint(epoch, b + 1)
                elif tc.checkpoint_every and state["iteration"] % tc.checkpoint_every == 0:
                    checkpoint(epoch, b + 1)
                out_of_time = bool(tc.max_minutes) and (
                    time.monotonic() - start_time > 60 * tc.max_minutes
                )
                if any_rank(out_of_time or signals.requested is not None, device):
                    checkpoint(epoch, b + 1)
                    interrupted = not out_of_time
                    if interrupted:
                        log.write(
                            event="interrupted",
                            signal=signals.requested or "another rank's",
                            epoch=epoch,
                            iteration=state["iteration"],
                        )
                    stopped = True
                    break
            bar.close()
            if stopped:
                break
            state["batch"] = 0
            validate(epoch)
            checkpoint(epoch + 1, 0)
    return TrainResult(
        run,
        state["best_rsum"],
        state["epoch"],
        state["iteration"],
        stopped,
        last_metrics,
        interrupted,
        state["nonfinite_steps"],
    )
