"""Train-and-test runs on a quickstart-style folder for the benchmark scripts, each command in
a fresh ``python -m imram`` process: one place that trains a run (again from scratch if an
earlier attempt was cut short), scores its best checkpoint on the test split and reads its dev
curve through :func:`imram.training.curves.read_curve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from imram.training.curves import read_curve


def imram(*args: str) -> None:
    """Run ``imram ARGS`` in a fresh process; its output is dropped, a failure raises with the
    command's last error lines."""
    command = [sys.executable, "-m", "imram", *args]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")


def train_and_test(preset: str, data: Path, run: Path, sets: list[str]) -> dict[str, Any]:
    """Train ``preset`` with ``--set`` items ``sets`` into ``run`` unless a finished run is
    there (marked by ``RUN.done``), evaluate it on the test split (1k protocol) and return the
    test rsum, the per-epoch dev curve (:func:`read_curve`) and the run's batch size."""
    done = run.with_name(run.name + ".done")
    if not done.is_file():  # a run cut short is trained again from scratch
        shutil.rmtree(run, ignore_errors=True)
        overrides = [item for s in sets for item in ("--set", s)]
        imram("train", "--config", preset, "--data", str(data), "--out", str(run), *overrides)
        done.write_text("")
    result = run / "test.json"
    imram(
        "evaluate",
        "--checkpoint",
        str(run),
        "--data",
        str(data),
        "--split",
        "test",
        "--protocol",
        "1k",
        "--json",
        str(result),
    )
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    return {
        "test_rsum": json.loads(result.read_text())["rsum"],
        "curve": [c for c in read_curve(run) if c["val_rsum"] is not None],
        "batch_size": config["train"]["batch_size"],
    }
