"""The pretrained transformer caption encoder (model.text_encoder: minilm): its states, masking,
frozen cache, word pieces merged into words, checkpoints and the fine-tuning learning rate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imram.checkpoint import load_checkpoint, save_checkpoint
from imram.config import Config, load_config
from imram.data import pad_captions
from imram.data.text import Vocabulary, load_tokenizer, merge_words
from imram.data.wordpiece import WordPieces, pretrained_dir
from imram.errors import ConfigError
from imram.models import build_model
from imram.models.text_transformer import TokenStates, cache_token_states
from imram.schema import ModelConfig
from imram.scoring import reference_similarity

CAPTIONS = [
    "A dog runs across the snowy field, chasing a frisbee.",
    "two kids",
    "an unbelievably colourful kaleidoscope",
]


@pytest.fixture(scope="module")
def pieces() -> WordPieces:
    return WordPieces("minilm")


@pytest.fixture(scope="module")
def batch(pieces: WordPieces) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_captions([pieces.encode(c) for c in CAPTIONS])


def _model(name: str = "imram_full", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    values = dict(text_encoder="minilm", embed_dim=32, img_dim=16, steps=2, vocab_size=30522)
    return build_model(name, **{**values, **overrides}).eval()


def test_pieces_split_words_and_merge_back(pieces: WordPieces) -> None:
    ids = pieces.encode(CAPTIONS[0])
    assert pieces.decode(ids)[0] == "[CLS]" and pieces.decode(ids)[-1] == "[SEP]"
    assert pieces.decode(ids)[11:14] == ["fr", "##is", "##bee"]
    assert pieces.word_groups(ids)[11] == [11, 12, 13]
    assert pieces.shown_words(ids)[11] == "frisbee"
    assert pieces.tokens(CAPTIONS[0]) == pieces.shown_words(ids)
    assert len(pieces.shown_words(ids)) == len(ids) - 2
    assert not any(pieces.unknown_words(ids))


def test_token_states_equal_a_plain_transformers_forward(pieces, batch) -> None:
    """Padded batch states equal each caption run alone through transformers' own loader."""
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(pretrained_dir("minilm"), local_files_only=True).eval()
    encoder = _model().text_encoder
    tokens, lengths = batch
    with torch.no_grad():
        states = encoder.token_states(tokens, lengths)
        for row, caption in enumerate(CAPTIONS):
            alone = torch.tensor([pieces.encode(caption)])
            expected = plain(input_ids=alone).last_hidden_state[0]
            n = int(lengths[row])
            assert torch.allclose(states[row, :n], expected, atol=1e-5, rtol=0)
            assert torch.all(states[row, n:] == 0)


def test_padding_equals_per_caption_slicing_through_the_reference(batch) -> None:
    """A cross-attention model over word pieces: the batched scorer on a padded block equals
    the plain per-pair reference (fp64), and padding changes no caption's fragments."""
    model = _model().double()
    tokens, lengths = batch
    with torch.no_grad():
        words = model.encode_captions(tokens, lengths)
        for row in range(len(CAPTIONS)):
            n = int(lengths[row])
            alone = model.encode_captions(tokens[row : row + 1, :n], lengths[row : row + 1])
            assert torch.allclose(words[row, :n], alone[0], atol=1e-10, rtol=0)
        images = model.encode_images(torch.randn(4, 5, 16, dtype=torch.float64))
        fast = model.similarity(images, words, lengths)
        slow = reference_similarity(model, images, words, lengths)
    assert torch.allclose(fast, slow, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["vsepp", "member", "scan_t2i", "imram_image"])
def test_every_model_takes_the_transformer(name: str, batch) -> None:
    model = _model(name, **({"steps": 1} if name.startswith("scan") else {}))
    tokens, lengths = batch
    with torch.no_grad():
        scores = model.similarity(
            model.encode_images(torch.randn(2, 5, 16)),
            model.encode_captions(tokens, lengths),
            lengths,
        )
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


def _split(
    root: Path, captions: list[str], pieces: WordPieces
) -> tuple[Path, np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "train_caps.txt"
    path.write_text("\n".join(captions) + "\n")
    encoded = [pieces.encode(c) for c in captions]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    return path, np.concatenate(encoded).astype(np.int32), offsets


def test_frozen_cache_is_used_and_invalidated(tmp_path: Path, pieces, batch) -> None:
    encoder = _model().text_encoder
    tokens, lengths = batch
    with torch.no_grad():
        direct = encoder.token_states(tokens, lengths)
    split = _split(tmp_path, CAPTIONS, pieces)
    encoder.forwards = 0
    cache_token_states(encoder, [split])
    first = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(first) == 1 and encoder.forwards >= 1  # computed once, written beside the data
    encoder.forwards = 0
    with torch.no_grad():
        cached = encoder.token_states(tokens, lengths)  # every caption known: no forward
        assert encoder.forwards == 0
        assert torch.allclose(cached, direct, atol=1e-6, rtol=0)
        encoder.token_states(*pad_captions([pieces.encode("a new caption")]))
        assert encoder.forwards == 1  # an unknown caption runs the transformer
    cache_token_states(encoder, [split])  # a second start reads the file
    assert encoder.forwards == 1
    # Changed captions: a new file replaces the stale one.
    cache_token_states(encoder, [_split(tmp_path, [*CAPTIONS[:2], "something else"], pieces)])
    second = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(second) == 1 and second != first and encoder.forwards == 2
    # Changed weights: another file, recomputed.
    with torch.no_grad():
        encoder.transformer.embeddings.word_embeddings.weight[1037] += 0.5
    cache_token_states(encoder, [split])
    third = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert encoder.forwards == 3 and third not in (first, second)


def test_token_states_lookup_needs_every_caption() -> None:
    ids = np.array([5, 6, 7, 8, 9], dtype=np.int32)
    cache = TokenStates(torch.arange(10.0).reshape(5, 2), ids, np.array([0, 3, 5]))
    tokens, lengths = pad_captions([[8, 9], [5, 6, 7]])
    got = cache.lookup(tokens, lengths)
    assert got.tolist() == [[[6, 7], [8, 9], [0, 0]], [[0, 1], [2, 3], [4, 5]]]
    assert cache.lookup(*pad_captions([[8, 9], [5, 6]])) is None


def test_merged_word_attention() -> None:
    """Pieces that query average into their word; pieces that are attended sum into it, so a
    distribution over pieces stays one over words."""
    groups = [[0], [1, 2, 3], [4]]
    over_pieces = torch.softmax(torch.randn(6, 5), dim=-1)  # 6 regions attend over 5 pieces
    over_words = merge_words(over_pieces, groups, 1, "sum")
    assert over_words.shape == (6, 3)
    assert torch.allclose(over_words.sum(-1), torch.ones(6))
    assert torch.allclose(over_words[:, 1], over_pieces[:, 1:4].sum(-1))
    queries = torch.softmax(torch.randn(5, 7), dim=-1)  # 5 pieces attend over 7 regions
    words = merge_words(queries, groups, 0, "mean")
    assert torch.allclose(words[1], queries[1:4].mean(0))
    assert torch.allclose(words.sum(-1), torch.ones(3))
    identity = [[0], [1], [2], [3], [4]]
    assert torch.equal(merge_words(queries, identity, 0, "mean"), queries)


def test_explain_traces_show_words(tmp_path: Path, pieces) -> None:
    from imram.analysis.traces import text_traces

    model = _model("imram_text")
    ids = pieces.encode(CAPTIONS[0])
    traces = text_traces(model, torch.randn(5, 16), [ids], "cpu", [pieces.word_groups(ids)])
    assert traces[0].attention.shape == (2, len(pieces.shown_words(ids)), 5)
    assert np.allclose(traces[0].attention.sum(-1), 1.0, atol=1e-5)


def test_checkpoint_keeps_the_tokenizer(tmp_path: Path, pieces, batch) -> None:
    model = _model("vsepp")
    config = Config.from_dict({"model": model.config.to_dict()})
    save_checkpoint(tmp_path / "ck", model, config, pieces)
    loaded = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.vocab, WordPieces) and loaded.vocab == pieces
    tokens, lengths = batch
    with torch.no_grad():
        assert torch.equal(
            loaded.model.encode_captions(tokens, lengths), model.encode_captions(tokens, lengths)
        )
    pieces.save(tmp_path / "vocab.json")
    assert load_tokenizer(tmp_path / "vocab.json") == pieces
    changed = {**json.loads((tmp_path / "vocab.json").read_text()), "fingerprint": "0" * 64}
    (tmp_path / "bad.json").write_text(json.dumps(changed))
    with pytest.raises(Exception, match="another word-piece vocabulary"):
        load_tokenizer(tmp_path / "bad.json")


def test_config_refuses_glove_with_the_transformer() -> None:
    with pytest.raises(ConfigError, match="model.word_vectors"):
        ModelConfig(text_encoder="minilm", word_vectors="glove-6b-50d", word_dim=50)
    with pytest.raises(ConfigError, match="model.freeze_text"):
        ModelConfig(text_encoder="minilm", freeze_words=True)
    with pytest.raises(ConfigError, match="model.text_encoder"):
        ModelConfig(text_encoder="bert-large")


@pytest.mark.slow
def test_training_uses_the_cache_and_text_lr(tmp_path: Path, toy_data: Path) -> None:
    """A frozen run runs the transformer only to fill the cache (no forward per epoch); a
    fine-tuned run trains it in its own group at train.text_lr, decayed with train.lr."""
    from imram.training import train

    calls: list[str] = []

    def count(module, args, output):  # a global hook counts real transformer forwards
        if type(module).__name__ == "BertModel":
            calls.append("forward")

    overrides = [
        "model.name=vsepp",
        "model.img_dim=32",
        "model.embed_dim=32",
        "model.text_encoder=minilm",
        "train.epochs=2",
        "train.batch_size=40",
        "train.lr_decay_epochs=1",
        "train.warmup_epochs=0",
        "data.val_captions=50",
        "data.vocab_glove_top=0",
        "model.word_vectors=",
        "model.freeze_words=false",
        "model.word_dim=300",
    ]
    # A private copy: other tests may train frozen MiniLM on the shared toy data (the cpu_*
    # presets do), and their cache files would serve this run.
    toy_data = Path(
        shutil.copytree(toy_data, tmp_path / "data", ignore=shutil.ignore_patterns("cache"))
    )
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        config = load_config("quickstart_vsepp", overrides)
        train(config, toy_data, tmp_path / "frozen", progress=False)
        filled = len(calls)
        assert filled > 0 and sorted(
            p.name.split(".")[0] for p in (toy_data / "cache").iterdir()
        ) == ["dev_caps", "train_caps"]
        calls.clear()
        train(config, toy_data, tmp_path / "again", progress=False)
        assert calls == []  # the cache files were read: no forward at all, epochs included
    finally:
        handle.remove()
    tuned = load_config(
        "quickstart_vsepp",
        [*overrides, "model.freeze_text=false", "train.epochs=2", "train.text_lr=1e-5"],
    )
    result = train(tuned, toy_data, tmp_path / "tuned", progress=False)
    assert result.iteration > 0
    meta = json.loads((tmp_path / "tuned" / "last" / "checkpoint.json").read_text())
    groups = meta["optimizer"]["param_groups"]
    assert [g.get("name") for g in groups] == [None, "text_transformer"]
    assert groups[0]["lr"] == pytest.approx(tuned.train.lr * tuned.train.lr_decay)
    assert groups[1]["lr"] == pytest.approx(1e-5 * tuned.train.lr_decay)
    assert isinstance(load_checkpoint(tmp_path / "tuned").vocab, WordPieces)
    assert isinstance(load_checkpoint(tmp_path / "frozen").vocab, WordPieces)
    assert not isinstance(load_checkpoint(tmp_path / "frozen").vocab, Vocabulary)


def test_tuned_layers_start_as_the_whole_transformer(tmp_path: Path, pieces, batch) -> None:
    """The last layers run over the frozen part's (cached) states: at the start, in eval mode,
    the states equal the plain transformer's, from the cache or not; only those layers train."""
    plain = _model().text_encoder
    tuned = _model(text_tuned_layers=2).text_encoder
    tokens, lengths = batch
    with torch.no_grad():
        expected = plain.token_states(tokens, lengths)
        assert torch.allclose(tuned.token_states(tokens, lengths), expected, atol=1e-5, rtol=0)
        cache_token_states(tuned, [_split(tmp_path, CAPTIONS, pieces)])
        tuned.forwards = 0
        assert torch.allclose(tuned.token_states(tokens, lengths), expected, atol=1e-5, rtol=0)
        assert tuned.forwards == 0
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == [
        "train_caps.minilm.layer4"
    ]
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained and all(
        n.startswith(("fc.", "transformer.encoder.layer.4.", "transformer.encoder.layer.5."))
        for n in trained
    )
    assert any(n.startswith("transformer.encoder.layer.4.") for n in trained)
    # What the tuned layers learn changes no cached state: the fingerprint covers the rest.
    before = tuned.fingerprint()
    with torch.no_grad():
        tuned.tuned[0].output.dense.weight.add_(0.1)
    assert tuned.fingerprint() == before
    with torch.no_grad():
        tuned.transformer.encoder.layer[3].output.dense.weight.add_(0.1)
    assert tuned.fingerprint() != before


def test_tuned_layers_round_trip_and_config_checks(tmp_path: Path, pieces, batch) -> None:
    model = _model("vsepp", text_tuned_layers=1, fragment_mlp=True)
    with torch.no_grad():  # trained weights: a checkpoint must carry them
        model.text_encoder.tuned[0].output.dense.weight.add_(0.05)
        model.text_encoder.mlp[2].weight.add_(0.01)
        model.image_encoder.mlp[2].weight.add_(0.01)
    config = Config.from_dict({"model": model.config.to_dict()})
    save_checkpoint(tmp_path / "ck", model, config, pieces)
    loaded = load_checkpoint(tmp_path / "ck").model
    tokens, lengths = batch
    images = torch.randn(2, 5, 16)
    with torch.no_grad():
        a = model.similarity(model.encode_images(images), model.encode_captions(tokens, lengths))
        b = loaded.similarity(loaded.encode_images(images), loaded.encode_captions(tokens, lengths))
        fresh = _model("vsepp").encode_captions(tokens, lengths)
    assert torch.equal(a, b)
    assert not torch.allclose(loaded.encode_captions(tokens, lengths), fresh)
    with pytest.raises(ConfigError, match="model.text_tuned_layers"):
        ModelConfig(text_encoder="gru", text_tuned_layers=1)
    with pytest.raises(ConfigError, match="model.text_tuned_layers"):
        ModelConfig(text_encoder="minilm", freeze_text=False, text_tuned_layers=1)
    with pytest.raises(ConfigError, match="has 6 layers"):
        _model(text_tuned_layers=7)


@pytest.mark.parametrize("name", ["vsepp", "imram_full", "member"])
def test_fragment_mlp_starts_as_the_linear_projection(name: str, batch) -> None:
    """The residual MLP's output layer starts at zero: a fresh model with it encodes exactly
    as one without, given the same linear weights."""
    plain, wide = _model(name), _model(name, fragment_mlp=True)
    wide.load_state_dict(plain.state_dict(), strict=False)
    tokens, lengths = batch
    images = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(wide.encode_images(images), plain.encode_images(images))
        assert torch.equal(
            wide.encode_captions(tokens, lengths), plain.encode_captions(tokens, lengths)
        )
    assert wide.image_encoder.mlp is not None and wide.text_encoder.mlp is not None


def test_feature_dropout_only_while_training(batch) -> None:
    plain, dropped = _model("vsepp"), _model("vsepp", feature_dropout=0.5)
    tokens, lengths = batch
    images = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(dropped.encode_images(images), plain.encode_images(images))
        assert torch.equal(
            dropped.encode_captions(tokens, lengths), plain.encode_captions(tokens, lengths)
        )
        dropped.train()
        assert not torch.allclose(dropped.encode_images(images), plain.encode_images(images))
        assert not torch.allclose(
            dropped.encode_captions(tokens, lengths), plain.encode_captions(tokens, lengths)
        )
    with pytest.raises(ConfigError, match="model.feature_dropout"):
        ModelConfig(feature_dropout=1.0)
