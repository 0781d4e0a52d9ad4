"""Every shipped preset loads; the CPU presets compare their models on equal encoders."""

from __future__ import annotations

import pytest

from imram.config import list_presets, load_config

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
        (c.model.img_dim, c.model.embed_dim, c.model.word_dim, c.model.word_vectors)
        for c in configs
    }
    assert encoders == {(1280, 256, 50, "glove-6b-50d")}
    assert all(c.model.freeze_words and c.precision == "auto" for c in configs)
    assert {(c.data.val_captions, c.data.vocab_glove_top) for c in configs} == {(500, 20000)}
    full = configs[0].train
    assert (full.mining, full.mining_shortlist, full.warmup_negatives) == ("shortlist", 4, 4)
    assert [c.train.mining for c in configs[2:]] == ["off", "off"]  # a dot product scores all
