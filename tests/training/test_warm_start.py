"""A warm start (train.init_from), validation by re-ranking (train.val_rerank), the cosine
schedule and decoupled weight decay."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from imram.config import TrainConfig, load_config
from imram.errors import ConfigError, DataError
from imram.models import build_model
from imram.training.trainer import train
from imram.training.warm_start import warm_start

pytestmark = pytest.mark.slow

SMALL = [
    "model.embed_dim=32",
    "model.word_dim=32",
    "model.img_dim=32",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.epochs=1",
    "data.vocab_threshold=1",
    "train.log_every=1",
]


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vsepp_run(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("warm") / "vsepp"
    train(load_config("vsepp", SMALL), toy_data, run, progress=False)
    return run


def test_warm_start_copies_the_shared_encoders_only(vsepp_run):
    source = load_file(vsepp_run / "best" / "model.safetensors")
    config = load_config("f30k_full_imram", SMALL).model
    from imram.data.text import load_tokenizer

    vocab = load_tokenizer(vsepp_run / "vocab.json")
    torch.manual_seed(0)
    model = build_model(config, vocab_size=len(vocab))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = warm_start(model, vsepp_run, vocab)
    assert copied == sorted(source)  # VSE++ is the encoders, all shared
    after = model.state_dict()
    for name, value in after.items():
        expected = source[name] if name in copied else before[name]
        assert torch.equal(value, expected), name
    assert any(k.startswith("text_memory") or "memory" in k for k in after if k not in copied)


def test_warm_start_refuses_what_does_not_fit(vsepp_run):
    from imram.data.text import Vocabulary, load_tokenizer

    vocab = load_tokenizer(vsepp_run / "vocab.json")
    other = build_model(
        load_config("vsepp", [*SMALL, "model.embed_dim=16"]).model, vocab_size=len(vocab)
    )
    with pytest.raises(ConfigError, match=r"image_encoder.fc.bias has shape \(32,\) there"):
        warm_start(other, vsepp_run, vocab)
    unrelated = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="shares no trainable weight"):
        warm_start(unrelated, vsepp_run, vocab)
    small = Vocabulary.build(["a dog"], 1)
    model = build_model(load_config("vsepp", SMALL).model, vocab_size=len(vocab))
    with pytest.raises(DataError, match="vocabulary differs"):
        warm_start(model, vsepp_run, small)


def test_training_from_a_warm_start(toy_data, vsepp_run, tmp_path):
    """At a learning rate too small to move a weight, the run's encoders stay the source's."""
    sets = [*SMALL, f"train.init_from={vsepp_run}", "train.lr=1e-12", "model.steps=1"]
    run = tmp_path / "scan"
    train(load_config("scan_t2i", sets), toy_data, run, progress=False)
    (event,) = [e for e in _events(run) if e["event"] == "init_from"]
    assert "image_encoder.fc.weight" in event["weights"]
    source = load_file(vsepp_run / "best" / "model.safetensors")
    trained = load_file(run / "last" / "model.safetensors")
    assert all(torch.allclose(trained[k], source[k], rtol=0, atol=1e-9) for k in event["weights"])


def test_rerank_validation_is_the_two_stage_ranking(toy_data, vsepp_run, tmp_path):
    """The logged validation is rerank_split of the two checkpoints; with a shortlist that
    holds everything it is the full scoring of the validation split."""
    from imram.checkpoint import load_checkpoint
    from imram.data import PrecompDataset
    from imram.evaluation import evaluate_model
    from imram.retrieval.two_stage import rerank_split

    run = tmp_path / "scan"
    sets = [*SMALL, "model.steps=1", f"train.val_rerank={vsepp_run}", "train.val_shortlist=3"]
    train(load_config("scan_t2i", sets), toy_data, run, progress=False)
    events = _events(run)
    (opened,) = [e for e in events if e["event"] == "val_rerank"]
    (val,) = [e for e in events if e["event"] == "val"]
    first, second = load_checkpoint(vsepp_run), load_checkpoint(run / "best")
    dev = PrecompDataset(toy_data, "dev", first.vocab)
    (expected,) = rerank_split(first.model, dev, second.model, dev, [3])
    assert opened["first_rsum"] == pytest.approx(evaluate_model(first.model, dev)[0]["rsum"])
    assert val["shortlist"] == 3 and val["t2i_in_shortlist"] < 100
    for key in ("rsum", "i2t_r1", "t2i_r10", "t2i_in_shortlist", "i2t_in_shortlist"):
        assert val[key] == pytest.approx(expected[key]), key

    from imram.training.validation import open_validation

    config = load_config("scan_t2i", [*sets[:-1], "train.val_shortlist=1000"])
    reranking = open_validation(config, second.model, toy_data, dev, torch.device("cpu"))
    full = evaluate_model(second.model, dev)[0]
    assert reranking(second.model)["rsum"] == pytest.approx(full["rsum"])


def test_rerank_validation_refuses_other_models(toy_data, vsepp_run, tmp_path):
    with pytest.raises(ConfigError, match="validates a cross-attention model"):
        train(
            load_config("vsepp", [*SMALL, f"train.val_rerank={vsepp_run}"]),
            toy_data,
            tmp_path / "a",
            progress=False,
        )
    scan = tmp_path / "scan"
    train(load_config("scan_t2i", [*SMALL, "model.steps=1"]), toy_data, scan, progress=False)
    with pytest.raises(ConfigError, match="must be an embedding model"):
        train(
            load_config("scan_t2i", [*SMALL, "model.steps=1", f"train.val_rerank={scan}"]),
            toy_data,
            tmp_path / "b",
            progress=False,
        )
    with pytest.raises(ConfigError, match="train.val_shortlist=0"):
        TrainConfig(val_shortlist=0).validate()


def test_cosine_schedule_and_step_schedule():
    cosine = TrainConfig(epochs=4, lr_schedule="cosine")
    assert [cosine.lr_factor(e) for e in range(4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    )
    step = TrainConfig(lr_decay_epochs=2, lr_decay=0.1)
    assert [step.lr_factor(e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear").validate()
    with pytest.raises(ConfigError, match="train.weight_decay"):
        TrainConfig(weight_decay=-1.0).validate()


def test_cosine_schedule_reaches_the_optimizer(toy_data, tmp_path):
    sets = [*SMALL, "train.epochs=3", "train.lr_schedule=cosine", "model.steps=1"]
    train(load_config("vsepp", sets), toy_data, tmp_path / "run", progress=False)
    lrs = {e["epoch"]: e["lr"] for e in _events(tmp_path / "run") if e["event"] == "train"}
    assert [lrs[e] for e in range(3)] == pytest.approx([2e-3, 1.5e-3, 0.5e-3])


def test_weight_decay_shrinks_the_weights(toy_data, tmp_path):
    def norm(decay):
        run = tmp_path / f"wd{decay}"
        sets = [*SMALL, f"train.weight_decay={decay}"]
        train(load_config("vsepp", sets), toy_data, run, progress=False)
        return float(
            load_file(run / "last" / "model.safetensors")["image_encoder.fc.weight"].norm()
        )

    assert norm(20.0) < 0.9 * norm(0.0)
