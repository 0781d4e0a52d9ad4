"""``imram analyze banks``: the attention statistics against hand-made cases, and the command
on a real MEMBER checkpoint (learned slots: non-empty without training)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from imram.analysis.banks import bank_statistics
from imram.checkpoint import save_checkpoint
from imram.config import Config
from imram.data import PrecompDataset, Vocabulary
from imram.evaluation import evaluate_model
from imram.models import build_model


def test_uniform_attention_has_entropy_one_and_one_hot_zero():
    uniform = torch.full((5, 8), 1 / 8)
    assert bank_statistics(uniform)["entropy_share"] == pytest.approx(1.0)
    one_hot = torch.eye(8)[[0, 0, 3, 5]]
    stats = bank_statistics(one_hot)
    assert stats["entropy_share"] == pytest.approx(0.0, abs=1e-6)
    assert stats["favoured_slots"] == pytest.approx(3 / 8)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert bank_statistics(half)["entropy_share"] == pytest.approx(math.log(2) / math.log(4))


def test_the_command_reports_a_member_checkpoint(toy_data, tmp_path):
    vocab = Vocabulary.from_caption_files([toy_data / "train_caps.txt"], 1)
    torch.manual_seed(0)
    model = build_model(
        "member",
        vocab_size=len(vocab),
        img_dim=32,
        embed_dim=16,
        word_dim=8,
        member_bank="learned",
        member_bank_size=12,
    )
    with torch.no_grad():  # gates of one value c: relative memory adds c × the vector's length
        model.image_gate.fill_(0.1)
        model.text_gate.fill_(-0.2)
    save_checkpoint(
        tmp_path / "ck", model, Config.from_dict({"model": model.config.to_dict()}), vocab
    )
    command = [
        sys.executable,
        "-m",
        "imram",
        "analyze",
        "banks",
        "--checkpoint",
        str(tmp_path / "ck"),
        "--data",
        str(toy_data),
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "image bank (words attend) | 12 |" in done.stdout
    payload = json.loads((tmp_path / "out" / "banks.json").read_text())
    for stats in payload["banks"].values():
        assert 0.0 <= stats["entropy_share"] <= 1.0 and 0.0 < stats["favoured_slots"] <= 1.0
    assert payload["gates"] == pytest.approx({"image": 0.1, "text": 0.2})
    assert payload["memory_share"] == pytest.approx({"image": 0.1, "text": 0.2}, rel=1e-4)
    assert "share of the vector (mean ‖added‖ / ‖VSE++'s‖): image 10.00%, text 20.00%" in (
        (tmp_path / "out" / "report.md").read_text()
    )
    assert all(set(s["words"]) <= set(vocab.words) for s in payload["image_bank_slots"])
    vsepp = build_model("vsepp", vocab_size=len(vocab), img_dim=32, embed_dim=16, word_dim=8)
    vsepp.image_encoder.load_state_dict(model.image_encoder.state_dict())
    vsepp.text_encoder.load_state_dict(model.text_encoder.state_dict())
    test = PrecompDataset(toy_data, "test", vocab)
    closed, _, _ = evaluate_model(vsepp, test, "1k")
    trained, _, _ = evaluate_model(model, test, "1k")
    assert payload["rsum"] == {"trained": trained["rsum"], "gates_closed": closed["rsum"]}
    save_checkpoint(
        tmp_path / "v", vsepp, Config.from_dict({"model": vsepp.config.to_dict()}), vocab
    )
    command[command.index(str(tmp_path / "ck"))] = str(tmp_path / "v")
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2 and "banks are MEMBER's" in failed.stderr
