"""The refer format (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF/ReferItGame), read and written.

Layout, as distributed with `refer <https://github.com/lichengunc/refer>`_::

    <root>/<dataset>/refs(<splitBy>).p   pickled list of refs (Python 2 pickle)
    <root>/<dataset>/instances.json      COCO-style images, annotations, categories

A ref is ``{ref_id, ann_id, image_id, split, category_id, file_name, sent_ids,
sentences: [{tokens, raw, sent, sent_id}]}``; an annotation ``{id, image_id, category_id, bbox [x, y, w, h],
segmentation, area, iscrowd}`` with ``segmentation`` as polygons, uncompressed or compressed RLE, or (RefCLEF)
a list of RLEs.

Mapping to the unified model (:mod:`refground.data.model`):

* objects are *all* annotations of ``instances.json`` (candidates, not just referents); the box is
  ``x1, y1, x2, y2 = x, y, x + w, y + h`` (continuous pixels); the mask is the segmentation as compressed
  RLE (several RLEs merged);
* one :class:`Query` per sentence: id ``sent_id``, group ``ref_id``, split the ref's split (``testAB`` etc.
  kept as stored; see :func:`refground.data.model.split_matches`), text the tokens joined by spaces
  (``sent.split()`` when a sentence has no tokens), raw ``raw``, task ``"expression"`` and one referent
  mention over all tokens linked to ``ann_id`` with the category name as its type;
* an image's split is the split its refs share, ``"mixed"`` when they differ, ``""`` when it has none;
* categories are ordered by COCO category id.

Boxes exceeding the image by at most :data:`~refground.data.formats._common.CLIP_TOLERANCE` pixel (float
rounding in real annotations) are clipped and counted in ``meta["clipped"]``; anything further out, or of
zero area, is an error unless ``skip_invalid`` (then the annotation, the refs pointing at it and their
sentences are dropped and counted).

Writing (:func:`export_refer`) keeps what the format cannot hold in extra keys that real readers ignore:
``image["refground"] = {"split"}``, ``annotation["attributes"]``, ``annotation["refground"] = {"mask": false}``
for objects without a mask (their ``segmentation`` is then the box polygon, so real readers still work),
and ``sentence["refground"] = {"kind", "group", "index", "mentions", "relations"}``. :func:`import_refer`
uses them when present, so ``export -> import`` reproduces images, objects, masks and expression queries
exactly. Boxes travel as ``[x, y, x2 - x, y2 - y]``: exact for integer-valued boxes (the synthetic world);
a non-integer box may come back differing in the last bit of ``x2``/``y2`` (``x + (x2 - x)`` rounding).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as cocomask

from refground import masks as rmasks
from refground.atomic import atomic_dir, atomic_file
from refground.data.formats._common import (CLIP_TOLERANCE, FORCE_HINT, check_images, check_name, check_out_root,
                                            copy_images, missing_image_files, plan_images)
from refground.data.formats.safe_pickle import load_restricted
from refground.data.model import ROLES, SPLIT_NAMES, Dataset, Image, Mention, Object, Query, Relation
from refground.data.validate import box_problem, check_boxes, validate_dataset
from refground.errors import DataError, UsageError
from refground.progress import track

# Which splitBy each refer dataset was released with.
SPLIT_BYS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc",),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}

INSTANCES = "instances.json"

# The split names a ref may carry: those of the refer releases (train, val, test; testA, testB, testC and
# their compounds such as testAB for RefCOCO/RefCOCO+). Anything else is a typo in the file that would
# silently drop its refs from every evaluation split.
REF_SPLITS: tuple[str, ...] = tuple(s for s in SPLIT_NAMES if s != "all")

# How export_refer starts instances.json: a previous export is recognised by these bytes.
_EXPORT_MARK = b'{"info":{"description":"exported by refground'


def refs_filename(split_by: str) -> str:
    """``refs(<split_by>).p``."""
    return f"refs({split_by}).p"


def check_split_by(dataset: str, split_by: str) -> str:
    """``split_by`` if the refer dataset was released with it (any name for other datasets), else
    :class:`UsageError` listing the valid ones."""
    valid = SPLIT_BYS.get(dataset)
    if valid is not None and split_by not in valid:
        raise UsageError(f"unknown split-by {split_by!r} for {dataset}; expected one of: {', '.join(valid)}")
    return check_name(split_by, "split-by")


# ------------------------------------------------------------------------------------------ reading
def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: malformed JSON (not UTF-8: {exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _records(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DataError(f"{path}: '{key}' must be a list of objects")
    return value


def _field(rec: dict, key: str, path: Path, what: str, kind: type | tuple[type, ...]) -> Any:
    if key not in rec:
        raise DataError(f"{path}: {what}: missing key '{key}'")
    value = rec[key]
    # bool is an int subclass; a true/false where a number belongs is a malformed file.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DataError(f"{path}: {what}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _segmentation_to_rle(segm: Any, height: int, width: int) -> dict[str, Any] | None:
    """Any COCO/refer segmentation -> one compressed RLE (None for an empty segmentation)."""
    if segm is None or (isinstance(segm, list) and len(segm) == 0):
        return None
    if isinstance(segm, list) and all(isinstance(s, dict) for s in segm):
        # RefCLEF: a list of RLEs, one per part; refer's getMask sums them.
        parts = [rmasks.from_segmentation(s, height, width) for s in segm]
        if len(parts) == 1:
            return parts[0]
        merged = cocomask.merge([{"size": p["size"], "counts": p["counts"].encode("ascii")} for p in parts])
        return {"size": [int(merged["size"][0]), int(merged["size"][1])], "counts": merged["counts"].decode("ascii")}
    if isinstance(segm, list):
        for poly in segm:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly)):
                raise ValueError("a polygon must be a flat list of at least 3 x, y pairs")
    return rmasks.from_segmentation(segm, height, width)


def _read_instances(path: Path, skip_invalid: bool) -> dict[str, Any]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    images, anns, cats = (_records(data, k, path) for k in ("images", "annotations", "categories"))

    cat_rows = []
    for c in cats:
        what = f"category {c.get('id', '?')}"
        cat_rows.append((_field(c, "id", path, what, int), str(_field(c, "name", path, what, str))))
    cat_rows.sort()
    cat_name: dict[int, str] = {}
    for cid, cname in cat_rows:
        if cid in cat_name:
            raise DataError(f"{path}: duplicate category id {cid}")
        cat_name[cid] = cname
    names = [n for _, n in cat_rows]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: category name {dup!r} is used by two category ids")

    image_info: dict[int, dict[str, Any]] = {}
    for im in images:
        what = f"image {im.get('id', '?')}"
        iid = _field(im, "id", path, what, int)
        if iid in image_info:
            raise DataError(f"{path}: duplicate image id {iid}")
        extra = im.get("refground") if isinstance(im.get("refground"), dict) else {}
        w, h = _field(im, "width", path, what, int), _field(im, "height", path, what, int)
        if w <= 0 or h <= 0:
            raise DataError(f"{path}: image {iid} has size {w}x{h}")
        image_info[iid] = {"file": str(_field(im, "file_name", path, what, str)), "width": w, "height": h,
                           "split": extra.get("split") if isinstance(extra.get("split"), str) else None}

    ann_ids = []
    boxes = np.zeros((len(anns), 4), dtype=np.float64)
    for k, a in enumerate(anns):
        what = f"annotation {a.get('id', '?')}"
        aid = _field(a, "id", path, what, int)
        iid = _field(a, "image_id", path, what, int)
        cid = _field(a, "category_id", path, what, int)
        bbox = _field(a, "bbox", path, what, list)
        if iid not in image_info:
            raise DataError(f"{path}: annotation {aid} refers to unknown image {iid}")
        if cid not in cat_name:
            raise DataError(f"{path}: annotation {aid} has unknown category id {cid}")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{path}: annotation {aid}: bbox must be 4 numbers [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        boxes[k] = (x, y, x + w, y + h)
        ann_ids.append(aid)
    if len(set(ann_ids)) != len(ann_ids):
        ids, counts = np.unique(np.array(ann_ids, dtype=np.int64), return_counts=True)
        raise DataError(f"{path}: duplicate annotation id {int(ids[counts > 1][0])}")

    img_w = np.array([image_info[a["image_id"]]["width"] for a in anns], dtype=np.float64)
    img_h = np.array([image_info[a["image_id"]]["height"] for a in anns], dtype=np.float64)
    boxes, clipped, bad = check_boxes(boxes, img_w, img_h, CLIP_TOLERANCE)
    if bad.any() and not skip_invalid:
        k = int(np.flatnonzero(bad)[0])
        a = anns[k]
        raise DataError(f"{path}: annotation {a['id']} (image {a['image_id']}) bbox {list(a['bbox'])} "
                        f"{box_problem(boxes[k], img_w[k], img_h[k])}; pass --skip-invalid to drop such annotations")

    objects: dict[int, Object] = {}
    dropped: set[int] = set()
    for k, a in enumerate(track(anns, len(anns), "reading annotations")):
        if bad[k]:
            dropped.add(a["id"])
            continue
        info = image_info[a["image_id"]]
        extra = a.get("refground") if isinstance(a.get("refground"), dict) else {}
        mask = None
        if extra.get("mask", True) is not False:
            try:
                mask = _segmentation_to_rle(a.get("segmentation"), info["height"], info["width"])
            except Exception as exc:  # pycocotools raises bare Exception on malformed input
                raise DataError(f"{path}: annotation {a['id']}: unreadable segmentation ({exc})") from None
            if mask is not None and list(mask["size"]) != [info["height"], info["width"]]:
                raise DataError(f"{path}: annotation {a['id']}: segmentation size {mask['size']} differs from "
                                f"its image ({info['height']}x{info['width']})")
        attrs = a.get("attributes") or {}
        if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
            raise DataError(f"{path}: annotation {a['id']}: 'attributes' must map names to strings")
        objects[a["id"]] = Object(a["id"], a["image_id"], cat_name[a["category_id"]],
                                  tuple(float(v) for v in boxes[k]), mask, {str(n): v for n, v in attrs.items()})
    return {"categories": names, "images": image_info, "objects": objects, "dropped": dropped,
            "clipped": int(clipped[~bad].sum())}


def _mentions_from_extra(extra: dict, path: Path, what: str) -> tuple[tuple[Mention, ...], tuple[Relation, ...]]:
    try:
        mentions = tuple(Mention(int(m["start"]), int(m["end"]), str(m["role"]),
                                 tuple(int(i) for i in m["object_ids"]), str(m.get("type", "")),
                                 str(m.get("entity", "")), str(m.get("kind", "")))
                             for m in extra.get("mentions", ()))
        relations = tuple(Relation(int(r["subject"]), str(r["predicate"]), int(r["object"]))
                          for r in extra.get("relations", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: {what}: malformed 'refground' entry ({type(exc).__name__}: {exc})") from None
    for m in mentions:
        if m.role not in ROLES:
            raise DataError(f"{path}: {what}: unknown mention role {m.role!r} in its 'refground' entry")
    return mentions, relations


def import_refer(
    root: str | os.PathLike,
    dataset: str,
    split_by: str,
    image_root: str | os.PathLike,
    name: str | None = None,
    skip_invalid: bool = False,
) -> Dataset:
    """Read ``<root>/<dataset>/refs(<split_by>).p`` and ``instances.json`` into a :class:`Dataset`.

    ``image_root`` is the folder holding the image files named in ``instances.json`` (e.g. COCO
    ``train2014``); it is stored absolute in ``meta["image_root"]``. Image files missing there are not an
    error (images are read only by later steps) but counted in ``meta["missing_images"]``, the first in
    ``meta["first_missing_image"]``, so the caller can warn. A ref whose split is not one of
    :data:`REF_SPLITS` is a :class:`DataError`. ``name`` defaults to ``<dataset>_<split_by>``. With
    ``skip_invalid`` empty sentences and annotations with invalid boxes (and the refs on them) are dropped
    and counted in ``meta["skipped"]`` (sentences) and ``meta["skipped_objects"]``; otherwise they are a
    :class:`DataError` naming the file. See the module docstring for the mapping.
    """
    check_split_by(dataset, split_by)
    check_name(dataset, "dataset")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: refer data root not found")
    folder = root / dataset
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found (expected {refs_filename(split_by)} and {INSTANCES} "
                        "inside)")
    refs_path = folder / refs_filename(split_by)
    inst_path = folder / INSTANCES
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise DataError(f"{p.name} not found in {folder}")

    if not Path(image_root).is_dir():
        raise DataError(f"{image_root}: image folder not found")
    inst = _read_instances(inst_path, skip_invalid)
    objects: dict[int, Object] = inst["objects"]
    image_info: dict[int, dict[str, Any]] = inst["images"]

    refs = load_restricted(refs_path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{refs_path}: expected a list of refs (dicts), got {type(refs).__name__}")

    queries: list[tuple[int | None, Query]] = []
    image_refs_splits: dict[int, set[str]] = {}
    skipped = 0
    seen_sent: set[int] = set()
    for ref in track(refs, len(refs), "reading refs"):
        rid = ref.get("ref_id", "?")
        what = f"ref {rid}"
        rid = _field(ref, "ref_id", refs_path, what, int)
        ann_id = _field(ref, "ann_id", refs_path, what, int)
        image_id = _field(ref, "image_id", refs_path, what, int)
        split = _field(ref, "split", refs_path, what, str)
        if split not in REF_SPLITS:
            raise DataError(f"{refs_path}: {what}: unknown split {split!r}; expected one of: "
                            f"{', '.join(REF_SPLITS)}")
        sentences = _field(ref, "sentences", refs_path, what, list)
        if ann_id in inst["dropped"]:
            skipped += len(sentences)
            continue
        obj = objects.get(ann_id)
        if obj is None:
            raise DataError(f"{refs_path}: ref {rid}: ann_id {ann_id} not found in {inst_path.name}")
        if obj.image_id != image_id:
            raise DataError(f"{refs_path}: ref {rid}: image_id {image_id} differs from annotation {ann_id}'s "
                            f"image {obj.image_id}")
        for s in sentences:
            if not isinstance(s, dict):
                raise DataError(f"{refs_path}: ref {rid}: sentences must be dicts, got {type(s).__name__}")
            sid = _field(s, "sent_id", refs_path, what, int)
            swhat = f"ref {rid} sentence {sid}"
            tokens = s.get("tokens")
            if tokens is None:
                tokens = str(s.get("sent", "")).split()
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DataError(f"{refs_path}: {swhat}: 'tokens' must be a list of strings")
            if any(not t or t != t.strip() or " " in t for t in tokens):
                tokens = " ".join(tokens).split()  # a token holding spaces would break span indexing
            if not tokens:
                if skip_invalid:
                    skipped += 1
                    continue
                raise DataError(f"{refs_path}: {swhat} is empty; pass --skip-invalid to drop empty sentences")
            if sid in seen_sent:
                raise DataError(f"{refs_path}: {swhat}: duplicate sent_id {sid}")
            seen_sent.add(sid)
            raw = s.get("raw", s.get("sent", " ".join(tokens)))
            if not isinstance(raw, str):
                raise DataError(f"{refs_path}: {swhat}: 'raw' must be a string")
            extra = s.get("refground") if isinstance(s.get("refground"), dict) else None
            text = " ".join(tokens)
            if extra is not None:
                mentions, relations = _mentions_from_extra(extra, refs_path, swhat)
                refs_obj = [m.object_ids for m in mentions if m.role == "referent"]
                if refs_obj and refs_obj[0] != (ann_id,):
                    raise DataError(f"{refs_path}: {swhat}: its 'refground' referent {list(refs_obj[0])} differs "
                                    f"from the ref's ann_id {ann_id}")
                kind = str(extra.get("kind", ""))
                group = int(extra.get("group", rid))
                index = extra.get("index")
            else:
                mentions = (Mention(0, len(tokens), "referent", (ann_id,), obj.category),)
                relations, kind, group, index = (), "", rid, None
            q = Query(sid, image_id, "expression", text, mentions, relations, kind, split, group, raw)
            queries.append((index if isinstance(index, int) else None, q))
        image_refs_splits.setdefault(image_id, set()).add(split)

    # Exported files carry each query's position; restore the original order when all have one.
    if queries and all(i is not None for i, _ in queries):
        queries.sort(key=lambda iq: iq[0])

    images = []
    for iid, info in image_info.items():
        split = info["split"]
        if split is None:
            splits = image_refs_splits.get(iid, set())
            split = next(iter(splits)) if len(splits) == 1 else ("mixed" if splits else "")
        images.append(Image(iid, info["file"], info["width"], info["height"], split))

    n_missing, first_missing = missing_image_files(Path(image_root), (im.file for im in images))
    meta = {"source": "refer", "dataset": dataset, "split_by": split_by,
            "image_root": str(Path(image_root).resolve()), "skipped": skipped,
            "skipped_objects": len(inst["dropped"]), "clipped": inst["clipped"],
            "missing_images": n_missing, "first_missing_image": first_missing}
    try:
        ds = Dataset.from_records(name or f"{dataset}_{split_by}", images, objects.values(),
                                  [q for _, q in queries], inst["categories"], meta)
    except DataError as exc:
        raise DataError(f"{refs_path}: {exc}") from None
    validate_dataset(ds, str(refs_path))
    return ds


# ------------------------------------------------------------------------------------------ writing
def _box_polygon(box: Sequence[float]) -> list[list[float]]:
    x1, y1, x2, y2 = box
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _refs_of(ds: Dataset, rows: np.ndarray) -> list[dict[str, Any]]:
    """Group expression query rows into refs by ``Query.group`` (group -1: one ref per query)."""
    groups = [int(g) for g in ds.query_groups[rows]]
    next_id = max([g for g in groups if g >= 0], default=-1) + 1
    refs: dict[int, dict[str, Any]] = {}
    for index, k in enumerate(rows.tolist()):
        q = ds._query_at(k)
        if q.group >= 0:
            ref_id = q.group
        else:
            ref_id, next_id = next_id, next_id + 1
        ann_id = q.referent_object_id
        ref = refs.get(ref_id)
        if ref is None:
            ref = refs[ref_id] = {"ref_id": ref_id, "ann_id": ann_id, "image_id": q.image_id, "split": q.split,
                                  "first": q.id, "sentences": []}
        elif (ref["ann_id"], ref["image_id"], ref["split"]) != (ann_id, q.image_id, q.split):
            raise DataError(f"dataset {ds.name}: query {q.id} of group {q.group} differs from query {ref['first']} "
                            "in referent, image or split; a refer ref needs them equal")
        ref["sentences"].append({
            "tokens": q.tokens, "raw": q.raw, "sent": q.text, "sent_id": q.id,
            "refground": {
                "kind": q.kind, "group": q.group, "index": index,
                "mentions": [{"start": m.start, "end": m.end, "role": m.role, "object_ids": list(m.object_ids),
                              "type": m.type, "entity": m.entity, **({"kind": m.kind} if m.kind else {})}
                             for m in q.mentions],
                "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object}
                              for r in q.relations],
            },
        })
    return list(refs.values())


def _is_exported_instances(path: Path) -> bool:
    """Whether ``path`` is an ``instances.json`` written by :func:`export_refer` (its first bytes)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_EXPORT_MARK)) == _EXPORT_MARK
    except OSError:
        return False


def _refer_target_problem(folder: Path) -> str | None:
    """Why writing an export into ``folder`` could destroy something that is not a refground export; None
    when ``folder`` is absent or holds only a previous export (our ``instances.json`` and ``refs(*).p``
    files, e.g. of other split-bys of the same corpus, which are kept)."""
    if not folder.exists():
        return None
    entries = sorted(p.name for p in folder.iterdir())
    ours = _is_exported_instances(folder / INSTANCES)
    if INSTANCES in entries and not ours:
        return f"{folder / INSTANCES} exists and was not written by refground export"
    foreign = [n for n in entries if n != INSTANCES and not (ours and n.startswith("refs(") and n.endswith(").p"))]
    if foreign:
        return f"{folder} is not empty ({foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''})"
    return None


def export_refer(
    ds: Dataset,
    out_root: str | os.PathLike,
    dataset_name: str,
    split_by: str = "unc",
    copy_image_files: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``ds`` as ``<out_root>/<dataset_name>/instances.json`` and ``refs(<split_by>).p``.

    Refs are the expression queries grouped by ``Query.group``; caption queries are not representable and
    are skipped (counted in the summary). Image files are copied into ``<out_root>/images/``.

    Nothing that is not ours is overwritten or deleted without ``force``: a ``<dataset_name>`` folder that
    holds anything but a previous export, or an image file of the same name with other content, is a
    one-line :class:`UsageError` before anything is written. With ``force`` the two annotation files and
    the image files replace those of the same name; every other file is kept. A new dataset folder is
    written under a temporary name and renamed; into an existing one the two files are written one by one
    (each atomically), so the files beside them (other split-bys, a user's files) stay.
    Returns a summary dict (counts, paths, notes).
    """
    check_name(dataset_name, "dataset name")
    check_name(split_by, "split-by")
    if dataset_name == "images":
        raise UsageError("dataset name 'images' would collide with the exported image folder; choose another")
    out_root = check_out_root(Path(out_root))
    folder = out_root / dataset_name
    # Every check before the first write: a refused export leaves the target as it was.
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a folder; move it away or choose another --corpus/--out-dir")
    problem = _refer_target_problem(folder)
    if problem is not None and not force:
        raise UsageError(f"{problem}; {FORCE_HINT}")
    plan = plan_images(ds, out_root / "images") if copy_image_files else None
    if plan is not None:
        check_images(plan, force)

    cat_id = {c: i + 1 for i, c in enumerate(ds.categories)}
    images = [{"id": im.id, "file_name": im.file, "width": im.width, "height": im.height,
               "refground": {"split": im.split}} for im in ds.images()]
    annotations = []
    for o in ds.objects():
        x1, y1, x2, y2 = o.box
        ann: dict[str, Any] = {"id": o.id, "image_id": o.image_id, "category_id": cat_id[o.category],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
        if o.mask is not None:
            ann["segmentation"] = {"size": list(o.mask["size"]), "counts": o.mask["counts"]}
            ann["area"] = float(rmasks.area(o.mask))
        else:
            ann["segmentation"] = _box_polygon(o.box)
            ann["area"] = float((x2 - x1) * (y2 - y1))
            ann["refground"] = {"mask": False}
        if o.attributes:
            ann["attributes"] = dict(o.attributes)
        annotations.append(ann)
    categories = [{"id": cat_id[c], "name": c, "supercategory": c} for c in ds.categories]

    rows = ds.query_rows("all", "expression")
    n_captions = int(ds.num_queries - len(rows))
    refs = _refs_of(ds, rows)
    cat_of = {int(i): ds.categories[int(c)] for i, c in zip(ds.object_ids, ds.object_categories)}
    for ref in refs:
        if ref["split"] not in REF_SPLITS:  # import_refer would refuse the file
            raise DataError(f"dataset {ds.name}: query {ref['first']} has split {ref['split']!r}, which the refer "
                            f"format cannot hold (expected one of: {', '.join(REF_SPLITS)})")
        ref.pop("first")
        ref["category_id"] = cat_id[cat_of[ref["ann_id"]]]
        stem, suffix = os.path.splitext(ds.image(ref["image_id"]).file)
        ref["file_name"] = f"{os.path.basename(stem)}_{ref['ann_id']}{suffix}"
        ref["sent_ids"] = [s["sent_id"] for s in ref["sentences"]]

    def write(directory: Path) -> None:
        # instances.json starts with the "info" key: _is_exported_instances recognises it by those bytes.
        with atomic_file(directory / INSTANCES, "w") as fh:
            json.dump({"info": {"description": f"exported by refground from dataset {ds.name}"},
                       "images": images, "annotations": annotations, "categories": categories}, fh,
                      separators=(",", ":"))
        with atomic_file(directory / refs_filename(split_by), "wb") as fh:
            pickle.dump(refs, fh, protocol=2)

    if folder.exists():
        from refground.cache.lock import artifact_lock

        with artifact_lock(folder):
            write(folder)
    else:
        with atomic_dir(folder, lock=False) as stage:  # outside the cache: no lock file litter
            write(stage)
    copied, missing = copy_images(ds, out_root / "images", force, plan) if plan is not None else (0, ds.num_images)
    notes = []
    if n_captions:
        notes.append(f"{n_captions} caption queries skipped (the refer format holds referring expressions only)")
    if missing:
        notes.append(f"{missing} image files not found under the dataset's image root, not copied")
    if problem is not None:
        notes.append(f"--force: wrote {INSTANCES} and {refs_filename(split_by)} into {folder}, kept its other files")
    return {"format": "refer", "out": str(folder), "images": ds.num_images, "objects": ds.num_objects,
            "refs": len(refs), "sentences": int(len(rows)), "skipped_captions": n_captions,
            "images_copied": copied, "images_missing": missing, "notes": notes}
