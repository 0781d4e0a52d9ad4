"""Checkpoint round-trips, refusal of pickles, and the release importer."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from imram.checkpoint import (
    import_release_checkpoint,
    load_checkpoint,
    recover_swap,
    save_checkpoint,
)
from imram.config import Config
from imram.data import Vocabulary
from imram.errors import DataError
from imram.models import build_model

SMALL = dict(vocab_size=12, word_dim=4, img_dim=6, embed_dim=8)
VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"])


def _scores(model):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 6, generator=gen)
    tokens = torch.randint(4, 12, (4, 6), generator=gen)
    lengths = torch.tensor([6, 3, 4, 2])
    with torch.no_grad():
        img, cap = model.encode_images(feats), model.encode_captions(tokens, lengths)
        return model.similarity(img, cap, lengths)


def test_round_trip(tmp_path):
    config = Config.from_dict({"model": {"name": "imram_full", **SMALL}})
    model = build_model(config.model)
    save_checkpoint(tmp_path / "ck", model, config, VOCAB, {"epoch": 3})
    save_checkpoint(tmp_path / "ck", model, config, VOCAB, {"epoch": 4})  # replaces atomically
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == config and loaded.vocab == VOCAB and loaded.state == {"epoch": 4}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert torch.equal(_scores(loaded.model), _scores(model.eval()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old dirs left
    assert not any(b"pickle" in p.read_bytes()[:64] for p in (tmp_path / "ck").iterdir())


def test_a_crash_inside_the_swap_is_recovered(tmp_path):
    """Killed between the two renames, only ``.ck.old`` holds the checkpoint: loading finds
    it, and ``recover_swap`` (run by a resume) puts it back in place; otherwise it does nothing."""
    config = Config.from_dict({"model": {"name": "imram_full", **SMALL}})
    save_checkpoint(tmp_path / "ck", build_model(config.model), config, VOCAB, {"epoch": 2})
    os.replace(tmp_path / "ck", tmp_path / ".ck.old")
    assert load_checkpoint(tmp_path / "ck").state == {"epoch": 2}
    recover_swap(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    recover_swap(tmp_path / "ck")  # nothing to recover
    assert load_checkpoint(tmp_path / "ck").state == {"epoch": 2}


def test_weights_that_do_not_fit_are_refused(tmp_path):
    config = Config.from_dict({"model": {"name": "imram_full", **SMALL}})
    save_checkpoint(tmp_path / "ck", build_model(config.model), config, VOCAB)
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    meta["config"]["model"]["embed_dim"] = 16
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="weights do not fit the model"):
        load_checkpoint(tmp_path / "ck")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_are_refused(tmp_path):
    config = Config.from_dict({"model": {"name": "vsepp", **SMALL}})
    save_checkpoint(tmp_path / "ck", build_model(config.model), config, VOCAB)
    torch.save({"weights": _Exploit()}, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(DataError, match="unreadable weights"):
        load_checkpoint(tmp_path / "ck")
    torch.save(
        {"model": {}, "opt": argparse.Namespace(), "x": _Exploit()}, tmp_path / "evil.pth.tar"
    )
    with pytest.raises(DataError, match="refused"):
        load_checkpoint(tmp_path / "evil.pth.tar")


_OURS_TO_RELEASE = {
    "image_encoder.fc.": "img_enc.fc_local.",
    "text_encoder.embed.": "txt_enc.embed.",
    "text_encoder.gru.": "txt_enc.rnn.",
    "text_memory.fuse.": "linear_t2i.",
    "text_memory.gate.": "gate_t2i.",
    "image_memory.fuse.": "linear_i2t.",
    "image_memory.gate.": "gate_i2t.",
}


def _release_file(tmp_path, model, mode="full_IMRAM", **opt_changes):
    """Write a checkpoint the way the release's trainer did (DataParallel keys, Namespace)."""
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in _OURS_TO_RELEASE.items():
            if key.startswith(ours):
                state["module." + theirs + key[len(ours) :]] = value
    for name in ("linear_t2i", "gate_t2i", "linear_i2t", "gate_i2t"):  # the release has all four
        for part, shape in (("weight", (8, 16)), ("bias", (8,))):
            state.setdefault(f"module.{name}.{part}", torch.zeros(shape))
    state["module.extra.weight"] = torch.zeros(1)
    opt = argparse.Namespace(
        model_mode=mode,
        vocab_size=12,
        word_dim=4,
        embed_size=8,
        img_dim=6,
        num_layers=1,
        iteration_step=3,
        lambda_softmax=9.0,
        no_IMRAM_norm=True,
        bi_gru=True,
        raw_feature_norm="clipped_l2norm",
        margin=0.2,
        data_name="f30k_precomp",
    )
    vars(opt).update(opt_changes)
    path = tmp_path / "model_best.pth.tar"
    payload = {
        "epoch": 12,
        "model": state,
        "best_rsum": np.float64(484.2),
        "opt": opt,
        "Eiters": 100,
    }
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("name,mode", [("imram_full", "full_IMRAM"), ("imram_text", "text_IMRAM")])
def test_release_importer(tmp_path, name, mode):
    torch.manual_seed(0)
    model = build_model(name, **SMALL).eval()
    checkpoint = import_release_checkpoint(_release_file(tmp_path, model, mode), VOCAB)
    assert checkpoint.config.model.name == name and checkpoint.config.model.steps == 3
    assert torch.equal(_scores(checkpoint.model), _scores(model))
    report = checkpoint.state["import_report"]
    assert report["unknown"] == ["extra.weight"]
    if name == "imram_text":
        assert "gate_i2t.weight" in report["unused"]
    assert checkpoint.state["best_rsum"] == pytest.approx(484.2)


def test_release_importer_errors(tmp_path):
    model = build_model("imram_full", **SMALL)
    path = _release_file(tmp_path, model)
    small_vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"])
    with pytest.raises(DataError, match="vocabulary has 4 words, the checkpoint 12"):
        import_release_checkpoint(path, small_vocab)
    path = _release_file(tmp_path, model, raw_feature_norm="softmax")
    with pytest.raises(DataError, match="raw_feature_norm='softmax'"):
        import_release_checkpoint(path, VOCAB)
    path = _release_file(tmp_path, model)
    raw = torch.load(path, weights_only=False)
    del raw["model"]["module.txt_enc.embed.weight"]
    torch.save(raw, path)
    with pytest.raises(DataError, match="lacks text_encoder.embed.weight"):
        import_release_checkpoint(path, VOCAB)
