"""GloVe 6B 50-d: the real vectors load, widen a vocabulary and initialise (frozen) embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from imram.config import load_config
from imram.data import Vocabulary
from imram.data.glove import embedding_matrix, glove_vocabulary, load_glove
from imram.data.text import SPECIALS
from imram.errors import ConfigError, DataError
from imram.training.trainer import train


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_real_vectors_load_and_carry_meaning():
    glove = load_glove()
    assert len(glove.words) == 400_000 and glove.vectors.shape == (400_000, 50)
    assert glove.words[:3] == ("the", ",", ".")  # most frequent first
    v = {w: np.asarray(glove.vectors[glove.index[w]]) for w in ("dog", "puppy", "cat", "saturn")}
    assert _cos(v["dog"], v["puppy"]) > _cos(v["dog"], v["saturn"]) + 0.3
    assert _cos(v["dog"], v["cat"]) > 0.8


def test_vocabulary_keeps_caption_words_first_then_adds_glove_top_words():
    captions = ["A zebra-striped kazoo.", "a kazoo"]
    vocab = glove_vocabulary(captions, threshold=1, top=50)
    assert vocab.words[:4] == list(SPECIALS)
    assert vocab.words[4:9] == ["a", "kazoo", ".", "zebra-striped", "the"]
    top = load_glove().words[:50]
    assert set(vocab.words[8:]) <= set(top)
    assert {"of", "to", "in", "said"} <= set(vocab.words[8:])
    assert '"' not in vocab.words  # the tokenizer turns it into `` or '', never itself
    assert len(set(vocab.words)) == len(vocab)


def test_embedding_matrix_takes_glove_rows_and_random_for_unknown_words():
    glove = load_glove()
    vocab = glove_vocabulary(["the dog qqqxyzzy"], threshold=1, top=0)
    matrix, found = embedding_matrix(vocab, 50, seed=3)
    assert matrix.shape == (len(vocab), 50) and found == 2
    for word in ("the", "dog"):
        assert np.array_equal(matrix[vocab(word)], glove.vectors[glove.index[word]])
    unknown = matrix[vocab("qqqxyzzy")]
    assert np.all(np.abs(unknown) <= 0.1) and np.any(unknown != 0)
    assert not matrix[0].any()  # <pad>
    with pytest.raises(DataError, match="word_dim=50"):
        embedding_matrix(vocab, 300)


def test_glove_needs_word_dim_50():
    with pytest.raises(ConfigError, match="word_dim=50"):
        load_config("vsepp", ["model.word_vectors=glove-6b-50d"])
    with pytest.raises(ConfigError, match="word_vectors"):
        load_config("vsepp", ["model.word_vectors=word2vec"])


def test_training_with_frozen_glove_keeps_the_vectors(toy_data, tmp_path):
    config = load_config(
        "vsepp",
        [
            "model.embed_dim=32",
            "model.img_dim=32",
            "model.word_dim=50",
            "model.word_vectors=glove-6b-50d",
            "model.freeze_words=true",
            "data.vocab_threshold=1",
            "data.vocab_glove_top=100",
            "train.epochs=1",
            "train.batch_size=64",
        ],
    )
    run = tmp_path / "run"
    train(config, toy_data, run, progress=False)
    weights = load_file(run / "last" / "model.safetensors")["text_encoder.embed.weight"].numpy()
    vocab = Vocabulary.load(run / "vocab.json")
    glove = load_glove()
    assert "horse" in vocab.words and "the" in vocab.words and len(vocab) > 100
    assert np.array_equal(weights[vocab("horse")], glove.vectors[glove.index["horse"]])
    assert '"word_vectors"' in (run / "metrics.jsonl").read_text()
