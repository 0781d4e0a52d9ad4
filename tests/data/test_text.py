"""Tokenizer, caption files and vocabulary."""

from __future__ import annotations

import json

import pytest

from imram.data import Vocabulary, read_captions, tokenize
from imram.errors import DataError


def test_tokenize_golden():
    assert tokenize("A dog's ball, on the grass.") == [
        "a",
        "dog",
        "'s",
        "ball",
        ",",
        "on",
        "the",
        "grass",
        ".",
    ]
    assert tokenize("Two MEN can't swim!") == ["two", "men", "ca", "n't", "swim", "!"]
    assert tokenize("  spaced   out  ") == ["spaced", "out"]


CORPUS = ["a dog runs", "a dog sits", "a cat sits", "a dog", "the cat"]


def test_build_threshold_and_order():
    # counts: a 4, dog 3, cat 2, sits 2, runs 1, the 1
    vocab = Vocabulary.build(CORPUS, threshold=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "sits"]
    assert Vocabulary.build(CORPUS, threshold=4).words[4:] == ["a"]
    assert len(Vocabulary.build(CORPUS, threshold=1)) == 4 + 6


def test_encode_wraps_and_maps_unknown():
    vocab = Vocabulary.build(CORPUS, threshold=2)
    assert vocab.encode("A dog flies") == [1, 4, 5, 3, 2]
    assert vocab.decode([1, 4, 5, 3, 2]) == ["<start>", "a", "dog", "<unk>", "<end>"]
    assert vocab("zebra") == 3 and vocab.word(6) == "cat"


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CORPUS, threshold=1)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.fingerprint() == vocab.fingerprint()
    assert Vocabulary.build(CORPUS, threshold=2).fingerprint() != vocab.fingerprint()
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.json"]  # no temp file left


def test_reads_official_layout(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "man", "horse"]
    official = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": 6,
    }
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps(official))
    vocab = Vocabulary.load(path)
    assert vocab.words == words
    assert vocab.encode("man on horse") == [1, 4, 3, 5, 2]
    assert vocab.to_json() == official


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json{", "not a JSON vocabulary"),
        ('["a"]', "JSON object"),
        ('{"word2idx": {}, "idx": 0}', "lacks key(s) idx2word"),
        (
            '{"word2idx": {"<pad>":0,"<start>":1,"<end>":2,"<unk>":3,"a":5},'
            '"idx2word": {"0":"<pad>","1":"<start>","2":"<end>","3":"<unk>","4":"a"}, "idx": 5}',
            "idx2word[4] = 'a' but word2idx['a'] = 5",
        ),
        (
            '{"word2idx": {"<pad>":0,"<start>":1,"<end>":2,"<unk>":3},'
            '"idx2word": {"0":"<pad>","1":"<start>","2":"<end>","3":"<unk>"}, "idx": 5}',
            "idx=5 but idx2word has 4",
        ),
        (
            '{"word2idx": {"<start>":0,"<pad>":1,"<end>":2,"<unk>":3},'
            '"idx2word": {"0":"<start>","1":"<pad>","2":"<end>","3":"<unk>"}, "idx": 4}',
            "ids 0-3 must be <pad>, <start>, <end>, <unk>",
        ),
    ],
)
def test_bad_vocabulary_files(tmp_path, content, message):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        Vocabulary.load(path)
    assert "bad_vocab.json" in str(err.value) and message in str(err.value)


def test_missing_vocabulary(tmp_path):
    with pytest.raises(DataError, match="nope.json: vocabulary file not found"):
        Vocabulary.load(tmp_path / "nope.json")


def test_read_captions_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train_caps.txt"
    path.write_bytes(b"a dog\r\nA cat sits \nlast line")
    assert read_captions(path) == ["a dog", "A cat sits", "last line"]
    path.write_bytes(b"a dog\nfine\ncaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"train_caps.txt, line 3: not valid UTF-8"):
        read_captions(path)
    path.write_bytes(b"a dog\n   \nthird\n")
    with pytest.raises(DataError, match=r"train_caps.txt, line 2: empty caption"):
        read_captions(path)
    with pytest.raises(DataError, match="missing_caps.txt: captions file not found"):
        read_captions(tmp_path / "missing_caps.txt")


def test_from_caption_files(tmp_path):
    (tmp_path / "train_caps.txt").write_text("a dog\na dog\n")
    (tmp_path / "dev_caps.txt").write_text("a cat\n")
    vocab = Vocabulary.from_caption_files(
        [tmp_path / "train_caps.txt", tmp_path / "dev_caps.txt"], threshold=2
    )
    assert vocab.words[4:] == ["a", "dog"]
