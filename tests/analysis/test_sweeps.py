"""``imram analyze steps`` and ``aggregators``: real one-epoch trainings on the toy folder."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import yaml
from PIL import Image

from imram.analysis import run_aggregators, run_steps
from imram.analysis.plots import CHART_INCHES, DPI
from imram.analysis.sweep import SweepInterrupted
from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.config import AGGREGATORS
from imram.data import PrecompDataset
from imram.evaluation import evaluate_model
from imram.metrics import METRIC_KEYS

CHART_PX = (round(CHART_INCHES[0] * DPI), round(CHART_INCHES[1] * DPI))


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _png_size(path):
    with Image.open(path) as image:
        image.load()
        return image.format, image.size


def test_steps_table_has_one_row_per_k_and_numbers_of_the_checkpoints(toy_data, tiny, tmp_path):
    out = tmp_path / "steps"
    argv = ["analyze", "steps", "--config", "f30k_full_imram", "--data", str(toy_data)]
    argv += ["--out", str(out), *_sets(tiny), "--steps", "2", "1", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["variants"]
    assert [r["label"] for r in rows] == ["K=1", "K=2"] and report["split"] == "test"
    table = (out / "report.md").read_text()
    assert table.count("\n| K=") == 2 and "\n| chance |" in table and "![" in table
    for row, k in zip(rows, (1, 2), strict=True):
        config = yaml.safe_load((out / f"steps_{k}" / "config.yaml").read_text())
        assert config["model"]["steps"] == k and config["model"]["embed_dim"] == 32
        assert row["status"] == "trained" and row["epochs_done"] == 1
        checkpoint = load_checkpoint(out / f"steps_{k}")
        dataset = PrecompDataset(toy_data, "test", checkpoint.vocab)
        metrics, _, _ = evaluate_model(checkpoint.model, dataset, "1k")
        assert row["metrics"] == pytest.approx({key: metrics[key] for key in METRIC_KEYS})
        assert f"| K={k} | {metrics['i2t_r1']:.1f} |" in table
    assert _png_size(out / "steps.png") == ("PNG", CHART_PX)

    again = run_steps("f30k_full_imram", toy_data, out, tiny, [1, 2], progress=False)
    assert [r.status for r in again.rows] == ["reused", "reused"]
    assert [r.metrics for r in again.rows] == [r["metrics"] for r in rows]


def test_a_run_stopped_by_its_budget_is_resumed_by_the_same_command(toy_data, tiny, tmp_path):
    out = tmp_path / "steps"
    budget = [*tiny, "train.max_minutes=1e-9"]  # stops after every batch
    first = run_steps("f30k_full_imram", toy_data, out, budget, [2], progress=False).rows[0]
    assert first.stopped_early and first.status == "trained" and first.epochs_done == 0
    assert first.checkpoint == "last"  # stopped before any validation: the last weights count
    second = run_steps("f30k_full_imram", toy_data, out, tiny, [2], progress=False).rows[0]
    assert second.status == "resumed" and not second.stopped_early
    assert second.epochs_done == 1 and second.checkpoint == "best"
    events = (out / "steps_2" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(e)["event"] == "val" for e in events) == 1
    state = json.loads((out / "steps_2" / "last" / "checkpoint.json").read_text())["state"]
    assert state["iteration"] == 4  # 125 dev captions in batches of 32: nothing replayed


def test_ctrl_c_checkpoints_and_stops_the_sweep_and_the_same_command_resumes(
    toy_data, tiny, tmp_path
):
    out = tmp_path / "steps"
    log = out / "steps_1" / "metrics.jsonl"

    def interrupt() -> None:  # once the training loop runs (it logs every step), press Ctrl-C
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.is_file() and '"train"' in log.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    long = [*tiny, "train.epochs=500", "train.log_every=1"]
    presser = threading.Thread(target=interrupt, daemon=True)
    presser.start()
    with pytest.raises(SweepInterrupted, match="run the same command again to resume"):
        run_steps("f30k_full_imram", toy_data, out, long, [1, 2], progress=False)
    presser.join()
    state = json.loads((out / "steps_1" / "last" / "checkpoint.json").read_text())["state"]
    assert state["iteration"] >= 1 and not (out / "steps_2").exists()  # K=2 never started
    shorter = [*tiny, f"train.epochs={state['epoch'] + 1}"]  # only train.* may change
    row = run_steps("f30k_full_imram", toy_data, out, shorter, [1], progress=False).rows[0]
    assert row.status == "resumed" and row.epochs_done == state["epoch"] + 1


def test_aggregators_train_each_memory_unit(toy_data, tiny, tmp_path):
    out = tmp_path / "aggregators"
    result = run_aggregators(
        "f30k_text_imram", toy_data, out, [*tiny, "model.steps=2"], progress=False
    )
    assert [r.label for r in result.rows] == list(AGGREGATORS)
    assert result.table.count("\n| ") == len(AGGREGATORS) + 1  # rows, chance
    for row in result.rows:
        checkpoint = load_checkpoint(row.run)
        assert checkpoint.config.model.aggregator == row.label
        memory = checkpoint.model.text_memory
        assert hasattr(memory, "gate") == (row.label in ("ours", "gate", "att"))
        assert 0 <= row.metrics["rsum"] <= 600
    assert _png_size(result.plot) == ("PNG", CHART_PX)
    assert "aggregators.png" in result.report_md.read_text()


@pytest.mark.parametrize(
    ("analysis", "extra", "message"),
    [
        ("steps", ["--config", "f30k_vsepp_missing"], "unknown preset"),
        ("steps", ["--config", "vsepp"], "needs an IMRAM model"),
        ("steps", ["--config", "scan_t2i"], "needs an IMRAM model"),
        ("steps", ["--config", "f30k_full_imram", "--steps", "0"], "positive integers"),
        ("aggregators", ["--config", "f30k_full_imram", "--set", "model.steps=1"], "model.steps=1"),
        ("steps", ["--config", "f30k_full_imram", "--split", "val"], "split 'val' not found"),
    ],
)
def test_bad_sweeps_fail_in_one_line_before_training(
    toy_data, tmp_path, capsys, analysis, extra, message
):
    argv = ["analyze", analysis, "--data", str(toy_data), "--out", str(tmp_path / "out"), *extra]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
