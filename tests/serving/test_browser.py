"""The search page in a real headless Chromium (Debian's, driven by Playwright) against the real
server over a tiny gallery: search, result thumbnails, the explanation canvases and coloured
words, picture queries, and API errors shown on the page. Skipped only without Chromium or
Playwright; a screenshot of the explanation is kept under ``test-artifacts/browser/``."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from imram.config import load_config
from imram.features.extract import ExtractorConfig
from imram.retrieval import build_index
from imram.training.trainer import train
from imram.workflows.prepare import prepare_folder

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=1280",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.warmup_epochs=1",
    "train.epochs=12",
    "data.vocab_threshold=1",
]
COLOURS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 90, 214),
    "yellow": (240, 200, 30),
    "purple": (130, 60, 170),
}
SHAPES = ("circle", "square", "triangle")
QUERY = "a red circle"
TIMEOUT_MS = 60_000


def _chromium() -> str:
    """Debian's Chromium, or a skip saying why the browser test cannot run."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no chromium on PATH: install Debian's chromium (scripts/setup.sh does as root) "
        "to run the browser test"
    )


def _picture(path: Path, colour: str, shape: str, seed: int) -> None:
    """A non-square picture: one coloured shape, off centre, on a pale background."""
    width, height = 120 + 8 * (seed % 3), 90
    image = Image.new("RGB", (width, height), (235 - 4 * seed % 40, 230, 220))
    draw = ImageDraw.Draw(image)
    x, y, r = 30 + (seed * 17) % 50, 25 + (seed * 11) % 30, 22
    box = (x, y, x + 2 * r, y + 2 * r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + r, y), (x, y + 2 * r), (x + 2 * r, y + 2 * r)], fill=fill)
    image.save(path)


def _gallery(root: Path) -> Path:
    """Pillow pictures with two captions each, split by the caption file, prepared to precomp."""
    images = root / "pictures"
    images.mkdir(parents=True)
    rows = ["image,caption,split"]
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    for n in range(3 * len(combos)):  # every colour-shape pair twice in train, then held out
        colour, shape = combos[n % len(combos)]
        name = f"{colour}-{shape}-{n}.png"
        _picture(images / name, colour, shape, n)
        split = "train" if n < 2 * len(combos) else ("test" if n % 2 == 0 else "dev")
        rows += [f"{name},a {colour} {shape},{split}"]
        rows += [f"{name},a {shape} in {colour} on a pale background,{split}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    out = root / "precomp"
    config = ExtractorConfig(input_size=96, batch_size=8)  # a 3 x 3 grid of regions
    prepare_folder(images, root / "captions.csv", "csv", out, config, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The real app over a tiny VSE++ index with a tiny Full-IMRAM re-ranker, on a free port."""
    _chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import uvicorn

    from imram.serving.app import create_app

    root = tmp_path_factory.mktemp("browser")
    data = _gallery(root)
    train(load_config("vsepp", SMALL), data, root / "vsepp", device="cpu", progress=False)
    imram = root / "imram"
    train(load_config("f30k_full_imram", SMALL), data, imram, device="cpu", progress=False)
    build_index(root / "vsepp", data, "test", root / "index", device="cpu", progress=False)
    app = create_app(root / "index", rerank=imram, shortlist=8, device="cpu")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "pictures": root / "pictures"}
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def browser(server) -> Iterator[Any]:
    """Debian's headless Chromium under Playwright (no downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server) -> Iterator[Any]:
    """A fresh page on the search page, with uncaught script errors collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('health').textContent.includes('images')")
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def _api(page: Any, server: dict[str, Any], path: str, status: int = 200) -> dict[str, Any]:
    response = page.request.get(server["url"] + path)
    assert response.status == status, response.text()
    return response.json()


def test_search_explain_and_screenshot(page, server, tmp_path):
    """Text search shows the server's ranking with loaded thumbnails; a click explains it."""
    page.fill("#query", QUERY)
    page.click("#search")
    page.wait_for_selector("#results .result img")
    expected = _api(page, server, "/search/text?q=a+red+circle&k=12")["hits"]
    tiles = page.locator("#results .result")
    assert tiles.count() == len(expected) > 1
    shown = tiles.evaluate_all("ts => ts.map(t => Number(t.dataset.id))")
    assert shown == [hit["id"] for hit in expected]
    first = tiles.nth(0)
    assert first.locator(".rank").inner_text() == "#1"
    assert first.locator(".score").inner_text() == f"{expected[0]['score']:.3f}"
    assert first.locator(".name").inner_text() == expected[0]["name"]
    assert first.locator("img").get_attribute("alt") == expected[0]["name"]
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#error").is_hidden()

    first.locator("button").click()
    explained = _api(page, server, f"/explain?q=a+red+circle&image_id={expected[0]['id']}")
    steps, words = explained["steps"], explained["words"]
    assert len(steps) >= 1 and explained["grid"] == [3, 3]
    page.wait_for_selector("#explain canvas.step")
    assert page.locator("#explain").is_visible()
    assert page.locator("canvas.step").count() == len(steps)
    assert page.locator("#word option").count() == len(words) + 1

    # Every step's words are coloured by that step's scores: the best and worst differ.
    for k, step in enumerate(steps):
        chips = page.locator(f"#steps .step-figure:nth-child({k + 1}) .word")
        assert chips.all_inner_texts() == words
        colours = chips.evaluate_all("cs => cs.map(c => getComputedStyle(c).backgroundColor)")
        scores = step["word_scores"]
        assert colours[scores.index(max(scores))] != colours[scores.index(min(scores))]

    # The canvas shows the picture with a red attention overlay on the 3 x 3 grid.
    stats = page.locator("canvas.step").first.evaluate(
        """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const colours = new Set();
            let red = 0;
            for (let i = 0; i < d.length; i += 4) {
                colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
                if (d[i] > d[i + 1] + 40 && d[i] > d[i + 2] + 40) red++;
            }
            return {colours: colours.size, red: red / (d.length / 4), width: c.width};
        }"""
    )
    assert stats["width"] > 0 and stats["colours"] > 20 and stats["red"] > 0.02

    # Choosing one word redraws the canvases for that word.
    before = page.locator("canvas.step").first.evaluate("c => c.toDataURL()")
    word = max(i for i, w in enumerate(words) if w not in ("<start>", "<end>"))
    page.select_option("#word", str(word))
    page.wait_for_function(
        "w => document.querySelector('canvas.step').getAttribute('aria-label').includes(w)",
        arg=words[word],
    )
    after = page.locator("canvas.step").first.evaluate("c => c.toDataURL()")
    assert after != before
    assert page.locator("#steps .word.selected").count() == len(steps)

    shot = tmp_path / "explain.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "explain.png")


def test_picture_query_lists_captions(page, server, tmp_path):
    """A picture file sent from the page lists the server's captions for it, on a phone-sized
    screen without sideways scrolling."""
    page.set_viewport_size({"width": 390, "height": 844})
    picture = next(server["pictures"].glob("blue-square-*.png"))
    page.set_input_files("#file", str(picture))
    page.click("#search-image")
    page.wait_for_selector("#results .caption-result")
    captions = page.locator("#results .caption-result .caption").all_inner_texts()
    assert len(captions) == 12  # the page asks for its "Results" count
    assert all(isinstance(c, str) and c for c in captions)
    assert page.locator("#error").is_hidden()
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot = tmp_path / "captions-narrow.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "captions-narrow.png")


def test_api_errors_are_shown_on_the_page(page, server):
    """An empty query and an out-of-range k show the server's own error messages."""
    page.click("#search")
    page.wait_for_selector("#error", state="visible")
    message = _api(page, server, "/search/text?q=&k=12", status=400)["error"]
    assert page.locator("#error").inner_text() == message
    assert page.locator("#results .result").count() == 0

    page.fill("#query", QUERY)
    page.fill("#k", "100000")
    page.click("#search")
    expected = _api(page, server, "/search/text?q=a+red+circle&k=100000", status=400)["error"]
    page.wait_for_function("m => document.getElementById('error').textContent === m", arg=expected)
    assert "k must be" in expected

    page.fill("#k", "3")
    page.click("#search")
    page.wait_for_selector("#results .result")
    assert page.locator("#results .result").count() == 3
    assert page.locator("#error").is_hidden()
