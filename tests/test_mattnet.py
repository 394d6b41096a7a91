"""MAttNet detections: reading (validation, clipping, ranking) and writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refground.data.formats.mattnet import ImportedDetections, write_mattnet_detections
from refground.data.model import Dataset, Image
from refground.errors import DataError, UsageError
from refground.features.base import ProposalSource, Proposals


@pytest.fixture(scope="module")
def ds() -> Dataset:
    images = [Image(1, "a.jpg", 80, 50, "train"), Image(2, "b.jpg", 40, 90, "train"), Image(7, "c.jpg", 64, 64, "val")]
    return Dataset.from_records("tiny", images, [], [])


def det(det_id, image_id=1, box=(10.0, 5.0, 20.0, 15.0), category_id=3, category_name="dog", score=0.5, **extra):
    return {"det_id": det_id, "image_id": image_id, "box": list(box), "category_id": category_id,
            "category_name": category_name, "score": score, **extra}


DETS = [
    det(1, 1, (0, 0, 80, 50), 3, "dog", 0.9, h5_id=0),
    det(2, 1, (10.5, 2.25, 20, 30), 1, "person", 0.95),
    det(5, 1, (30, 30, 10, 10), 1, "person", 0.4),
    det(4, 1, (31, 31, 10, 10), 1, "person", 0.4),  # tie with det 5: det_id 4 first
    det(3, 2, (1, 2, 3, 4), 7, "cat", 0.2),
]


def write(tmp_path, payload, name="dets.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_read_ranks_and_scores(tmp_path, ds):
    src = ImportedDetections(write(tmp_path, DETS), ds)
    assert isinstance(src, ProposalSource)
    assert src.class_names == ["person", "dog", "cat"]  # by category_id 1, 3, 7
    assert src.category_ids.tolist() == [1, 3, 7] and len(src) == 5 and src.clipped == 0
    p1, p2, p7 = src.propose([None, None, None], [1, 2, 7], max_proposals=10)
    assert torch.equal(p1.scores, torch.tensor([0.95, 0.9, 0.4, 0.4]))
    assert torch.equal(p1.labels, torch.tensor([0, 1, 0, 0]))
    assert torch.equal(p1.boxes, torch.tensor([[10.5, 2.25, 30.5, 32.25], [0, 0, 80, 50], [31, 31, 41, 41],
                                               [30, 30, 40, 40]]))
    assert p1.boxes.dtype == p1.scores.dtype == p1.class_scores.dtype == torch.float32
    assert p1.labels.dtype == torch.int64 and p1.features is None
    expected = torch.zeros(4, 3)
    expected[torch.arange(4), p1.labels] = p1.scores  # one-hot at the category times the score
    assert torch.equal(p1.class_scores, expected)
    assert torch.equal(p2.boxes, torch.tensor([[1.0, 2.0, 4.0, 6.0]])) and p2.labels.tolist() == [2]
    assert p7.boxes.shape == (0, 4) and p7.class_scores.shape == (0, 3) and p7.scores.shape == (0,)
    # no NMS (dets 4 and 5 overlap at IoU 0.68), max_proposals cuts the ranking
    top = src.propose([None], [1], max_proposals=2)[0]
    assert torch.equal(top.boxes, p1.boxes[:2])
    assert len(src.propose([None], [1], 0)[0]) == 0
    with pytest.raises(DataError, match="image 99 is not in dataset tiny"):
        src.propose([None], [99], 3)
    with pytest.raises(ValueError):
        src.propose([], [1], 3)


def test_dict_form_and_identity(tmp_path, ds):
    plain = write(tmp_path, DETS, "a.json")
    wrapped = write(tmp_path, {"dets": DETS, "info": "MAttNet"}, "b.json")
    a, b = ImportedDetections(plain, ds), ImportedDetections(wrapped, ds)
    for pa, pb in zip(a.propose([0, 0], [1, 2], 9), b.propose([0, 0], [1, 2], 9)):
        assert torch.equal(pa.boxes, pb.boxes) and torch.equal(pa.class_scores, pb.class_scores)
    assert a.identity() == {"kind": "mattnet-detections", "file": hashlib.sha256(plain.read_bytes()).hexdigest()}
    assert a.identity() != b.identity()
    json.dumps(a.identity())


def test_clipping_within_tolerance(tmp_path, ds):
    dets = [det(1, 1, (-0.5, 0, 80.6, 50.9)), det(2, 2, (39.5, 0, 0.9, 90.0)), det(3, 1, (2, 2, 3, 3))]
    src = ImportedDetections(write(tmp_path, dets), ds)
    assert src.clipped == 2
    p1, p2 = src.propose([0, 0], [1, 2], 5)
    assert p1.boxes.tolist()[0] == [0.0, 0.0, 80.0, 50.0]
    assert p2.boxes.tolist() == [[39.5, 0.0, 40.0, 90.0]]


@pytest.mark.parametrize("payload, message", [
    ("[{", "malformed JSON (line 1 column"),
    ('{"detections": []}', 'expected a list of detections or an object with a "dets" list'),
    ("[1]", "detection 0 is not an object"),
    ([{k: v for k, v in det(1).items() if k != "det_id"}], "detection 0 has no 'det_id'"),
    ([{k: v for k, v in det(1).items() if k != "image_id"}], "detection 0 (det_id 1) has no 'image_id'"),
    ([{k: v for k, v in det(1).items() if k != "box"}], "detection 0 (det_id 1) has no 'box'"),
    ([{k: v for k, v in det(1).items() if k != "category_id"}], "detection 0 (det_id 1) has no 'category_id'"),
    ([{k: v for k, v in det(1).items() if k != "category_name"}], "(det_id 1) has no 'category_name'"),
    ([{k: v for k, v in det(1).items() if k != "score"}], "detection 0 (det_id 1) has no 'score'"),
    ([det(1, image_id="1")], "image_id '1' is not an integer"),
    ([det(True)], "det_id True is not an integer"),
    ([det(1, category_id=2.5)], "category_id 2.5 is not an integer"),
    ([det(1, category_name="")], "category_name '' is not a non-empty string"),
    ('[{"det_id": 1, "image_id": 1, "box": [1, 1, 2, 2], "category_id": 1, "category_name": "a", "score": NaN}]',
     "score nan is not a finite number"),
    ('[{"det_id": 1, "image_id": 1, "box": [1, 1, 2, 2], "category_id": 1, "category_name": "a", "score": Infinity}]',
     "score inf is not a finite number"),
    ([det(1, score="0.5")], "score '0.5' is not a finite number"),
    ([det(1, score=1.5)], "score 1.5 is outside [0, 1]"),
    ([det(1, box=(1, 2, 3))], "box [1, 2, 3] is not [x, y, w, h] numbers"),
    ([det(1, box=(1, 2, "3", 4))], "is not [x, y, w, h] numbers"),
    ('[{"det_id": 1, "image_id": 1, "box": [1, NaN, 2, 2], "category_id": 1, "category_name": "a", "score": 0.5}]',
     "box [1.0, nan, 2.0, 2.0] [x, y, w, h] is not finite (image 1)"),
    ([det(1), det(2, image_id=99)], "detection 1 (det_id 2) refers to image 99, not in dataset tiny"),
    ([det(1, box=(70, 0, 12, 10))], "box [70.0, 0.0, 12.0, 10.0] [x, y, w, h] lies outside the 80x50 image (image 1)"),
    ([det(1, image_id=2, box=(0, -1.5, 10, 10))], "lies outside the 40x90 image (image 2)"),
    ([det(1, box=(5, 5, 0, 10))], "box [5.0, 5.0, 0.0, 10.0] [x, y, w, h] has zero area"),
    ([det(1, box=(5, 5, 10, -2))], "has zero area"),
    ([det(1), det(1)], "detection 1 (det_id 1): det_id 1 repeats detection 0"),
    ([det(1), det(2, category_name="wolf")], "category_id 3 is named 'wolf' here but 'dog' before"),
])
def test_validation_errors(tmp_path, ds, payload, message):
    path = write(tmp_path, payload)
    with pytest.raises(DataError) as err:
        ImportedDetections(path, ds)
    msg = str(err.value)
    assert msg.startswith(str(path)) and message in msg and "\n" not in msg, msg


def test_file_errors(tmp_path, ds):
    with pytest.raises(DataError, match="detections file not found"):
        ImportedDetections(tmp_path / "nope.json", ds)
    with pytest.raises(DataError, match="is a folder"):
        ImportedDetections(tmp_path, ds)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'[{"category_name": "caf\xe9"}]')
    with pytest.raises(DataError, match="malformed JSON"):
        ImportedDetections(bad, ds)


def test_round_trip_dicts(tmp_path, ds):
    path = tmp_path / "out" / "dets.json"
    assert write_mattnet_detections(path, DETS) == 5
    data = json.loads(path.read_text())
    assert isinstance(data, list) and data[0] == {k: v for k, v in DETS[0].items() if k != "h5_id"}
    back = ImportedDetections(path, ds)
    orig = ImportedDetections(write(tmp_path, DETS), ds)
    assert back.class_names == orig.class_names
    for a, b in zip(back.propose([0, 0], [1, 2], 9), orig.propose([0, 0], [1, 2], 9)):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert write_mattnet_detections(tmp_path / "d.json", DETS, as_dict=True) == 5
    assert list(json.loads((tmp_path / "d.json").read_text())) == ["dets"]
    with pytest.raises(UsageError, match="detection 0 has no 'score'"):
        write_mattnet_detections(tmp_path / "x.json", [{k: v for k, v in DETS[0].items() if k != "score"}])
    assert not (tmp_path / "x.json").exists()


def test_round_trip_proposals(tmp_path, ds):
    names = ["person", "dog", "cat"]
    props = {
        2: Proposals(boxes=torch.tensor([[1.5, 2.0, 30.25, 88.0]]), scores=torch.tensor([0.25]),
                     labels=torch.tensor([2]), class_scores=torch.tensor([[0.1, 0.2, 0.25]])),
        1: Proposals(boxes=torch.tensor([[0.0, 0.0, 80.0, 50.0], [10.0, 10.0, 20.5, 30.0]]),
                     scores=torch.tensor([0.75, 0.5]), labels=torch.tensor([1, 0]),
                     class_scores=torch.tensor([[0.0, 0.75, 0.0], [0.5, 0.0, 0.0]])),
    }
    path = tmp_path / "ours.json"
    assert write_mattnet_detections(path, props, class_names=names, category_ids=[10, 20, 30]) == 3
    data = json.loads(path.read_text())
    assert [d["det_id"] for d in data] == [1, 2, 3] and [d["image_id"] for d in data] == [1, 1, 2]
    assert data[1] == {"det_id": 2, "image_id": 1, "box": [10.0, 10.0, 10.5, 20.0], "category_id": 10,
                       "category_name": "person", "score": 0.5}
    back = ImportedDetections(path, ds)
    assert back.class_names == names and back.category_ids.tolist() == [10, 20, 30]
    for image_id, p in zip([1, 2, 7], back.propose([0, 0, 0], [1, 2, 7], 10)):
        if image_id == 7:
            assert len(p) == 0
            continue
        assert torch.allclose(p.boxes, props[image_id].boxes)
        assert torch.equal(p.scores, props[image_id].scores) and torch.equal(p.labels, props[image_id].labels)
    with pytest.raises(UsageError, match="class_names is needed"):
        write_mattnet_detections(tmp_path / "y.json", props)
    with pytest.raises(UsageError, match="2 category ids for 3 class names"):
        write_mattnet_detections(tmp_path / "y.json", props, class_names=names, category_ids=[1, 2])


def test_large_file_is_vectorised(tmp_path, ds):
    rng = np.random.default_rng(0)
    n = 20000
    xy = rng.uniform(0, 30, (n, 2))
    wh = rng.uniform(1, 20, (n, 2))
    scores = rng.integers(0, 5, n) / 4  # many ties
    dets = [{"det_id": int(n - k), "image_id": 1, "box": [*xy[k], *wh[k]], "category_id": int(k % 4),
             "category_name": f"c{k % 4}", "score": float(scores[k])} for k in range(n)]
    src = ImportedDetections(write(tmp_path, dets), ds)
    p = src.propose([0], [1], n)[0]
    order = sorted(range(n), key=lambda k: (-scores[k], n - k))  # score desc, det_id asc
    assert torch.equal(p.scores, torch.tensor(scores[order], dtype=torch.float32))
    assert torch.allclose(p.boxes[:, :2], torch.tensor(xy[order], dtype=torch.float32))
