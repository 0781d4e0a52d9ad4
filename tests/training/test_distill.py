"""train.distill_from: a frozen cross-attention teacher whose batch ranking an embedding model
learns (the KL term against a plain loop, no gradient into the teacher, its scores equal to
``similarity``, the wiring through train() and its errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from imram.checkpoint import save_checkpoint
from imram.config import Config, load_config
from imram.data import PrecompDataset, Vocabulary, collate
from imram.errors import ConfigError, DataError
from imram.models import build_model
from imram.training import train
from imram.training.batch import batch_scores
from imram.training.distill import distill_loss, load_teacher
from imram.training.loss import triplet_loss

DIMS = dict(img_dim=32, embed_dim=16, word_dim=8)


def test_distill_loss_matches_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 4, generator=gen).tanh()
    teacher = 6 * torch.randn(4, 4, generator=gen).tanh()
    tau, terms = 0.1, 6

    def kl(p_logits: list[float], q_logits: list[float]) -> float:
        p = [math.exp(x) for x in p_logits]
        q = [math.exp(x) for x in q_logits]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    expected = 0.0
    for i in range(4):
        expected += kl(
            [teacher[i, j] / (terms * tau) for j in range(4)],
            [student[i, j] / tau for j in range(4)],
        )
        expected += kl(
            [teacher[j, i] / (terms * tau) for j in range(4)],
            [student[j, i] / tau for j in range(4)],
        )
    got = distill_loss(student, teacher, terms, tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(teacher / terms, teacher, terms, tau)) == pytest.approx(0, abs=1e-5)


@pytest.fixture(scope="module")
def teacher_setup(toy_data: Path, tmp_path_factory) -> tuple[Path, Path, Vocabulary]:
    root = tmp_path_factory.mktemp("distill")
    vocab = Vocabulary.from_caption_files(
        [toy_data / "train_caps.txt", toy_data / "dev_caps.txt"], 1
    )
    vocab.save(root / "vocab.json")
    torch.manual_seed(1)
    teacher = build_model("imram_full", vocab_size=len(vocab), steps=2, **DIMS)
    config = Config.from_dict({"model": teacher.config.to_dict()})
    save_checkpoint(root / "teacher", teacher, config, vocab)
    return root / "teacher", root / "vocab.json", vocab


def test_the_teacher_is_frozen_and_scores_as_similarity(toy_data, teacher_setup):
    path, _, vocab = teacher_setup
    teacher = load_teacher(path, vocab, DIMS["img_dim"], torch.device("cpu"))
    assert teacher.score_terms() == 4 and not any(p.requires_grad for p in teacher.parameters())
    dataset = PrecompDataset(toy_data, "train", vocab)
    batch = collate([dataset[j] for j in range(12)])
    torch.manual_seed(2)
    student = build_model("member", vocab_size=len(vocab), member_bank_size=16, **DIMS).train()
    sims = batch_scores(student, batch, torch.device("cpu"), 1024.0, False)
    with torch.no_grad():
        taught = batch_scores(teacher, batch, torch.device("cpu"), 1024.0, False)
        direct = teacher.similarity(
            teacher.encode_images(batch.images),
            teacher.encode_captions(batch.tokens, batch.lengths),
            batch.lengths,
        )
    assert torch.allclose(taught, direct, atol=1e-5, rtol=0)
    loss = triplet_loss(sims, 0.2, True) + distill_loss(sims, taught, teacher.score_terms(), 0.05)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.image_encoder.fc.weight.grad.abs().sum() > 0


def test_training_with_a_teacher_and_its_errors(toy_data, teacher_setup, tmp_path):
    path, vocab_path, _ = teacher_setup
    overrides = [
        "model.img_dim=32",
        "model.embed_dim=16",
        "model.word_dim=8",
        "model.member_bank_size=16",
        "train.epochs=1",
        "train.batch_size=40",
        "data.vocab_threshold=1",
        "data.val_captions=50",
        "train.mining=off",
        f"train.distill_from={path}",
    ]
    config = load_config("member", overrides)
    result = train(config, toy_data, tmp_path / "run", vocab_path=vocab_path, progress=False)
    assert result.iteration == 15  # 600 training captions in batches of 40
    losses = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isfinite(e["loss"]) for e in losses if e.get("event") == "train")
    with pytest.raises(ConfigError, match="train.distill_from needs train.mining: off"):
        load_config("member", [f"train.distill_from={path}", "train.mining=exact"])
    other = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "dog"])
    with pytest.raises(DataError, match="vocabulary differs"):
        load_teacher(path, other, DIMS["img_dim"], torch.device("cpu"))
    with pytest.raises(DataError, match="takes 32-d regions"):
        load_teacher(path, Vocabulary.load(vocab_path), 64, torch.device("cpu"))
    student = tmp_path / "run"
    with pytest.raises(ConfigError, match="must be a cross-attention model"):
        load_teacher(student, Vocabulary.load(vocab_path), 32, torch.device("cpu"))
