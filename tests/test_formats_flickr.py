"""Flickr30K Entities: a hand-written fixture in the real format, every bad input, and export -> import round
trips with and without the refground.json sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refground import masks
from refground.data.formats import export_flickr30k, import_flickr30k
from refground.data.formats.flickr30k import parse_sentence
from refground.data.model import Dataset, Image, Mention, Object, Query, Relation
from refground.errors import DataError

BIG = 1000092795

XML_BIG = """<annotation>
  <filename>1000092795.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>5</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>
  <object><name>5</name><bndbox><xmin>150</xmin><ymin>20</ymin><xmax>300</xmax><ymax>375</ymax></bndbox></object>
  <object><name>6</name><name>9</name>
    <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
  <object><name>7</name><nobndbox>1</nobndbox><scene>0</scene></object>
  <object><name>8</name><nobndbox>0</nobndbox><scene>1</scene></object>
  <object><name>11</name><bndbox><xmin>400</xmin><ymin>300</ymin><xmax>500</xmax><ymax>375</ymax></bndbox></object>
</annotation>
"""
SENT_BIG = (
    "[/EN#5/people/other Two young guys] with [/EN#6/bodyparts shaggy hair] look at [/EN#7/bodyparts their hands]"
    " while hanging out in [/EN#8/scene the yard] .\n"
    "[/EN#5/people Two men] look at [/EN#0/notvisual something] near [/EN#9/notvisual the photographer] .\n"
    "\n"
)
XML_DOG = """<annotation><filename>36979.jpg</filename><size><width>100</width><height>80</height><depth>3</depth>
</size><object><name>1</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>60</xmax><ymax>80</ymax></bndbox></object>
</annotation>"""


def write_flickr(root: Path, sentences: dict | None = None, xmls: dict | None = None) -> Path:
    """Two listed images (train: 1000092795, test: 36979) and one image in no split file (555)."""
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    sentences = {BIG: SENT_BIG, 36979: "[/EN#1/animals A dog] runs .\n", 555: "[/EN#2/people A man] .\n",
                 **(sentences or {})}
    xmls = {BIG: XML_BIG, 36979: XML_DOG, 555: XML_DOG.replace("36979", "555"), **(xmls or {})}
    for iid, text in sentences.items():
        if text is not None:
            (root / "Sentences" / f"{iid}.txt").write_text(text)
    for iid, text in xmls.items():
        if text is not None:
            (root / "Annotations" / f"{iid}.xml").write_text(text)
    (root / "train.txt").write_text(f"{BIG}\n")
    (root / "val.txt").write_text("")
    (root / "test.txt").write_text("36979\n")
    return root


def test_parse_sentence_like_the_official_reader():
    words, phrases = parse_sentence("[/EN#5/people/other Two young guys] with [/EN#6/bodyparts hair] .")
    assert words == ["Two", "young", "guys", "with", "hair", "."]
    assert phrases == [(0, 3, "5", ["people", "other"]), (4, 5, "6", ["bodyparts"])]
    assert parse_sentence("no phrases here") == (["no", "phrases", "here"], [])


def test_import_real_shaped_flickr(tmp_path):
    write_flickr(tmp_path)
    with pytest.raises(DataError, match="jpg: image folder not found"):
        import_flickr30k(tmp_path, tmp_path / "jpg")
    (tmp_path / "jpg").mkdir()
    ds = import_flickr30k(tmp_path, tmp_path / "jpg")
    assert ds.name == "flickr30k" and ds.meta["skipped_images"] == 1 and ds.meta["sidecar"] is False
    assert ds.meta["image_root"] == str((tmp_path / "jpg").resolve())
    assert [(im.id, im.file, im.width, im.height, im.split) for im in ds.images()] == [
        (BIG, "1000092795.jpg", 500, 375, "train"), (36979, "36979.jpg", 100, 80, "test")]
    o = BIG * 1000
    assert [(x.id, x.category, x.box) for x in ds.objects_of(BIG)] == [
        (o, "people", (0.0, 0.0, 100.0, 200.0)),          # 1-based inclusive xmin..xmax -> [xmin-1, xmax)
        (o + 1, "people", (149.0, 19.0, 300.0, 375.0)),
        (o + 2, "bodyparts", (9.0, 9.0, 50.0, 60.0)),     # one box, two entity names
        (o + 3, "other", (399.0, 299.0, 500.0, 375.0)),   # no phrase mentions entity 11
    ]
    assert ds.categories == ["animals", "bodyparts", "other", "people"]
    q0, q1 = ds.queries(task="caption")[:2]
    assert q0.id == BIG * 100 and q1.id == BIG * 100 + 1
    assert q0.text == "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
    assert q0.raw == SENT_BIG.split("\n")[0] and q0.split == "train" and q0.task == "caption"
    assert q0.mentions == (
        Mention(0, 3, "referent", (o, o + 1), "people", "5"),
        Mention(4, 6, "referent", (o + 2,), "bodyparts", "6"),
        Mention(8, 10, "referent", (), "bodyparts", "7"),  # nobndbox
        Mention(14, 16, "referent", (), "scene", "8"),     # scene
    )
    assert q1.text == "Two men look at something near the photographer ."
    assert q1.mentions == (
        Mention(0, 2, "referent", (o, o + 1), "people", "5"),
        Mention(4, 5, "referent", (), "notvisual", "0"),
        Mention(6, 8, "referent", (), "notvisual", "9"),   # entity 9 has a box, but the phrase is notvisual
    )
    dog = ds.query(36979 * 100)
    assert dog.text == "A dog runs ." and dog.split == "test"
    assert dog.mentions == (Mention(0, 2, "referent", (36979000,), "animals", "1"),)
    assert ds.object(36979000).box == (10.0, 20.0, 60.0, 80.0)
    assert [q.id for q in ds.queries("test")] == [36979 * 100]


@pytest.mark.parametrize("line, problem", [
    ("[/EN#5/people Two men look .", "line 1: unbalanced brackets: phrase '[/EN#5/people' is not closed"),
    ("[/EN#5/people Two [/EN#6/other men] .", "line 1: unbalanced brackets: phrase '[/EN#5/people' is not closed "
                                              "before '[/EN#6/other'"),
    ("Two men] look .", "line 1: unbalanced brackets: 'men]' closes no phrase"),
    ("[EN#5/people Two] men .", "line 1: malformed phrase tag '[EN#5/people'"),
    ("[/EN#/people Two] men .", "malformed phrase tag"),
    ("ok [/EN#5/people ] .", "line 1: empty phrase"),
])
def test_malformed_markup(tmp_path, line, problem):
    write_flickr(tmp_path, sentences={36979: line + "\n"})
    with pytest.raises(DataError) as err:
        import_flickr30k(tmp_path, tmp_path)
    assert str(err.value).startswith(str(tmp_path / "Sentences" / "36979.txt")) and problem in str(err.value)


def test_error_names_the_line(tmp_path):
    write_flickr(tmp_path, sentences={BIG: "[/EN#5/people Two men] .\n\n[/EN#5/people Two men .\n"})
    with pytest.raises(DataError, match=r"1000092795\.txt: line 3: unbalanced"):
        import_flickr30k(tmp_path, tmp_path)


@pytest.mark.parametrize("xml, problem", [
    ("<annotation><size><width>10</width>", "malformed XML"),
    ("<annotation><object><name>1</name></object></annotation>", "missing <size>"),
    (XML_DOG.replace("<xmax>60", "<xmax>6o"), "<xmax> is not an integer ('6o')"),
    (XML_DOG.replace("<xmax>60", "<xmax>120"), "box [11, 21, 120, 80] lies outside the 100x80 image"),
    (XML_DOG.replace("<xmin>11", "<xmin>61"), "has zero area"),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]><annotation/>', "DOCTYPE/ENTITY declarations are not allowed"),
])
def test_malformed_annotations(tmp_path, xml, problem):
    write_flickr(tmp_path, xmls={36979: xml})
    with pytest.raises(DataError) as err:
        import_flickr30k(tmp_path, tmp_path)
    assert str(err.value).startswith(str(tmp_path / "Annotations" / "36979.xml")) and problem in str(err.value)


def test_box_outside_can_be_skipped_and_sub_pixel_is_clipped(tmp_path):
    write_flickr(tmp_path, xmls={36979: XML_DOG.replace("<xmax>60", "<xmax>120")})
    ds = import_flickr30k(tmp_path, tmp_path, skip_invalid=True)
    assert ds.meta["skipped_objects"] == 1 and ds.objects_of(36979) == []
    assert ds.query(36979 * 100).mentions[0].object_ids == ()
    write_flickr(tmp_path, xmls={36979: XML_DOG.replace("<xmin>11", "<xmin>0").replace("<ymax>80", "<ymax>81")})
    ds = import_flickr30k(tmp_path, tmp_path)
    assert ds.object(36979000).box == (0.0, 20.0, 60.0, 80.0) and ds.meta["clipped"] == 1


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="Flickr30K Entities root not found"):
        import_flickr30k(tmp_path / "nope", tmp_path)
    write_flickr(tmp_path, xmls={36979: None})
    with pytest.raises(DataError, match=r"Annotations/36979\.xml: annotation file not found"):
        import_flickr30k(tmp_path, tmp_path)
    (tmp_path / "Annotations" / "36979.xml").write_text(XML_DOG)
    (tmp_path / "Sentences" / "36979.txt").unlink()
    with pytest.raises(DataError, match=r"Sentences/36979\.txt: sentence file not found"):
        import_flickr30k(tmp_path, tmp_path)
    write_flickr(tmp_path)
    (tmp_path / "val.txt").unlink()
    with pytest.raises(DataError, match=r"^val\.txt not found in "):
        import_flickr30k(tmp_path, tmp_path)
    write_flickr(tmp_path)
    (tmp_path / "val.txt").write_text("36979\n")
    with pytest.raises(DataError, match=r"test\.txt: image 36979 is also listed in val\.txt"):
        import_flickr30k(tmp_path, tmp_path)
    (tmp_path / "val.txt").write_text("abc\n")
    with pytest.raises(DataError, match=r"val\.txt: line 1: 'abc' is not an image id"):
        import_flickr30k(tmp_path, tmp_path)
    write_flickr(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "Sentences")
    with pytest.raises(DataError, match=r"^Sentences/ not found in "):
        import_flickr30k(tmp_path, tmp_path)


# ------------------------------------------------------------------------------------ round trips

def caption_dataset(image_root: Path | None = None) -> Dataset:
    rng = np.random.default_rng(1)

    def mask(h, w, box):
        m = np.zeros((h, w), bool)
        x1, y1, x2, y2 = (int(v) for v in box)
        m[y1:y2, x1:x2] = rng.random((y2 - y1, x2 - x1)) < 0.6
        return masks.encode(m)

    images = [Image(7, "seven.png", 60, 40, "testB"), Image(2, "two.png", 30, 30, "train"),
              Image(5, "five.png", 50, 50, "mixed"), Image(9, "nine.png", 20, 20, "val"),
              Image(4, "four.png", 16, 16, "testAB")]
    objects = [
        Object(71, 7, "circle", (0.0, 0.0, 10.0, 10.0), mask(40, 60, (0, 0, 10, 10)), {"color": "red"}),
        Object(72, 7, "square", (20.0, 5.0, 60.0, 40.0), mask(40, 60, (20, 5, 60, 40)),
               {"color": "blue", "size": "big"}),
        Object(73, 7, "circle", (30.0, 30.0, 31.0, 31.0)),
        Object(21, 2, "star", (1.0, 2.0, 29.0, 30.0), mask(30, 30, (1, 2, 29, 30))),
        Object(51, 5, "star", (0.0, 0.0, 50.0, 50.0)),
        Object(91, 9, "square", (3.0, 3.0, 9.0, 9.0), mask(20, 20, (3, 3, 9, 9))),
        Object(41, 4, "circle", (2.0, 2.0, 6.0, 6.0)),
    ]
    queries = [
        Query(700, 7, "caption", "two circles and a blue square near the camera",
              (Mention(0, 2, "referent", (71, 73), "circle"), Mention(3, 6, "referent", (72,), "square"),
               Mention(7, 9, "context", (), "notvisual")), (Relation(1, "near", 2),), "caption", "testB", 3,
              "Two circles and a blue square near the camera."),
        Query(701, 7, "expression", "the red circle", (Mention(0, 3, "referent", (71,), "circle"),), (),
              "attribute", "testB", 4, "the red circle"),
        Query(702, 7, "caption", "a square beside circles", (Mention(0, 2, "referent", (72,), "square"),
                                                            Mention(3, 4, "referent", (73, 71), "circle")),
              (), "caption", "testB", -1, ""),
        Query(200, 2, "caption", "a star in the sky", (Mention(0, 2, "referent", (21,), "star"),
                                                      Mention(3, 5, "referent", (), "scene", "e1")),
              (), "caption", "train", -1, "a star in the sky"),
        Query(500, 5, "caption", "one star", (Mention(0, 2, "referent", (51,), "star"),), (), "caption", "val"),
        Query(501, 5, "caption", "the star", (Mention(0, 2, "referent", (51,), "star"),), (), "caption", "train"),
        Query(900, 9, "caption", "a small square and nothing else",
              (Mention(0, 3, "referent", (91,), "square"), Mention(1, 4, "context", (91,), "sq uare"),
               Mention(4, 5, "referent", (), "other")), (), "caption", "val", 8, "raw text"),
        Query(201, 2, "caption", "a star again", (Mention(0, 2, "referent", (21,), "star/other"),), (),
              "caption", "train"),
        Query(400, 4, "caption", "a notvisual circle", (Mention(1, 3, "referent", (41,), "notvisual"),), (),
              "caption", "testAB"),
    ]
    meta = {"image_root": str(image_root)} if image_root else {}
    return Dataset.from_records("caps", images, objects, queries, ["circle", "square", "star", "unused"], meta)


def caption_records(ds: Dataset) -> dict:
    rec = ds.records()
    rec["queries"] = [q for q in rec["queries"] if q.task == "caption"]
    return rec


def test_round_trip_with_sidecar_is_exact(tmp_path):
    ds = caption_dataset()
    summary = export_flickr30k(ds, tmp_path / "out")
    assert summary["skipped_expressions"] == 1 and summary["unmarked_mentions"] == 1
    assert summary["unlisted_images"] == 1 and summary["sentences"] == 8
    back = import_flickr30k(tmp_path / "out", tmp_path / "out" / "flickr30k_images", name="caps")
    assert back.meta["sidecar"] is True
    assert back.records() == caption_records(ds)


def test_exported_files_are_real_flickr(tmp_path):
    export_flickr30k(caption_dataset(), tmp_path)
    lines = (tmp_path / "Sentences" / "7.txt").read_text().splitlines()
    assert lines == ["[/EN#1/circle two circles] and [/EN#2/square a blue square] near [/EN#0/notvisual the camera]",
                     "[/EN#2/square a square] beside [/EN#1/circle circles]"]
    assert (tmp_path / "Sentences" / "9.txt").read_text().splitlines() == [
        "[/EN#6/square a small square] and [/EN#7/other nothing] else"]
    assert (tmp_path / "Sentences" / "2.txt").read_text().splitlines()[1] == "[/EN#3/star/other a star] again"
    assert (tmp_path / "train.txt").read_text() == "2\n"
    assert (tmp_path / "val.txt").read_text() == "9\n"
    assert (tmp_path / "test.txt").read_text() == "7\n4\n"
    import xml.etree.ElementTree as ET

    root = ET.parse(tmp_path / "Annotations" / "7.xml").getroot()
    objs = root.findall("object")
    assert [[n.text for n in o.findall("name")] for o in objs] == [["1"], ["2"], ["1"]]
    assert [int(objs[1].find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")] == [21, 6, 60, 40]
    root = ET.parse(tmp_path / "Annotations" / "2.xml").getroot()
    nobox = [o for o in root.findall("object") if o.find("nobndbox") is not None]
    assert [(o.find("name").text, o.find("scene").text) for o in nobox] == [("4", "1")]
    side = json.loads((tmp_path / "refground.json").read_text())
    assert side["format"] == "refground-flickr30k-sidecar" and [i["id"] for i in side["images"]] == [7, 2, 5, 9, 4]


def test_without_sidecar_the_format_parts_match(tmp_path):
    ds = caption_dataset()
    export_flickr30k(ds, tmp_path)
    (tmp_path / "refground.json").unlink()
    back = import_flickr30k(tmp_path, tmp_path)
    assert back.meta["skipped_images"] == 1  # image 5 ("mixed") is in no split file
    kept = [im for im in ds.images() if im.id != 5]
    assert sorted((im.id, im.file, im.width, im.height) for im in back.images()) == \
        sorted((im.id, im.file, im.width, im.height) for im in kept)
    for im in kept:
        assert back.image(im.id).split == ("test" if im.split.startswith("test") else im.split)
        assert sorted(o.box for o in back.objects_of(im.id)) == sorted(o.box for o in ds.objects_of(im.id))
        ours = [q for q in ds.queries(task="caption") if q.image_id == im.id]
        theirs = [q for q in back.queries() if q.image_id == im.id]
        assert [q.tokens for q in theirs] == [q.tokens for q in ours]
        assert all(q.split == back.image(im.id).split for q in theirs)
        for a, b in zip(ours, theirs):
            marked, end = [], 0
            for m in sorted(a.mentions, key=lambda m: m.start):
                if m.start >= end:
                    marked.append(m)
                    end = m.end
            assert [(m.start, m.end) for m in b.mentions] == [(m.start, m.end) for m in marked]
            for ma, mb in zip(marked, b.mentions):
                expected = set() if ma.type == "notvisual" else {ds.object(i).box for i in ma.object_ids}
                assert {back.object(i).box for i in mb.object_ids} == expected


def test_stale_sidecar_is_refused(tmp_path):
    export_flickr30k(caption_dataset(), tmp_path)
    (tmp_path / "Sentences" / "9.txt").write_text("[/EN#6/square a big square] and [/EN#7/other nothing] else\n")
    with pytest.raises(DataError, match=r"refground\.json: stale sidecar for image 9: query 900 text differs"):
        import_flickr30k(tmp_path, tmp_path)
    assert import_flickr30k(tmp_path, tmp_path, use_sidecar=False).query(900).text == "a big square and nothing else"


def test_export_copies_images_and_refuses_unwritable_tokens(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "seven.png").write_bytes(b"7")
    summary = export_flickr30k(caption_dataset(src), tmp_path / "out")
    assert summary["images_copied"] == 1 and summary["images_missing"] == 4
    assert (tmp_path / "out" / "flickr30k_images" / "seven.png").read_bytes() == b"7"
    bad = Dataset.from_records("bad", [Image(1, "a.png", 9, 9, "train")], [],
                               [Query(1, 1, "caption", "a [weird] token", ())])
    with pytest.raises(DataError, match=r"query 1 token '\[weird\]' cannot be written"):
        export_flickr30k(bad, tmp_path / "bad")


def test_synth_round_trip(tmp_path):
    synth = pytest.importorskip("refground.data.synth")
    if not hasattr(synth, "generate_dataset"):
        pytest.skip("refground.data.synth.generate_dataset not available yet")
    ds = synth.generate_dataset(name="synth", num_images=12, seed=0, image_size=96, image_dir=None, workers=1)
    export_flickr30k(ds, tmp_path / "out")
    back = import_flickr30k(tmp_path / "out", tmp_path, name=ds.name)
    assert back.records() == caption_records(ds)
    plain = import_flickr30k(tmp_path / "out", tmp_path, use_sidecar=False)
    listed = [im for im in ds.images() if im.split.startswith(("train", "val", "test"))]
    assert plain.num_images == len(listed)
    for im in listed:
        assert (plain.image(im.id).width, plain.image(im.id).height) == (im.width, im.height)
        assert sorted(o.box for o in plain.objects_of(im.id)) == sorted(o.box for o in ds.objects_of(im.id))
        assert [q.tokens for q in plain.queries() if q.image_id == im.id] == \
            [q.tokens for q in ds.queries(task="caption") if q.image_id == im.id]
