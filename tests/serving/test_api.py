"""The search service over real HTTP: uvicorn serves tiny trained models on 127.0.0.1, and every
answer, good or refused, is checked as a client sees it."""

from __future__ import annotations

import http.client
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw

from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.config import load_config
from imram.data import PrecompDataset, pad_captions
from imram.features.extract import ExtractorConfig
from imram.retrieval import build_index, load_index
from imram.retrieval.two_stage import rerank_hits
from imram.serving import Limits, create_app
from imram.serving.app import STATIC, bind, url_of
from imram.training.trainer import train
from imram.workflows.prepare import prepare_folder

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=1280",
    "train.batch_size=8",
    "train.lr=2e-3",
    "train.warmup_epochs=1",
    "train.epochs=1",
    "data.vocab_threshold=1",
]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "circle", "triangle")
SHORTLIST = 4
TEXT = "a red circle"


def _draw(path: Path, colour: tuple[int, int, int], shape: str, size: int) -> None:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(size // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    image.save(path)


def _precomp(root: Path) -> Path:
    """A real precomp folder (meta.json with files and the extractor) of 18 drawn pictures."""
    pictures = root / "pictures"
    pictures.mkdir()
    rows = ["image,caption,split"]
    n = 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for size in (48, 64):
                name = f"{colour}_{shape}_{size}.png"
                _draw(pictures / name, rgb, shape, size)
                split = ("train", "train", "dev", "test", "test", "train")[n % 6]
                rows += [
                    f"{name},a {colour} {shape},{split}",
                    f"{name},{shape} in {colour},{split}",
                ]
                n += 1
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    out = root / "precomp"
    config = ExtractorConfig(input_size=64)
    prepare_folder(
        pictures, root / "captions.csv", "csv", out, config, progress=False, device="cpu"
    )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    data = _precomp(root)
    torch.manual_seed(0)
    train(load_config("member", SMALL), data, root / "member", progress=False, device="cpu")
    train(load_config("f30k_full_imram", SMALL), data, root / "imram", progress=False, device="cpu")
    build_index(root / "member", data, "test", root / "index", progress=False, device="cpu")
    bare = root / "bare"  # the same data, but its meta.json predates the files entry
    bare.mkdir()
    for file in data.iterdir():
        (bare / file.name).write_bytes(file.read_bytes())
    meta = json.loads((data / "meta.json").read_text())
    for split in meta["splits"].values():
        del split["files"]
    (bare / "meta.json").write_text(json.dumps(meta))
    build_index(root / "member", bare, "test", root / "bare_index", progress=False, device="cpu")
    files = json.loads((data / "meta.json").read_text())["splits"]["test"]["files"]
    assert len(files) == 6
    return {"root": root, "data": data, "files": [Path(f) for f in files]}


@contextmanager
def _running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def rerank_app(setup) -> FastAPI:
    return create_app(
        setup["root"] / "index", rerank=setup["root"] / "imram", shortlist=SHORTLIST, device="cpu"
    )


@pytest.fixture(scope="module")
def rerank_url(rerank_app) -> Iterator[str]:
    with _running(rerank_app) as url:
        yield url


@pytest.fixture(scope="module")
def plain_url(setup) -> Iterator[str]:
    with _running(create_app(setup["root"] / "bare_index", device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as session:
        yield session


def _hits(hits) -> list[dict]:
    return [{"rank": h.rank, "id": h.id, "score": pytest.approx(h.score, abs=1e-5)} for h in hits]


def _picked(answer: dict) -> list[dict]:
    return [{key: hit[key] for key in ("rank", "id", "score")} for hit in answer["hits"]]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` pixels, with no real image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_health_reports_what_is_loaded(rerank_url, plain_url, client):
    answer = client.get(f"{rerank_url}/health").json()
    assert answer["status"] == "ok" and (answer["images"], answer["captions"]) == (6, 12)
    assert answer["model"] == "member" and answer["rerank"] == "imram_full"
    assert answer["image_search"] and answer["image_files"] and answer["explain"]
    assert answer["limits"] == vars(Limits())
    plain = client.get(f"{plain_url}/health").json()
    assert plain["rerank"] is None and not plain["explain"] and not plain["image_files"]


def test_text_search_equals_the_index_and_the_reranker(setup, rerank_url, plain_url, client):
    gallery = load_index(setup["root"] / "bare_index", device="cpu")
    for k in (1, 3, 100):
        answer = client.get(f"{plain_url}/search/text", params={"q": TEXT, "k": k}).json()
        assert answer["query"] == TEXT and not answer["reranked"]
        assert _picked(answer) == _hits(gallery.search_text(TEXT, k))
        assert all(hit["image_url"] == f"/images/{hit['id']}" for hit in answer["hits"])
        assert [h["name"] for h in answer["hits"]] == [
            gallery.image_names[h["id"]] for h in answer["hits"]
        ]
    gallery = load_index(setup["root"] / "index", device="cpu")
    reranker = load_checkpoint(setup["root"] / "imram")
    shortlist = gallery.search_text(TEXT, SHORTLIST)
    expected = rerank_hits(gallery, shortlist, reranker, text=TEXT, device="cpu")
    answer = client.get(f"{rerank_url}/search/text", params={"q": TEXT, "k": 2}).json()
    assert answer["reranked"] and _picked(answer) == _hits(expected[:2])
    answer = client.get(f"{rerank_url}/search/text", params={"q": TEXT, "k": 6}).json()
    everything = rerank_hits(gallery, gallery.search_text(TEXT, 6), reranker, text=TEXT)
    assert _picked(answer) == _hits(everything)  # k above the shortlist re-ranks k items


def test_concurrent_text_searches_agree(rerank_url, client):
    queries = ["a red circle", "blue square", "triangle in green", "a green circle"] * 3

    def ask(q: str) -> list[dict]:
        with httpx.Client(timeout=30) as own:
            return own.get(f"{rerank_url}/search/text", params={"q": q, "k": 3}).json()["hits"]

    alone = {q: ask(q) for q in set(queries)}
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, queries))
    assert together == [alone[q] for q in queries]


def test_image_upload_finds_captions(setup, rerank_url, plain_url, client):
    picture = setup["files"][0]
    gallery = load_index(setup["root"] / "bare_index", device="cpu")
    files = {"file": ("query.png", picture.read_bytes(), "image/png")}
    answer = client.post(f"{plain_url}/search/image", params={"k": 5}, files=files).json()
    assert _picked(answer) == _hits(gallery.search_image(picture, 5))
    cap2img = gallery.cap2img
    assert all(h["image_url"] == f"/images/{cap2img[h['id']]}" for h in answer["hits"])
    gallery = load_index(setup["root"] / "index", device="cpu")
    reranker = load_checkpoint(setup["root"] / "imram")
    shortlist = gallery.search_image(picture, SHORTLIST)
    expected = rerank_hits(gallery, shortlist, reranker, image=picture, device="cpu")
    answer = client.post(f"{rerank_url}/search/image", params={"k": 3}, files=files).json()
    assert answer["reranked"] and _picked(answer) == _hits(expected[:3])
    assert [h["name"] for h in answer["hits"]] == [h.name for h in expected[:3]]


def test_explain_traces_words_over_regions(setup, rerank_url, client):
    image = 2
    answer = client.get(f"{rerank_url}/explain", params={"q": TEXT, "image_id": image}).json()
    reranker = load_checkpoint(setup["root"] / "imram")
    ids = reranker.vocab.encode(TEXT)
    assert (
        answer["words"] == reranker.vocab.decode(ids) == ["<start>", "a", "red", "circle", "<end>"]
    )
    assert answer["tokens"] == answer["words"] and answer["markers"] == "included"
    assert answer["grid"] == [2, 2] and answer["regions"] == 4
    features = PrecompDataset(setup["data"], "test", None).images([image])
    tokens, lengths = pad_captions([ids])
    with torch.no_grad():
        img = reranker.model.encode_images(features)
        cap = reranker.model.encode_captions(tokens, lengths)
        traces = reranker.model.explain(img, cap, lengths)
        total = float(reranker.model.similarity(img, cap, lengths)[0, 0])
    text = traces["text"]
    assert len(answer["steps"]) == text.step_scores.shape[-1] == 3
    for k, step in enumerate(answer["steps"]):
        attention = np.array(step["attention"])
        assert attention.shape == (5, 4)
        np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(attention, text.attention[k][0, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(step["word_scores"], text.fragment_scores[0, 0, k], atol=1e-5)
        assert step["step_score"] == pytest.approx(float(text.step_scores[0, 0, k]), abs=1e-5)
    image_steps = answer["image_branch"]["steps"]
    assert np.array(image_steps[0]["attention"]).shape == (4, 5)
    assert answer["score"] == pytest.approx(total, abs=1e-5)
    assert sum(answer["branch_scores"].values()) == pytest.approx(total, abs=1e-5)
    hits = client.get(f"{rerank_url}/search/text", params={"q": TEXT, "k": 6}).json()["hits"]
    assert next(h["score"] for h in hits if h["id"] == image) == pytest.approx(total, abs=1e-5)
    odd = client.get(f"{rerank_url}/explain", params={"q": "A red Zebra!", "image_id": 0}).json()
    assert odd["tokens"] == ["<start>", "a", "red", "zebra", "!", "<end>"]
    assert odd["words"] == ["<start>", "a", "red", "<unk>", "<unk>", "<end>"]
    assert np.array(odd["steps"][0]["attention"]).shape == (6, 4)


def test_images_by_id_are_the_gallery_files(setup, rerank_url, plain_url, client):
    for i, path in enumerate(setup["files"]):
        response = client.get(f"{rerank_url}/images/{i}")
        assert response.status_code == 200 and response.content == path.read_bytes()
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"
    response = client.get(f"{plain_url}/images/0")
    assert response.status_code == 404
    assert response.json() == {"error": "this gallery has no image files recorded"}


def test_page_is_served_once_written(rerank_url, client):
    if not (STATIC / "index.html").is_file():
        pytest.skip("the web page is not written yet")
    response = client.get(f"{rerank_url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")


def _chunked_upload(total: int) -> Iterator[bytes]:
    """A multipart body of ``total`` zero bytes sent without Content-Length (chunked)."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    for _ in range(total // (1 << 20)):
        yield b"\0" * (1 << 20)
    yield b"\r\n--b--\r\n"


def _raw_get(url: str, path: str) -> tuple[int, dict]:
    """GET a path exactly as written (no client-side normalisation of ``..``)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_every_bad_request_is_a_json_4xx_and_the_server_keeps_serving(
    setup, rerank_app, rerank_url, plain_url, client
):
    long = "a" * 201
    picture = setup["files"][0].read_bytes()
    text, image, explain = (
        f"{rerank_url}{p}" for p in ("/search/text", "/search/image", "/explain")
    )

    def upload(body: bytes, name: str = "file", **params) -> httpx.Response:
        files = {name: ("x.png", body, "image/png")}
        return client.post(image, params={"k": 3, **params}, files=files)

    cases = [
        (lambda: client.get(text, params={"q": ""}), 400, "empty"),
        (lambda: client.get(text, params={"q": "   "}), 400, "empty"),
        (lambda: client.get(text, params={"q": long}), 400, "201 characters"),
        (lambda: client.get(text, params={"q": "dog", "k": 0}), 400, "between 1 and 100"),
        (lambda: client.get(text, params={"q": "dog", "k": 101}), 400, "between 1 and 100"),
        (lambda: client.get(text, params={"q": "dog", "k": -1}), 400, "between 1 and 100"),
        (lambda: client.get(text, params={"q": "dog", "k": "x"}), 400, "parameter 'k'"),
        (lambda: client.get(text, params={"q": "dog", "k": "1.5"}), 400, "parameter 'k'"),
        (lambda: client.get(text, params={"q": "dog", "k": "9" * 40}), 400, "between"),
        (lambda: client.get(text), 400, "missing query parameter 'q'"),
        (lambda: client.get(f"{rerank_url}/images/6"), 404, "no image 6"),
        (lambda: client.get(f"{rerank_url}/images/99999999999"), 404, "no image"),
        (lambda: client.get(f"{rerank_url}/images/{'9' * 40}"), 404, "no image 99999999999"),
        (lambda: client.get(f"{rerank_url}/images/-1"), 400, "non-negative"),
        (lambda: client.get(f"{rerank_url}/images/1.0"), 400, "non-negative"),
        (lambda: client.get(f"{rerank_url}/images/0x1"), 400, "non-negative"),
        (lambda: client.get(f"{rerank_url}/images/%C2%B9"), 400, "non-negative"),
        (lambda: client.get(f"{rerank_url}/images/%2e%2e"), 400, "non-negative"),
        (lambda: client.get(f"{rerank_url}/images/..%2F..%2Fetc%2Fpasswd"), 404, "endpoint"),
        (lambda: client.get(f"{rerank_url}/images/%2Fetc%2Fpasswd"), 404, "endpoint"),
        (lambda: client.get(explain, params={"q": TEXT}), 400, "parameter 'image_id'"),
        (lambda: client.get(explain, params={"image_id": 0}), 400, "parameter 'q'"),
        (lambda: client.get(explain, params={"q": TEXT, "image_id": 6}), 404, "no image 6"),
        (lambda: client.get(explain, params={"q": TEXT, "image_id": "x"}), 400, "integer"),
        (lambda: client.get(explain, params={"q": long, "image_id": 0}), 400, "characters"),
        (
            lambda: client.get(f"{plain_url}/explain", params={"q": TEXT, "image_id": 0}),
            400,
            "cross-attention",
        ),
        (lambda: upload(b"\0" * (8 * 1024 * 1024 + 1)), 413, "larger than the limit"),
        (
            lambda: client.post(
                image,
                content=_chunked_upload(9 << 20),
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
            413,
            "larger than the limit",
        ),
        (lambda: upload(b"just some text, not a picture"), 415, "not an image"),
        (lambda: upload(b""), 400, "empty"),
        (lambda: upload(_png_header(100_000, 100_000)), 413, "pixels"),
        (lambda: upload(_png_header(7_000, 7_000)), 413, "more than the limit"),
        (lambda: upload(picture[:120]), 400, "cannot use the image"),
        (lambda: upload(picture, name="other"), 400, "no file field 'file'"),
        (lambda: upload(picture, k=0), 400, "between 1 and 100"),
        (
            lambda: client.post(image, content=picture, headers={"content-type": "image/png"}),
            415,
            "multipart/form-data",
        ),
        (lambda: client.post(image, data={"file": "not a file"}), 415, "multipart"),
        (lambda: client.get(f"{rerank_url}/no/such/route"), 404, "no such endpoint"),
        (lambda: client.delete(f"{rerank_url}/health"), 405, "Method Not Allowed"),
        (lambda: client.get(f"{rerank_url}/static/missing.js"), 404, ""),
    ]
    for number, (call, status, words) in enumerate(cases):
        response = call()
        assert (number, response.status_code) == (number, status), response.text
        assert response.headers["content-type"] == "application/json", number
        assert words in response.json()["error"], (number, response.json())
        assert client.get(f"{rerank_url}/health").status_code == 200
    for path in ("/images/../../etc/passwd", "/images/..%2f..%2fetc%2fpasswd", "/../etc/passwd"):
        status, answer = _raw_get(rerank_url, path)
        assert status in (400, 404) and "error" in answer and "root:" not in json.dumps(answer)
        assert client.get(f"{rerank_url}/health").status_code == 200
    ok = client.get(text, params={"q": "a" * 200, "k": 100})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 6
    assert not any(rerank_app.state.uploads.iterdir())  # every upload was removed


def test_serve_command_refuses_a_missing_index_and_warns_off_loopback(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "none"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no index here" in err and "warning" not in err
    argv = ["serve", "--index", str(tmp_path / "none"), "--host", "0.0.0.0", "--port", "70000"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and "no index here" in err
