"""Per-image containers in the style of detectron2: :class:`Boxes` and :class:`Instances`.

Code that handles features, graphs, pseudo labels or predictions passes these around instead of indexing
``[:, 2]`` by hand. All box math is delegated to :mod:`refground.boxes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from refground import boxes as box_ops

Index = int | slice | Tensor | Sequence[int]


class Boxes:
    """N boxes as one ``Tensor[N, 4]`` float tensor, xyxy in continuous absolute pixels (``.tensor``).

    Empty-safe: an empty input becomes shape (0, 4). Indexing with an int, slice, bool mask Tensor[N] or
    index Tensor[K] returns a :class:`Boxes` (an int gives one box, shape (1, 4)); like tensor indexing, a
    slice shares memory with the original.
    """

    def __init__(self, tensor: Tensor | Sequence[Sequence[float]]) -> None:
        if not isinstance(tensor, Tensor):
            tensor = torch.as_tensor(tensor, dtype=torch.float32)
        if not tensor.is_floating_point():
            tensor = tensor.float()
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.ndim != 2 or tensor.shape[1] != 4:
            raise ValueError(f"Boxes needs a Tensor[N, 4], got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    @classmethod
    def from_format(cls, tensor: Tensor, fmt: str) -> Boxes:
        """Boxes from Tensor[N, 4] in ``fmt`` ("xyxy", "xywh" or "cxcywh")."""
        t = torch.as_tensor(tensor)
        t = t if t.is_floating_point() else t.float()
        return cls(box_ops.box_convert(t.reshape(-1, 4), fmt, "xyxy"))

    def convert(self, fmt: str) -> Tensor:
        """The boxes as Tensor[N, 4] in ``fmt`` ("xyxy", "xywh" or "cxcywh")."""
        return box_ops.box_convert(self.tensor, "xyxy", fmt)

    @classmethod
    def cat(cls, boxes_list: Sequence[Boxes]) -> Boxes:
        """Concatenate a list of Boxes (an empty list gives empty Boxes)."""
        if not boxes_list:
            return cls(torch.zeros(0, 4))
        if not all(isinstance(b, Boxes) for b in boxes_list):
            raise ValueError("Boxes.cat needs a list of Boxes")
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))

    def clone(self) -> Boxes:
        return Boxes(self.tensor.clone())

    def to(self, *args: Any, **kwargs: Any) -> Boxes:
        """Boxes with the tensor moved / cast like ``Tensor.to``."""
        return Boxes(self.tensor.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, item: Index) -> Boxes:
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        out = self.tensor[item]
        if out.ndim != 2:
            raise IndexError(f"indexing Boxes with {item!r} did not give a Tensor[K, 4]")
        return Boxes(out)

    def __iter__(self) -> Iterator[Tensor]:
        """Yields each box as Tensor[4]."""
        yield from self.tensor

    def __repr__(self) -> str:
        return f"Boxes({self.tensor!r})"

    def widths(self) -> Tensor:
        """Tensor[N]: x2 - x1."""
        return self.tensor[:, 2] - self.tensor[:, 0]

    def heights(self) -> Tensor:
        """Tensor[N]: y2 - y1."""
        return self.tensor[:, 3] - self.tensor[:, 1]

    def area(self) -> Tensor:
        """Tensor[N]: area of each box (0 for degenerate boxes)."""
        return box_ops.box_area(self.tensor)

    def centers(self) -> Tensor:
        """Tensor[N, 2]: (cx, cy) of each box."""
        return box_ops.box_centers(self.tensor)

    def clip(self, image_size: tuple[int, int]) -> Boxes:
        """New Boxes clipped to an image of ``image_size`` (height, width). (detectron2 clips in place;
        this returns a copy so that views of shared tensors are never modified.)"""
        return Boxes(box_ops.clip_boxes_to_image(self.tensor, image_size))

    def nonempty(self, threshold: float = 0.0) -> Tensor:
        """Bool Tensor[N]: width > threshold and height > threshold."""
        return (self.widths() > threshold) & (self.heights() > threshold)

    def scale(self, scale_x: float, scale_y: float) -> Boxes:
        """New Boxes with x coordinates times ``scale_x`` and y coordinates times ``scale_y``."""
        factor = self.tensor.new_tensor([scale_x, scale_y, scale_x, scale_y])
        return Boxes(self.tensor * factor)

    def iou(self, other: Boxes) -> Tensor:
        """Tensor[N, M]: pairwise IoU with ``other`` (M boxes), :func:`refground.boxes.box_iou`."""
        return box_ops.box_iou(self.tensor, other.tensor)


def _field_len(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        raise ValueError(f"an Instances field needs a length, got {type(value).__name__}") from None


def _index_field(value: Any, item: int | slice | Tensor | Sequence[int]) -> Any:
    """Index one field: tensors, Boxes and anything tensor-indexable directly; lists / tuples by position."""
    if isinstance(value, (list, tuple)):
        if isinstance(item, slice):
            return type(value)(value[item])
        idx = torch.as_tensor(item)
        if idx.dtype == torch.bool:
            if idx.shape != (len(value),):
                raise IndexError(f"bool mask of shape {tuple(idx.shape)} for a field of length {len(value)}")
            idx = torch.nonzero(idx).squeeze(1)
        return type(value)(value[i] for i in idx.reshape(-1).tolist())
    return value[item]


class Instances:
    """Per-image set of N instances: ``image_size`` (height, width) plus any number of fields of length N.

    Fields are tensors (first dimension N), :class:`Boxes`, lists or anything with ``len`` and
    tensor-style indexing; set them as attributes (``inst.scores = t``) or with :meth:`set`. Setting a
    field whose length differs from the existing ones raises ValueError. Indexing (int, slice, bool mask,
    index tensor) indexes every field and returns a new Instances; an int keeps a length-1 Instances.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        h, w = image_size
        self._image_size = (int(h), int(w))
        self._fields: dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width)."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; guard _fields so copy/pickle of a bare object cannot recurse.
        if name == "_fields" or name not in self._fields:
            raise AttributeError(f"Instances has no field {name!r}")
        return self._fields[name]

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            super().__delattr__(name)
        else:
            self.remove(name)

    def set(self, name: str, value: Any) -> None:
        """Add or replace field ``name``; ValueError if its length differs from the other fields'."""
        n = _field_len(value)
        others = [k for k in self._fields if k != name]
        if others and n != len(self._fields[others[0]]):
            raise ValueError(f"field {name!r} has length {n}, but the other fields have length "
                             f"{len(self._fields[others[0]])}")
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        """Field ``name`` (KeyError if absent)."""
        if name not in self._fields:
            raise KeyError(f"Instances has no field {name!r}")
        return self._fields[name]

    def remove(self, name: str) -> None:
        """Delete field ``name`` (KeyError if absent)."""
        if name not in self._fields:
            raise KeyError(f"Instances has no field {name!r}")
        del self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        """The field dict (name -> value), in insertion order."""
        return self._fields

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        return 0

    def to(self, *args: Any, **kwargs: Any) -> Instances:
        """New Instances with every field that has ``.to`` (tensors, Boxes) moved / cast."""
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            out.set(name, value.to(*args, **kwargs) if hasattr(value, "to") else value)
        return out

    def __getitem__(self, item: Index) -> Instances:
        if isinstance(item, int):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"Instances index {item} out of range for length {n}")
            item = slice(item, item + 1 if item != -1 else None)
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            out.set(name, _index_field(value, item))
        return out

    @staticmethod
    def cat(instance_lists: Sequence[Instances]) -> Instances:
        """Concatenate Instances of the same image size and field names, field by field (tensors with
        torch.cat, Boxes with Boxes.cat, lists / tuples by concatenation)."""
        if not instance_lists:
            raise ValueError("Instances.cat needs at least one Instances")
        first = instance_lists[0]
        names = list(first._fields)
        for inst in instance_lists[1:]:
            if inst.image_size != first.image_size:
                raise ValueError(f"Instances.cat: image sizes differ ({first.image_size} vs {inst.image_size})")
            if sorted(inst._fields) != sorted(names):
                raise ValueError(f"Instances.cat: fields differ ({sorted(names)} vs {sorted(inst._fields)})")
        out = Instances(first.image_size)
        for name in names:
            values = [inst._fields[name] for inst in instance_lists]
            v0 = values[0]
            if isinstance(v0, Tensor):
                merged = torch.cat(values, dim=0)
            elif isinstance(v0, (list, tuple)):
                merged = type(v0)(x for v in values for x in v)
            elif hasattr(type(v0), "cat"):
                merged = type(v0).cat(values)
            else:
                raise ValueError(f"Instances.cat: cannot concatenate field {name!r} of type {type(v0).__name__}")
            out.set(name, merged)
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {type(v).__name__}" for k, v in self._fields.items())
        return f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, " \
               f"image_width={self._image_size[1]}, fields=[{fields}])"
