"""Detections in MAttNet's JSON format, read as a ProposalSource and written from our proposals.

`MAttNet <https://github.com/lichengunc/MAttNet>`_ ships the Faster R-CNN detections its comprehension
results use as JSON: a list of detections, or an object whose ``"dets"`` key holds that list. A detection::

    {"det_id": 17, "image_id": 581857, "box": [x, y, w, h], "category_id": 1,
     "category_name": "person", "score": 0.98}

``box`` is ``[x, y, w, h]`` in pixels of the image (continuous coordinates, no +1, as COCO), read as xyxy
``x, y, x + w, y + h`` with :func:`refground.boxes.box_convert`. Other keys (MAttNet's ``h5_id``, masks)
are ignored.

Reading (:class:`ImportedDetections`) checks every detection against a refground :class:`Dataset`: all six
fields present, ids integers, ``det_id`` unique, ``score`` a finite number in [0, 1], ``box`` four finite
numbers, ``image_id`` an image of the dataset, the box inside that image -- a box at most
:data:`~refground.data.formats._common.CLIP_TOLERANCE` pixel outside is clipped (and counted in
``clipped``), further out or of zero area is an error --, and one name per ``category_id``. Each problem is
a one-line :class:`DataError` naming the file and the detection.

As proposals: ``class_names`` are the category names sorted by ``category_id`` (the categories the file
uses); ``labels`` index them; the format carries one score per detection, so ``class_scores`` is one-hot at
the detection's category times its score; ``features`` is None (a FeatureSource pools them from the
boxes). The detections are final (MAttNet applied its NMS already), so no NMS is applied here: per image
they are sorted by decreasing score, ties by increasing ``det_id``, and cut at ``max_proposals``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.atomic import atomic_file
from refground.boxes import box_convert
from refground.data.formats._common import CLIP_TOLERANCE
from refground.data.model import Dataset
from refground.data.validate import box_problem, check_boxes
from refground.errors import DataError, UsageError
from refground.features.base import Proposals

FIELDS = ("det_id", "image_id", "box", "category_id", "category_name", "score")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: detections file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a detections JSON file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _load_list(path: Path, data: bytes) -> list[Any]:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: malformed JSON (not UTF-8: {exc.reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("dets"), list):
        return obj["dets"]
    if isinstance(obj, list):
        return obj
    raise DataError(f"{path}: expected a list of detections or an object with a \"dets\" list")


class ImportedDetections:
    """MAttNet detections of one file over a dataset's images, as a ProposalSource (module docstring).

    Columns after reading (rows sorted by image in dataset order, then score descending, then det_id):
    ``det_ids`` int64[N], ``image_ids`` int64[N], ``boxes`` float32[N, 4] xyxy pixels (clipped),
    ``scores`` float32[N], ``labels`` int64[N] (index into ``class_names``), ``category_ids`` int64[C]
    (the file's category ids, sorted; ``class_names[c]`` is the name of ``category_ids[c]``);
    ``clipped``: how many boxes were clipped to their image.
    """

    kind = "mattnet-detections"

    def __init__(self, path: str | Path, ds: Dataset) -> None:
        self.path = Path(path)
        data = _read_bytes(self.path)
        self.digest = hashlib.sha256(data).hexdigest()
        dets = _load_list(self.path, data)
        n = len(dets)
        det_ids = np.zeros(n, dtype=np.int64)
        image_ids = np.zeros(n, dtype=np.int64)
        cat_ids = np.zeros(n, dtype=np.int64)
        scores = np.zeros(n, dtype=np.float64)
        xywh = np.zeros((n, 4), dtype=np.float64)
        names: dict[int, str] = {}
        seen: dict[int, int] = {}
        for k, det in enumerate(dets):
            where = f"{self.path}: detection {k}"
            if not isinstance(det, dict):
                raise DataError(f"{where} is not an object")
            if "det_id" in det:
                where += f" (det_id {det['det_id']!r})"
            for f in FIELDS:
                if f not in det:
                    raise DataError(f"{where} has no {f!r}")
            for f in ("det_id", "image_id", "category_id"):
                if not _is_int(det[f]):
                    raise DataError(f"{where}: {f} {det[f]!r} is not an integer")
            name, score, box = det["category_name"], det["score"], det["box"]
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{where}: category_name {name!r} is not a non-empty string")
            if not _is_number(score) or not math.isfinite(score):
                raise DataError(f"{where}: score {score!r} is not a finite number")
            if not 0.0 <= score <= 1.0:
                raise DataError(f"{where}: score {score!r} is outside [0, 1]")
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise DataError(f"{where}: box {box!r} is not [x, y, w, h] numbers")
            d, c = det["det_id"], det["category_id"]
            if d in seen:
                raise DataError(f"{where}: det_id {d} repeats detection {seen[d]}")
            seen[d] = k
            if names.setdefault(c, name) != name:
                raise DataError(f"{where}: category_id {c} is named {name!r} here but {names[c]!r} before")
            det_ids[k], image_ids[k], cat_ids[k], scores[k] = d, det["image_id"], c, score
            xywh[k] = box

        # Images: known to the dataset; boxes inside them (vectorised).
        pos = ds._image_pos
        rows = np.array([pos.get(int(i), -1) for i in image_ids.tolist()], dtype=np.int64)
        if (rows < 0).any():
            k = int(np.flatnonzero(rows < 0)[0])
            raise DataError(f"{self.path}: detection {k} (det_id {int(det_ids[k])}) refers to image "
                            f"{int(image_ids[k])}, not in dataset {ds.name}")
        xyxy = box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy()
        w, h = ds.image_width[rows].astype(np.float64), ds.image_height[rows].astype(np.float64)
        boxes, clipped, bad = check_boxes(xyxy, w, h, tolerance=CLIP_TOLERANCE)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.path}: detection {k} (det_id {int(det_ids[k])}) box {xywh[k].tolist()} "
                            f"[x, y, w, h] {box_problem(xyxy[k], w[k], h[k])} (image {int(image_ids[k])})")
        self.clipped = int(clipped.sum())

        self.category_ids = np.array(sorted(names), dtype=np.int64)
        self.class_names = [names[int(c)] for c in self.category_ids]
        labels = np.searchsorted(self.category_ids, cat_ids).astype(np.int64)
        order = np.lexsort((det_ids, -scores, rows))
        self.det_ids, self.image_ids = det_ids[order], image_ids[order]
        self.boxes = boxes[order].astype(np.float32)
        self.scores = scores[order].astype(np.float32)
        self.labels = labels[order]
        # Rows of dataset image r are _offsets[r]:_offsets[r + 1].
        self._offsets = np.searchsorted(rows[order], np.arange(ds.num_images + 1)).astype(np.int64)
        self._image_pos = dict(pos)
        self.dataset_name = ds.name

    def __len__(self) -> int:
        return int(len(self.det_ids))

    def identity(self) -> dict[str, Any]:
        """``{"kind": "mattnet-detections", "file": sha256 of the file's bytes}``."""
        return {"kind": self.kind, "file": self.digest}

    def propose(self, images: list[np.ndarray], image_ids: list[int], max_proposals: int) -> list[Proposals]:
        """The detections of each image id, best first, at most ``max_proposals`` (``images`` is not read:
        the detections were computed already). An id outside the dataset is a DataError."""
        if len(images) != len(image_ids):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
        if max_proposals < 0:
            raise UsageError(f"max_proposals must be >= 0, got {max_proposals}")
        num_classes = len(self.class_names)
        out = []
        for image_id in image_ids:
            r = self._image_pos.get(int(image_id))
            if r is None:
                raise DataError(f"{self.path}: image {image_id} is not in dataset {self.dataset_name}")
            a = int(self._offsets[r])
            b = min(int(self._offsets[r + 1]), a + max_proposals)
            scores = torch.from_numpy(self.scores[a:b].copy())
            labels = torch.from_numpy(self.labels[a:b].copy())
            class_scores = torch.zeros(b - a, num_classes, dtype=torch.float32)
            class_scores[torch.arange(b - a), labels] = scores
            out.append(Proposals(boxes=torch.from_numpy(self.boxes[a:b].copy()), scores=scores, labels=labels,
                                 class_scores=class_scores, features=None))
        return out


def write_mattnet_detections(path: str | Path,
                             dets: Sequence[Mapping[str, Any]] | Mapping[int, Proposals],
                             class_names: Sequence[str] | None = None,
                             category_ids: Sequence[int] | None = None,
                             as_dict: bool = False) -> int:
    """Write detections as a MAttNet JSON file (atomically); returns the number written.

    ``dets`` is either a list of MAttNet detection dicts (the six fields; written as given, ``box`` as
    ``[x, y, w, h]``), or ``{image_id: Proposals}`` (e.g. from any ProposalSource): then each proposal
    becomes a detection with ``det_id`` numbered from 1 in image-id order then rank, ``box`` the xyxy box
    as ``[x, y, w, h]``, ``score``, and ``category_name = class_names[label]`` with ``category_id =
    category_ids[label]`` (default ``label + 1``). ``as_dict`` writes ``{"dets": [...]}`` instead of the
    bare list (both are read back).
    """
    if isinstance(dets, Mapping):
        if class_names is None:
            raise UsageError("class_names is needed to write proposals as MAttNet detections")
        ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
        if len(ids) != len(class_names):
            raise UsageError(f"{len(ids)} category ids for {len(class_names)} class names")
        records: list[dict[str, Any]] = []
        for image_id in sorted(dets):
            p = dets[image_id]
            xywh = box_convert(p.boxes.detach().double().cpu(), "xyxy", "xywh").tolist()
            for box, score, label in zip(xywh, p.scores.tolist(), p.labels.tolist()):
                records.append({"det_id": len(records) + 1, "image_id": int(image_id), "box": box,
                                "category_id": int(ids[label]), "category_name": str(class_names[label]),
                                "score": float(score)})
    else:
        records = []
        for k, det in enumerate(dets):
            missing = [f for f in FIELDS if f not in det]
            if missing:
                raise UsageError(f"detection {k} has no {missing[0]!r}")
            records.append({f: det[f] for f in FIELDS})
    payload: Any = {"dets": records} if as_dict else records
    with atomic_file(Path(path), "w", encoding="utf-8") as fh:
        json.dump(payload, fh, allow_nan=False)
    return len(records)
