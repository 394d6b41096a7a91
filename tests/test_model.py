"""Dataset model: records <-> columns, store round trip, split semantics, validation."""

import json

import pytest

from refground.data.model import Dataset, Image, Mention, Object, Query, Relation, split_matches
from refground.data.store import load_dataset, save_dataset
from refground.data.validate import validate_dataset
from refground.errors import ArtifactError, DataError, UsageError


def tiny() -> Dataset:
    images = [Image(1, "a.png", 40, 30, "train"), Image(2, "b.png", 50, 50, "testA")]
    objects = [
        Object(11, 2, "circle", (1.0, 2.0, 10.0, 12.0), {"size": [50, 50], "counts": "0"}, {"color": "red"}),
        Object(10, 1, "square", (0.0, 0.0, 40.0, 30.0)),
        Object(12, 2, "star", (20.0, 20.0, 30.0, 31.0), None, {"size": "small"}),
    ]
    queries = [
        Query(100, 2, "expression", "the red circle left of the star",
              (Mention(0, 3, "referent", (11,), "circle"), Mention(5, 7, "context", (12,), "star")),
              (Relation(0, "left of", 1),), "relation1", "testA", 7, "The red circle left of the star"),
        Query(101, 1, "caption", "a square", (Mention(0, 2, "referent", (10,), entity="3"),), (), "caption", "train"),
    ]
    return Dataset.from_records("tiny", images, objects, queries, meta={"source": "test"})


def test_records_round_trip_and_grouping():
    ds = tiny()
    assert ds.object_ids.tolist() == [10, 11, 12]  # grouped by image order
    assert ds.object_slice(2) == slice(1, 3)
    assert [o.id for o in ds.objects_of(2)] == [11, 12]
    o = ds.object(11)
    assert o.mask == {"size": [50, 50], "counts": "0"} and o.attributes == {"color": "red"}
    assert ds.object(12).attributes == {"size": "small"}
    q = ds.query(100)
    assert q.referent_object_id == 11 and q.tokens[:3] == ["the", "red", "circle"]
    assert q.relations == (Relation(0, "left of", 1),) and q.group == 7
    validate_dataset(ds)


def test_store_round_trip_is_exact_and_deterministic(tmp_path):
    ds = tiny()
    save_dataset(ds, tmp_path / "d1")
    save_dataset(ds, tmp_path / "d2")
    back = load_dataset(tmp_path / "d1")
    assert back.records() == ds.records()
    for f in sorted((tmp_path / "d1" / "annotations").iterdir()):
        assert f.read_bytes() == (tmp_path / "d2" / "annotations" / f.name).read_bytes()
    assert back.meta["image_root"] == str(tmp_path / "d1" / "images")


def test_incomplete_dataset_is_refused(tmp_path):
    save_dataset(tiny(), tmp_path / "d")
    m = tmp_path / "d" / "manifest.json"
    data = json.loads(m.read_text())
    data["complete"] = False
    m.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="incomplete"):
        load_dataset(tmp_path / "d")
    with pytest.raises(ArtifactError, match="missing manifest"):
        load_dataset(tmp_path / "nothing")


@pytest.mark.parametrize("stored,requested,expected", [
    ("testAB", "testA", True), ("testAB", "testB", True), ("testAB", "testC", False),
    ("testA", "test", True), ("train", "test", False), ("testAB", "testAB", True), ("testA", "testAB", False),
    ("val", "val", True), ("train", "val", False), ("train", "all", True),
])
def test_split_semantics_follow_refer(stored, requested, expected):
    assert split_matches(stored, requested) is expected


def test_unknown_split_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown split 'tset'"):
        tiny().queries("tset")
    assert [q.id for q in tiny().queries("testA")] == [100]
    assert [q.id for q in tiny().queries("all", task="caption")] == [101]


@pytest.mark.parametrize("box,message", [
    ((-1.0, 0.0, 5.0, 5.0), "lies outside the 40x30 image"),
    ((0.0, 0.0, 41.0, 5.0), "lies outside the 40x30 image"),
    ((3.0, 3.0, 3.0, 9.0), "zero area"),
])
def test_validation_rejects_bad_boxes(box, message):
    ds = Dataset.from_records("bad", [Image(1, "a.png", 40, 30, "train")], [Object(1, 1, "x", box)], [])
    with pytest.raises(DataError, match=message):
        validate_dataset(ds)


def test_validation_rejects_empty_query_and_bad_spans():
    im, ob = [Image(1, "a.png", 40, 30, "train")], [Object(1, 1, "x", (0.0, 0.0, 4.0, 4.0))]
    empty = Query(1, 1, "expression", "", (Mention(0, 1, "referent", (1,)),))
    with pytest.raises(DataError, match="query 1 is empty"):
        validate_dataset(Dataset.from_records("e", im, ob, [empty]))
    span = Query(2, 1, "expression", "an x", (Mention(0, 3, "referent", (1,)),))
    with pytest.raises(DataError, match="outside its 2 tokens"):
        validate_dataset(Dataset.from_records("s", im, ob, [span]))
    two = Query(3, 1, "expression", "an x", (Mention(0, 2, "referent", (1, 1)),))
    with pytest.raises(DataError, match="refers to 2 objects"):
        validate_dataset(Dataset.from_records("t", im, ob, [two]))
