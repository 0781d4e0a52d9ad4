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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from imram.checkpoint import (
    WEIGHTS_NAME,
    load_trainer_state,
    load_weights,
    read_meta,
    read_tensors,
    recover_swap,
    save_checkpoint,
    saved_config,
)
from imram.config import Config, save_config
from imram.data import PrecompBatch, PrecompDataset, Vocabulary, collate, read_captions
from imram.data.glove import embedding_matrix, glove_vocabulary
from imram.data.text import Tokenizer, load_tokenizer
from imram.data.wordpiece import WordPieces
from imram.devices import resolve_device
from imram.distributed import any_rank, barrier, broadcast_object, sum_gradients, world
from imram.errors import ConfigError, DataError, TrainingError
from imram.files import atomic_write_text, check_sealed, is_sibling_of
from imram.models import build_model
from imram.models.interface import CrossAttentionModel
from imram.models.text_transformer import TransformerTextEncoder, cache_token_states
from imram.precision import autocast, resolve_precision
from imram.training.batch import batch_scores, mined_batch_loss
from imram.training.distill import distill_loss, load_teacher
from imram.training.loss import contrastive_loss, triplet_loss
from imram.training.manifest import (
    MANIFEST,
    data_files,
    describe,
    read_manifest,
    verify,
    write_manifest,
)
from imram.training.validation import Reranking, Validation, open_validation
from imram.training.warm_start import warm_start


@dataclass
class TrainResult:
    """Where a run ended: its best validation rsum, position, and why it stopped early, if it
    did (the time budget; a SIGTERM/SIGINT: ``interrupted``; ``train.patience`` validations
    without a better rsum: ``plateaued``)."""

    run_dir: Path
    best_rsum: float
    epoch: int
    iteration: int
    stopped_early: bool
    last_metrics: dict[str, Any]
    interrupted: bool = False
    nonfinite_steps: int = 0
    plateaued: bool = False


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The caption order of an epoch: a function of (seed, epoch) only, so resume replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _vocabulary(config: Config, data: Path, run: Path, vocab_path: str | Path | None) -> Tokenizer:
    """The run's tokenizer: ``--vocab``, the run's ``vocab.json``, the pretrained text
    encoder's word pieces, or a word vocabulary built from the train and dev captions."""
    given = vocab_path if vocab_path is not None else run / "vocab.json"
    if vocab_path is not None or given.is_file():
        vocab = load_tokenizer(given)
        pieces = config.model.text_encoder != "gru"
        if pieces != isinstance(vocab, WordPieces):
            kind = "word-piece tokenizer" if isinstance(vocab, WordPieces) else "word vocabulary"
            raise ConfigError(
                f"{given}: a {kind}, but model.text_encoder={config.model.text_encoder} "
                f"reads {'word pieces' if pieces else 'words'}"
            )
        return vocab
    if config.model.text_encoder != "gru":
        return WordPieces(config.model.text_encoder)
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


def init_word_embeddings(model: torch.nn.Module, config: Config, vocab: Tokenizer) -> int:
    """Load ``model.word_vectors`` into the word embeddings (before training; a resumed run has
    them in its weights) and return how many vocabulary words the vectors covered."""
    if not config.model.word_vectors:
        return 0
    matrix, found = embedding_matrix(vocab, config.model.word_dim, config.train.seed)
    embed = model.text_encoder.embed.weight
    with torch.no_grad():
        embed.copy_(torch.from_numpy(matrix).to(embed.device))
    return found


# The named parameter groups and the train.* key of their learning rate.
GROUP_LR = {"text_transformer": "text_lr", "image_tower": "tower_lr"}


def _param_groups(model: torch.nn.Module, config: Config) -> list[dict[str, Any]]:
    """The trainable parameters: a fine-tuned pretrained transformer and a tuned image tower
    each in a group of its own at ``train.text_lr`` / ``train.tower_lr`` (named, so the
    schedule finds them), everything else at ``train.lr``."""
    text, tower = model.text_encoder, model.image_encoder.tower
    named = {
        "text_transformer": (
            [p for p in text.transformer.parameters() if p.requires_grad]
            if isinstance(text, TransformerTextEncoder)
            else []
        ),
        "image_tower": [] if tower is None else list(tower.parameters()),
    }
    own = {id(p) for params in named.values() for p in params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": config.train.lr}]
    for name, params in named.items():
        if params:
            lr = getattr(config.train, GROUP_LR[name])
            groups.append({"params": params, "lr": lr, "name": name})
    return groups


# What a run directory may hold: the files and folders train() writes, and the hidden siblings
# that atomic writes build beside them (files.atomic_output, files.sibling_dir, files.swap_in).
RUN_FILES = ("config.yaml", "vocab.json", "metrics.jsonl", MANIFEST, "last", "best")


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or any(is_sibling_of(name, own) for own in RUN_FILES)


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


@dataclass
class TrainState:
    """Where a run stands, saved in every checkpoint so that a resume continues exactly:
    the position (``epoch``, ``batch`` within it, ``iteration`` overall), the best validation
    rsum so far, the wall time spent in training steps (not validation, summed over
    resumes), the number of skipped non-finite steps and of validations since the best one
    (``stale``, for early stopping)."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0
    best_rsum: float = -math.inf
    train_seconds: float = 0.0
    nonfinite_steps: int = 0
    stale: int = 0

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved (extra keys such as best/'s metrics are ignored)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def _check_resumable(run: Path, config: Config, lead: bool) -> dict[str, Any]:
    """The meta of ``run/last`` (a crashed swap put back first), refusing a missing checkpoint
    or a model config that differs from the checkpoint's, field by field."""
    last_dir = run / "last"
    if lead:
        recover_swap(last_dir)
        recover_swap(run / "best")
    barrier()
    if not (last_dir / "checkpoint.json").is_file():
        raise DataError(f"{run}: nothing to resume (no last/checkpoint.json)")
    meta = read_meta(last_dir)
    saved = Config.from_dict(saved_config(meta), str(last_dir / "checkpoint.json"))
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
    return meta


@dataclass
class _Session:
    """A run while it trains: what it trains, on what, where it writes, and its state. Only
    rank 0 (``lead``) writes."""

    run: Path
    config: Config
    vocab: Tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device
    train_set: PrecompDataset
    val_set: PrecompDataset
    files: list[Path]
    manifest: dict[str, Any]
    log: _Log
    state: TrainState
    lead: bool
    world_size: int
    validation: Validation
    teacher: CrossAttentionModel | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def checkpoint(self, epoch: int, batch: int) -> None:
        """Save ``last/`` at the position a resume starts from."""
        self.state.epoch, self.state.batch = epoch, batch
        if self.lead:
            save_checkpoint(
                self.run / "last",
                self.model,
                self.config,
                self.vocab,
                asdict(self.state),
                self.optimizer,
            )

    def validate(self, epoch: int) -> bool:
        """Score the dev split, log it, and save ``best/`` when its rsum is the best so far;
        True when ``train.patience`` validations in a row have not improved on the best."""
        metrics = self.validation(self.model)
        self.last_metrics = metrics
        self.log.write(
            event="val",
            epoch=epoch,
            iteration=self.state.iteration,
            train_seconds=self.state.train_seconds,
            **metrics,
        )
        self.state.stale += 1
        if metrics["rsum"] > self.state.best_rsum:
            self.state.best_rsum = metrics["rsum"]
            self.state.stale = 0
            if self.lead:
                state = {**asdict(self.state), "metrics": metrics}
                save_checkpoint(self.run / "best", self.model, self.config, self.vocab, state)
        patience = self.config.train.patience
        if patience and self.state.stale >= patience:
            self.log.write(
                event="early_stop",
                epoch=epoch,
                iteration=self.state.iteration,
                best_rsum=self.state.best_rsum,
                patience=patience,
            )
            return True
        return False

    def step(self, batch: PrecompBatch, hardest: bool) -> float | None:
        """One optimisation step; the loss, or None when the loss or the gradient norm is not
        finite (the step is skipped). Every rank takes the same decision: the loss comes from
        the gathered matrix and the norm from the summed gradients."""
        tc, device = self.config.train, self.device
        budget, recompute = tc.score_budget_mb, tc.activation_checkpointing
        with autocast(self.precision, device):
            negatives = 1 if hardest else tc.warmup_negatives
            if tc.loss == "hinge" and tc.mining != "off" and negatives > 0:
                shortlist = tc.mining_shortlist if tc.mining == "shortlist" else None
                loss = mined_batch_loss(
                    self.model, batch, device, budget, recompute, tc.margin, shortlist, negatives
                )
            else:
                sims = batch_scores(self.model, batch, device, budget, recompute)
                if tc.loss == "infonce":
                    model = self.model
                    terms = model.score_terms() if isinstance(model, CrossAttentionModel) else 1
                    loss = contrastive_loss(sims, tc.temperature, terms)
                else:
                    loss = triplet_loss(sims.float(), tc.margin, hardest)
                if self.teacher is not None:
                    with torch.no_grad():
                        taught = batch_scores(self.teacher, batch, device, budget, False)
                    terms = self.teacher.score_terms()
                    distill = distill_loss(sims, taught, terms, tc.distill_temperature)
                    loss = loss + tc.distill_weight * distill
        if not torch.isfinite(loss):
            return None
        trainable = self.trainable
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss / self.world_size).backward()
        if self.world_size > 1:
            sum_gradients(trainable)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        if not (torch.isfinite(norm) or self.scaler.is_enabled()):  # fp16: the scaler skips
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def skipped(self, epoch: int, in_a_row: int) -> None:
        """Count and log a skipped non-finite step; stop the run after too many in a row."""
        self.state.nonfinite_steps += 1
        self.log.write(
            event="nonfinite",
            epoch=epoch,
            iteration=self.state.iteration,
            in_a_row=in_a_row,
            total=self.state.nonfinite_steps,
        )
        limit = self.config.train.max_nonfinite_steps
        if in_a_row >= limit:
            raise TrainingError(
                f"{self.run}: {in_a_row} training steps in a row had a non-finite "
                f"loss or gradient (epoch {epoch + 1}, iteration "
                f"{self.state.iteration}); each was skipped, and the run stops at "
                f"train.max_nonfinite_steps={limit}. {self.run / 'last'}"
                " holds the last good checkpoint; lower train.lr, check the data, "
                "or train in fp32"
            )

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's batches of caption indices (:func:`epoch_order`), with the epoch's
        learning rate set on the optimizer."""
        tc = self.config.train
        for group in self.optimizer.param_groups:
            base = getattr(tc, GROUP_LR[group["name"]]) if "name" in group else tc.lr
            group["lr"] = base * tc.lr_factor(epoch)
        order = epoch_order(len(self.train_set), tc.seed, epoch)
        return [order[s : s + tc.batch_size] for s in range(0, len(order), tc.batch_size)]

    def run_epochs(self, progress: bool) -> TrainResult:
        """The training loop, from the state's position to the last epoch or a stop (the
        time budget, SIGTERM/SIGINT): steps, logs, validation and checkpoints."""
        tc, state = self.config.train, self.state
        start_time = time.monotonic()
        stopped = interrupted = False
        # A run that already stopped early (resumed after it) stays stopped, like a finished one.
        plateaued = bool(tc.patience) and state.stale >= tc.patience
        bad_in_a_row = 0
        with _StopSignals() as signals:
            for epoch in range(state.epoch, state.epoch if plateaued else tc.epochs):
                verify(self.manifest, self.files, self.run, full=False)
                batches = self.epoch_batches(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                hardest = tc.hardest_negative and epoch >= tc.warmup_epochs
                bar = tqdm(
                    range(state.batch, len(batches)),
                    desc=f"epoch {epoch + 1}/{tc.epochs}",
                    disable=not (progress and self.lead),
                    leave=False,
                )
                self.model.train()
                for b in bar:
                    tick = time.perf_counter()
                    batch = collate([self.train_set[int(j)] for j in batches[b]])
                    loss = self.step(batch, hardest)
                    state.iteration += 1
                    seconds = time.perf_counter() - tick
                    state.train_seconds += seconds
                    rate = len(batches[b]) / seconds
                    if loss is None:
                        bad_in_a_row += 1
                        self.skipped(epoch, bad_in_a_row)
                    else:
                        bad_in_a_row = 0
                        bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}")
                        if state.iteration % tc.log_every == 0:
                            self.log.write(
                                event="train",
                                epoch=epoch,
                                iteration=state.iteration,
                                loss=loss,
                                lr=lr,
                                hardest=hardest,
                                samples_per_s=rate,
                                train_seconds=state.train_seconds,
                            )
                    if tc.val_every and state.iteration % tc.val_every == 0:
                        plateaued = self.validate(epoch)
                        self.checkpoint(epoch, b + 1)
                        if plateaued:
                            break
                    elif tc.checkpoint_every and state.iteration % tc.checkpoint_every == 0:
                        self.checkpoint(epoch, b + 1)
                    out_of_time = bool(tc.max_minutes) and (
                        time.monotonic() - start_time > 60 * tc.max_minutes
                    )
                    if any_rank(out_of_time or signals.requested is not None, self.device):
                        self.checkpoint(epoch, b + 1)
                        interrupted = not out_of_time
                        if interrupted:
                            self.log.write(
                                event="interrupted",
                                signal=signals.requested or "another rank's",
                                epoch=epoch,
                                iteration=state.iteration,
                            )
                        stopped = True
                        break
                bar.close()
                if stopped or plateaued:
                    break
                state.batch = 0
                plateaued = self.validate(epoch)
                self.checkpoint(epoch + 1, 0)
                if plateaued:
                    break
        return TrainResult(
            self.run,
            state.best_rsum,
            state.epoch,
            state.iteration,
            stopped,
            self.last_metrics,
            interrupted,
            state.nonfinite_steps,
            plateaued,
        )


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
    session = _open(config, Path(data_dir), Path(run_dir), vocab_path, resume, device)
    return session.run_epochs(progress)


def _open(
    config: Config,
    data: Path,
    run: Path,
    vocab_path: str | Path | None,
    resume: bool,
    device: str | torch.device | None,
) -> _Session:
    """Everything a run needs before its first step: the run folder checked (and, on resume,
    the checkpoint), the vocabulary, the data and its manifest, the model, the optimizer and
    the state, restored from ``last/`` on resume."""
    rank, world_size = world()
    lead = rank == 0
    device = resolve_device(device)
    meta = _check_resumable(run, config, lead) if resume else None
    if lead:  # before any rank writes: the others would see rank 0's first files
        check_run_dir(run, resume)
        run.mkdir(parents=True, exist_ok=True)
    barrier()

    vocab = _vocabulary(config, data, run, vocab_path)
    if meta is not None and vocab.fingerprint() != meta["vocab_fingerprint"]:
        raise DataError(
            f"{vocab_path or run / 'vocab.json'}: vocabulary differs from the checkpoint's"
        )
    config = replace(config, model=replace(config.model, vocab_size=len(vocab)))
    config.validate()
    stages = config.model.trunk_stages
    train_set = PrecompDataset(data, config.data.train_split, vocab, stages)
    val_set = PrecompDataset(data, config.data.val_split, vocab, stages)
    for split in (train_set, val_set):
        split.require_input(config.model, "the config")
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
    warm = None if resume or not config.train.init_from else config.train.init_from
    copied = [] if warm is None else warm_start(model, warm, vocab)
    decay = config.train.weight_decay
    optimizer = torch.optim.Adam(
        _param_groups(model, config),
        lr=config.train.lr,
        **({"weight_decay": decay, "decoupled_weight_decay": True} if decay else {}),
    )
    state = TrainState()
    if meta is not None:
        last_dir = run / "last"
        weights = last_dir / WEIGHTS_NAME
        load_weights(model, read_tensors(weights, meta, device), str(weights))
        load_trainer_state(last_dir, optimizer)
        state = TrainState.from_dict(meta["state"])
        check_sealed(meta, last_dir / "checkpoint.json")
    cached_seconds = None
    if isinstance(model.text_encoder, TransformerTextEncoder) and model.text_encoder.frozen:
        start = time.perf_counter()
        splits = [(d.captions_path, *d.token_arrays()) for d in (train_set, val_set)]
        if lead:  # rank 0 computes and writes the cache files; the other ranks then read them
            cache_token_states(model.text_encoder, splits)
        barrier()
        if not lead:
            cache_token_states(model.text_encoder, splits)
        cached_seconds = time.perf_counter() - start
    teacher = None
    if config.train.distill_from:
        teacher = load_teacher(config.train.distill_from, vocab, config.model.img_dim, device)
    validation = open_validation(config, model, data, val_set, device)
    precision = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = _Log(run / "metrics.jsonl" if lead else None)
    if resume:
        log.rewind(state.iteration)
    if precision != config.precision:
        log.write(event="precision", configured=config.precision, resolved=precision)
    if cached_seconds is not None:
        log.write(
            event="token_states",
            encoder=config.model.text_encoder,
            captions=len(train_set) + len(val_set),
            seconds=round(cached_seconds, 3),
        )
    if isinstance(validation, Reranking):
        log.write(
            event="val_rerank",
            path=config.train.val_rerank,
            shortlist=config.train.val_shortlist,
            first_rsum=validation.first_metrics["rsum"],
        )
    if warm is not None:
        log.write(event="init_from", path=warm, weights=copied)
    if found:
        log.write(
            event="word_vectors", name=config.model.word_vectors, found=found, vocab=len(vocab)
        )
    if world_size > 1:
        log.write(
            event="distributed", world_size=world_size, backend=torch.distributed.get_backend()
        )
    return _Session(
        run,
        config,
        vocab,
        model,
        optimizer,
        scaler,
        precision,
        device,
        train_set,
        val_set,
        files,
        manifest,
        log,
        state,
        lead,
        world_size,
        validation,
        teacher,
    )
