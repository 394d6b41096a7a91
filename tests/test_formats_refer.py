"""The refer format (RefCOCO/+/g, RefCLEF) and the restricted unpickler: a hand-written fixture shaped like
the real files, every bad input, and export -> import round trips."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from refground import masks
from refground.data.formats import export_refer, import_refer, load_restricted
from refground.data.formats.safe_pickle import loads_restricted
from refground.data.model import Dataset, Image, Mention, Object, Query, Relation
from refground.errors import DataError, UsageError

# ------------------------------------------------------------------------------------- safe pickle


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil(f"echo pwned > {marker}")}], protocol=2))
    with pytest.raises(DataError) as err:
        load_restricted(path)
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and "forbidden global" in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("obj", [eval, getattr, __import__, dataclasses.dataclass, Path])
def test_other_globals_are_refused(tmp_path, obj):
    with pytest.raises(DataError, match="forbidden global"):
        loads_restricted(pickle.dumps(obj, protocol=2), "x.p")


def test_plain_containers_load_at_every_protocol():
    data = {"a": [1, 2.5, -3, True, None, "é"], "b": ({"c": (1, 2)}, frozenset({3}), {4, 5}), "d": 1 + 2j,
            7: b"\x00\xff", "big": 2**70}
    for protocol in (0, 2, 4, 5):
        if protocol < 3:  # bytes need _codecs.encode below protocol 3: not a plain container
            data_p = {k: v for k, v in data.items() if k != 7}
        else:
            data_p = data
        assert loads_restricted(pickle.dumps(data_p, protocol=protocol)) == data_p


def test_python2_str_is_read_as_latin1(tmp_path):
    # What Python 2 writes for pickle.dump({'raw': 'caf\xe9', 'n': 3L}, f, 2): str is SHORT_BINSTRING bytes,
    # the builtins module is __builtin__.
    py2 = (b"\x80\x02}q\x00(U\x03rawq\x01U\x04caf\xe9q\x02U\x01nq\x03\x8a\x01\x03"
           b"U\x01sq\x04c__builtin__\nset\nq\x05]q\x06K\x01a\x85q\x07Rq\x08u.")
    path = tmp_path / "py2.p"
    path.write_bytes(py2)
    assert load_restricted(path) == {"raw": "café", "n": 3, "s": {1}}


def test_truncated_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "t.p"
    path.write_bytes(pickle.dumps([{"a": 1}] * 5, protocol=2)[:-7])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_restricted(path)


# ------------------------------------------------------------------------- hand-written real fixture

def _py2_str(data: bytes, placeholder: str, value: bytes) -> bytes:
    """Swap the BINUNICODE ``placeholder`` for a Python 2 SHORT_BINSTRING holding ``value`` (raw bytes)."""
    enc = placeholder.encode()
    old = b"X" + len(enc).to_bytes(4, "little") + enc
    assert data.count(old) == 1
    return data.replace(old, b"U" + bytes([len(value)]) + value)


def write_refcoco(root: Path, refs: list | None = None, instances: dict | None = None) -> Path:
    """A two-image RefCOCO-shaped folder: ``<root>/refcoco/refs(unc).p`` + ``instances.json``."""
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    if instances is None:
        crowd = masks.encode(np.pad(np.ones((4, 6), bool), ((2, 34), (1, 43))))  # rows 2..5, cols 1..6
        crowd_uncompressed = {"size": [40, 50], "counts": _uncompressed(crowd)}
        instances = {
            "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset."},
            "images": [
                {"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "coco_url": "", "height": 40,
                 "width": 50, "date_captured": "2013-11-16 20:46:42", "flickr_url": "", "id": 581857},
                {"license": 1, "file_name": "COCO_train2014_000000000009.jpg", "height": 30, "width": 20,
                 "id": 9},
                {"license": 1, "file_name": "COCO_train2014_000000000025.jpg", "height": 10, "width": 10,
                 "id": 25},
            ],
            "annotations": [
                {"segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]], "area": 200.0, "iscrowd": 0,
                 "image_id": 581857, "bbox": [10.0, 10.0, 20.0, 10.0], "category_id": 18, "id": 1719310},
                {"segmentation": crowd_uncompressed, "area": 24.0, "iscrowd": 1, "image_id": 581857,
                 "bbox": [1, 2, 6, 4], "category_id": 1, "id": 900100581857},
                {"segmentation": [[0, 0, 5, 0, 5, 5, 0, 5], [10, 10, 15, 10, 15, 15, 10, 15]], "area": 50.0,
                 "iscrowd": 0, "image_id": 9, "bbox": [0.5, 1.25, 14.5, 13.75], "category_id": 1, "id": 5},
                {"segmentation": {"size": [30, 20], "counts": masks.encode(np.ones((30, 20), bool))["counts"]},
                 "area": 600.0, "iscrowd": 0, "image_id": 9, "bbox": [0, 0, 20, 30], "category_id": 3, "id": 6},
            ],
            "categories": [{"supercategory": "animal", "id": 18, "name": "dog"},
                           {"supercategory": "person", "id": 1, "name": "person"},
                           {"supercategory": "vehicle", "id": 3, "name": "car"}],
        }
    (folder / "instances.json").write_text(json.dumps(instances))
    if refs is None:
        refs = [
            {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_1719310.jpg", "ann_id": 1719310,
             "ref_id": 0, "image_id": 581857, "split": "testAB", "category_id": 18,
             "sentences": [{"tokens": ["the", "brown", "dog"], "raw": "RAW_PLACEHOLDER", "sent_id": 0,
                            "sent": "the brown dog"},
                           {"tokens": ["dog", "on", "left"], "raw": "Dog on left", "sent_id": 1,
                            "sent": "dog on left"}]},
            {"sent_ids": [7], "file_name": "COCO_train2014_000000581857_900100581857.jpg",
             "ann_id": 900100581857, "ref_id": 3, "image_id": 581857, "split": "testA", "category_id": 1,
             "sentences": [{"raw": "crowd  of people", "sent_id": 7, "sent": "crowd  of people"}]},
            {"sent_ids": [2], "file_name": "COCO_train2014_000000000009_5.jpg", "ann_id": 5, "ref_id": 1,
             "image_id": 9, "split": "train", "category_id": 1,
             "sentences": [{"tokens": ["man"], "raw": "man", "sent_id": 2, "sent": "man"}]},
        ]
    data = pickle.dumps(refs, protocol=2)
    if b"RAW_PLACEHOLDER" in data:
        data = _py2_str(data, "RAW_PLACEHOLDER", "The brown dog at the caf\xe9".encode("latin1"))
    (folder / "refs(unc).p").write_bytes(data)
    return folder


def _uncompressed(rle: dict) -> list[int]:
    """Uncompressed (list) COCO counts of a mask, computed directly from the column-major pixels."""
    flat = masks.decode(rle).flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    return np.diff(np.concatenate([[0], changes])).tolist()  # starts with the zeros run (0 if none)


def test_import_real_shaped_refcoco(tmp_path):
    write_refcoco(tmp_path)
    with pytest.raises(DataError, match="imgs: image folder not found"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path / "imgs")
    (tmp_path / "imgs").mkdir()
    ds = import_refer(tmp_path, "refcoco", "unc", tmp_path / "imgs")
    assert ds.name == "refcoco_unc"
    assert ds.categories == ["person", "car", "dog"]  # by COCO category id 1, 3, 18
    assert [(im.id, im.file, im.width, im.height, im.split) for im in ds.images()] == [
        (581857, "COCO_train2014_000000581857.jpg", 50, 40, "mixed"),
        (9, "COCO_train2014_000000000009.jpg", 20, 30, "train"),
        (25, "COCO_train2014_000000000025.jpg", 10, 10, ""),
    ]
    assert ds.meta["image_root"] == str((tmp_path / "imgs").resolve()) and ds.meta["skipped"] == 0
    dog = ds.object(1719310)
    assert dog.category == "dog" and dog.box == (10.0, 10.0, 30.0, 20.0) and dog.attributes == {}
    assert masks.area(dog.mask) == 200 and masks.to_bbox(dog.mask) == (10.0, 10.0, 30.0, 20.0)
    crowd = ds.object(900100581857)
    assert crowd.box == (1.0, 2.0, 7.0, 6.0) and masks.to_bbox(crowd.mask) == (1.0, 2.0, 7.0, 6.0)
    assert masks.area(crowd.mask) == 24 and isinstance(crowd.mask["counts"], str)
    man = ds.object(5)
    assert man.box == (0.5, 1.25, 15.0, 15.0) and masks.area(man.mask) == 50  # two 5x5 polygons merged
    assert masks.area(ds.object(6).mask) == 600
    q = ds.query(0)
    assert (q.image_id, q.task, q.text, q.group, q.split, q.kind) == (581857, "expression", "the brown dog", 0,
                                                                      "testAB", "")
    assert q.raw == "The brown dog at the café"  # Python 2 str, latin-1
    assert q.mentions == (Mention(0, 3, "referent", (1719310,), "dog"),) and q.relations == ()
    assert ds.query(7).text == "crowd of people"  # no tokens: sent.split()
    assert ds.query(7).raw == "crowd  of people"
    assert ds.query(2).referent_object_id == 5 and ds.query(2).split == "train"
    assert [q.id for q in ds.queries("testA")] == [0, 1, 7]
    assert [q.id for q in ds.queries("testB")] == [0, 1]
    assert [q.id for q in ds.queries("train")] == [2]


def test_refclef_list_of_rles_is_merged(tmp_path):
    a = np.zeros((8, 8), bool)
    a[0:2, 0:2] = True
    b = np.zeros((8, 8), bool)
    b[5:8, 4:8] = True
    inst = {"images": [{"id": 1, "file_name": "1.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 8, 8], "iscrowd": 0,
                             "segmentation": [masks.encode(a), masks.encode(b)]}],
            "categories": [{"id": 2, "name": "sky"}]}
    refs = [{"ref_id": 4, "ann_id": 3, "image_id": 1, "split": "test",
             "sentences": [{"tokens": ["sky"], "raw": "sky", "sent": "sky", "sent_id": 9}]}]
    folder = tmp_path / "refclef"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps(inst))
    (folder / "refs(berkeley).p").write_bytes(pickle.dumps(refs, protocol=2))
    ds = import_refer(tmp_path, "refclef", "berkeley", tmp_path)
    assert np.array_equal(masks.decode(ds.object(3).mask), a | b)
    assert ds.image(1).split == "test" and ds.query(9).text == "sky"


# ------------------------------------------------------------------------------------ bad input

def _instances(tmp_path: Path) -> dict:
    write_refcoco(tmp_path / "orig")
    return json.loads((tmp_path / "orig" / "refcoco" / "instances.json").read_text())


def _refs(tmp_path: Path) -> list:
    write_refcoco(tmp_path / "orig")
    return pickle.loads((tmp_path / "orig" / "refcoco" / "refs(unc).p").read_bytes(), encoding="latin1")


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DataError, match="refer data root not found"):
        import_refer(tmp_path / "nope", "refcoco", "unc", tmp_path)
    with pytest.raises(DataError, match=r"refcoco: dataset folder not found"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    folder = write_refcoco(tmp_path)
    (folder / "refs(unc).p").unlink()
    with pytest.raises(DataError) as err:
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    assert str(err.value) == f"refs(unc).p not found in {folder}"
    folder = write_refcoco(tmp_path)
    (folder / "instances.json").unlink()
    with pytest.raises(DataError, match=r"instances\.json not found in"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)


def test_unknown_split_by_lists_valid_ones(tmp_path):
    write_refcoco(tmp_path)
    with pytest.raises(UsageError, match=r"unknown split-by 'berkeley' for refcoco; expected one of: unc$"):
        import_refer(tmp_path, "refcoco", "berkeley", tmp_path)
    with pytest.raises(UsageError, match="umd, google"):
        import_refer(tmp_path, "refcocog", "unc", tmp_path)


def test_malformed_instances(tmp_path):
    folder = write_refcoco(tmp_path)
    (folder / "instances.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"instances\.json: malformed JSON \(line 1"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    inst = _instances(tmp_path)
    del inst["annotations"][2]["bbox"]
    write_refcoco(tmp_path, instances=inst)
    with pytest.raises(DataError, match=r"instances\.json: annotation 5: missing key 'bbox'"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    inst = _instances(tmp_path)
    inst["annotations"][0]["segmentation"] = [[1, 2]]
    write_refcoco(tmp_path, instances=inst)
    with pytest.raises(DataError, match=r"annotation 1719310: unreadable segmentation"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)


def test_bad_refs(tmp_path):
    folder = write_refcoco(tmp_path)
    (folder / "refs(unc).p").write_bytes(pickle.dumps({"not": "a list"}, protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: expected a list of refs"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    refs = _refs(tmp_path)
    del refs[2]["split"]
    write_refcoco(tmp_path, refs=refs)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 1: missing key 'split'"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    refs = _refs(tmp_path)
    refs[2]["ann_id"] = 12345
    write_refcoco(tmp_path, refs=refs)
    with pytest.raises(DataError, match=r"ref 1: ann_id 12345 not found in instances\.json"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    (folder / "refs(unc).p").write_bytes(pickle.dumps([_Evil("true")], protocol=2))
    with pytest.raises(DataError, match="forbidden global"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)


@pytest.mark.parametrize("bbox, problem", [([40, 10, 20, 10], "lies outside the 50x40 image"),
                                           ([-3, 0, 5, 5], "lies outside"),
                                           ([10, 10, 0, 5], "has zero area")])
def test_invalid_boxes(tmp_path, bbox, problem):
    inst = _instances(tmp_path)
    inst["annotations"][0]["bbox"] = bbox
    write_refcoco(tmp_path, instances=inst)
    with pytest.raises(DataError) as err:
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    assert "instances.json: annotation 1719310" in str(err.value) and problem in str(err.value)
    ds = import_refer(tmp_path, "refcoco", "unc", tmp_path, skip_invalid=True)
    assert 1719310 not in ds.object_ids.tolist() and ds.meta["skipped_objects"] == 1
    assert ds.meta["skipped"] == 2 and sorted(ds.query_ids.tolist()) == [2, 7]  # ref 0's sentences dropped


def test_sub_pixel_overshoot_is_clipped(tmp_path):
    inst = _instances(tmp_path)
    inst["annotations"][0]["bbox"] = [30.0, 30.0, 20.4, 10.3]  # ends at 50.4, 40.3 in a 50x40 image
    write_refcoco(tmp_path, instances=inst)
    ds = import_refer(tmp_path, "refcoco", "unc", tmp_path)
    assert ds.object(1719310).box == (30.0, 30.0, 50.0, 40.0) and ds.meta["clipped"] == 1


def test_empty_sentence(tmp_path):
    refs = _refs(tmp_path)
    refs[0]["sentences"][1]["tokens"] = []
    write_refcoco(tmp_path, refs=refs)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 0 sentence 1 is empty"):
        import_refer(tmp_path, "refcoco", "unc", tmp_path)
    ds = import_refer(tmp_path, "refcoco", "unc", tmp_path, skip_invalid=True)
    assert ds.meta["skipped"] == 1 and sorted(ds.query_ids.tolist()) == [0, 2, 7]


# ------------------------------------------------------------------------------------ round trips

def rich_dataset(image_root: Path | None = None) -> Dataset:
    """Expressions with groups (interleaved), kinds, context mentions and relations; captions; objects with
    and without masks and attributes; an image with captions only; unused category."""
    rng = np.random.default_rng(0)

    def mask(h, w, box):
        m = np.zeros((h, w), bool)
        x1, y1, x2, y2 = (int(v) for v in box)
        m[y1:y2, x1:x2] = rng.random((y2 - y1, x2 - x1)) < 0.7
        m[y1, x1] = m[y2 - 1, x2 - 1] = True
        return masks.encode(m)

    images = [Image(3, "img3.png", 64, 48, "train"), Image(1, "sub/img1.png", 32, 32, "testA"),
              Image(2, "img2.png", 40, 50, "val"), Image(4, "img4.png", 20, 20, "testB")]
    b = {10: (0.0, 0.0, 20.0, 10.0), 11: (5.0, 5.0, 64.0, 48.0), 12: (30.0, 2.0, 31.0, 3.0),
         20: (1.0, 1.0, 31.0, 31.0), 21: (0.0, 10.0, 5.0, 32.0), 30: (2.0, 3.0, 40.0, 50.0), 40: (0.0, 0.0, 20.0, 20.0)}
    objects = [
        Object(10, 3, "circle", b[10], mask(48, 64, b[10]), {"color": "red", "size": "small"}),
        Object(11, 3, "square", b[11], mask(48, 64, b[11]), {"color": "blue"}),
        Object(12, 3, "circle", b[12], None, {}),
        Object(20, 1, "star", b[20], mask(32, 32, b[20])),
        Object(21, 1, "circle", b[21], None, {"size": "large"}),
        Object(30, 2, "square", b[30], mask(50, 40, b[30])),
        Object(40, 4, "star", b[40], mask(20, 20, b[40])),
    ]
    queries = [
        Query(100, 3, "expression", "the red circle left of the blue square",
              (Mention(0, 3, "referent", (10,), "circle"), Mention(5, 8, "context", (11,), "square")),
              (Relation(0, "left of", 1),), "relation1", "train", 5, "The red circle left of the blue square."),
        Query(101, 1, "expression", "big star", (Mention(0, 2, "referent", (20,), "star"),), (), "size", "testA",
              6, "Big star"),
        Query(102, 3, "expression", "red circle", (Mention(0, 2, "referent", (10,), "circle"),), (), "attribute",
              "train", 5, ""),
        Query(103, 3, "caption", "a circle and a square", (Mention(0, 2, "referent", (10, 12)),
                                                           Mention(3, 5, "referent", (11,))), (), "caption", "train"),
        Query(104, 1, "expression", "circle", (Mention(0, 1, "referent", (21,), "circle"),), (), "category",
              "testA", -1, "circle"),
        Query(105, 2, "expression", "the square", (Mention(0, 2, "referent", (30,), "square", "e7"),), (),
              "category", "val", -1, "the square"),
        Query(106, 4, "caption", "a star", (Mention(0, 2, "referent", (40,)),), (), "caption", "testB"),
        Query(107, 1, "expression", "the big star", (Mention(1, 3, "referent", (20,), "star"),), (), "size",
              "testA", 6, "the big star"),
    ]
    meta = {"image_root": str(image_root)} if image_root else {}
    return Dataset.from_records("rich", images, objects, queries, ["circle", "square", "star", "triangle"], meta)


def expression_records(ds: Dataset) -> dict:
    rec = ds.records()
    rec["queries"] = [q for q in rec["queries"] if q.task == "expression"]
    return rec


def test_export_import_round_trip_is_exact(tmp_path):
    ds = rich_dataset()
    summary = export_refer(ds, tmp_path / "out", "rich", "unc")
    assert summary["skipped_captions"] == 2 and "caption" in summary["notes"][0]
    assert summary["refs"] == 4 and summary["sentences"] == 6 and summary["images_missing"] == 4
    back = import_refer(tmp_path / "out", "rich", "unc", tmp_path / "out" / "images", name="rich")
    assert back.records() == expression_records(ds)
    # The extra keys are invisible to a real reader: refs are plain containers, refer-shaped.
    refs = pickle.loads((tmp_path / "out" / "rich" / "refs(unc).p").read_bytes())
    assert refs == load_restricted(tmp_path / "out" / "rich" / "refs(unc).p")
    by_id = {r["ref_id"]: r for r in refs}
    assert sorted(by_id) == [5, 6, 7, 8]  # groups 5, 6 kept; two group -1 queries get fresh ids
    assert by_id[5]["sent_ids"] == [100, 102] and by_id[5]["ann_id"] == 10 and by_id[5]["split"] == "train"
    assert by_id[6]["file_name"] == "img1_20.png" and by_id[6]["category_id"] == 3
    assert by_id[5]["sentences"][0]["tokens"] == ["the", "red", "circle", "left", "of", "the", "blue", "square"]
    inst = json.loads((tmp_path / "out" / "rich" / "instances.json").read_text())
    ann = {a["id"]: a for a in inst["annotations"]}
    assert ann[11]["bbox"] == [5.0, 5.0, 59.0, 43.0] and ann[11]["attributes"] == {"color": "blue"}
    assert ann[12]["refground"] == {"mask": False} and ann[12]["area"] == 1.0
    assert ann[12]["segmentation"] == [[30.0, 2.0, 31.0, 2.0, 31.0, 3.0, 30.0, 3.0]]
    assert ann[10]["area"] == masks.area(ds.object(10).mask)


def test_without_extra_keys_the_refer_parts_survive(tmp_path):
    ds = rich_dataset()
    export_refer(ds, tmp_path / "out", "rich")
    folder = tmp_path / "out" / "rich"
    refs = pickle.loads((folder / "refs(unc).p").read_bytes())
    for r in refs:
        for s in r["sentences"]:
            del s["refground"]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    back = import_refer(tmp_path / "out", "rich", "unc", tmp_path)
    assert back.objects() == ds.objects() and back.images() == ds.images()
    for q in ds.queries(task="expression"):
        b = back.query(q.id)
        assert (b.text, b.split, b.raw, b.referent_object_id) == (q.text, q.split, q.raw, q.referent_object_id)
        assert b.mentions == (Mention(0, len(q.tokens), "referent", (q.referent_object_id,),
                                      ds.object(q.referent_object_id).category),)


def test_non_integer_boxes_round_trip_within_rounding(tmp_path):
    im = Image(1, "a.png", 100, 100, "train")
    boxes = [(0.1, 0.2, 0.3, 0.7), (10.3, 20.7, 55.9, 99.99), (1 / 3, 2 / 3, 99.1, 33.3)]
    objs = [Object(k + 1, 1, "c", b) for k, b in enumerate(boxes)]
    qs = [Query(k + 1, 1, "expression", "c", (Mention(0, 1, "referent", (k + 1,)),), split="train")
          for k in range(3)]
    ds = Dataset.from_records("nonint", [im], objs, qs)
    export_refer(ds, tmp_path, "nonint")
    back = import_refer(tmp_path, "nonint", "unc", tmp_path, name="nonint")
    np.testing.assert_allclose(back.object_boxes, ds.object_boxes, rtol=0, atol=1e-12)
    assert back.object_boxes[:, :2].tolist() == ds.object_boxes[:, :2].tolist()  # x, y travel unchanged


def test_export_refuses_inconsistent_groups(tmp_path):
    ds = rich_dataset()
    recs = ds.records()
    qs = [dataclasses.replace(q, group=5) if q.id == 101 else q for q in recs["queries"]]
    bad = Dataset.from_records("bad", recs["images"], recs["objects"], qs, recs["categories"])
    with pytest.raises(DataError, match="query 101 of group 5 differs from query 100"):
        export_refer(bad, tmp_path, "bad")
    assert not (tmp_path / "bad").exists()


def test_export_copies_images(tmp_path):
    src = tmp_path / "src"
    for name in ("img3.png", "sub/img1.png", "img2.png"):  # img4.png is missing
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode() * 3)
    ds = rich_dataset(src)
    summary = export_refer(ds, tmp_path / "out", "rich")
    assert summary["images_copied"] == 3 and summary["images_missing"] == 1
    assert (tmp_path / "out" / "images" / "sub" / "img1.png").read_bytes() == b"sub/img1.png" * 3
    assert not (tmp_path / "out" / "images" / "img4.png").exists()
    again = export_refer(ds, tmp_path / "out", "rich")  # a second export over the first is fine
    assert again["images_copied"] == 3
    back = import_refer(tmp_path / "out", "rich", "unc", tmp_path / "out" / "images")
    from refground.data.store import image_path

    assert image_path(back, 1).read_bytes() == b"sub/img1.png" * 3


def test_synth_round_trip(tmp_path):
    synth = pytest.importorskip("refground.data.synth")
    if not hasattr(synth, "generate_dataset"):
        pytest.skip("refground.data.synth.generate_dataset not available yet")
    ds = synth.generate_dataset(name="synth", num_images=12, seed=0, image_size=96, image_dir=tmp_path / "png",
                                workers=1)
    ds.meta["image_root"] = str(tmp_path / "png")  # generate_dataset leaves the image root to its caller
    summary = export_refer(ds, tmp_path / "out", "synth")
    assert summary["images_copied"] == ds.num_images
    back = import_refer(tmp_path / "out", "synth", "unc", tmp_path / "out" / "images", name=ds.name)
    assert back.records() == expression_records(ds)
    assert back.splits() == [s for s in ds.splits() if ds.queries(s, "expression")]
