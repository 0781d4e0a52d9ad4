"""Caption-file readers: each format's fixture, quoting, BOM and CRLF, and every error message."""

from __future__ import annotations

import json

import pytest

from imram.data.formats import (
    FORMATS,
    CaptionRecord,
    DroppedImage,
    detect_format,
    load_captions,
    read_records,
)
from imram.errors import ConfigError, DataError


def _error(path, fmt) -> str:
    with pytest.raises(DataError) as err:
        read_records(path, fmt)
    return str(err.value)


def _rows(records: list[CaptionRecord]) -> list[tuple[str, str, str | None]]:
    return [(r.image, r.caption, r.split) for r in records]


# flickr8k


def test_flickr8k_with_split_files_bom_and_crlf(tmp_path):
    path = tmp_path / "Flickr8k.token.txt"
    lines = ["a.jpg#0\tA dog\truns .", "a.jpg#1\t  Two  dogs ", "", "b.jpg#0\tA cat", "c.jpg#0\tX"]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\r\nz.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("b.jpg\n\n")
    result = load_captions(path)
    assert result.format == "flickr8k"
    assert _rows(result.records) == [
        ("a.jpg", "A dog runs .", "train"),
        ("a.jpg", "Two dogs", "train"),
        ("b.jpg", "A cat", "test"),
    ]
    assert result.records[2].source == f"{path}:4"
    reason = "in no Flickr8k split file (Flickr_8k.testImages.txt, Flickr_8k.trainImages.txt)"
    assert result.dropped == [DroppedImage("c.jpg", 1, reason)]
    assert result.notes == [
        "1 image(s) listed in the split files have no caption in Flickr8k.token.txt (first: z.jpg)"
    ]


def test_flickr8k_without_split_files(tmp_path):
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("a.jpg#0\tone\nb#2.jpg\ttwo\n")
    assert _rows(read_records(path, "flickr8k")) == [
        ("a.jpg", "one", None),
        ("b#2.jpg", "two", None),
    ]


def test_flickr8k_errors(tmp_path):
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("a.jpg#0\tone\na.jpg#1 two\n")
    assert _error(path, "flickr8k") == (
        f"{path}, line 2: expected 'image.jpg#k<TAB>caption', found no tab"
    )
    path.write_text("a.jpg#0\tone\n\na.jpg#1\t \t\n")
    assert _error(path, "flickr8k") == (
        f"{path}:3: empty caption (after whitespace normalisation); expected text"
    )
    path.write_text("a.jpg#0\tone\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("b.jpg\na.jpg\n")
    message = _error(path, "flickr8k")
    assert message.startswith(f"{tmp_path / 'Flickr_8k.devImages.txt'}, line 2: image 'a.jpg'")
    assert f"in split 'train' ({tmp_path / 'Flickr_8k.trainImages.txt'}, line 1)" in message


# csv


def test_csv_quoting_extra_columns_and_splits(tmp_path):
    path = tmp_path / "caps.csv"
    text = (
        "id,Image , caption,Split\r\n"
        '1,a.jpg,"A dog, running",train\r\n'
        '2,a.jpg,"He said ""hi""",\r\n'
        "\r\n"
        '3,b.jpg,"two\r\nlines",val\r\n'
        "4,c d.jpg,plain,RESTVAL\r\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = read_records(path, "csv")
    assert _rows(records) == [
        ("a.jpg", "A dog, running", "train"),
        ("a.jpg", 'He said "hi"', None),
        ("b.jpg", "two lines", "dev"),
        ("c d.jpg", "plain", "train"),
    ]
    assert [r.source for r in records] == [f"{path}:{n}" for n in (2, 3, 5, 7)]


def test_csv_without_split_column(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("caption,image\nhello there,x.png\n")
    assert _rows(read_records(path, "csv")) == [("x.png", "hello there", None)]


@pytest.mark.parametrize(
    "text,message",
    [
        ("image,text\na.jpg,x\n", ", line 1: missing column(s) caption; expected a header"),
        ("\nname,caption\n", ", line 2: missing column(s) image; expected a header"),
        ("image,caption,image\n", ", line 1: column 'image' appears twice"),
        ("image,caption\na.jpg,x\nb.jpg,a dog, running\n", ", line 3: 3 fields but the header"),
        ("image,caption\na.jpg,x\nb.jpg\n", ", line 3: 1 fields but the header has 2"),
        ("image,caption,split\na.jpg,x,holdout\n", ", line 2: unknown split 'holdout'"),
        ('image,caption\na.jpg,"x"y\n', ", line 2: malformed CSV"),
        ('image,caption\na.jpg,"never closed\n', ", line 2: malformed CSV (unexpected end"),
        ("image,caption\n,x\n", ", line 2: empty image name"),
        ('image,caption\n"a\nb.jpg",x\n', ", line 2: image name 'a\\nb.jpg' holds a line break"),
        ("image,caption\na.jpg,ok\nb.jpg,  \n", ":3: empty caption"),
        ("", ": empty CSV file; expected a header with columns image,caption"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "caps.csv"
    path.write_text(text)
    assert _error(path, "csv").startswith(f"{path}{message}")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_bytes(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n")
    assert _error(path, "csv") == (
        f"{path}, line 3: not valid UTF-8 (byte 0xe9 at column 10); "
        "expected a UTF-8 CSV caption file"
    )


def test_missing_file(tmp_path):
    assert (
        _error(tmp_path / "nope.tsv", "tsv")
        == f"{tmp_path / 'nope.tsv'}: TSV caption file not found"
    )


# tsv


def test_tsv_header_crlf_and_errors(tmp_path):
    path = tmp_path / "caps.tsv"
    path.write_bytes(b'Image\tCaption\r\nsub/a.jpg\tA dog\tbarks\r\nb.jpg\t"quoted"\r\n')
    assert _rows(read_records(path, "tsv")) == [
        ("sub/a.jpg", "A dog barks", None),
        ("b.jpg", '"quoted"', None),
    ]
    path.write_text("a.jpg\tok\nb.jpg ok\n")
    assert _error(path, "tsv") == f"{path}, line 2: expected 'image<TAB>caption', found no tab"


# karpathy


def _karpathy(tmp_path, images) -> object:
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def test_karpathy(tmp_path):
    path = _karpathy(
        tmp_path,
        [
            {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A b."}, {"raw": "c"}]},
            {
                "filepath": "val2014/",
                "filename": "b.jpg",
                "split": "val",
                "sentences": [{"raw": "d"}],
            },
            {
                "filename": "c.jpg",
                "split": "restval",
                "sentences": [{"raw": " e\nf ", "tokens": []}],
            },
            {"filename": "d.jpg", "split": "test", "sentences": []},
        ],
    )
    result = load_captions(path)
    assert result.format == "karpathy"
    assert _rows(result.records) == [
        ("a.jpg", "A b.", "train"),
        ("a.jpg", "c", "train"),
        ("val2014/b.jpg", "d", "dev"),
        ("c.jpg", "e f", "train"),
    ]
    assert result.records[1].source == f"{path}:images[0].sentences[1]"
    assert result.dropped == [DroppedImage("d.jpg", 0, "no sentences")]


@pytest.mark.parametrize(
    "image,message",
    [
        ({"split": "train", "sentences": []}, "images[0]: missing key 'filename'"),
        ({"filename": 3, "split": "train", "sentences": []}, "images[0].filename: expected str"),
        ({"filename": "a", "split": "x", "sentences": []}, "images[0].split: unknown split 'x'"),
        ({"filename": "a", "split": "test", "sentences": [{"tokens": ["a"]}]}, "sentences[0]: "),
        (
            {"filename": "a", "split": "test", "sentences": [{"raw": ""}]},
            ":images[0].sentences[0]: ",
        ),
        ({"filename": "a", "split": "test", "sentences": "abc"}, "images[0].sentences: expected"),
        ({"filename": "a", "split": "test", "sentences": [], "filepath": 1}, ".filepath: expected"),
    ],
)
def test_karpathy_errors(tmp_path, image, message):
    path = _karpathy(tmp_path, [image])
    text = _error(path, "karpathy")
    assert text.startswith(str(path)) and message in text


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    assert _error(path, "karpathy").startswith(f"{path}, line 2: invalid JSON (")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        detect_format(path)


# coco


def _coco(tmp_path, images, annotations) -> object:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_coco(tmp_path):
    images = [{"id": 7, "file_name": "x.jpg"}, {"id": 3, "file_name": "y.jpg"}]
    images.append({"id": 9, "file_name": "z.jpg"})
    annotations = [
        {"image_id": 3, "id": 1, "caption": "y one"},
        {"image_id": 7, "id": 2, "caption": "x one\n"},
        {"image_id": 3, "id": 3, "caption": "y two"},
    ]
    result = load_captions(_coco(tmp_path, images, annotations))
    assert result.format == "coco"
    assert _rows(result.records) == [
        ("x.jpg", "x one", None),
        ("y.jpg", "y one", None),
        ("y.jpg", "y two", None),
    ]
    assert result.records[0].source.endswith("captions_val2014.json:annotations[1]")
    assert result.dropped == [DroppedImage("z.jpg", 0, "no annotation")]


@pytest.mark.parametrize(
    "images,annotations,message",
    [
        (
            [{"id": 1, "file_name": "a"}],
            [{"image_id": 2, "caption": "c"}],
            "annotations[0].image_id: 2 is not the id",
        ),
        (
            [{"id": 1, "file_name": "a"}],
            [{"image_id": "1", "caption": "c"}],
            "annotations[0].image_id: '1' is not",
        ),
        (
            [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}],
            [],
            "images[1].id: 1 is also the id of images[0]",
        ),
        ([{"id": 1}], [], "images[0]: missing key 'file_name'"),
        ([{"id": True, "file_name": "a"}], [], "images[0].id: expected int or str, found bool"),
        ([{"id": 1, "file_name": "a"}], [{"image_id": 1}], "annotations[0]: missing key 'caption'"),
        ([{"id": 1, "file_name": "a"}], ["x"], "annotations[0]: expected a JSON object, found str"),
    ],
)
def test_coco_errors(tmp_path, images, annotations, message):
    path = _coco(tmp_path, images, annotations)
    text = _error(path, "coco")
    assert text.startswith(f"{path}, ") and message in text


# detection and dispatch


def test_detect_format(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tx\n")
    (tmp_path / "results_20130124.token").write_text("a.jpg#0\tx\n")
    (tmp_path / "a.CSV").write_text("image,caption\n")
    (tmp_path / "a.tsv").write_text("a\tb\n")
    (tmp_path / "plain.txt").write_text("\na.jpg\tb\n")
    (tmp_path / "hashed.txt").write_text("a.jpg#4\tb\n")
    _karpathy(tmp_path, [{"filename": "a", "split": "test", "sentences": []}])
    _coco(tmp_path, [], [])
    expected = {
        "Flickr8k.token.txt": "flickr8k",
        "results_20130124.token": "flickr8k",
        "a.CSV": "csv",
        "a.tsv": "tsv",
        "plain.txt": "tsv",
        "hashed.txt": "flickr8k",
        "dataset_flickr8k.json": "karpathy",
        "captions_val2014.json": "coco",
    }
    assert {name: detect_format(tmp_path / name) for name in expected} == expected
    assert set(expected.values()) == set(FORMATS)
    assert load_captions(tmp_path / "hashed.txt").records[0].image == "a.jpg"


def test_undetectable_and_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just words\n")
    with pytest.raises(DataError, match="cannot tell the caption format"):
        load_captions(path)
    other = tmp_path / "other.json"
    other.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"other.json: a JSON caption file needs images\[\*\]"):
        load_captions(other)
    with pytest.raises(
        ConfigError, match="unknown caption format 'yaml'; expected one of flickr8k"
    ):
        read_records(path, "yaml")
