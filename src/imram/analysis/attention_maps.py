"""``imram analyze attention``: where each word of a caption looks at every matching step, drawn
over the picture (the paper's Figure 3), with each word's matching score per step.

The image is an image file (its features made as the data folder's ``meta.json`` records) or an
image of a split of the folder (by row index, or by its name in ``{split}_ids.txt``). Grid
features (``imram prepare``) are drawn as heat maps over the picture the network saw: the
attention over the h×w cells, upsampled bilinearly. Regions that are not a grid (detector boxes,
as in SCAN's folders) have no place in the picture, so they are drawn as bars, one per region.
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from imram.analysis.pictures import (
    extractor_config,
    network_view,
    picture_file,
    read_meta,
    region_grid,
)
from imram.analysis.plots import DPI, save_figure
from imram.analysis.report import write_report_files
from imram.analysis.traces import TextTrace, check_regions, load_text_checkpoint, text_traces
from imram.data import PrecompDataset
from imram.data.text import MARKERS
from imram.devices import default_device
from imram.errors import ConfigError, DataError
from imram.features.extract import image_features

MAX_WORDS = 12
PANEL_PX = 200
HEADER_PX = 80
WORD_COLOUR = "#1f4fd8"


@dataclass
class ImageInput:
    """An image to explain: its raw region features ``[R, D]``, the picture as the network saw
    it (``[S, S, 3]`` uint8, or None), its region grid (None: not a grid), a description, and
    its own first caption when it comes from a split; ``picture_path``: the drawn file."""

    features: torch.Tensor
    picture: np.ndarray | None
    grid: tuple[int, int] | None
    description: str
    caption: str | None = None
    note: str | None = None
    picture_path: Path | None = None


@dataclass
class AttentionResult:
    """What ``attention_maps`` wrote, and the numbers behind the figure."""

    figure: Path
    report_md: Path
    report_json: Path
    tokens: list[str]
    trace: TextTrace

    def summary(self) -> str:
        steps = ", ".join(f"{s:.3f}" for s in self.trace.step_scores)
        return (
            f"text-branch step scores F_k: {steps}\n"
            f"wrote {self.figure}, {self.report_md} and {self.report_json}"
        )


def _split_row(image: str, dataset: PrecompDataset) -> int:
    """The row of a split that ``image`` names: a decimal index, or a name in the ids file."""
    if image.isdigit():
        index = int(image)
        if index >= dataset.num_images:
            raise DataError(
                f"--image {image}: split {dataset.split!r} has images 0..{dataset.num_images - 1}"
            )
        return index
    if dataset.ids is not None and image in dataset.ids:
        return dataset.ids.index(image)
    raise DataError(
        f"--image {image!r}: not an image file, not a row index of split {dataset.split!r} "
        f"(0..{dataset.num_images - 1}), nor a name in {dataset.split}_ids.txt"
    )


def resolve_image(
    image: str, data: str | Path, split: str, img_dim: int, device: str | torch.device
) -> ImageInput:
    """``image`` as an existing file, else a row index or an id of ``split`` in ``data``."""
    path = Path(image)
    if path.is_file():
        extractor = extractor_config(data, img_dim)
        features = image_features([path], extractor, device)[0]
        picture = network_view(path, extractor)
        return ImageInput(features, picture, extractor.grid, f"file {path.name}", picture_path=path)
    dataset = PrecompDataset(data, split, None)
    index = _split_row(image, dataset)
    features = dataset.image(index)
    meta = read_meta(data)
    grid = region_grid(meta, split, dataset.num_regions)
    name = dataset.ids[index] if dataset.ids is not None else None
    description = f"{split} image {index}" + (f" ({name})" if name else "")
    caption = dataset.captions[int(np.flatnonzero(dataset.cap2img == index)[0])]
    picture, note = None, None
    file = picture_file(meta, split, index)
    if grid is not None:
        try:
            if file is None:
                raise DataError("its picture file is not on this machine")
            picture = network_view(file, extractor_config(data, dataset.feature_dim))
        except DataError as err:
            note = f"{err}: the maps are drawn on a blank square"
    return ImageInput(features, picture, grid, description, caption, note, file)


def shown_tokens(tokens: list[str], limit: int = MAX_WORDS) -> list[int]:
    """Positions of the words to draw: tokens with a letter or digit (no markers, no
    punctuation), the first ``limit``; every token when there is none."""
    words = [i for i, t in enumerate(tokens) if t not in MARKERS and any(map(str.isalnum, t))]
    return (words or list(range(len(tokens))))[:limit]


def _panel(figure: Figure, row: int, col: int, rows: int, cols: int, bars: bool) -> Axes:
    """Axes for panel (row, col) of the grid under the header, in exact pixels."""
    width, height = cols * PANEL_PX, rows * PANEL_PX + HEADER_PX
    inset_left, inset_bottom = (34, 22) if bars else (8, 8)
    left = col * PANEL_PX + inset_left
    bottom = height - HEADER_PX - (row + 1) * PANEL_PX + inset_bottom
    w = PANEL_PX - inset_left - 8
    h = PANEL_PX - inset_bottom - 26
    return figure.add_axes((left / width, bottom / height, w / width, h / height))


def _header(title: str, width_px: int) -> str:
    """The title's lines fitted to the figure's width: the first shortened to one line, the
    others wrapped onto two at most (five lines fit in ``HEADER_PX``)."""
    chars = max(30, width_px // 6)
    first, *rest = title.split("\n")
    lines = [textwrap.shorten(first, chars, placeholder=" …")]
    for line in rest:
        lines += textwrap.wrap(line, chars)[:2]
    return "\n".join(lines)


def draw_attention(
    path: str | Path,
    source: ImageInput,
    tokens: list[str],
    unknown: list[bool],
    trace: TextTrace,
    shown: list[int],
    title: str,
) -> Path:
    """The figure: one row per shown word, one column per step (after the picture itself for
    grids); each map coloured from 0 to the largest weight of its row, so that a map that
    sharpens from step to step shows it. Size: ``cols × PANEL_PX`` by ``rows × PANEL_PX +
    HEADER_PX`` pixels."""
    steps = trace.attention.shape[0]
    bars = source.grid is None
    cols = steps + (0 if bars else 1)
    rows = len(shown)
    figure = Figure(figsize=(cols * PANEL_PX / DPI, (rows * PANEL_PX + HEADER_PX) / DPI), dpi=DPI)
    header = _header(title, cols * PANEL_PX)
    figure.text(0.01, 1 - 6 / (rows * PANEL_PX + HEADER_PX), header, va="top", fontsize=8)
    picture = source.picture
    if not bars and picture is None:
        picture = np.full((224, 224, 3), 235, dtype=np.uint8)
    for r, position in enumerate(shown):
        word = tokens[position] + (" (unk)" if unknown[position] else "")
        weights = trace.attention[:, position]
        vmax = float(weights.max()) or 1.0
        if not bars:
            ax = _panel(figure, r, 0, rows, cols, bars)
            ax.imshow(picture)
            ax.set_title(word, color=WORD_COLOUR, fontsize=10, fontweight="bold")
            ax.axis("off")
        for k in range(steps):
            ax = _panel(figure, r, k + (0 if bars else 1), rows, cols, bars)
            score = trace.word_scores[k, position]
            label = f"step {k + 1}: {word} {score:.2f}" if bars else f"step {k + 1}: {score:.2f}"
            ax.set_title(label, color=WORD_COLOUR, fontsize=8)
            if bars:
                ax.bar(np.arange(weights.shape[1]), weights[k], color=WORD_COLOUR)
                ax.set_ylim(0, vmax * 1.05)
                ax.tick_params(labelsize=6)
                ax.set_xlabel("region", fontsize=6, labelpad=1)
            else:
                size = picture.shape[0]
                ax.imshow(picture)
                ax.imshow(
                    weights[k].reshape(source.grid),
                    cmap="jet",
                    alpha=0.5 if source.picture is not None else 0.85,
                    interpolation="bilinear",
                    vmin=0.0,
                    vmax=vmax,
                    extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                )
                ax.axis("off")
    return save_figure(figure, path)


def _score_table(
    tokens: list[str], unknown: list[bool], trace: TextTrace, grid: tuple[int, int] | None
) -> str:
    steps = trace.word_scores.shape[0]
    head = "| token | " + " | ".join(f"step {k + 1}" for k in range(steps)) + " |"
    lines = [head, "|---" * (steps + 1) + "|"]
    for i, token in enumerate(tokens):
        cells = []
        for k in range(steps):
            peak = int(trace.attention[k, i].argmax())
            where = f"cell {divmod(peak, grid[1])}" if grid else f"region {peak}"
            cells.append(
                f"{trace.word_scores[k, i]:.3f} ({where}: {trace.attention[k, i, peak]:.2f})"
            )
        name = f"`{token}`" + (" (unk)" if unknown[i] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_maps(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    image: str,
    caption: str | None = None,
    split: str = "test",
    device: str | None = None,
    max_words: int = MAX_WORDS,
) -> AttentionResult:
    """Draw the per-step attention of ``caption``'s words over ``image`` into ``out``:
    ``attention.png``, ``attention.json`` (every weight and score) and ``report.md``.

    ``image``: an image file, or a row index or id of ``split``; ``caption`` defaults to a
    split image's own first caption.
    """
    if max_words < 1:
        raise ConfigError(f"--max-words must be at least 1, got {max_words}")
    device = device or str(default_device())
    loaded = load_text_checkpoint(checkpoint, device)
    img_dim = loaded.config.model.img_dim
    source = resolve_image(image, data, split, img_dim, device)
    check_regions(loaded, int(source.features.shape[-1]), source.description)
    caption = caption if caption is not None else source.caption
    if caption is None or not caption.strip():
        raise ConfigError("--caption: a caption is needed (an image file has none of its own)")
    assert loaded.vocab is not None
    vocab = loaded.vocab
    ids = vocab.encode(caption)
    tokens = vocab.tokens(caption)
    unknown = vocab.unknown_words(ids)
    trace = text_traces(loaded.model, source.features, [ids], device, [vocab.word_groups(ids)])[0]
    shown = shown_tokens(tokens, max_words)
    name = loaded.config.model.name
    step_text = ", ".join(f"{s:.3f}" for s in trace.step_scores)
    title = (
        f"{caption!r}  on  {source.description}\n"
        f"model {name}, text branch (words attend over regions); step scores F_k: {step_text}\n"
        "titles: the word's matching score at each step; colour: attention, 0 to the row's max"
    )
    out = Path(out)
    figure = draw_attention(out / "attention.png", source, tokens, unknown, trace, shown, title)
    payload = {
        "checkpoint": str(loaded.path),
        "model": name,
        "image": source.description,
        "caption": caption,
        "tokens": tokens,
        "unknown": unknown,
        "grid": list(source.grid) if source.grid else None,
        "regions": int(source.features.shape[0]),
        "step_scores": trace.step_scores.tolist(),
        "word_scores": trace.word_scores.tolist(),
        "attention": trace.attention.tolist(),
        "note": source.note,
    }
    argv = ["imram", "analyze", "attention", "--checkpoint", str(checkpoint), "--data", str(data)]
    argv += ["--split", split, "--image", image, "--caption", caption, "--out", str(out)]
    layout = f"a {source.grid[0]}x{source.grid[1]} grid" if source.grid else "regions as bars"
    text = "\n".join(
        [
            "# imram analyze attention: words attending over the image, step by step",
            "",
            f"`{shlex.join(argv)}`",
            "",
            f"Checkpoint `{loaded.path}` (model `{name}`, K={trace.step_scores.shape[0]}); "
            f"image: {source.description} ({source.features.shape[0]} regions, {layout}"
            + (f"; picture `{source.picture_path}`" if source.picture_path else "")
            + f"); caption {caption!r}.",
            *([f"Note: {source.note}."] if source.note else []),
            "",
            f"Text-branch step scores F_k (mean over the tokens, markers included): {step_text}; "
            f"their sum {float(trace.step_scores.sum()):.3f}.",
            "",
            "Each token's matching score per step (its cosine with its attended regions), and "
            "where its attention peaks ((row, col) of the grid, or the region):",
            "",
            _score_table(tokens, unknown, trace, source.grid),
            "",
            "![attention per step](attention.png)",
        ]
    )
    written = write_report_files(out, "attention.json", payload, text)
    return AttentionResult(figure=figure, tokens=tokens, trace=trace, **written)
