"""The Tux Paint stamps: descriptions paired with pictures, SVGs rasterised or refused clearly."""

from __future__ import annotations

import pytest
from PIL import Image

from imram.data.tuxpaint import rasterise_svg, read_stamps, stamps_root
from imram.errors import DataError

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="80">'
    '<rect x="0" y="0" width="40" height="40" fill="#ff0000"/></svg>'
)


def _png(path, colour=(0, 0, 255, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (8, 8), colour).save(path)


def test_read_stamps_pairs_first_lines_with_pictures(tmp_path):
    _png(tmp_path / "animals" / "dog.png")
    (tmp_path / "animals" / "dog.txt").write_text(
        "\ufeffA  brown\tdog.\nfr.utf8=Un chien brun.\n", encoding="utf-8"
    )
    (tmp_path / "food").mkdir()
    (tmp_path / "food" / "pie.svg").write_text(SVG)
    _png(tmp_path / "food" / "pie.png")  # a PNG wins over the SVG of the same stamp
    (tmp_path / "food" / "pie.txt").write_text("A pie.")
    (tmp_path / "food" / "cake.svg").write_text(SVG)
    (tmp_path / "food" / "cake.txt").write_text("A cake.\r\n")
    (tmp_path / "food" / "gift.txt").write_text("A gift.")  # no picture
    (tmp_path / "food" / "blank.txt").write_text("\nsecond line")
    _png(tmp_path / "food" / "blank.png")
    (tmp_path / "food" / "latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    _png(tmp_path / "food" / "latin1.png")

    stamps, skipped = read_stamps(tmp_path)
    assert [(s.name, s.caption) for s in stamps] == [
        ("animals/dog.png", "A brown dog."),
        ("food/cake.svg", "A cake."),
        ("food/pie.png", "A pie."),
    ]
    assert stamps[1].picture == tmp_path / "food" / "cake.svg"
    reasons = dict(skipped)
    assert set(reasons) == {"food/blank", "food/gift", "food/latin1"}
    assert "empty" in reasons["food/blank"] and "no .png" in reasons["food/gift"]
    assert "UTF-8" in reasons["food/latin1"]


def test_rasterise_svg_keeps_the_aspect_with_the_longer_side_at_size(tmp_path):
    svg = tmp_path / "tall.svg"
    svg.write_text(SVG)
    png = rasterise_svg(svg, tmp_path / "out" / "tall.png", size=64)
    with Image.open(png) as image:
        assert image.size == (32, 64)
        assert image.convert("RGBA").getpixel((16, 16)) == (255, 0, 0, 255)
        assert image.convert("RGBA").getpixel((16, 48))[3] == 0  # transparent below the square
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]


def test_rasterise_svg_refuses_entities_and_garbage_naming_the_file(tmp_path):
    entity = tmp_path / "entity.svg"
    entity.write_text(
        '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY ns_svg "http://www.w3.org/2000/svg">]>'
        '<svg xmlns="&ns_svg;" width="4" height="4"/>'
    )
    garbage = tmp_path / "garbage.svg"
    garbage.write_bytes(b"\x89 not xml")
    for bad in (entity, garbage):
        with pytest.raises(DataError, match=bad.name):
            rasterise_svg(bad, tmp_path / f"{bad.stem}.png")
        assert not (tmp_path / f"{bad.stem}.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_package_without_fetch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("imram.data.tuxpaint.INSTALLED", tmp_path / "not-installed")
    with pytest.raises(DataError, match="neither installed nor cached"):
        stamps_root(cache=tmp_path / "cache", fetch=False)


def test_the_real_package_has_its_stamps():
    stamps, skipped = read_stamps(stamps_root())
    assert len(stamps) > 900 and len(skipped) < 10
    names = {s.name for s in stamps}
    assert len(names) == len(stamps)
    assert sum(s.picture.suffix == ".svg" for s in stamps) > 100
