"""Runs that survive faults: SIGKILL and resume, SIGTERM, non-finite steps, changed data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imram.data import PrecompDataset
from imram.errors import DataError
from imram.files import sealed, sha256_file
from imram.training.manifest import data_files, describe, verify

pytestmark = pytest.mark.slow

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=32",
    "train.batch_size=30",
    "train.warmup_epochs=1",
    "train.epochs=2",
    "train.log_every=1",
    "data.vocab_threshold=1",
    "data.val_captions=50",
]


def _command(data, out, extra=(), resume=False):
    args = [sys.executable, "-m", "imram", "train", "--config", "f30k_full_imram"]
    args += ["--data", str(data), "--out", str(out), "--no-progress"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(data, out, extra=(), resume=False):
    result = subprocess.run(
        _command(data, out, extra, resume), env=ENV, capture_output=True, text=True
    )
    return result


def _events(run, kind=None):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [e for e in events if kind is None or e["event"] == kind]


def _start_and_wait(data, out, extra, iteration):
    """Start training in the background and return once it has logged ``iteration``."""
    process = subprocess.Popen(
        _command(data, out, extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not any(e["iteration"] >= iteration for e in _events(out, "train")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


def _weights(run):
    return load_file(run / "last" / "model.safetensors")


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _run(toy_data, run, ["train.checkpoint_every=3"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(
    toy_data, tmp_path, uninterrupted
):
    run = tmp_path / "run"
    process = _start_and_wait(toy_data, run, ["train.checkpoint_every=3"], 8)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait()
    state = json.loads((run / "last" / "checkpoint.json").read_text())["state"]
    assert state["epoch"] == 0 and 6 <= state["iteration"] < 20  # mid-epoch, a multiple of 3
    assert state["iteration"] % 3 == 0 and state["batch"] == state["iteration"]
    result = _run(toy_data, run, ["train.checkpoint_every=3"], resume=True)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_weights(run, uninterrupted)
    # The replayed steps log the same losses as the uninterrupted run's.
    replayed = {e["iteration"]: e["loss"] for e in _events(run, "train")}
    for e in _events(uninterrupted, "train"):
        assert replayed[e["iteration"]] == e["loss"]


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(toy_data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = _start_and_wait(toy_data, run, [], 5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "interrupted (checkpointed; continue with --resume)" in out.decode()
    (stop,) = _events(run, "interrupted")
    assert stop["signal"] == "SIGTERM"
    state = json.loads((run / "last" / "checkpoint.json").read_text())["state"]
    assert state["iteration"] == stop["iteration"] == _events(run, "train")[-1]["iteration"]
    assert 0 < state["batch"] < 20  # mid-epoch, no periodic checkpoint asked for
    result = _run(toy_data, run, ["train.checkpoint_every=3"], resume=True)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_weights(run, uninterrupted)


def _poison(run, key, rows=None):
    """Write NaN into ``key`` of the run's last checkpoint (all of it, or some rows), as a
    diverged run would have saved it: the file hashes in checkpoint.json are updated, since a
    checkpoint changed behind imram's back is refused (test_integrity)."""
    path = run / "last" / "model.safetensors"
    weights = load_file(path)
    if rows is None:
        weights[key].fill_(float("nan"))
    else:
        weights[key][rows] = float("nan")
    save_file(weights, path, metadata={"format": "imram-checkpoint/1"})
    meta_path = run / "last" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["files_sha256"][path.name] = sha256_file(path)[0]
    meta_path.write_text(json.dumps(sealed(meta)))


def test_a_non_finite_step_is_skipped_counted_and_logged(toy_data, tmp_path):
    """One caption with a NaN word vector: its batch's loss is NaN once per epoch; the step is
    skipped, logged and counted, and the run finishes with finite weights elsewhere."""
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    captions = (data / "train_caps.txt").read_text().splitlines()
    captions[7] = captions[7] + " zebra"
    (data / "train_caps.txt").write_text("\n".join(captions) + "\n")
    run = tmp_path / "run"
    assert _run(data, run, ["train.epochs=1"]).returncode == 0
    zebra = json.loads((run / "vocab.json").read_text())["word2idx"]["zebra"]
    _poison(run, "text_encoder.embed.weight", [zebra])
    result = _run(data, run, ["train.epochs=2"], resume=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 non-finite steps skipped" in result.stdout
    (bad,) = _events(run, "nonfinite")
    assert bad["epoch"] == 1 and bad["in_a_row"] == 1 and bad["total"] == 1
    assert bad["iteration"] not in {e["iteration"] for e in _events(run, "train")}
    state = json.loads((run / "last" / "checkpoint.json").read_text())["state"]
    assert state["nonfinite_steps"] == 1 and state["iteration"] == 40
    for key, value in _weights(run).items():
        if key != "text_encoder.embed.weight":
            assert torch.isfinite(value).all(), key


def test_non_finite_steps_in_a_row_stop_the_run_with_a_clear_message(toy_data, tmp_path):
    run = tmp_path / "run"
    assert _run(toy_data, run, ["train.epochs=1"]).returncode == 0
    before = _weights(run)
    _poison(run, "image_encoder.fc.weight")
    result = _run(toy_data, run, ["train.epochs=2", "train.max_nonfinite_steps=3"], resume=True)
    assert result.returncode == 2
    assert "3 training steps in a row had a non-finite loss or gradient" in result.stderr
    assert "train.max_nonfinite_steps=3" in result.stderr and str(run / "last") in result.stderr
    assert [e["in_a_row"] for e in _events(run, "nonfinite")] == [1, 2, 3]
    after = _weights(run)  # the last checkpoint is the poisoned one, untouched by the skips
    assert torch.isnan(after["image_encoder.fc.weight"]).all()
    assert torch.equal(after["text_encoder.embed.weight"], before["text_encoder.embed.weight"])


def test_truncated_feature_file_is_refused_at_open(toy_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    path = data / "dev_ims.npy"
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(DataError, match=r"dev_ims.npy: truncated: its header declares float32"):
        PrecompDataset(data, "dev", None)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 128)
    with pytest.raises(DataError, match=r"dev_ims.npy: 64 bytes after the float32"):
        PrecompDataset(data, "dev", None)


def test_changed_data_is_detected_by_the_manifest(toy_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    run = tmp_path / "run"
    assert _run(data, run, ["train.epochs=1"]).returncode == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        str(data / f) for f in ("train_ims.npy", "train_caps.txt", "dev_ims.npy", "dev_caps.txt")
    }
    # The same bytes copied back (a new modification time) pass a resume's full check.
    features = np.load(data / "train_ims.npy")
    np.save(data / "train_ims.npy", features)
    assert _run(data, run, ["train.epochs=2"], resume=True).returncode == 0
    # Different values of the same size: the SHA-256 catches them at resume.
    features[3, 0, 0] += 1.0
    np.save(data / "train_ims.npy", features)
    result = _run(data, run, ["train.epochs=3"], resume=True)
    assert result.returncode == 2
    assert f"{data / 'train_ims.npy'}: changed since the run started" in result.stderr
    assert "SHA-256" in result.stderr


def test_manifest_checks_between_epochs_catch_a_modified_or_missing_file(toy_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    datasets = [PrecompDataset(data, s, None) for s in ("train", "dev")]
    files = data_files(*datasets)
    manifest = describe(files)
    verify(manifest, files, tmp_path, full=False)  # unchanged: passes
    captions = data / "dev_caps.txt"
    os.utime(captions, ns=(0, captions.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="dev_caps.txt: modified during the run"):
        verify(manifest, files, tmp_path, full=False)
    manifest = verify(manifest, files, tmp_path, full=True)  # same bytes: passes, re-timed
    verify(manifest, files, tmp_path, full=False)
    (data / "train_ims.npy").unlink()
    with pytest.raises(DataError, match="train_ims.npy: data file of this run is gone"):
        verify(manifest, files, tmp_path, full=False)
