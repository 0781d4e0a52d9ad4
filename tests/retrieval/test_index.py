"""FAISS indexes: built from a tiny trained VSE++, searched, checked against brute force, and
refused when corrupt, mismatched or built from a model that has no single vectors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imram.checkpoint import load_checkpoint, save_checkpoint
from imram.cli import main
from imram.config import load_config
from imram.data import PrecompDataset, Vocabulary, pad_captions
from imram.errors import ConfigError, DataError
from imram.features.extract import ExtractorConfig
from imram.models import build_model
from imram.retrieval import (
    FORMAT,
    GalleryIndex,
    Hit,
    build_index,
    checkpoint_weights,
    default_nlist,
    load_index,
)
from imram.training.trainer import train
from imram.workflows.prepare import prepare_folder

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
TEXTS = ["a dog and a cat", "the horse near the boat", "bird", "a photo of a tree and a bike"]
KS = [1, 5, 25, 1000]


@pytest.fixture(scope="module")
def run(toy_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "vsepp"
    train(load_config("vsepp", SMALL), toy_data, out, progress=False)
    return out


@pytest.fixture(scope="module")
def flat(run, toy_data) -> Path:
    out = run.parent / "flat"
    build_index(run, toy_data, "test", out, batch_size=16, progress=False)
    return out


@pytest.fixture(scope="module")
def ivf(run, toy_data) -> Path:
    out = run.parent / "ivf"
    build_index(run, toy_data, "test", out, kind="ivf", batch_size=16, progress=False)
    return out


@pytest.fixture(scope="module")
def truth(run, toy_data) -> dict:
    """The model's own embeddings of the test split, computed without the index."""
    checkpoint = load_checkpoint(run)
    dataset = PrecompDataset(toy_data, "test", checkpoint.vocab)
    model = checkpoint.model
    with torch.no_grad():
        images = model.embed_images(dataset.images(range(dataset.num_images))).numpy()
        tokens, lengths = pad_captions([dataset.caption_tokens(j) for j in range(len(dataset))])
        captions = model.embed_captions(tokens, lengths).numpy()
    return {"images": images, "captions": captions, "checkpoint": checkpoint, "data": dataset}


def _embed_text(checkpoint, text: str) -> np.ndarray:
    tokens, lengths = pad_captions([checkpoint.vocab.encode(text)])
    with torch.no_grad():
        return checkpoint.model.embed_captions(tokens, lengths).numpy()[0]


def _check_hits(hits: list[Hit], scores: np.ndarray, k: int, names: list[str]) -> None:
    """``hits`` are the brute-force top k of ``scores``: same scores, same ids outside ties."""
    expected = min(k, len(scores))
    order = np.argsort(-scores, kind="stable")
    assert [hit.rank for hit in hits] == list(range(1, expected + 1))
    assert len({hit.id for hit in hits}) == expected
    got = np.array([hit.score for hit in hits])
    np.testing.assert_allclose(got, scores[order[:expected]], rtol=0, atol=1e-5)
    for hit, best in zip(hits, order, strict=False):
        assert hit.score == pytest.approx(float(scores[hit.id]), abs=1e-5)
        assert hit.name == names[hit.id]
        if np.sum(np.abs(scores - scores[best]) <= 1e-5) == 1:
            assert hit.id == best


def test_round_trip_stores_the_models_embeddings(flat, run, toy_data, truth):
    gallery = load_index(flat)
    assert isinstance(gallery, GalleryIndex)
    assert (gallery.num_images, gallery.num_captions, gallery.dim) == (25, 125, 32)
    np.testing.assert_allclose(gallery.image_vectors(), truth["images"], atol=1e-6)
    np.testing.assert_allclose(gallery.caption_vectors(), truth["captions"], atol=1e-6)
    assert gallery.captions == truth["data"].captions
    assert gallery.image_names == [str(i) for i in range(25)]
    assert gallery.cap2img.tolist() == truth["data"].cap2img.tolist()
    meta = json.loads((flat / "index.json").read_text())
    assert meta["format"] == FORMAT and meta["model"] == "vsepp" and meta["kind"] == "flat"
    assert meta["checkpoint"]["path"] == str((run / "best").resolve())
    assert meta["checkpoint"]["weights_sha256"] == checkpoint_weights(run)[1]
    assert meta["data"] == {"root": str(toy_data.resolve()), "split": "test", "extractor": None}
    assert sorted(p.name for p in flat.iterdir()) == [
        "captions.faiss",
        "images.faiss",
        "index.json",
    ]
    assert not list(flat.parent.glob(".flat.*"))


@pytest.mark.parametrize("k", KS)
def test_search_equals_brute_force(flat, truth, k):
    gallery = load_index(flat)
    images, captions = truth["images"], truth["captions"]
    for text in TEXTS:
        query = _embed_text(truth["checkpoint"], text)
        _check_hits(gallery.search_text(text, k), images @ query, k, gallery.image_names)
    for i in (0, 7, 24):
        _check_hits(gallery.search_image_id(i, k), captions @ images[i], k, gallery.captions)
    for j in (0, 13, 124):
        _check_hits(gallery.search_caption_id(j, k), images @ captions[j], k, gallery.image_names)


def test_ivf_probing_every_list_equals_exact_search(flat, ivf, truth):
    exact, approx = load_index(flat), load_index(ivf)
    assert approx.nlist == {"images": default_nlist(25), "captions": default_nlist(125)}
    assert approx.nprobe == {"images": 3, "captions": 6}
    np.testing.assert_allclose(approx.image_vectors(), truth["images"], atol=1e-6)
    every = max(approx.nlist.values())
    for k in (1, 5, 30):
        for text in TEXTS:
            a, b = exact.search_text(text, k), approx.search_text(text, k, nprobe=every)
            assert [h.id for h in a] == [h.id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        for i in (0, 24):
            a, b = exact.search_image_id(i, k), approx.search_image_id(i, k, nprobe=every)
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    scores = truth["images"] @ _embed_text(truth["checkpoint"], TEXTS[0])
    for hit in approx.search_text(TEXTS[0], 5):  # fewer lists: exact scores, maybe other items
        assert hit.score == pytest.approx(float(scores[hit.id]), abs=1e-5)


def test_ivf_options_are_checked(run, toy_data, tmp_path):
    out = tmp_path / "ivf"
    with pytest.raises(ConfigError, match="nlist=26 exceeds the 25 images"):
        build_index(run, toy_data, "test", out, kind="ivf", nlist=26, progress=False)
    with pytest.raises(ConfigError, match="kind 'ivf' only"):
        build_index(run, toy_data, "test", out, nlist=4, progress=False)
    with pytest.raises(ConfigError, match="unknown; valid: flat, ivf"):
        build_index(run, toy_data, "test", out, kind="hnsw", progress=False)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        build_index(run, toy_data, "test", out, batch_size=0, progress=False)
    info = build_index(run, toy_data, "test", out, kind="ivf", nlist=5, nprobe=2, progress=False)
    assert info.nlist == {"images": 5, "captions": 5} and info.nprobe == {
        "images": 2,
        "captions": 2,
    }
    assert "nlist 5, nprobe 2" in info.summary()
    assert not list(tmp_path.glob(".ivf.*"))


def _copy(index: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(index, tmp_path / "copy"))


def _edit_meta(index: Path, edit) -> None:
    meta = json.loads((index / "index.json").read_text())
    edit(meta)
    (index / "index.json").write_text(json.dumps(meta))


def test_flipped_bytes_are_refused(flat, tmp_path):
    index = _copy(flat, tmp_path)
    data = bytearray((index / "images.faiss").read_bytes())
    data[-20] ^= 0xFF
    (index / "images.faiss").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images\.faiss: contents do not match the SHA-256"):
        load_index(index)


def test_truncated_file_is_refused(flat, tmp_path):
    index = _copy(flat, tmp_path)
    data = (index / "captions.faiss").read_bytes()
    (index / "captions.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"captions\.faiss: \d+ bytes, index\.json says \d+"):
        load_index(index)
    (index / "captions.faiss").unlink()
    with pytest.raises(DataError, match=r"captions\.faiss: missing from the index"):
        load_index(index)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["images"].update(count=24), "'images.names' has 25 entries but"),
        (lambda m: m["captions"].update(count=124), "'captions.texts' has 125 entries but"),
        (lambda m: m["images"].update(names=[], count=0), "'images.count' must be at least 1"),
        (lambda m: m.update(dim=16), r"images\.faiss: holds 32-d vectors, index\.json says 16-d"),
        (lambda m: m.update(format="imram-index/2"), "format 'imram-index/2', this imram reads"),
        (lambda m: m.update(format="other"), "not an imram index"),
        (lambda m: m["captions"].pop("cap2img"), "field 'captions.cap2img' is missing"),
        (lambda m: m["captions"]["cap2img"].__setitem__(3, 99), r"cap2img'\[3\] = 99"),
        (lambda m: m["images"].update(file="../x"), "'images.file' must be 'images.faiss'"),
        (lambda m: m.update(kind="ivf"), "an IVF index needs"),
    ],
)
def test_edited_metadata_is_refused(flat, tmp_path, edit, message):
    index = _copy(flat, tmp_path)
    _edit_meta(index, edit)
    with pytest.raises(DataError, match=message):
        load_index(index)


def test_unreadable_metadata_and_missing_index(flat, tmp_path):
    index = _copy(flat, tmp_path)
    (index / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"index\.json: unreadable index metadata"):
        load_index(index)
    with pytest.raises(DataError, match="no index here"):
        load_index(tmp_path / "nothing")


def _perturbed(run: Path, out: Path) -> Path:
    checkpoint = load_checkpoint(run)
    with torch.no_grad():
        checkpoint.model.image_encoder.fc.bias.add_(0.01)
    save_checkpoint(out, checkpoint.model, checkpoint.config, checkpoint.vocab)
    return out


def test_a_different_checkpoint_is_refused(flat, run, toy_data, tmp_path):
    other = _perturbed(run, tmp_path / "other")
    with pytest.raises(DataError, match="other weights") as caught:
        load_index(flat, checkpoint=other)
    assert str((run / "best").resolve()) in str(caught.value) and str(other) in str(caught.value)
    moved = Path(shutil.copytree(run / "best", tmp_path / "ckpt"))
    index = tmp_path / "index"
    build_index(moved, toy_data, "test", index, progress=False)
    _perturbed(run, moved)  # retrained in place: the stored path now has other weights
    with pytest.raises(DataError, match="other weights"):
        load_index(index)
    shutil.rmtree(moved)
    with pytest.raises(DataError, match="is not there; pass the checkpoint"):
        load_index(index)
    assert load_index(index, checkpoint=run).num_images == 25  # the same weights, elsewhere


def test_a_model_of_another_dimension_is_refused(run, flat, tmp_path):
    checkpoint = load_checkpoint(run)
    config = load_config("vsepp", [*SMALL, "model.embed_dim=16"])
    config = replace(config, model=replace(config.model, vocab_size=len(checkpoint.vocab)))
    path = save_checkpoint(tmp_path / "d16", build_model(config.model), config, checkpoint.vocab)
    with pytest.raises(DataError, match="other weights"):
        load_index(flat, checkpoint=path)


def test_imram_checkpoint_is_refused(run, toy_data, tmp_path):
    vocab = load_checkpoint(run).vocab
    config = load_config("f30k_full_imram", SMALL)
    config = replace(config, model=replace(config.model, vocab_size=len(vocab)))
    path = save_checkpoint(tmp_path / "imram", build_model(config.model), config, vocab)
    with pytest.raises(ConfigError, match="embedding model such as vsepp or member") as caught:
        build_index(path, toy_data, "test", tmp_path / "index", progress=False)
    assert "IMRAM re-ranks a shortlist" in str(caught.value)
    assert not (tmp_path / "index").exists()


def test_overwrite_semantics(run, toy_data, tmp_path):
    out = tmp_path / "index"
    build_index(run, toy_data, "test", out, progress=False)
    first = (out / "index.json").read_text()
    with pytest.raises(DataError, match="already holds an index"):
        build_index(run, toy_data, "dev", out, progress=False)
    assert (out / "index.json").read_text() == first
    build_index(run, toy_data, "dev", out, progress=False, overwrite=True)
    assert load_index(out).meta["data"]["split"] == "dev"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary left over
    (tmp_path / "file").write_text("precious")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("precious")
    for target in ("file", "folder"):
        with pytest.raises(DataError, match="exists and is not an imram index"):
            build_index(run, toy_data, "test", tmp_path / target, progress=False, overwrite=True)
    assert (tmp_path / "folder" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    build_index(run, toy_data, "test", tmp_path / "empty", progress=False)
    assert load_index(tmp_path / "empty").num_captions == 125


def test_bad_queries_are_refused(flat):
    gallery = load_index(flat)
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        gallery.search_text("a dog", 0)
    with pytest.raises(ConfigError, match="query text is empty"):
        gallery.search_text("  ", 3)
    with pytest.raises(DataError, match=r"image id 25 is outside \[0, 25\)"):
        gallery.search_image_id(25, 3)
    with pytest.raises(DataError, match=r"caption id -1 is outside \[0, 125\)"):
        gallery.search_caption_id(-1, 3)
    with pytest.raises(DataError, match="no extractor entry"):
        gallery.search_image(flat / "index.json", 3)


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_builds_and_searches(run, toy_data, tmp_path, capsys):
    out = str(tmp_path / "index")
    build = ["index", "build", "--checkpoint", str(run), "--data", str(toy_data)]
    build += ["--split", "test", "--out", out, "--no-progress"]
    assert main(build) == 0
    assert "25 images and 125 captions" in capsys.readouterr().out
    top = load_index(out).search_text(TEXTS[1], 3)
    assert main(["search", "--index", out, "--text", TEXTS[1], "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[2].split() == ["1", f"{top[0].score:.4f}", top[0].name]
    assert main(["search", "--index", out, "--text", TEXTS[1], "--k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in payload["hits"]] == [h.id for h in top]
    assert payload["query"] == {"text": TEXTS[1]}
    _one_line_error(capsys, build, "already holds an index")
    _one_line_error(capsys, ["search", "--index", out, "--text", "dog", "--k", "0"], "k must be")
    missing = str(tmp_path / "none")
    _one_line_error(capsys, ["search", "--index", missing, "--text", "dog"], "no index here")
    image = ["search", "--index", out, "--image", str(tmp_path / "x.png")]
    _one_line_error(capsys, image, "no extractor entry")
    other = str(_perturbed(run, tmp_path / "other"))
    _one_line_error(
        capsys, ["search", "--index", out, "--text", "dog", "--checkpoint", other], "other weights"
    )


def _prepared(tmp_path: Path) -> Path:
    """A real precomp folder (meta.json with the extractor) of six tiny noise pictures."""
    images = tmp_path / "pictures"
    images.mkdir()
    rows = ["image,caption,split"]
    for n in range(6):
        pixels = np.random.default_rng(n).integers(0, 256, (24 + n, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"p{n}.png")
        split = "train" if n < 3 else "test"
        rows += [f"p{n}.png,picture number {n},{split}", f"p{n}.png,noise {n} in colour,{split}"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "precomp"
    prepare_folder(
        images,
        tmp_path / "captions.csv",
        "csv",
        out,
        ExtractorConfig(input_size=32),
        progress=False,
        device="cpu",
    )
    return out


def test_image_queries_embed_files_like_the_gallery(tmp_path, capsys):
    data = _prepared(tmp_path)
    vocab = Vocabulary.build(PrecompDataset(data, "train", None).captions, 1)
    config = load_config("vsepp", ["model.img_dim=1280", "model.embed_dim=16"])
    config = replace(config, model=replace(config.model, vocab_size=len(vocab), word_dim=8))
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ckpt", build_model(config.model), config, vocab)
    out = tmp_path / "index"
    build_index(path, data, "test", out, progress=False, device="cpu")
    gallery = load_index(out, device="cpu")
    assert gallery.image_names == ["p3.png", "p4.png", "p5.png"]
    assert gallery.extractor == json.loads((data / "meta.json").read_text())["extractor"]
    images, captions = gallery.image_vectors(), gallery.caption_vectors()
    for i, name in enumerate(gallery.image_names):
        file = tmp_path / "pictures" / name
        np.testing.assert_allclose(gallery.embed_image_file(file), images[i], atol=1e-4)
        for k in (1, 4, 10):
            _check_hits(gallery.search_image(file, k), captions @ images[i], k, gallery.captions)
    argv = ["search", "--index", str(out), "--image", str(tmp_path / "pictures" / "p4.png")]
    assert main([*argv, "--k", "2", "--device", "cpu"]) == 0
    top = gallery.search_image(tmp_path / "pictures" / "p4.png", 1)[0]
    assert top.name in capsys.readouterr().out
    (tmp_path / "bad.png").write_text("not a picture")
    argv = ["search", "--index", str(out), "--image", str(tmp_path / "bad.png")]
    _one_line_error(capsys, argv, "bad.png: not an image")
