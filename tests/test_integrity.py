"""Nothing lost, nothing silent: the failures a hostile first week of use found, each with the
real files and processes (damaged files, kill -9, SIGTERM), asserting that the message names
the file or field and that the user's files are byte for byte untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imram.checkpoint import load_checkpoint
from imram.cli import main
from imram.data import PrecompDataset
from imram.errors import DataError

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = [
    "model.embed_dim=32",
    "model.word_dim=16",
    "model.img_dim=32",
    "train.batch_size=30",
    "train.epochs=1",
    "train.log_every=1",
    "data.vocab_threshold=1",
    "data.val_captions=50",
]


def _train_args(data, out, preset="vsepp", extra=(), resume=False) -> list[str]:
    args = ["train", "--config", preset, "--data", str(data), "--out", str(out), "--no-progress"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def _imram(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imram", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def run(toy_data, tmp_path_factory) -> Path:
    """A finished one-epoch VSE++ run (best/ and last/)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    assert main(_train_args(toy_data, out)) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# 1. A user's own config.yaml in --out is never overwritten or appended to.
@pytest.mark.parametrize("own_config", [False, True])
def test_train_refuses_a_folder_holding_the_users_files(toy_data, tmp_path, own_config):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "config.yaml").write_text("# mine\nmodel:\n  name: vsepp\n")
    before = _snapshot(folder)
    args = _train_args(toy_data, folder)
    if own_config:  # --config DIR/config.yaml --out DIR
        args[args.index("vsepp")] = str(folder / "config.yaml")
    result = _imram(*args)
    assert result.returncode == 2
    assert f"{folder} holds files that are not an imram run: config.yaml; choose another --out" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert _snapshot(folder) == before  # nothing written, nothing appended


def test_train_may_restart_its_own_run_that_never_checkpointed(toy_data, tmp_path):
    """A run killed before its first checkpoint holds only imram's files: starting again is
    allowed, and the log starts afresh instead of appending to the dead run's."""
    out = tmp_path / "run"
    assert main(_train_args(toy_data, out)) == 0
    shutil.rmtree(out / "last")
    shutil.rmtree(out / "best")
    assert main(_train_args(toy_data, out)) == 0
    iterations = [e["iteration"] for e in _events(out, "train")]
    assert iterations == sorted(set(iterations))


# 2. A damaged best/ is an error, never silently replaced by last/.
@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_evaluate_refuses_a_damaged_best_checkpoint(toy_data, run, tmp_path, damage):
    copy = _copy(run, tmp_path)
    meta = copy / "best" / "checkpoint.json"
    if damage == "missing":
        meta.unlink()
    else:
        meta.write_text("{not json")
    result = _imram("evaluate", "--checkpoint", str(copy), "--data", str(toy_data))
    assert result.returncode == 2
    assert str(meta) in result.stderr and "Traceback" not in result.stderr
    assert "rsum" not in result.stdout  # nothing was scored with last/ instead


def test_a_run_without_best_says_it_uses_last(run, tmp_path, caplog):
    copy = _copy(run, tmp_path)
    shutil.rmtree(copy / "best")
    loaded = load_checkpoint(copy)
    assert loaded.path == copy / "last"
    assert "no best/ checkpoint" in caplog.text


# 3. Finite but huge features would overflow the L2 norm: refused with the file and image.
def test_huge_features_are_refused_naming_the_image(toy_data, tmp_path):
    data = Path(shutil.copytree(toy_data, tmp_path / "data"))
    feats = np.load(data / "test_ims.npy")
    feats[3, 1, 5] = 3e38
    np.save(data / "test_ims.npy", feats)
    message = r"test_ims\.npy: image 3 has a feature of magnitude 3e\+38"
    with pytest.raises(DataError, match=message):
        PrecompDataset(data, "test", None).images(range(25))


# 4. An interrupted quickstart says how to resume instead of failing on a missing best/.
def test_quickstart_interrupted_while_training_says_how_to_resume(tmp_path):
    out = tmp_path / "qs"
    command = [sys.executable, "-m", "imram", "quickstart", "--out", str(out), "--no-progress"]
    for item in ("model.embed_dim=32", "train.epochs=50", "train.log_every=1"):
        command += ["--set", item]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = out / "quickstart_full_imram" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (log.is_file() and '"train"' in log.read_text()):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err
    assert "no checkpoint here" not in err and "Traceback" not in err
    assert (out / "quickstart_full_imram" / "last" / "checkpoint.json").is_file()


# 5. Features of another size than the checkpoint takes: one line, not a matmul traceback.
def test_feature_size_mismatch_is_one_line_in_evaluate_and_index(toy_data, run, tmp_path):
    data = Path(shutil.copytree(toy_data, tmp_path / "wide"))
    feats = np.load(data / "test_ims.npy")
    np.save(data / "test_ims.npy", np.concatenate([feats, feats[..., :16]], axis=-1))
    for args in (
        ("evaluate", "--checkpoint", str(run), "--data", str(data)),
        (
            "index",
            "build",
            "--checkpoint",
            str(run),
            "--data",
            str(data),
            "--split",
            "test",
            "--out",
            str(tmp_path / "index"),
        ),
    ):
        result = _imram(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "test_ims.npy: features are 48-d but the" in result.stderr
        assert "takes 32-d regions" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "index").exists()


# 6. A truncated checkpoint file at --resume names the file.
@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors"])
def test_resume_from_a_truncated_checkpoint_names_the_file(toy_data, run, tmp_path, name):
    copy = _copy(run, tmp_path)
    path = copy / "last" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = _imram(*_train_args(toy_data, copy, extra=["train.epochs=2"], resume=True))
    assert result.returncode == 2
    assert f"{path}: unreadable" in result.stderr and "Traceback" not in result.stderr


# 7. --out naming a regular file.
def test_out_naming_a_file_is_refused(toy_data, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    result = _imram(*_train_args(toy_data, target))
    assert result.returncode == 2
    assert f"{target}: --out names a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and target.read_text() == "my notes\n"


# 8. CR-only line endings, and a vocabulary from no caption at all.
def test_cr_line_endings_and_empty_captions_are_explained(toy_data, tmp_path):
    data = Path(shutil.copytree(toy_data, tmp_path / "data"))
    lines = (data / "dev_caps.txt").read_text().splitlines()
    (data / "dev_caps.txt").write_bytes("\r".join(lines).encode() + b"\r")
    with pytest.raises(DataError, match=r"dev_caps\.txt: lines end in a bare carriage return"):
        PrecompDataset(data, "dev", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "dev"):
        (empty / f"{split}_caps.txt").write_text("")
    result = _imram("vocab", "--data", str(empty), "--out", str(tmp_path / "vocab.json"))
    assert result.returncode == 2
    assert "no captions to build a vocabulary from" in result.stderr
    assert not (tmp_path / "vocab.json").exists()


# 9. Edited index metadata and a flipped byte inside the weights are refused.
def test_edited_index_names_and_flipped_weights_are_refused(toy_data, run, tmp_path):
    from imram.retrieval import build_index, load_index

    index = tmp_path / "index"
    build_index(run, toy_data, "test", index, progress=False)
    meta = json.loads((index / "index.json").read_text())
    meta["images"]["names"][0] = "someone-else.jpg"
    (index / "index.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(DataError, match=r"index\.json: its contents changed after it was written"):
        load_index(index)

    copy = _copy(run, tmp_path)
    weights = copy / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"best/model\.safetensors: its contents changed"):
        load_checkpoint(copy)


# 10a. Half-written checkpoints a kill -9 left are removed at resume.
def test_resume_removes_checkpoints_a_killed_writer_left(toy_data, run, tmp_path):
    copy = _copy(run, tmp_path)
    for name in (".last.tmp-k9x2", ".best.tmp-k9x3"):
        (copy / name).mkdir()
        (copy / name / "model.safetensors").write_bytes(b"half")
    assert main(_train_args(toy_data, copy, extra=["train.epochs=2"], resume=True)) == 0
    assert not list(copy.glob(".*.tmp-*"))


# 10b. After kill -9 and --resume, every iteration is logged once.
def test_resume_after_kill_logs_each_iteration_once(toy_data, tmp_path):
    out = tmp_path / "run"
    # Checkpoints at iterations 7 and 14: a kill soon after iteration 8 lands between them.
    args = _train_args(toy_data, out, "f30k_full_imram", ["train.checkpoint_every=7"])
    process = subprocess.Popen(
        [sys.executable, "-m", "imram", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (
        (out / "metrics.jsonl").is_file()
        and any(e["iteration"] >= 8 for e in _events(out, "train"))
    ):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    logged = [e["iteration"] for e in _events(out, "train")]
    checkpointed = json.loads((out / "last" / "checkpoint.json").read_text())["state"]
    assert max(logged) > checkpointed["iteration"]  # steps after the checkpoint were logged
    assert main(_train_args(toy_data, out, "f30k_full_imram", resume=True)) == 0
    iterations = [e["iteration"] for e in _events(out, "train")]
    assert iterations == list(range(1, len(iterations) + 1))


# 10c. A changed model config at resume names the field.
def test_resume_with_another_model_config_names_the_field(toy_data, run, tmp_path):
    copy = _copy(run, tmp_path)
    result = _imram(*_train_args(toy_data, copy, extra=["model.embed_dim=16"], resume=True))
    assert result.returncode == 2
    assert "model.embed_dim: 16 (checkpoint 32)" in result.stderr


# 10e. Refusing a malicious pickle never suggests loading it with weights_only=False.
def test_pickle_refusal_never_suggests_running_its_code(tmp_path):
    import argparse

    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"model": {}, "opt": argparse.Namespace(), "x": Exploit()}, path)
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    assert "refused" in str(caught.value) and "weights_only" not in str(caught.value)
