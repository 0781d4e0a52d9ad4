"""``imram bench accuracy``: presets trained in fresh processes, each evaluated on the split
as ``imram evaluate`` would, cross-attention models re-ranking an embedding model's shortlists."""

from __future__ import annotations

import json

import pytest

from imram.bench.accuracy import prepared_data
from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.data import PrecompDataset
from imram.errors import ConfigError
from imram.evaluation import evaluate_model
from imram.retrieval.fusion import FUSION_WEIGHTS
from imram.retrieval.two_stage import rerank_split

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=32",
    "model.img_dim=32",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "data.vocab_threshold=1",
]


def test_without_data_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="--photos .*--caption-file"):
        prepared_data(tmp_path / "none", None, tmp_path / "nope.txt")


@pytest.mark.slow
def test_accuracy_rows_equal_evaluate_and_rerank(toy_data, tmp_path):
    out = tmp_path / "acc"
    argv = ["bench", "accuracy", "--presets", "scan_t2i", "--rerank-with", "vsepp"]
    argv += ["--data", str(toy_data), "--out", str(out), "--shortlist", "5", "0", "--no-progress"]
    argv += [a for s in SMALL for a in ("--set", s)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["preset"], r["shortlist"], "fused" in r["protocol"]): r for r in report["rows"]}
    assert set(rows) == {
        ("vsepp", None, False),
        *(("scan_t2i", k, fused) for k in (5, "all") for fused in (False, True)),
    }
    vsepp, scan = (load_checkpoint(out / p / "seed0") for p in ("vsepp", "scan_t2i"))
    expected, _, _ = evaluate_model(vsepp.model, PrecompDataset(toy_data, "dev", vsepp.vocab))
    assert rows["vsepp", None, False]["metrics"]["rsum"] == pytest.approx(expected["rsum"])
    reranked = rerank_split(
        vsepp.model,
        PrecompDataset(toy_data, "dev", vsepp.vocab),
        scan.model,
        PrecompDataset(toy_data, "dev", scan.vocab),
        [5],
        fusion_weights=FUSION_WEIGHTS,
    )[0]
    assert rows["scan_t2i", 5, False]["metrics"]["rsum"] == pytest.approx(reranked["rsum"])
    best = max(m["rsum"] for m in reranked["fused"].values())
    assert rows["scan_t2i", 5, True]["metrics"]["rsum"] == pytest.approx(best)
    inside = (reranked["i2t_in_shortlist"] + reranked["t2i_in_shortlist"]) / 2
    assert rows["scan_t2i", 5, False]["in_shortlist"] == pytest.approx(inside)
    assert rows["scan_t2i", "all", False]["in_shortlist"] == pytest.approx(100.0)
    for row in rows.values():
        assert row["epochs"] == pytest.approx(2.0) and row["stopped"] == "all epochs"
        assert row["best_epoch"] in (1, 2) and row["samples_per_s"] > 0
        assert row["t2i_ms"] > 0 and row["i2t_ms"] > 0
    table = (out / "report.md").read_text()
    assert "| scan_t2i on vsepp top 5 |" in table and "| vsepp | 1k, one stage |" in table
    assert "| scan_t2i fused with vsepp top 5 | 1k, two stage fused (top 5, w " in table
    mtime = (out / "vsepp" / "seed0" / "last" / "checkpoint.json").stat().st_mtime_ns
    assert main(argv) == 0  # finished runs are kept, not trained again
    assert (out / "vsepp" / "seed0" / "last" / "checkpoint.json").stat().st_mtime_ns == mtime
