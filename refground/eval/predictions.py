"""The predictions file that ``refground eval`` scores: JSON lines keyed by query id.

One JSON object per line (blank lines are skipped). Boxes are ``[x1, y1, x2, y2]`` in continuous
absolute pixels of the query's image (no +1), four finite numbers with ``x2 >= x1`` and ``y2 >= y1``.
There are two line types, one per kind of key:

**Query lines** (:class:`QueryPrediction`, for expression queries: comprehension, segmentation,
proposals), keyed by ``query_id``; any combination of::

    {"query_id": 17, "box": [x1, y1, x2, y2]}                    the top-1 box ("score": optional)
    {"query_id": 17, "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}
                                                                 a ranked list, best first (may be
                                                                 empty); "scores" optional and, when
                                                                 given, one per box and non-increasing
    {"query_id": 17, "mask": {"size": [h, w], "counts": "..."}}  a COCO RLE (compressed string counts or
                                                                 an uncompressed list), the image's size
    {"query_id": 17, "point": [x, y]}                            a localisation point (e.g. the maximum of
                                                                 a heatmap): two finite numbers, continuous
                                                                 image pixels (pixel (r, c) spans
                                                                 [c, c+1) x [r, r+1))

The top-1 box is ``box`` if given, else ``boxes[0]``; proposal recall reads ``boxes`` (or ``[box]``);
localisation accuracy (``loc_acc``) reads ``point``.

**Phrase lines** (:class:`PhrasePrediction`, for caption queries: phrase grounding), keyed by
``(query_id, mention)`` where ``mention`` indexes ``Query.mentions``; one line per phrase::

    {"query_id": 17, "mention": 2, "box": [x1, y1, x2, y2]}      ("boxes"/"scores" as above also allowed;
                                                                 "mask" and "point" are not)

Optional on every line: ``"image_id"`` (checked against the dataset). Any other field is an error (it
catches typos such as ``"bbox"``). Two lines with the same key, an empty file, malformed JSON, a missing
or non-integer ``query_id`` and bad boxes, masks or points are :class:`~refground.errors.DataError`
one-liners naming the file and line; ids unknown to the dataset are reported the same way by
:func:`refground.eval.evaluate.evaluate`.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from refground.atomic import atomic_file
from refground.errors import DataError

Box = tuple[float, float, float, float]
Point = tuple[float, float]
FIELDS = ("query_id", "mention", "image_id", "box", "score", "boxes", "scores", "mask", "point")
_FIELD_SET = frozenset(FIELDS)
# The exact types a decoded JSON number has; anything else (bool, numpy scalars, strings) takes the
# per-value checks, which decide and word the error.
_NUMBER_TYPES = frozenset((int, float))
# Lines are written with this one encoder: json.dumps(obj, separators=...) builds a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(", ", ": "))


class _BoxChoice:
    """Top-1 and ranked boxes of a line that has ``box`` and/or ``boxes`` (shared by both line types)."""

    __slots__ = ()
    box: Box | None
    boxes: tuple[Box, ...] | None

    @property
    def top_box(self) -> Box | None:
        """``box``, else the first of ``boxes``, else None."""
        if self.box is not None:
            return self.box
        return self.boxes[0] if self.boxes else None

    @property
    def ranked(self) -> tuple[Box, ...]:
        """The ranked list for proposal recall: ``boxes``, else ``(box,)``, else empty."""
        if self.boxes is not None:
            return self.boxes
        return (self.box,) if self.box is not None else ()


@dataclass(frozen=True, slots=True)
class QueryPrediction(_BoxChoice):
    """A query line: top-1 ``box``, ranked ``boxes`` (+ ``scores``), a ``mask`` (RLE dict) and/or a
    localisation ``point`` ``(x, y)`` (continuous image pixels).

    ``line`` is the 1-based line (or item) number it came from; it does not take part in equality.
    """

    query_id: int
    box: Box | None = None
    score: float | None = None
    boxes: tuple[Box, ...] | None = None
    scores: tuple[float, ...] | None = None
    mask: dict[str, Any] | None = None
    image_id: int | None = None
    line: int = field(default=0, compare=False)
    # Last, after line: callers that build lines positionally (qid, box, ..., image_id, line) keep working.
    point: Point | None = None


@dataclass(frozen=True, slots=True)
class PhrasePrediction(_BoxChoice):
    """A phrase line: the box for mention ``mention`` of caption query ``query_id``."""

    query_id: int
    mention: int
    box: Box | None = None
    score: float | None = None
    boxes: tuple[Box, ...] | None = None
    scores: tuple[float, ...] | None = None
    image_id: int | None = None
    line: int = field(default=0, compare=False)


Prediction = Union[QueryPrediction, PhrasePrediction]


@dataclass
class Predictions:
    """The parsed file: query lines by query id, phrase lines by ``(query_id, mention)``.

    ``path`` names the source in messages (``"<predictions>"`` for items built in memory).
    """

    path: str = "<predictions>"
    queries: dict[int, QueryPrediction] = field(default_factory=dict)
    phrases: dict[tuple[int, int], PhrasePrediction] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries) + len(self.phrases)

    def __iter__(self) -> Iterator[Prediction]:
        """All predictions in line order."""
        return iter(sorted([*self.queries.values(), *self.phrases.values()], key=lambda p: p.line))

    def where(self, pred: Prediction) -> str:
        """``"<path>: line <n>"`` -- the prefix of a message about ``pred``."""
        return f"{self.path}: line {pred.line}"

    def add(self, pred: Prediction) -> None:
        """Add one prediction; a second one with the same key is a :class:`DataError`."""
        if isinstance(pred, PhrasePrediction):
            key: Any = (pred.query_id, pred.mention)
            table: dict = self.phrases
            what = f"query {pred.query_id} mention {pred.mention}"
        else:
            key, table, what = pred.query_id, self.queries, f"query {pred.query_id}"
        if key in table:
            raise DataError(f"{self.where(pred)}: duplicate prediction for {what} "
                            f"(first on line {table[key].line})")
        table[key] = pred

    @property
    def has_boxes(self) -> bool:
        """Some query line has a top-1 box."""
        return any(p.top_box is not None for p in self.queries.values())

    @property
    def has_ranked(self) -> bool:
        """Some query line has a ranked ``boxes`` list."""
        return any(p.boxes is not None for p in self.queries.values())

    @property
    def has_masks(self) -> bool:
        return any(p.mask is not None for p in self.queries.values())

    @property
    def has_points(self) -> bool:
        """Some query line has a localisation ``point``."""
        return any(p.point is not None for p in self.queries.values())

    @classmethod
    def from_items(cls, items: Iterable[Prediction | dict[str, Any]], path: str = "<predictions>") -> "Predictions":
        """Build from dataclasses or line dicts (validated as :func:`read_predictions` would)."""
        preds = cls(path)
        for n, item in enumerate(items, start=1):
            # Dataclasses go through their JSON form too: one validation path, plain Python types.
            obj = item if isinstance(item, dict) else to_json(item)
            preds.add(parse_line(obj, f"{path}: line {n}", n))
        return preds


# ------------------------------------------------------------------------------------ validation
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _floats(values: list[Any]) -> list[float] | None:
    """``values`` as finite floats when every one is a plain int or float, else None (the per-value
    checks then find the first bad one and word the error)."""
    types = set(map(type, values))
    if not types <= _NUMBER_TYPES:
        return None
    try:
        out = values if types == {float} else list(map(float, values))
    except OverflowError:  # an int too large for a float: the per-value checks raise it, as before
        return None
    return out if all(map(math.isfinite, out)) else None


def _int(obj: dict[str, Any], key: str, where: str, minimum: int | None = None) -> int:
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(f"{where}: {key} must be an integer, got {json.dumps(v)}")
    if minimum is not None and v < minimum:
        raise DataError(f"{where}: {key} must be >= {minimum}, got {v}")
    return v


def _box(value: Any, where: str, what: str = "box") -> Box:
    if type(value) is list and len(value) == 4:  # the common case in C-level checks (see _boxes_fast)
        flat = _floats(value)
        if flat is not None and flat[0] <= flat[2] and flat[1] <= flat[3]:
            return tuple(flat)  # type: ignore[return-value]
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise DataError(f"{where}: {what} must be 4 numbers [x1, y1, x2, y2], got {json.dumps(value)}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"{where}: {what} has a non-finite number: {json.dumps(value)}")
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: {what} {json.dumps(value)} has x2 < x1 or y2 < y1 (expected xyxy)")
    return (x1, y1, x2, y2)


def _point(value: Any, where: str) -> Point:
    if type(value) is list and len(value) == 2:  # the common case: two plain finite numbers
        flat = _floats(value)
        if flat is not None:
            return (flat[0], flat[1])
    if not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise DataError(f"{where}: point must be 2 numbers [x, y], got {json.dumps(value)}")
    # Two plain numbers that _floats refused: an int too large for a float, or a non-finite value.
    raise DataError(f"{where}: point has a non-finite number: {json.dumps(value)}")


def _number(value: Any, where: str, what: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise DataError(f"{where}: {what} must be a finite number, got {json.dumps(value)}")
    return float(value)


def _boxes_fast(raw: list[Any]) -> tuple[Box, ...] | None:
    """The ranked boxes of a well-formed ``boxes`` list in one pass of C-level checks, or None when any
    box needs the per-box checks of :func:`_box` (which raise the error naming the first bad one).

    Same result as ``tuple(_box(b) ...)``: each box a list of 4 plain numbers, finite, x2 >= x1, y2 >= y1.
    Python builtins over the flat coordinates beat numpy here: lists are ~10 boxes, where numpy's
    per-call overhead dominates (measured 5 us against 10 us per 10-box line).
    """
    if not raw:
        return ()
    if set(map(type, raw)) != {list} or set(map(len, raw)) != {4}:
        return None
    flat = _floats(list(chain.from_iterable(raw)))
    if flat is None:
        return None
    if not (all(map(operator.le, flat[0::4], flat[2::4])) and all(map(operator.le, flat[1::4], flat[3::4]))):
        return None
    it = iter(flat)
    return tuple(zip(it, it, it, it))


def _ranked(obj: dict[str, Any], where: str) -> tuple[tuple[Box, ...] | None, tuple[float, ...] | None]:
    if "boxes" not in obj:
        if "scores" in obj:
            raise DataError(f"{where}: scores given without boxes")
        return None, None
    raw = obj["boxes"]
    if not isinstance(raw, list):
        raise DataError(f"{where}: boxes must be a list of [x1, y1, x2, y2], got {json.dumps(raw)[:80]}")
    boxes = _boxes_fast(raw)
    if boxes is None:
        boxes = tuple(_box(b, where, f"boxes[{i}]") for i, b in enumerate(raw))
    if "scores" not in obj:
        return boxes, None
    rs = obj["scores"]
    if not isinstance(rs, list) or len(rs) != len(boxes):
        raise DataError(f"{where}: scores must be a list of {len(boxes)} numbers (one per box)")
    fast = _floats(rs)
    scores = tuple(fast) if fast is not None else tuple(_number(s, where, f"scores[{i}]") for i, s in enumerate(rs))
    if not all(map(operator.ge, scores, scores[1:])):  # finite, so "not a >= b" is "b > a"
        raise DataError(f"{where}: scores must be non-increasing (boxes are ranked best first)")
    return boxes, scores


def rle_string_counts(counts: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, or None if it is not a valid encoding.

    Mirrors pycocotools' ``rleFrString`` (6-bit groups offset by 48, sign bit, deltas from the 4th run
    on) so malformed strings are refused here instead of being handed to C code.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def _mask(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"size", "counts"}:
        raise DataError(f"{where}: mask must be an RLE object {{\"size\": [h, w], \"counts\": ...}}")
    size = value["size"]
    if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                              and v > 0 for v in size)):
        raise DataError(f"{where}: mask size must be [height, width] (positive integers), got {json.dumps(size)}")
    h, w = size
    counts = value["counts"]
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        runs = counts
    else:
        runs = None
    if runs is None:
        raise DataError(f"{where}: mask counts are not a valid COCO RLE")
    if sum(runs) != h * w:
        raise DataError(f"{where}: mask counts cover {sum(runs)} pixels, expected {h} x {w} = {h * w}")
    return {"size": [h, w], "counts": counts}


def parse_line(obj: Any, where: str, line: int = 0) -> Prediction:
    """Validate one decoded line; ``where`` prefixes error messages (``"<file>: line <n>"``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not _FIELD_SET.issuperset(obj):
        unknown = [k for k in obj if k not in _FIELD_SET]
        raise DataError(f"{where}: unknown field {unknown[0]!r} (expected: {', '.join(FIELDS)})")
    if "query_id" not in obj:
        raise DataError(f"{where}: missing query_id")
    qid = _int(obj, "query_id", where)
    image_id = _int(obj, "image_id", where) if "image_id" in obj else None
    box = _box(obj["box"], where) if "box" in obj else None
    score = _number(obj["score"], where, "score") if "score" in obj else None
    if score is not None and box is None:
        raise DataError(f"{where}: score given without box")
    boxes, scores = _ranked(obj, where)
    if "mention" in obj:
        if "mask" in obj:
            raise DataError(f"{where}: phrase lines (with mention) take boxes, not masks")
        if "point" in obj:
            raise DataError(f"{where}: phrase lines (with mention) take boxes, not points")
        if box is None and boxes is None:
            raise DataError(f"{where}: phrase line without box or boxes")
        return PhrasePrediction(qid, _int(obj, "mention", where, minimum=0), box, score, boxes, scores,
                                image_id, line)
    mask = _mask(obj["mask"], where) if "mask" in obj else None
    point = _point(obj["point"], where) if "point" in obj else None
    if box is None and boxes is None and mask is None and point is None:
        raise DataError(f"{where}: no box, boxes or mask for query {qid}")  # a point alone is a prediction too
    return QueryPrediction(qid, box, score, boxes, scores, mask, image_id, line, point)


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate a predictions file (module docstring); raises :class:`DataError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file")
    preds = Predictions(str(path))
    prefix = f"{path}: line "
    try:
        with open(path, encoding="utf-8") as fh:
            for n, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                where = f"{prefix}{n}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                preds.add(parse_line(obj, where, n))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not len(preds):
        raise DataError(f"{path}: empty predictions file (expected JSON lines with query_id)")
    return preds


# ---------------------------------------------------------------------------------------- writing
def _floats_json(value: Any, n: int) -> list[float]:
    """A box (n = 4) or point (n = 2) as a list of ``n`` Python floats."""
    if type(value) is tuple and len(value) == n and set(map(type, value)) == {float}:
        return list(value)  # a parsed box or point: already Python floats
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    return [float(v) for v in np.asarray(value, dtype=np.float64).reshape(n)]


def _box_json(box: Any) -> list[float]:
    return _floats_json(box, 4)


def _point_json(point: Any) -> list[float]:
    return _floats_json(point, 2)


def _boxes_json(boxes: Any) -> list[list[float]]:
    if (type(boxes) is tuple and set(map(type, boxes)) <= {tuple} and set(map(len, boxes)) <= {4}
            and set(map(type, chain.from_iterable(boxes))) <= {float}):
        return list(map(list, boxes))  # parsed boxes: tuples of four Python floats
    return [_box_json(b) for b in boxes]


def to_json(pred: Prediction) -> dict[str, Any]:
    """The line object of a prediction (fields in a fixed order, absent ones left out)."""
    out: dict[str, Any] = {"query_id": int(pred.query_id)}
    if isinstance(pred, PhrasePrediction):
        out["mention"] = int(pred.mention)
    if pred.image_id is not None:
        out["image_id"] = int(pred.image_id)
    if pred.box is not None:
        out["box"] = _box_json(pred.box)
    if pred.score is not None:
        out["score"] = float(pred.score)
    if pred.boxes is not None:
        out["boxes"] = _boxes_json(pred.boxes)
    if pred.scores is not None:
        scores = pred.scores
        out["scores"] = (list(scores) if type(scores) is tuple and set(map(type, scores)) <= {float}
                         else [float(s) for s in scores])
    if isinstance(pred, QueryPrediction):
        if pred.mask is not None:
            counts = pred.mask["counts"]
            out["mask"] = {"size": [int(v) for v in pred.mask["size"]],
                           "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        if pred.point is not None:
            out["point"] = _point_json(pred.point)
    return out


def write_predictions(path: str | os.PathLike, items: Iterable[Prediction | dict[str, Any]] | Predictions) -> Path:
    """Write predictions as JSON lines, atomically (temporary file, then rename). Returns ``path``.

    items: :class:`QueryPrediction` / :class:`PhrasePrediction` dataclasses, line dicts, or a
    :class:`Predictions`; everything is validated first (same rules as reading), so a written file
    always reads back.
    """
    path = Path(path)
    preds = items if isinstance(items, Predictions) else Predictions.from_items(items, str(path))
    with atomic_file(path, "w", encoding="utf-8") as fh:
        for pred in preds:
            fh.write(_ENCODER.encode(to_json(pred)) + "\n")
    return path
