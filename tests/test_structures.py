"""refground.structures: Boxes and Instances."""

from __future__ import annotations

import pytest
import torch

from refground import boxes as box_ops
from refground.structures import Boxes, Instances

T = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [3.0, 3.0, 3.0, 9.0], [-4.0, 2.0, 30.0, 40.0]])


def test_boxes_construction_and_empty():
    b = Boxes(T)
    assert len(b) == 4 and b.tensor is T
    assert Boxes([[0, 0, 1, 2]]).tensor.dtype == torch.float32
    assert Boxes(torch.tensor([[0, 0, 1, 2]])).dtype == torch.float32  # ints become float
    assert Boxes(T.double()).dtype == torch.float64
    for empty in (torch.zeros(0), torch.zeros(0, 4), []):
        e = Boxes(empty)
        assert e.tensor.shape == (0, 4) and len(e) == 0
        assert e.area().shape == (0,) and e.centers().shape == (0, 2) and e.nonempty().shape == (0,)
        assert e.iou(b).shape == (0, 4)
    with pytest.raises(ValueError):
        Boxes(torch.zeros(3, 5))


def test_boxes_indexing_returns_boxes():
    b = Boxes(T)
    one = b[1]
    assert isinstance(one, Boxes) and one.tensor.tolist() == [T[1].tolist()]
    assert b[1:3].tensor.tolist() == T[1:3].tolist()
    mask = torch.tensor([True, False, False, True])
    assert b[mask].tensor.tolist() == T[mask].tolist()
    assert b[torch.tensor([3, 0])].tensor.tolist() == [T[3].tolist(), T[0].tolist()]
    assert len(b[torch.zeros(4, dtype=torch.bool)]) == 0
    assert [r.tolist() for r in b] == T.tolist()
    with pytest.raises(IndexError):
        b[:, 0]


def test_boxes_geometry_delegates_to_box_ops():
    b = Boxes(T)
    assert torch.equal(b.area(), box_ops.box_area(T))
    assert b.area().tolist() == [100.0, 200.0, 0.0, 34.0 * 38.0]
    assert b.centers().tolist() == [[5.0, 5.0], [10.0, 15.0], [3.0, 6.0], [13.0, 21.0]]
    assert b.widths().tolist() == [10.0, 10.0, 0.0, 34.0] and b.heights().tolist() == [10.0, 20.0, 6.0, 38.0]
    assert b.nonempty().tolist() == [True, True, False, True]
    assert b.nonempty(threshold=10.0).tolist() == [False, False, False, True]
    clipped = b.clip((20, 12))  # (height, width)
    assert clipped.tensor.tolist() == [[0, 0, 10, 10], [5, 5, 12, 20], [3, 3, 3, 9], [0, 2, 12, 20]]
    assert b.tensor[3, 0] == -4.0  # clip returns a copy
    assert torch.equal(b.iou(b[:2]), box_ops.box_iou(T, T[:2]))
    assert b.scale(2.0, 0.5).tensor[1].tolist() == [10.0, 2.5, 30.0, 12.5]
    torch.testing.assert_close(Boxes.from_format(b.convert("cxcywh"), "cxcywh").tensor, T)
    assert b.convert("xywh")[1].tolist() == [5.0, 5.0, 10.0, 20.0]


def test_boxes_cat_to_clone():
    b = Boxes(T)
    c = Boxes.cat([b[:1], Boxes(torch.zeros(0, 4)), b[2:]])
    assert c.tensor.tolist() == [T[0].tolist()] + T[2:].tolist()
    assert len(Boxes.cat([])) == 0
    assert b.to(torch.float64).dtype == torch.float64 and b.to("cpu").device.type == "cpu"
    k = b.clone()
    k.tensor[0, 0] = 99.0
    assert T[0, 0] == 0.0
    with pytest.raises(ValueError):
        Boxes.cat([b, T])
    assert "Boxes(" in repr(b)


def make() -> Instances:
    inst = Instances((30, 40), scores=torch.tensor([0.9, 0.1, 0.5, 0.7]))
    inst.boxes = Boxes(T)
    inst.labels = ["a", "b", "c", "d"]
    return inst


def test_instances_fields():
    inst = make()
    assert len(inst) == 4 and inst.image_size == (30, 40)
    assert inst.has("boxes") and not inst.has("masks")
    assert inst.get("labels") == ["a", "b", "c", "d"] and inst.labels is inst.get("labels")
    assert list(inst.get_fields()) == ["scores", "boxes", "labels"]
    inst.set("scores", torch.zeros(4))  # replacing with the same length is fine
    with pytest.raises(ValueError, match="length"):
        inst.extra = torch.zeros(3)
    with pytest.raises(ValueError, match="length"):
        inst.set("scores", torch.zeros(5))
    with pytest.raises(ValueError):
        inst.set("count", 3)  # no length
    inst.remove("labels")
    assert not inst.has("labels")
    del inst.scores
    assert list(inst.get_fields()) == ["boxes"]
    with pytest.raises(AttributeError):
        inst.labels
    with pytest.raises(KeyError):
        inst.get("labels")
    with pytest.raises(KeyError):
        inst.remove("labels")
    assert len(Instances((1, 1))) == 0
    assert "num_instances=1" in repr(inst[0])


def test_instances_indexing():
    inst = make()
    top = inst[inst.scores > 0.6]
    assert isinstance(top, Instances) and top.image_size == (30, 40)
    assert top.scores.tolist() == pytest.approx([0.9, 0.7]) and top.labels == ["a", "d"]
    assert isinstance(top.boxes, Boxes) and top.boxes.tensor.tolist() == [T[0].tolist(), T[3].tolist()]
    order = inst[torch.argsort(inst.scores, descending=True)]
    assert order.labels == ["a", "d", "c", "b"]
    assert inst[1:3].labels == ["b", "c"] and len(inst[1:3].boxes) == 2
    last = inst[-1]
    assert len(last) == 1 and last.labels == ["d"] and last.boxes.tensor.tolist() == [T[3].tolist()]
    assert inst[0].scores.shape == (1,)
    assert len(inst[torch.zeros(4, dtype=torch.bool)]) == 0
    with pytest.raises(IndexError):
        inst[4]
    with pytest.raises(IndexError):
        inst[torch.tensor([True, False])]


def test_instances_cat_and_to():
    a, b = make(), make()[2:]
    c = Instances.cat([a, b])
    assert len(c) == 6 and c.labels == ["a", "b", "c", "d", "c", "d"]
    assert c.boxes.tensor.tolist() == T.tolist() + T[2:].tolist()
    assert c.scores.shape == (6,)
    with pytest.raises(ValueError, match="image sizes"):
        Instances.cat([a, Instances((1, 2), scores=torch.zeros(1), boxes=Boxes(T[:1]), labels=["x"])])
    with pytest.raises(ValueError, match="fields"):
        Instances.cat([a, Instances((30, 40), scores=torch.zeros(1))])
    with pytest.raises(ValueError):
        Instances.cat([])
    d = a.to(torch.float64)
    assert d.scores.dtype == torch.float64 and d.boxes.dtype == torch.float64 and d.labels == a.labels
