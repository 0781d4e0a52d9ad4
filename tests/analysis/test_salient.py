"""``imram analyze salient`` and its offline POS tagger, against plain references."""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imram.analysis.plots import CHART_INCHES, DPI
from imram.analysis.pos import _SetsOnly, coarse_class, penn_tags, word_classes
from imram.analysis.salient import SalientCounts, markdown_table
from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.data import PrecompDataset, pad_captions
from imram.data.text import tokenize

GOLDEN = [
    ("a dog runs on the red grass", ["DT", "NN", "VBZ", "IN", "DT", "JJ", "NN"]),
    (
        "the little girl is holding a big balloon",
        ["DT", "JJ", "NN", "VBZ", "VBG", "DT", "JJ", "NN"],
    ),
    ("two black cats sleeping on a sofa", ["CD", "JJ", "NNS", "VBG", "IN", "DT", "NN"]),
    ("a man riding a horse", ["DT", "NN", "VBG", "DT", "NN"]),
]


@pytest.mark.parametrize(("sentence", "tags"), GOLDEN)
def test_the_tagger_runs_offline_and_tags_fixed_sentences(sentence, tags):
    assert penn_tags(sentence.split()) == tags


def test_coarse_classes():
    assert word_classes("a dog runs on the red grass".split()) == [
        None, "NOUN", "VERB", None, None, "ADJ", "NOUN"
    ]  # fmt: skip
    assert [coarse_class(t) for t in ("NNPS", "VBD", "JJS", "RB", "PRP")] == [
        "NOUN", "VERB", "ADJ", None, None
    ]  # fmt: skip
    assert word_classes([]) == []


def test_the_weights_reader_builds_nothing_but_sets():
    safe = pickle.dumps(({"bias": {"NN": 1.0}}, {"the": "DT"}, {"NN", "DT"}), protocol=2)
    weights, tagdict, classes = _SetsOnly(io.BytesIO(safe)).load()
    assert classes == {"NN", "DT"} and tagdict == {"the": "DT"}
    with pytest.raises(pickle.UnpicklingError, match="only sets"):
        _SetsOnly(io.BytesIO(pickle.dumps(np.float64(1.0)))).load()


def _reference(pairs):
    """Plain loops: per step, the words above the mean of all the caption's scores."""
    words = {"NOUN": 0, "VERB": 0, "ADJ": 0}
    salient = {name: [0, 0] for name in words}
    for scores, classes in pairs:
        for k, row in enumerate(scores):
            mean = sum(row) / len(row)
            for score, name in zip(row, classes, strict=True):
                if name is not None and score > mean:
                    salient[name][k] += 1
        for name in classes:
            if name is not None:
                words[name] += 1
    return words, salient


def test_salient_counts_match_a_plain_reference_on_hand_made_scores():
    # <start> a red dog runs <end>, then <start> cats sleep <end>; two steps each.
    pairs = [
        (
            [[0.1, 0.0, 0.5, 0.6, 0.2, 0.1], [0.1, 0.0, 0.1, 0.6, 0.4, 0.1]],
            [None, None, "ADJ", "NOUN", "VERB", None],
        ),
        ([[0.3, 0.2, 0.1, 0.3], [0.1, 0.1, 0.6, 0.1]], [None, "NOUN", "VERB", None]),
    ]
    counts = SalientCounts(2)
    for scores, classes in pairs:
        counts.add(np.array(scores), classes)
    words, salient = _reference(pairs)
    assert counts.words == words and counts.salient == salient and counts.pairs == 2
    assert words == {"NOUN": 2, "VERB": 2, "ADJ": 1}
    assert salient == {"NOUN": [1, 1], "VERB": [0, 2], "ADJ": [1, 0]}
    assert counts.shares() == {"NOUN": [50.0, 50.0], "VERB": [0.0, 100.0], "ADJ": [100.0, 0.0]}
    assert "| 2 | 50.0 (1/2) | 100.0 (2/2) | 0.0 (0/1) |" in markdown_table(counts)
    empty = SalientCounts(1)
    assert math.isnan(empty.shares()["VERB"][0]) and "- (0 words)" in markdown_table(empty)
    with pytest.raises(ValueError, match="3 tokens"):
        counts.add(np.zeros((2, 4)), [None, None, None])


def test_salient_command_counts_what_the_model_explains(text_run, toy_data, tmp_path):
    out = tmp_path / "salient"
    argv = ["analyze", "salient", "--checkpoint", str(text_run), "--data", str(toy_data)]
    argv += ["--split", "test", "--out", str(out), "--max-pairs", "30", "--seed", "3"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    payload = json.loads((out / "salient.json").read_text())
    chosen = payload["caption_indices"]
    assert payload["pairs"] == 30 and len(set(chosen)) == 30 and payload["steps"] == 2

    checkpoint = load_checkpoint(text_run)
    model, dataset = checkpoint.model, PrecompDataset(toy_data, "test", checkpoint.vocab)
    pairs = []
    with torch.no_grad():
        for j in chosen:
            tokens, lengths = pad_captions([dataset.caption_tokens(j)])
            img = model.encode_images(dataset.images([int(dataset.cap2img[j])]))
            cap = model.encode_captions(tokens, lengths)
            scores = model.explain(img, cap, lengths)["text"].fragment_scores[0, 0]
            tags = penn_tags(tokenize(dataset.captions[j]))
            classes = [None, *({"N": "NOUN", "V": "VERB", "J": "ADJ"}.get(t[0]) for t in tags)]
            pairs.append((scores.tolist(), [*classes, None]))
    words, salient = _reference(pairs)
    assert payload["words"] == words and payload["salient"] == salient
    assert words["NOUN"] >= 60  # every toy caption names two concepts
    with Image.open(out / "salient.png") as image:
        assert image.size == (round(CHART_INCHES[0] * DPI), round(CHART_INCHES[1] * DPI))
    report = (out / "report.md").read_text()
    assert "| 1 | " in report and "| 2 | " in report and "Table 6" in report


def test_salient_refuses_a_model_without_words_attending(untrained, toy_data, tmp_path, capsys):
    argv = ["analyze", "salient", "--checkpoint", str(untrained("vsepp")), "--data", str(toy_data)]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert "has no cross-attention" in capsys.readouterr().err
