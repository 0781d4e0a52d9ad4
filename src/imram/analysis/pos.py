"""Part-of-speech tags that work offline: nouns, verbs and adjectives for ``analyze salient``.

The tagger is NLTK's greedy averaged perceptron (Honnibal's design, Penn Treebank tags, about
97% accurate on WSJ text) with trained weights that install from PyPI: the wheel
``textblob-aptagger`` (MIT) carries them as ``textblob_aptagger/trontagger-0.1.0.pickle``,
the model NLTK's own ``averaged_perceptron_tagger`` data was made from. NLTK's tagger code reads
them here, so nothing is downloaded at run time (``nltk.pos_tag`` needs the
``averaged_perceptron_tagger_eng`` resource of nltk_data, which its downloader fetches from
GitHub). The file is a pickle of ``(weights, tag dictionary, classes)``: it is read with an
unpickler that can build nothing but sets, so it cannot run code. spaCy was the other candidate;
its English models (``en-core-web-sm``) are not on PyPI.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from nltk.tag.perceptron import PerceptronTagger

from imram.errors import ConfigError, DataError

WEIGHTS_PACKAGE = "textblob-aptagger"
WEIGHTS_FILE = "textblob_aptagger/trontagger-0.1.0.pickle"
CLASSES = ("NOUN", "VERB", "ADJ")
_PENN_PREFIXES = (("NN", "NOUN"), ("VB", "VERB"), ("JJ", "ADJ"))


class _SetsOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, tuples, numbers, strings and sets, nothing else."""

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return set
        raise pickle.UnpicklingError(f"refused {module}.{name}: only sets may be built")


def weights_path() -> Path:
    """Where the installed ``textblob-aptagger`` wheel keeps the tagger's weights."""
    try:
        dist = metadata.distribution(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"the POS tagger's weights come from the PyPI package {WEIGHTS_PACKAGE}, which is "
            "not installed; run scripts/setup.sh (or pip install textblob-aptagger)"
        ) from None
    return Path(str(dist.locate_file(WEIGHTS_FILE)))


@functools.cache
def load_tagger() -> PerceptronTagger:
    """NLTK's perceptron tagger with the packaged weights (loaded once per process)."""
    path = weights_path()
    try:
        with open(path, "rb") as handle:
            weights, tagdict, classes = _SetsOnly(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
        raise DataError(f"{path}: not the tagger's weights ({err})") from None
    if not (isinstance(weights, dict) and isinstance(tagdict, dict) and isinstance(classes, set)):
        raise DataError(f"{path}: expected (weights dict, tag dict, class set)")
    tagger = PerceptronTagger(load=False)
    tagger.decode_json_params((weights, tagdict, sorted(classes)))
    return tagger


def penn_tags(tokens: Sequence[str]) -> list[str]:
    """Penn Treebank tags of a tokenised sentence (e.g. ``DT NN VBZ``)."""
    return [tag for _, tag in load_tagger().tag(list(tokens))] if tokens else []


def coarse_class(tag: str) -> str | None:
    """``NOUN`` (NN*), ``VERB`` (VB*), ``ADJ`` (JJ*) or None for every other Penn tag."""
    return next((name for prefix, name in _PENN_PREFIXES if tag.startswith(prefix)), None)


def word_classes(tokens: Sequence[str]) -> list[str | None]:
    """Each token's class among :data:`CLASSES` (None: none of them)."""
    return [coarse_class(tag) for tag in penn_tags(tokens)]
