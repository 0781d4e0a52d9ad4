"""Two-stage retrieval through the commands: evaluate --rerank and search --rerank, with real
tiny trained models; a shortlist of everything gives IMRAM's own ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.config import load_config
from imram.data import PrecompDataset, pad_captions
from imram.evaluation import evaluate_model
from imram.retrieval import build_index
from imram.retrieval.two_stage import two_stage_search
from imram.training.trainer import train

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=32",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.warmup_epochs=1",
    "train.epochs=2",
    "data.vocab_threshold=1",
]


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    train(load_config("member", SMALL), toy_data, root / "member", progress=False)
    train(load_config("f30k_full_imram", SMALL), toy_data, root / "imram", progress=False)
    build_index(root / "member", toy_data, "test", root / "index", progress=False)
    return root


def test_evaluate_rerank_with_every_item_equals_imram_alone(runs, toy_data, tmp_path):
    out = tmp_path / "two_stage.json"
    argv = ["evaluate", "--checkpoint", str(runs / "member"), "--data", str(toy_data)]
    argv += ["--rerank", str(runs / "imram"), "--shortlist", "3", "0", "--json", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    short, everything = json.loads(out.read_text())["results"]
    imram = load_checkpoint(runs / "imram")
    alone, _, _ = evaluate_model(imram.model, PrecompDataset(toy_data, "test", imram.vocab))
    assert everything["rsum"] == pytest.approx(alone["rsum"])
    assert everything["shortlist"] == "all" and short["shortlist"] == 3
    # R@10 cannot exceed the share of queries whose match is in a shortlist of 3.
    assert short["t2i_r10"] <= short["t2i_in_shortlist"] + 1e-9
    assert short["pairs_scored"] < everything["pairs_scored"] == 25 * 125


def test_search_rerank_of_the_whole_gallery_is_imram_ranking(runs, toy_data, capsys):
    text = "a dog and a cat"
    hits = two_stage_search(
        runs / "index", runs / "imram", text=text, k=5, shortlist=25, device="cpu"
    )
    imram = load_checkpoint(runs / "imram")
    dataset = PrecompDataset(toy_data, "test", None)
    with torch.no_grad():
        img = imram.model.encode_images(dataset.images(range(25)))
        tokens, lengths = pad_captions([imram.vocab.encode(text)])
        cap = imram.model.encode_captions(tokens, lengths)
        scores = imram.model.similarity(img, cap, lengths)[:, 0].numpy()
    expected = np.argsort(-scores, kind="stable")[:5]
    assert [h.id for h in hits] == expected.tolist()
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h.score for h in hits], scores[expected], rtol=1e-5)

    argv = ["search", "--index", str(runs / "index"), "--text", text, "--k", "2"]
    assert main([*argv, "--rerank", str(runs / "imram"), "--shortlist", "25", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in printed["hits"]] == expected[:2].tolist()
    assert main([*argv, "--rerank", str(runs / "imram"), "--shortlist", "1"]) == 2
    assert "shortlist" in capsys.readouterr().err


def test_fit_fusion_then_search_and_serve_rank_by_it(runs, toy_data, tmp_path):
    """evaluate --fit-fusion writes the pair's fusion; search and the service then rank a
    shortlist by (s1 - m1)/sd1 + w (s2 - m2)/sd2 of both models' own scores."""
    from imram.retrieval.fusion import Fusion, load_fusion
    from imram.serving.engine import SearchService

    fusion_file = tmp_path / "fusion.json"
    argv = ["evaluate", "--checkpoint", str(runs / "member"), "--data", str(toy_data)]
    argv += ["--rerank", str(runs / "imram"), "--shortlist", "10", "--fit-fusion"]
    assert main([*argv, str(fusion_file), "--no-progress"]) == 0
    member, imram = load_checkpoint(runs / "member"), load_checkpoint(runs / "imram")
    fusion = load_fusion(fusion_file, member, imram)
    saved = json.loads(fusion_file.read_text())
    rsums = saved["fitted"]["rsum_by_weight"]
    assert rsums[str(fusion.weight)] == max(rsums.values())
    # Applying the written file reproduces the fitted rsum.
    out = tmp_path / "applied.json"
    argv = ["evaluate", "--checkpoint", str(runs / "member"), "--data", str(toy_data)]
    argv += ["--rerank", str(runs / "imram"), "--shortlist", "10", "--fusion", str(fusion_file)]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    (applied,) = json.loads(out.read_text())["results"]
    assert applied["fused_given"]["rsum"] == pytest.approx(rsums[str(fusion.weight)])

    text = "a dog and a cat"
    fixed = Fusion(
        0.5,
        *[getattr(fusion, k) for k in ("first_mean", "first_std")],
        fusion.second_mean,
        fusion.second_std,
    )
    from imram.retrieval.fusion import save_fusion

    save_fusion(tmp_path / "half.json", fixed, member, imram)
    hits = two_stage_search(
        runs / "index",
        runs / "imram",
        text=text,
        k=25,
        shortlist=25,
        device="cpu",
        fusion=tmp_path / "half.json",
    )
    dataset = PrecompDataset(toy_data, "test", None)
    with torch.no_grad():
        img = imram.model.encode_images(dataset.images(range(25)))
        tokens, lengths = pad_captions([imram.vocab.encode(text)])
        second = imram.model.similarity(img, imram.model.encode_captions(tokens, lengths), lengths)[
            :, 0
        ].numpy()
        vectors = member.model.embed_images(dataset.images(range(25)))
        tokens, lengths = pad_captions([member.vocab.encode(text)])
        query = member.model.embed_captions(tokens, lengths)
        first = (vectors @ query.T)[:, 0].numpy()
    expected = fixed.combine(first, second)
    assert [h.id for h in hits] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose(
        [h.score for h in hits], np.sort(expected)[::-1], rtol=1e-4, atol=1e-4
    )
    service = SearchService(
        runs / "index",
        rerank=runs / "imram",
        shortlist=25,
        fusion=tmp_path / "half.json",
        device="cpu",
    )
    try:
        served = service.search_text(text, 25)["hits"]
        assert [h["id"] for h in served] == [h.id for h in hits]
        assert service.health()["fusion_weight"] == 0.5
    finally:
        service.close()
    # A fusion fitted for other weights is refused, naming the file.
    other = load_checkpoint(runs / "imram")
    save_fusion(tmp_path / "other.json", fixed, other, other)
    with pytest.raises(Exception, match="other.json: fitted for other first-stage weights"):
        two_stage_search(runs / "index", runs / "imram", text=text, fusion=tmp_path / "other.json")
