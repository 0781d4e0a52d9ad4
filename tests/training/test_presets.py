"""Every shipped preset loads; the CPU presets compare their models on equal encoders."""

from __future__ import annotations

from importlib.resources import files

import pytest
import yaml

from imram.config import Config, list_presets, load_config
from imram.errors import ConfigError
from imram.models import model_config

CPU = ("cpu_full_imram", "cpu_scan_t2i", "cpu_vsepp", "cpu_member")


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset)
    config.validate()
    assert config.model.name


def test_cpu_presets_share_encoders_data_and_validation_size():
    configs = [load_config(p) for p in CPU]
    assert [c.model.name for c in configs] == ["imram_full", "scan_t2i", "vsepp", "member"]
    encoders = {
        (c.model.img_dim, c.model.embed_dim, c.model.text_encoder, c.model.freeze_text)
        for c in configs
    }
    assert encoders == {(1280, 256, "minilm", True)}
    assert all(c.precision == "auto" for c in configs)
    # Cross-attention models validate on 500 dev captions (5 M pairs for all would take most
    # of an hour); the tuned VSE++ on all of them.
    assert [c.data.val_captions for c in configs] == [500, 500, 5000, 500]
    full = configs[0].train
    assert (full.mining, full.mining_shortlist, full.warmup_negatives) == ("shortlist", 4, 4)
    assert [c.train.mining for c in configs[2:]] == ["off", "off"]  # a dot product scores all


@pytest.mark.parametrize("preset", list_presets())
def test_presets_state_only_what_differs(preset):
    """A preset names its model and then only the keys where it departs from the defaults
    (the model's registry entry, then the config dataclasses), so a default changes in one
    place."""
    text = (files("imram.presets") / f"{preset}.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if "base" in raw:  # a variant: only what differs from the preset it extends
        defaults = load_config(raw.pop("base"))
        model_defaults = defaults.model.to_dict()
    else:
        defaults = Config()
        model_defaults = model_config(raw["model"]["name"]).to_dict()
    for section, values in raw.items():
        if not isinstance(values, dict):
            assert getattr(defaults, section) != values, section
            continue
        base = model_defaults if section == "model" else vars(getattr(defaults, section))
        repeated = [k for k, v in values.items() if k != "name" and base[k] == v]
        assert not repeated, f"{preset}: {section}.{repeated} restate the defaults"


def test_a_variant_states_only_what_differs_from_its_base(tmp_path):
    variant = tmp_path / "mine.yaml"
    variant.write_text("base: quickstart_vsepp\nmodel: {embed_dim: 64}\ntrain: {epochs: 3}\n")
    config = load_config(str(variant))
    base = load_config("quickstart_vsepp")
    assert (config.model.embed_dim, config.train.epochs) == (64, 3)
    assert config.model.word_vectors == base.model.word_vectors == "glove-6b-50d"
    assert config.train.lr == base.train.lr and config.data == base.data
    minilm = load_config("quickstart_vsepp_minilm")
    assert (minilm.model.text_encoder, minilm.train) == ("minilm", base.train)
    variant.write_text("base: no_such_preset\n")
    with pytest.raises(ConfigError, match="base 'no_such_preset' is not a preset"):
        load_config(str(variant))
