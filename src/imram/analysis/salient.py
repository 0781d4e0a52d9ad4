"""``imram analyze salient``: which kinds of words stand out at each matching step (Table 6).

Following the paper (its section 4.5): for an image and its caption, at step k every word has
a matching score (its cosine with the regions it attends to) and the caption has their mean; a
word is *salient* at step k when its score exceeds that mean. The mean is over every token the model
averages, ``<start>`` and ``<end>`` included (with the default ``avg`` pooling it is the step
score F_k itself); markers and punctuation are never counted as words. The report gives, per
step, the share of the nouns, verbs and adjectives of the sampled pairs (each caption with its
own image) that are salient. Words are tagged offline by :mod:`imram.analysis.pos`.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from imram.analysis.plots import DISTINCT_LINES, line_chart
from imram.analysis.pos import CLASSES, word_classes
from imram.analysis.report import AnalysisReport, write_report_files
from imram.analysis.traces import TextTrace, load_text_checkpoint, text_traces
from imram.devices import default_device
from imram.errors import ConfigError

LABELS = {"NOUN": "nouns", "VERB": "verbs", "ADJ": "adjectives"}
EXAMPLES = 10
PAPER_NOTE = (
    "For reference, the paper's Table 6 (COCO, Text-IMRAM K=3; nouns / verbs / adjectives, %): "
    "k=1 99.0 / 32.0 / 35.3; k=2 99.0 / 38.8 / 37.9; k=3 99.0 / 40.2 / 39.1."
)


def salient_mask(word_scores: np.ndarray) -> np.ndarray:
    """``[K, n]`` scores of a caption's tokens → ``[K, n]`` whether each exceeds its step's mean."""
    scores = np.asarray(word_scores, dtype=np.float64)
    return scores > scores.mean(axis=1, keepdims=True)


@dataclass
class SalientCounts:
    """Per class: how many words were seen and, per step, how many of them were salient."""

    steps: int
    words: dict[str, int] = field(default_factory=dict)
    salient: dict[str, list[int]] = field(default_factory=dict)
    pairs: int = 0

    def __post_init__(self) -> None:
        for name in CLASSES:
            self.words.setdefault(name, 0)
            self.salient.setdefault(name, [0] * self.steps)

    def add(self, word_scores: np.ndarray, classes: Sequence[str | None]) -> np.ndarray:
        """Count one pair: ``[K, n]`` token scores and each token's class (None: not counted).
        Returns the ``[K, n]`` salient mask."""
        mask = salient_mask(word_scores)
        if mask.shape != (self.steps, len(classes)):
            raise ValueError(
                f"scores of shape {mask.shape} for {len(classes)} tokens and {self.steps} steps"
            )
        for i, name in enumerate(classes):
            if name is None:
                continue
            self.words[name] += 1
            for k in range(self.steps):
                self.salient[name][k] += bool(mask[k, i])
        self.pairs += 1
        return mask

    def shares(self) -> dict[str, list[float]]:
        """Percent of each class's words salient at each step (NaN for a class never seen)."""
        return {
            name: [
                100.0 * count / self.words[name] if self.words[name] else math.nan
                for count in self.salient[name]
            ]
            for name in CLASSES
        }


@dataclass(kw_only=True)
class SalientResult(AnalysisReport):
    """What ``salient_analysis`` wrote, and the counts behind it."""

    counts: SalientCounts


def markdown_table(counts: SalientCounts) -> str:
    """The paper's Table 6 layout: one row per step, the share of each class (with counts)."""
    shares = counts.shares()
    header = "| step k | " + " | ".join(f"{LABELS[c]} (%)" for c in CLASSES) + " |"
    lines = [header, "|---" * (len(CLASSES) + 1) + "|"]
    for k in range(counts.steps):
        cells = [
            f"{shares[c][k]:.1f} ({counts.salient[c][k]}/{counts.words[c]})"
            if counts.words[c]
            else "- (0 words)"
            for c in CLASSES
        ]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sample(n_captions: int, max_pairs: int | None, seed: int) -> np.ndarray:
    if max_pairs is None or max_pairs >= n_captions:
        return np.arange(n_captions)
    if max_pairs < 1:
        raise ConfigError(f"--max-pairs must be at least 1, got {max_pairs}")
    return np.sort(np.random.default_rng(seed).choice(n_captions, max_pairs, replace=False))


def salient_analysis(
    checkpoint: str | Path,
    data: str | Path,
    split: str,
    out: str | Path,
    max_pairs: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> SalientResult:
    """Count salient nouns, verbs and adjectives per step over the captions of ``split`` (each
    with its own image; ``max_pairs`` samples that many with ``seed``) and write
    ``out/report.md``, ``out/salient.json`` and ``out/salient.png``."""
    device = device or str(default_device())
    loaded = load_text_checkpoint(checkpoint, device)
    vocab = loaded.vocab
    dataset = loaded.open_split(data, split)
    chosen = _sample(dataset.num_captions, max_pairs, seed)
    by_image: dict[int, list[int]] = {}
    for j in chosen.tolist():
        by_image.setdefault(int(dataset.cap2img[j]), []).append(j)
    counts = SalientCounts(loaded.config.model.steps)
    examples: list[dict[str, Any]] = []
    bar = tqdm(by_image.items(), desc="salient", unit="img", disable=not progress)
    for image, caption_ids in bar:
        tokens = [dataset.caption_tokens(j) for j in caption_ids]
        groups = [vocab.word_groups(ids) for ids in tokens]
        traces = text_traces(loaded.model, dataset.image(image), tokens, device, groups)
        for j, trace in zip(caption_ids, traces, strict=True):
            words = vocab.tokens(dataset.captions[j])[1:-1]
            classes = [None, *word_classes(words), None]
            mask = counts.add(trace.word_scores, classes)
            if len(examples) < EXAMPLES:
                examples.append(_example(j, dataset.captions[j], words, classes, trace, mask))
    bar.close()
    out = Path(out)
    shares = counts.shares()
    plot = line_chart(
        out / "salient.png",
        list(range(1, counts.steps + 1)),
        {LABELS[c]: shares[c] for c in CLASSES},
        title="Salient words per matching step (score above the caption's mean)",
        xlabel="matching step k",
        ylabel="salient (%)",
        styles=DISTINCT_LINES,
    )
    table = markdown_table(counts)
    payload = {
        "checkpoint": str(loaded.path),
        "model": loaded.config.model.name,
        "data": str(data),
        "split": split,
        "pairs": counts.pairs,
        "caption_indices": chosen.tolist(),
        "steps": counts.steps,
        "words": counts.words,
        "salient": counts.salient,
        "shares": shares,
        "examples": examples,
    }
    argv = ["imram", "analyze", "salient", "--checkpoint", str(checkpoint), "--data", str(data)]
    argv += ["--split", split, "--out", str(out), "--seed", str(seed)]
    argv += ["--max-pairs", str(max_pairs)] if max_pairs is not None else []
    text = "\n".join(
        [
            "# imram analyze salient: salient nouns, verbs and adjectives per step (Table 6)",
            "",
            f"`{shlex.join(argv)}`",
            "",
            f"Checkpoint `{loaded.path}` (model `{loaded.config.model.name}`, text branch, "
            f"K={counts.steps}); {counts.pairs} captions of split `{split}`, each with its own "
            f"image; {counts.words['NOUN']} nouns, {counts.words['VERB']} verbs, "
            f"{counts.words['ADJ']} adjectives (Penn tags NN*, VB*, JJ* of the offline "
            "averaged-perceptron tagger). A word is salient at step k when its matching score "
            "exceeds the mean over the caption's tokens (markers included) at that step.",
            "",
            table,
            "",
            "![salient words per step](salient.png)",
            "",
            "## Examples (salient words per step)",
            "",
            *(_example_line(e) for e in examples),
            "",
            "## Notes",
            "",
            PAPER_NOTE,
        ]
    )
    written = write_report_files(out, "salient.json", payload, text)
    return SalientResult(counts=counts, table=table, plot=plot, **written)


def _example(
    index: int,
    caption: str,
    words: list[str],
    classes: list[str | None],
    trace: TextTrace,
    mask: np.ndarray,
) -> dict[str, Any]:
    """One caption's words, classes, per-step scores and salient flags (markers dropped)."""
    return {
        "caption_index": index,
        "caption": caption,
        "words": words,
        "classes": classes[1:-1],
        "word_scores": np.round(trace.word_scores[:, 1:-1], 4).tolist(),
        "salient": mask[:, 1:-1].tolist(),
    }


def _example_line(example: dict[str, Any]) -> str:
    steps = []
    for k, flags in enumerate(example["salient"]):
        picked = [
            f"{w}/{c or '-'}"
            for w, c, f in zip(example["words"], example["classes"], flags, strict=True)
            if f
        ]
        steps.append(f"step {k + 1}: {', '.join(picked) or '(none)'}")
    return f"- {example['caption']!r}: " + "; ".join(steps)
