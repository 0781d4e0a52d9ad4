"""Tokenizer, caption files, atomic writes and the vocabulary."""

from __future__ import annotations

import json
import os

import pytest

from imram.data import Vocabulary, read_captions, read_lines, tokenize
from imram.errors import DataError
from imram.files import atomic_write_text

SPECIAL_WORDS = ["<pad>", "<start>", "<end>", "<unk>"]


@pytest.mark.parametrize(
    "text,tokens",
    [
        (
            "A dog's ball, on the grass.",
            ["a", "dog", "'s", "ball", ",", "on", "the", "grass", "."],
        ),
        ("Two MEN can't swim!", ["two", "men", "ca", "n't", "swim", "!"]),
        ("I'm HERE", ["i", "'m", "here"]),
        (
            'A "quoted" word; and (brackets)...',
            ["a", "``", "quoted", "''", "word", ";", "and", "(", "brackets", ")", "..."],
        ),
        ("e-mail 3.5 km/h", ["e-mail", "3.5", "km/h"]),
        ("  spaced \t  out  ", ["spaced", "out"]),
        ("A rook. It moves", ["a", "rook", ".", "it", "moves"]),
        ("Dr. e.g. U.S. x. 3.5.", ["dr", ".", "e.g.", "u.s.", "x.", "3.5", "."]),
    ],
)
def test_tokenize_golden(text, tokens):
    assert tokenize(text) == tokens


# Hand counts: a 4, dog 3, cat 2, sits 2, runs 1, the 1.
CORPUS = ["a dog runs", "A dog sits", "a cat sits", "a DOG", "the cat"]


def test_build_threshold_and_order():
    vocab = Vocabulary.build(CORPUS, threshold=2)
    # Descending count, ties ("cat", "sits") alphabetical.
    assert vocab.words == [*SPECIAL_WORDS, "a", "dog", "cat", "sits"]
    assert Vocabulary.build(CORPUS, threshold=3).words[4:] == ["a", "dog"]
    assert Vocabulary.build(CORPUS).words[4:] == ["a"]  # default threshold 4
    assert Vocabulary.build(CORPUS, threshold=5).words == SPECIAL_WORDS
    assert Vocabulary.build(CORPUS, threshold=1).words[4:] == [
        "a",
        "dog",
        "cat",
        "sits",
        "runs",
        "the",
    ]


def test_build_order_does_not_depend_on_caption_order():
    forward = Vocabulary.build(CORPUS, threshold=1)
    backward = Vocabulary.build(list(reversed(CORPUS)), threshold=1)
    assert forward == backward and forward.fingerprint() == backward.fingerprint()


def test_encode_wraps_and_maps_unknown():
    vocab = Vocabulary.build(CORPUS, threshold=2)
    assert vocab.encode("A dog flies") == [1, 4, 5, 3, 2]
    assert vocab.encode("") == [1, 2]
    assert vocab.decode([1, 4, 5, 3, 2, 0]) == ["<start>", "a", "dog", "<unk>", "<end>", "<pad>"]
    assert vocab("zebra") == 3 and vocab("cat") == 6 and vocab.word(6) == "cat"
    assert len(vocab) == 8
    with pytest.raises(IndexError):
        vocab.word(8)
    with pytest.raises(IndexError):
        vocab.word(-1)


def test_constructor_rejects_bad_word_lists():
    with pytest.raises(ValueError, match="starts with"):
        Vocabulary(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="each word once"):
        Vocabulary([*SPECIAL_WORDS, "a", "a"])


def test_equality_and_fingerprint():
    a = Vocabulary([*SPECIAL_WORDS, "x", "y"])
    assert a == Vocabulary([*SPECIAL_WORDS, "x", "y"])
    assert a != Vocabulary([*SPECIAL_WORDS, "y", "x"])
    assert a != [*SPECIAL_WORDS, "x", "y"]
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() == Vocabulary([*SPECIAL_WORDS, "x", "y"]).fingerprint()
    assert a.fingerprint() != Vocabulary([*SPECIAL_WORDS, "y", "x"]).fingerprint()


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CORPUS + ["café au lait"] * 2, threshold=1)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.fingerprint() == vocab.fingerprint()
    assert json.loads(path.read_text(encoding="utf-8")) == vocab.to_json()
    assert Vocabulary.build(CORPUS, threshold=2).fingerprint() != vocab.fingerprint()
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.json"]  # no temp file left


def test_reads_official_layout(tmp_path):
    # Written by hand in the original release's layout, keys in a different order.
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(
        '{"idx": 6, "idx2word": {"5": "horse", "0": "<pad>", "1": "<start>", "2": "<end>", '
        '"3": "<unk>", "4": "man"}, "word2idx": {"horse": 5, "man": 4, "<pad>": 0, '
        '"<start>": 1, "<end>": 2, "<unk>": 3}}'
    )
    vocab = Vocabulary.load(path)
    assert vocab.words == [*SPECIAL_WORDS, "man", "horse"]
    assert vocab.encode("Man on horse") == [1, 4, 3, 5, 2]
    assert vocab.to_json() == json.loads(path.read_text())


def _official(words, **override):
    data = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    data.update(override)
    return json.dumps(data)


GOOD = [*SPECIAL_WORDS, "a"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json{", "not a JSON vocabulary"),
        ('["a"]', "expected a JSON object with word2idx, idx2word and idx, found list"),
        ('{"word2idx": {}, "idx": 0}', "lacks key(s) idx2word"),
        ("{}", "lacks key(s) word2idx, idx2word, idx"),
        (_official(GOOD, word2idx=[]), "word2idx and idx2word must be JSON objects"),
        (
            _official(GOOD, word2idx={**dict(zip(GOOD, range(5), strict=True)), "a": 5}),
            "idx2word[4] = 'a' but word2idx['a'] = 5",
        ),
        (
            _official(GOOD, word2idx={**dict(zip(GOOD, range(5), strict=True)), "<start>": True}),
            "idx2word[1] = '<start>' but word2idx['<start>'] = True",
        ),
        (_official(GOOD, idx=7), "idx=7 but idx2word has 5 and word2idx 5 entries"),
        (_official(GOOD, idx="5"), "idx='5'"),
        (
            _official(
                GOOD, idx2word={"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "5": "a"}
            ),
            "idx2word has no id 4 (ids must be 0..4)",
        ),
        (
            _official(GOOD, idx2word={**{str(i): w for i, w in enumerate(GOOD)}, "4": 7}),
            "idx2word[4] is 7, expected a string",
        ),
        (_official(["<start>", "<pad>", "<end>", "<unk>"]), "ids 0-3 must be <pad>, <start>"),
        (_official(["<pad>", "<start>", "<end>", "a", "<unk>"]), "got <pad>, <start>, <end>, a"),
        (_official(["<pad>", "<start>", "<end>"]), "ids 0-3 must be"),
    ],
)
def test_bad_vocabulary_files(tmp_path, content, message):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        Vocabulary.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_non_utf8_vocabulary(tmp_path):
    path = tmp_path / "latin1_vocab.json"
    path.write_bytes(b'{"word2idx": {"caf\xe9": 0}}')
    with pytest.raises(DataError, match="not a JSON vocabulary") as err:
        Vocabulary.load(path)
    assert str(path) in str(err.value)


def test_unreadable_vocabulary(tmp_path):
    with pytest.raises(DataError) as err:
        Vocabulary.load(tmp_path / "nope.json")
    assert str(err.value) == f"{tmp_path / 'nope.json'}: vocabulary file not found"
    with pytest.raises(DataError, match="cannot read the vocabulary") as err:
        Vocabulary.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_read_captions_line_endings(tmp_path):
    path = tmp_path / "train_caps.txt"
    path.write_bytes(b"a dog\r\n  A cat sits \nlast line")
    assert read_captions(path) == ["a dog", "A cat sits", "last line"]
    path.write_bytes(b"a dog\r\nb\r\n")
    assert read_captions(path) == ["a dog", "b"]
    path.write_bytes("\ufeffcaf\u00e9 one\ntwo\n".encode())
    assert read_captions(path) == ["caf\u00e9 one", "two"]
    path.write_bytes(b"")
    assert read_captions(path) == []


def test_read_captions_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "train_caps.txt"
    path.write_bytes(b"a dog\nfine\ncaf\xe9 au lait\nmore\n")
    with pytest.raises(DataError) as err:
        read_captions(path)
    assert str(err.value).startswith(f"{path}, line 3: not valid UTF-8 (byte 0xe9 at column 4)")


@pytest.mark.parametrize(
    "content,line",
    [
        (b"a dog\n   \nthird\n", 2),
        (b"\nsecond\n", 1),
        (b"a\r\n\r\nc", 2),
        (b"a\nb\n\n", 3),  # two newlines at the end leave an empty last caption
    ],
)
def test_read_captions_empty_line_names_file_and_line(tmp_path, content, line):
    path = tmp_path / "train_caps.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_captions(path)
    assert str(err.value).startswith(f"{path}, line {line}: empty caption")


def test_read_captions_missing_or_unreadable(tmp_path):
    with pytest.raises(DataError) as err:
        read_captions(tmp_path / "missing_caps.txt")
    assert str(err.value) == f"{tmp_path / 'missing_caps.txt'}: captions file not found"
    with pytest.raises(DataError, match="cannot read the captions file"):
        read_captions(tmp_path)


def test_read_lines_names_what_it_reads(tmp_path):
    path = tmp_path / "test_ids.txt"
    path.write_bytes(b"1\n\n3\n")
    with pytest.raises(DataError, match=r"test_ids.txt, line 2: empty id"):
        read_lines(path, "id")


def test_from_caption_files(tmp_path):
    (tmp_path / "train_caps.txt").write_text("a dog\na dog\nthe cat\n")
    (tmp_path / "dev_caps.txt").write_text("a cat\n")
    vocab = Vocabulary.from_caption_files(
        [tmp_path / "train_caps.txt", str(tmp_path / "dev_caps.txt")], threshold=2
    )
    assert vocab.words[4:] == ["a", "cat", "dog"]
    single = Vocabulary.from_caption_files(tmp_path / "train_caps.txt", threshold=2)
    assert single.words[4:] == ["a", "dog"]
    (tmp_path / "dev_caps.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match=r"dev_caps.txt, line 2"):
        Vocabulary.from_caption_files([tmp_path / "train_caps.txt", tmp_path / "dev_caps.txt"])


def test_atomic_write_replaces_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    previous = os.umask(0o022)
    try:
        atomic_write_text(path, "new ✓")
    finally:
        os.umask(previous)
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_failure_leaves_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "bad \ud800 surrogate")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
