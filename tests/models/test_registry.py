"""Registry, config validation and the encoders' contract."""

from __future__ import annotations

import pytest
import torch

from imram.config import ModelConfig
from imram.errors import ConfigError
from imram.models import (
    IMRAM,
    MEMBER,
    SCAN,
    VSEPP,
    CrossAttentionModel,
    EmbeddingModel,
    build_model,
    list_models,
    model_config,
    register_model,
)
from imram.models.registry import model_class

SMALL = dict(vocab_size=30, word_dim=6, img_dim=10, embed_dim=8)


def test_registry_names_and_classes():
    assert list_models() == [
        "imram_full",
        "imram_image",
        "imram_text",
        "member",
        "scan_i2t",
        "scan_t2i",
        "vsepp",
    ]
    kinds = {
        "imram_full": IMRAM,
        "scan_t2i": SCAN,
        "scan_i2t": SCAN,
        "vsepp": VSEPP,
        "member": MEMBER,
    }
    for name, cls in kinds.items():
        assert type(build_model(name, **SMALL)) is cls


def test_default_model_is_the_published_setting():
    model = build_model("imram_full")
    cfg = model.config
    assert (cfg.embed_dim, cfg.word_dim, cfg.img_dim, cfg.steps) == (1024, 300, 2048, 3)
    assert (cfg.lambda_softmax, cfg.attn_norm, cfg.attn_sim, cfg.renorm) == (
        9.0,
        "clipped_l2norm",
        "dot",
        False,
    )
    assert model.text_memory.gate.weight.shape == (1024, 2048)
    assert model.image_memory.fuse.weight.shape == (1024, 2048)


def test_preset_defaults_per_name():
    assert model_config("scan_i2t").lambda_softmax == 4.0
    assert model_config("scan_i2t").lambda_lse == 5.0
    assert model_config("scan_t2i").steps == 1
    assert model_config("imram_text").branch == "text"
    assert model_config("imram_image", steps=2).steps == 2
    assert build_model(ModelConfig(name="imram_text", **SMALL), steps=1).config.steps == 1


def test_one_step_models_have_no_memory():
    model = build_model("imram_full", steps=1, **SMALL)
    assert model.text_memory is None and model.image_memory is None
    assert build_model("imram_text", **SMALL).image_memory is None


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: build_model("imram_ful"), "unknown model 'imram_ful'"),
        (lambda: build_model("imram_full", stepz=2), "unknown model config key(s) stepz"),
        (lambda: build_model("imram_full", aggregator="sum"), "model.aggregator='sum'"),
        (lambda: build_model("imram_full", attn_norm="l1"), "model.attn_norm='l1'"),
        (lambda: build_model("imram_full", steps=0), "model.steps=0"),
        (lambda: build_model("imram_full", lambda_softmax=-1.0), "model.lambda_softmax=-1.0"),
        (lambda: build_model("scan_t2i", steps=2), "SCAN has one attention step"),
        (lambda: build_model("scan_t2i", branch="full"), "SCAN scores one direction"),
    ],
)
def test_config_errors_are_clear(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert message in str(err.value)


def test_text_encoder_ignores_batch_padding():
    """A caption's word vectors do not depend on what else is in its batch."""
    torch.manual_seed(0)
    model = build_model("imram_full", **SMALL).double()
    lengths = torch.tensor([3, 7, 5])
    tokens = torch.randint(4, 30, (3, 9))
    batch = model.encode_captions(tokens, lengths)
    assert batch.shape == (3, 9, 8)
    for j, n in enumerate(lengths.tolist()):
        alone = model.encode_captions(tokens[j : j + 1, :n], lengths[j : j + 1])
        assert torch.allclose(batch[j, :n], alone[0], atol=1e-12)
        assert (batch[j, n:] == 0).all()
        assert torch.allclose(batch[j, :n].norm(dim=-1), torch.ones(n, dtype=torch.float64))


def test_image_encoder_projects_then_normalises():
    model = build_model("imram_full", **SMALL).double()
    feats = torch.randn(2, 4, 10, dtype=torch.float64) * 5
    out = model.encode_images(feats)
    expected = feats @ model.image_encoder.fc.weight.T + model.image_encoder.fc.bias
    expected = expected / (expected.norm(dim=-1, keepdim=True) + 1e-8)
    assert torch.allclose(out, expected, atol=1e-12)
    assert (model.image_encoder.fc.bias == 0).all()


def test_vsepp_embeddings_are_unit_vectors():
    model = build_model("vsepp", **SMALL)
    img = model.embed_images(torch.randn(3, 4, 10))
    cap = model.embed_captions(torch.randint(4, 30, (2, 5)), torch.tensor([5, 2]))
    assert img.shape == (3, 8) and cap.shape == (2, 8)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert model.similarity(img, cap).shape == (3, 2)


def test_zero_length_caption_is_refused():
    model = build_model("imram_full", **SMALL)
    with pytest.raises(ValueError, match="at least one token"):
        model.encode_captions(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 0]))


def test_every_model_declares_its_kind():
    """The scorer, trainer and index dispatch on the two declared kinds, so each registered
    name is exactly one of them, and the kind matches how the model embeds an item."""
    tokens, lengths = torch.randint(4, 30, (2, 5)), torch.tensor([5, 2])
    for name in list_models():
        model = build_model(name, **SMALL).eval()
        cross = isinstance(model, CrossAttentionModel)
        assert cross != isinstance(model, EmbeddingModel), name
        assert issubclass(model_class(name), CrossAttentionModel) == cross
        with torch.no_grad():
            images = model.encode_images(torch.randn(3, 4, 10))
            captions = model.encode_captions(tokens, lengths)
        assert images.dim() == captions.dim() == (3 if cross else 2), name


def test_registry_refuses_a_class_of_neither_kind():
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="neither an EmbeddingModel nor a CrossAttentionModel"):
        register_model("plain", Plain)
    assert "plain" not in list_models()


def test_a_model_missing_an_interface_method_cannot_be_built():
    class Half(EmbeddingModel):
        def encode_images(self, features):
            return features.mean(dim=1)

    with pytest.raises(TypeError, match="encode_captions"):
        Half()
