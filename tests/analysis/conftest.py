"""Tiny trained runs for the analysis tests: the session's toy folder, trained on its small dev
split for one epoch (a few batches), on one thread (the machine may be busy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imram.checkpoint import save_checkpoint
from imram.config import load_config
from imram.training.trainer import train

TINY = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=32",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.epochs=1",
    "train.warmup_epochs=1",
    "data.vocab_threshold=1",
    "data.train_split=dev",
]


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    """``--set`` items of a tiny model trained for one epoch on the toy folder's dev split."""
    return list(TINY)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_run(toy_data, tmp_path_factory) -> Path:
    """Text-IMRAM, K=2, trained for one epoch."""
    run = tmp_path_factory.mktemp("analysis") / "text_imram"
    config = load_config("f30k_text_imram", [*TINY, "model.steps=2"])
    train(config, toy_data, run, device="cpu", progress=False)
    return run


@pytest.fixture
def untrained(text_run, tmp_path):
    """``untrained(preset)``: a checkpoint of ``preset`` at its initial weights, with the text
    run's vocabulary (enough for the paths that refuse a model)."""
    from imram.checkpoint import load_checkpoint
    from imram.models import build_model

    vocab = load_checkpoint(text_run).vocab

    def make(preset: str) -> Path:
        config = load_config(preset, [*TINY, f"model.vocab_size={len(vocab)}"])
        return save_checkpoint(tmp_path / preset, build_model(config.model), config, vocab)

    return make
