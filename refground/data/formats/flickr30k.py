"""Flickr30K Entities, read and written.

Layout, as distributed with `flickr30k_entities <https://github.com/BryanPlummer/flickr30k_entities>`_::

    <root>/Sentences/<image_id>.txt    one caption a line; phrases marked [/EN#<entity>/<type>[/<type2>...] w w]
    <root>/Annotations/<image_id>.xml  PASCAL-VOC-like: <size>, and <object>s with one or more <name> (entity
                                       ids) and either a <bndbox> or <nobndbox>1</nobndbox><scene>0|1</scene>
    <root>/train.txt, val.txt, test.txt   image ids of each split

Decisions (the unified model is :mod:`refground.data.model`):

* **Coordinates.** The XML holds 1-based inclusive pixel indices (the official reader subtracts 1 from all
  four). A box covering pixel columns ``xmin..xmax`` (1-based, inclusive) spans ``[xmin - 1, xmax)`` in
  continuous 0-based coordinates, so we read ``x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax`` and write
  ``xmin, ymin, xmax, ymax = floor(x1) + 1, floor(y1) + 1, ceil(x2), ceil(y2)`` (exact for integer boxes; a
  non-integer box is widened to the pixels it touches). Boxes at most one pixel outside the image are
  clipped to it and counted in ``meta["clipped"]``; further out is an error (or dropped with
  ``skip_invalid``).
* **Ids.** Image id = the integer file stem. Object id = ``image_id * 1000 + k`` for the k-th ``<object>``
  with a ``<bndbox>`` in the XML (0-based; every such element is one object, even when it names several
  entities). Query id = ``image_id * 100 + s`` for the s-th non-empty line of the sentence file.
* **Objects and phrases.** An object's category is the first type of the first phrase (file order) that
  mentions one of its entities and is not ``notvisual``, else ``"other"``. Each sentence is a
  ``"caption"`` query (text: the words without markup, raw: the line as written); each phrase a referent
  :class:`Mention` with ``entity`` the EN id, ``type`` its first type and ``object_ids`` the boxes of the
  entity -- empty for entities without a box (``nobndbox``/scene), for ``notvisual`` phrases and for entity
  ``0``; empty mentions are kept out of evaluation.
* **Splits.** Images are those listed in ``train.txt``, ``val.txt`` and ``test.txt`` (in that order, file
  order within); queries take their image's split. Sentence files of images in no split file are skipped
  and counted in ``meta["skipped_images"]``; an image listed in two split files is an error.

**Sidecar.** :func:`export_flickr30k` writes ``<out_root>/refground.json`` with what Flickr30K cannot
hold; :func:`import_flickr30k` uses it when present (and checks it against the files; a mismatch means the
files were edited after the export and is an error)::

    {"format": "refground-flickr30k-sidecar", "version": 1, "name": str, "categories": [str],
     "images": [                       # dataset order; images in no split file are listed here too
       {"id": int, "split": str,        # exact split (testA, testAB, mixed, ...)
        "objects": [                   # the XML's <bndbox> objects, same order
          {"id": int, "category": str, "box": [x1, y1, x2, y2],   # exact continuous box
           "mask": str | null,         # compressed RLE counts (size = the image's)
           "attributes": {str: str}}],
        "queries": [                   # the sentence file's lines, same order
          {"id": int, "index": int,     # index = position among the dataset's caption queries
           "text": str, "raw": str, "kind": str, "split": str, "group": int,
           "mentions": [{"start", "end", "role", "object_ids", "type", "entity"}],
           "relations": [{"subject", "predicate", "object"}]}]}]}

Without the sidecar the format-expressible parts still come back: image sizes and files, boxes (as sets
per phrase), phrase spans and tokens, and split membership (testA/testB/... are written as ``test``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from refground.atomic import atomic_dir, atomic_file
from refground.data.formats._common import (CLIP_TOLERANCE, FORCE_HINT, check_images, check_out_root, copy_images,
                                            missing_image_files, plan_images, read_text)
from refground.data.model import ROLES, Dataset, Image, Mention, Object, Query, Relation
from refground.data.validate import box_problem, check_boxes, validate_dataset
from refground.errors import DataError, UsageError
from refground.progress import track

SENTENCES = "Sentences"
ANNOTATIONS = "Annotations"
SPLITS = ("train", "val", "test")
SIDECAR = "refground.json"
SIDECAR_FORMAT = "refground-flickr30k-sidecar"
IMAGES_DIR = "flickr30k_images"
OBJECT_ID_STRIDE = 1000
QUERY_ID_STRIDE = 100

_TYPE_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# ------------------------------------------------------------------------------------------ parsing
Phrase = tuple[int, int, str, list[str]]  # (start, end, entity id, types)


def parse_sentence(line: str, path: Path | str = "<sentence>", lineno: int = 0) -> tuple[list[str], list[Phrase]]:
    """Parse one marked-up caption line.

    Returns ``(words, phrases)`` with ``phrases`` as ``(start, end, entity_id, types)`` token spans
    ``[start, end)`` into ``words``. Malformed markup (unbalanced brackets, a bad ``[/EN#id/type`` tag,
    an empty phrase) is a :class:`DataError` naming the file and line.
    """
    where = f"{path}: line {lineno}"
    words: list[str] = []
    phrases: list[Phrase] = []
    open_tag: tuple[int, str, list[str], str] | None = None
    for token in line.split():
        if open_tag is not None:
            if token.startswith("["):
                raise DataError(f"{where}: unbalanced brackets: phrase {open_tag[3]!r} is not closed before {token!r}")
            if token.endswith("]"):
                if token[:-1]:
                    words.append(token[:-1])
                start, entity, types, tag = open_tag
                if len(words) == start:
                    raise DataError(f"{where}: empty phrase {tag!r}")
                phrases.append((start, len(words), entity, types))
                open_tag = None
            else:
                words.append(token)
        elif token.startswith("["):
            parts = token.split("/")
            if (len(parts) < 3 or parts[0] != "[" or not parts[1].startswith("EN#") or not parts[1][3:]
                    or not all(parts[2:]) or token.endswith("]")):
                raise DataError(f"{where}: malformed phrase tag {token!r} (expected [/EN#<id>/<type> words])")
            open_tag = (len(words), parts[1][3:], parts[2:], token)
        elif token.endswith("]"):
            raise DataError(f"{where}: unbalanced brackets: {token!r} closes no phrase")
        else:
            words.append(token)
    if open_tag is not None:
        raise DataError(f"{where}: unbalanced brackets: phrase {open_tag[3]!r} is not closed")
    return words, phrases


def _int_text(el: ET.Element | None, tag: str, path: Path, what: str) -> int:
    child = el.find(tag) if el is not None else None
    if child is None or child.text is None:
        raise DataError(f"{path}: {what}: missing <{tag}>")
    try:
        return int(child.text.strip())
    except ValueError:
        raise DataError(f"{path}: {what}: <{tag}> is not an integer ({child.text.strip()!r})") from None


def parse_annotation(path: Path) -> dict[str, Any]:
    """Parse one ``Annotations/<id>.xml``.

    Returns ``{"filename": str | None, "width", "height", "boxes": [(names, [xmin, ymin, xmax, ymax])],
    "nobox": [entity], "scene": [entity]}`` with the raw 1-based inclusive coordinates.
    """
    data = Path(path).read_bytes() if Path(path).is_file() else None
    if data is None:
        raise DataError(f"{path}: annotation file not found")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:  # no entity expansion from downloaded files
        raise DataError(f"{path}: malformed XML (DOCTYPE/ENTITY declarations are not allowed)")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: malformed XML (root element <{root.tag}>, expected <annotation>)")
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: missing <size>")
    width, height = _int_text(size, "width", path, "size"), _int_text(size, "height", path, "size")
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size {width}x{height}")
    fn = root.find("filename")
    out: dict[str, Any] = {"filename": fn.text.strip() if fn is not None and fn.text else None,
                           "width": width, "height": height, "boxes": [], "nobox": [], "scene": []}
    for k, obj in enumerate(root.findall("object")):
        names = [(n.text or "").strip() for n in obj.findall("name")]
        if not names or not all(names):
            raise DataError(f"{path}: <object> {k} has no <name> (entity id)")
        bb = obj.find("bndbox")
        what = f"<object> {k} (entity {'/'.join(names)})"
        if bb is not None:
            coords = [_int_text(bb, t, path, what) for t in ("xmin", "ymin", "xmax", "ymax")]
            out["boxes"].append((names, coords))
        else:
            if obj.find("nobndbox") is not None and _int_text(obj, "nobndbox", path, what) > 0:
                out["nobox"].extend(names)
            if obj.find("scene") is not None and _int_text(obj, "scene", path, what) > 0:
                out["scene"].extend(names)
    return out


def _read_ids(path: Path, counts: Counter | None = None) -> list[int]:
    ids = []
    for n, line in enumerate(read_text(path, "split file", counts).splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            ids.append(int(s))
        except ValueError:
            raise DataError(f"{path}: line {n}: {s!r} is not an image id") from None
    return ids


def _load_sidecar(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("version") != 1:
        raise DataError(f"{path}: not a refground Flickr30K sidecar (format {SIDECAR_FORMAT} version 1)")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise DataError(f"{path}: malformed sidecar (images and categories must be lists)")
    return data


# ------------------------------------------------------------------------------------------ reading
def import_flickr30k(
    root: str | os.PathLike,
    image_root: str | os.PathLike,
    name: str = "flickr30k",
    skip_invalid: bool = False,
    use_sidecar: bool = True,
) -> Dataset:
    """Read a Flickr30K Entities folder (see the module docstring) into a :class:`Dataset`.

    ``image_root`` is the folder holding the JPEGs (stored absolute in ``meta["image_root"]``); image files
    missing there are counted in ``meta["missing_images"]`` (the first in ``meta["first_missing_image"]``).
    ``refground.json`` beside the folders is used when present and ``use_sidecar``. With ``skip_invalid``
    boxes outside the image are dropped (``meta["skipped_objects"]``) instead of an error.

    Text files are UTF-8; a leading byte-order mark is dropped (counted in ``meta["bom_files"]``) and a
    line that is not UTF-8 is read as latin-1 (counted in ``meta["latin1_lines"]`` and
    ``meta["latin1_files"]``), so no character is ever replaced.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Flickr30K Entities root not found")
    for sub in (SENTENCES, ANNOTATIONS):
        if not (root / sub).is_dir():
            raise DataError(f"{sub}/ not found in {root}")
    if not Path(image_root).is_dir():
        raise DataError(f"{image_root}: image folder not found")
    split_of: dict[int, str] = {}
    listed: list[int] = []
    decoding: Counter = Counter()  # byte-order marks and latin-1 lines met in the text files
    for split in SPLITS:
        path = root / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{split}.txt not found in {root}")
        for iid in _read_ids(path, decoding):
            if iid in split_of:
                raise DataError(f"{path}: image {iid} is also listed in {split_of[iid]}.txt")
            split_of[iid] = split
            listed.append(iid)

    sidecar_path = root / SIDECAR
    sidecar = _load_sidecar(sidecar_path) if use_sidecar else None
    side_images: dict[int, dict[str, Any]] = {}
    if sidecar is not None:
        for entry in sidecar["images"]:
            try:
                side_images[int(entry["id"])] = entry
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{sidecar_path}: malformed image entry") from None
        missing = [i for i in listed if i not in side_images]
        if missing:
            raise DataError(f"{sidecar_path}: stale sidecar: image {missing[0]} of the split files is not in it "
                            f"(delete {SIDECAR} to import without it)")
        order = list(side_images)
        skipped_images = 0
    else:
        order = listed
        known = set(listed)
        skipped_images = sum(1 for p in (root / SENTENCES).glob("*.txt")
                             if p.stem.isdigit() and int(p.stem) not in known)

    images: list[Image] = []
    objects: list[Object] = []
    queries: list[tuple[int, Query]] = []
    clipped = dropped = 0
    for iid in track(order, len(order), "reading Flickr30K Entities"):
        xml_path = root / ANNOTATIONS / f"{iid}.xml"
        txt_path = root / SENTENCES / f"{iid}.txt"
        ann = parse_annotation(xml_path)
        if not txt_path.is_file():
            raise DataError(f"{txt_path}: sentence file not found")
        w, h = ann["width"], ann["height"]
        coords = np.array([c for _, c in ann["boxes"]], dtype=np.float64).reshape(-1, 4)
        boxes = coords - np.array([1.0, 1.0, 0.0, 0.0])  # 1-based inclusive -> continuous 0-based
        boxes, clip, bad = check_boxes(boxes, np.full(len(boxes), w), np.full(len(boxes), h), CLIP_TOLERANCE)
        if bad.any() and not skip_invalid:
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{xml_path}: <object> (entity {'/'.join(ann['boxes'][k][0])}) box "
                            f"{[int(v) for v in coords[k]]} {box_problem(boxes[k], w, h)}; "
                            "pass --skip-invalid to drop such boxes")
        if len(ann["boxes"]) > OBJECT_ID_STRIDE:
            raise DataError(f"{xml_path}: more than {OBJECT_ID_STRIDE} boxes; object ids would collide")
        clipped += int(clip[~bad].sum())
        dropped += int(bad.sum())
        oids = [iid * OBJECT_ID_STRIDE + k for k in range(len(ann["boxes"]))]
        entity_objects: dict[str, list[int]] = {}
        for k, (names, _) in enumerate(ann["boxes"]):
            if bad[k]:
                continue
            for n in names:
                entity_objects.setdefault(n, []).append(oids[k])

        text = read_text(txt_path, "sentence file", decoding)
        lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        if len(lines) > QUERY_ID_STRIDE:
            raise DataError(f"{txt_path}: more than {QUERY_ID_STRIDE} sentences; query ids would collide")
        side = side_images.get(iid)
        parsed = []
        category: dict[int, str] = {}
        for s, (lineno, line) in enumerate(lines):
            words, phrases = parse_sentence(line, txt_path, lineno)
            mentions = []
            for start, end, entity, types in phrases:
                visible = types[0] != "notvisual" and entity != "0"
                linked = tuple(entity_objects.get(entity, ())) if visible else ()
                for oid in linked:
                    category.setdefault(oid, types[0])
                mentions.append(Mention(start, end, "referent", linked, types[0], entity))
            parsed.append((lineno, line, words, tuple(mentions)))

        if side is None:
            split = split_of[iid]
            images.append(Image(iid, ann["filename"] or f"{iid}.jpg", w, h, split))
            for k, (names, _) in enumerate(ann["boxes"]):
                if not bad[k]:
                    objects.append(Object(oids[k], iid, category.get(oids[k], "other"),
                                          tuple(float(v) for v in boxes[k])))
            for s, (lineno, line, words, mentions) in enumerate(parsed):
                q = Query(iid * QUERY_ID_STRIDE + s, iid, "caption", " ".join(words), mentions, split=split,
                          raw=line)
                queries.append((len(queries), q))
        else:
            objs, qs = _apply_sidecar(side, sidecar_path, iid, xml_path, txt_path, ann, boxes, bad, parsed)
            images.append(Image(iid, ann["filename"] or f"{iid}.jpg", w, h, str(side.get("split", ""))))
            objects.extend(objs)
            queries.extend(qs)

    queries.sort(key=lambda iq: iq[0])
    n_missing, first_missing = missing_image_files(Path(image_root), (im.file for im in images))
    meta = {"source": "flickr30k_entities", "image_root": str(Path(image_root).resolve()),
            "skipped_images": skipped_images, "skipped_objects": dropped, "clipped": clipped,
            "sidecar": sidecar is not None, "missing_images": n_missing, "first_missing_image": first_missing,
            "latin1_files": decoding["latin1_files"], "latin1_lines": decoding["latin1_lines"],
            "bom_files": decoding["bom_files"]}
    categories = [str(c) for c in sidecar["categories"]] if sidecar is not None else None
    try:
        ds = Dataset.from_records(name, images, objects, [q for _, q in queries], categories, meta)
    except DataError as exc:
        raise DataError(f"{root}: {exc}") from None
    validate_dataset(ds, str(sidecar_path if sidecar is not None else root))
    return ds


def _apply_sidecar(side: dict, sidecar_path: Path, iid: int, xml_path: Path, txt_path: Path, ann: dict,
                   boxes: np.ndarray, bad: np.ndarray, parsed: list) -> tuple[list[Object], list[tuple[int, Query]]]:
    """Objects and queries of one image from the files plus its sidecar entry (checked against them)."""
    stale = f"{sidecar_path}: stale sidecar for image {iid}"
    side_objs = side.get("objects", [])
    side_qs = side.get("queries", [])
    kept = np.flatnonzero(~bad)
    if len(side_objs) != len(ann["boxes"]) or len(kept) != len(ann["boxes"]):
        raise DataError(f"{stale}: {len(side_objs)} objects, {xml_path.name} has {len(ann['boxes'])} boxes")
    if len(side_qs) != len(parsed):
        raise DataError(f"{stale}: {len(side_qs)} queries, {txt_path.name} has {len(parsed)} sentences")
    objects = []
    try:
        for k, o in enumerate(side_objs):
            box = tuple(float(v) for v in o["box"])
            # The XML holds the box widened to whole pixels; the sidecar's exact box must lie within a pixel.
            if len(box) != 4 or np.abs(np.asarray(box) - boxes[k]).max() >= 1.0:
                raise DataError(f"{stale}: object {o['id']} box {list(box)} does not match {xml_path.name} "
                                f"box {boxes[k].tolist()}")
            mask = {"size": [ann["height"], ann["width"]], "counts": str(o["mask"])} if o.get("mask") else None
            objects.append(Object(int(o["id"]), iid, str(o["category"]), box, mask,
                                  {str(a): str(v) for a, v in (o.get("attributes") or {}).items()}))
        queries = []
        for q, (lineno, line, words, _) in zip(side_qs, parsed):
            text = " ".join(words)
            if str(q["text"]) != text:
                raise DataError(f"{stale}: query {q['id']} text differs from {txt_path.name} line {lineno}")
            mentions = tuple(Mention(int(m["start"]), int(m["end"]), str(m["role"]),
                                     tuple(int(i) for i in m["object_ids"]), str(m.get("type", "")),
                                     str(m.get("entity", "")), str(m.get("kind", "")))
                                 for m in q.get("mentions", ()))
            for m in mentions:
                if m.role not in ROLES:
                    raise DataError(f"{sidecar_path}: query {q['id']}: unknown mention role {m.role!r}")
            relations = tuple(Relation(int(r["subject"]), str(r["predicate"]), int(r["object"]))
                              for r in q.get("relations", ()))
            queries.append((int(q["index"]), Query(int(q["id"]), iid, "caption", text, mentions, relations,
                                                   str(q.get("kind", "")), str(q.get("split", "")),
                                                   int(q.get("group", -1)), str(q.get("raw", line)))))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{sidecar_path}: malformed entry for image {iid} ({type(exc).__name__}: {exc})") from None
    return objects, queries


# ------------------------------------------------------------------------------------------ writing
def _flickr_split(split: str) -> str | None:
    if split in ("train", "val"):
        return split
    if split.startswith("test"):
        return "test"
    return None


def _markup_type(t: str) -> str:
    parts = t.split("/")
    return t if t and all(_TYPE_RE.match(p) for p in parts) else "other"


def _xml_box(box: tuple[float, float, float, float]) -> list[int]:
    x1, y1, x2, y2 = box
    return [math.floor(x1) + 1, math.floor(y1) + 1, math.ceil(x2), math.ceil(y2)]


def _previous_export_ids(out_root: Path) -> set[int] | None:
    """The image ids of the export whose sidecar lies in ``out_root``; None when there is no refground
    sidecar there (absent, unreadable or another file of that name)."""
    path = out_root / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            return None
        return {int(e["id"]) for e in data["images"]}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _flickr_target(out_root: Path, force: bool) -> tuple[set[int], dict[str, list[str]], list[str]]:
    """Check what an export would write over in ``out_root`` before anything is written.

    Returns ``(previous ids, foreign, problems)``: the image ids of a previous export there (its files are
    ours to replace), per sub-folder the entries that export did not write, and the reasons the export
    needs ``force``. A non-file where a file goes (or the reverse) is a :class:`UsageError` even with
    ``force``: replacing it would delete a folder we did not write.
    """
    old = _previous_export_ids(out_root)
    problems: list[str] = []

    def blocked(p: Path, what: str) -> UsageError:
        return UsageError(f"{p}: exists and is not {what}; move it away or choose another --out-dir")

    for name in (SIDECAR, *(f"{sp}.txt" for sp in SPLITS)):
        p = out_root / name
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise blocked(p, "a file")
        if p.exists() and old is None:
            problems.append(f"{p} exists and was not written by refground export")
    foreign: dict[str, list[str]] = {}
    for sub, ext in ((SENTENCES, ".txt"), (ANNOTATIONS, ".xml")):
        d = out_root / sub
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise blocked(d, "a folder")
        ours = {f"{i}{ext}" for i in old or ()}
        foreign[sub] = sorted(p.name for p in d.iterdir() if p.name not in ours or not p.is_file()) \
            if d.exists() else []
        if foreign[sub]:
            more = f" and {len(foreign[sub]) - 1} more" if len(foreign[sub]) > 1 else ""
            problems.append(f"{d} holds files refground export did not write ({foreign[sub][0]}{more})")
    if problems and not force:
        raise UsageError(f"{problems[0]}; {FORCE_HINT}")
    return old or set(), foreign, problems


def _write_folder(folder: Path, files: dict[str, bytes], foreign: list[str], stale: set[str]) -> None:
    """Write ``files`` (name -> bytes) as the contents of ``folder``.

    Without ``foreign`` entries (the folder is new or holds only a previous export) the folder is replaced
    in one rename. With them (``--force``) each file is written in place, atomically, the ``stale`` files
    of the previous export are removed and the foreign ones are kept.
    """
    if not foreign:
        with atomic_dir(folder, lock=False) as stage:  # outside the cache: no lock file litter
            for name, data in files.items():
                (stage / name).write_bytes(data)
        return
    from refground.cache.lock import artifact_lock

    with artifact_lock(folder):
        for name, data in files.items():
            with atomic_file(folder / name, "wb") as fh:
                fh.write(data)
        for name in stale - set(files):
            (folder / name).unlink(missing_ok=True)


def export_flickr30k(ds: Dataset, out_root: str | os.PathLike, copy_image_files: bool = True,
                     force: bool = False) -> dict[str, Any]:
    """Write the caption queries of ``ds`` as a Flickr30K Entities folder plus the ``refground.json``
    sidecar (see the module docstring); image files are copied into ``<out_root>/flickr30k_images/``.
    Expression queries are skipped (counted in the summary).

    Nothing that is not ours is overwritten or deleted without ``force``: the files a previous export
    wrote (known from its sidecar) are replaced, but any other file in ``Sentences/`` or ``Annotations/``,
    split files or a ``refground.json`` that no export wrote, or an image file of the same name with other
    content, is a one-line :class:`UsageError` before anything is written. With ``force`` the files this
    export writes replace those of the same name and every other file is kept.

    Entity ids are numbered from 1 across the dataset: one per distinct object-id set of a phrase within
    an image, one per phrase without boxes (``0`` for ``notvisual`` ones), one per object no phrase
    mentions. Mentions that overlap an earlier one cannot be marked up; they live in the sidecar only.
    Returns a summary dict.
    """
    out_root = check_out_root(Path(out_root))
    old_ids, foreign, problems = _flickr_target(out_root, force)
    plan = plan_images(ds, out_root / IMAGES_DIR) if copy_image_files else None
    if plan is not None:
        check_images(plan, force)
    caption_rows = ds.query_rows("all", "caption")
    by_image: dict[int, list[int]] = {}
    for k in caption_rows.tolist():
        by_image.setdefault(int(ds.query_image_ids[k]), []).append(k)
    index_of = {k: i for i, k in enumerate(caption_rows.tolist())}

    next_entity = 1
    sentences: dict[int, str] = {}
    xmls: dict[int, bytes] = {}
    side_images = []
    split_lists: dict[str, list[int]] = {s: [] for s in SPLITS}
    unmarked = unlisted = 0
    for im in track(ds.images(), ds.num_images, "writing Flickr30K Entities"):
        objs = ds.objects_of(im.id)
        entity_of_set: dict[tuple[int, ...], str] = {}
        names_of: dict[int, list[str]] = {o.id: [] for o in objs}
        nobox: list[tuple[str, bool]] = []
        lines = []
        side_queries = []
        for k in by_image.get(im.id, []):
            q = ds._query_at(k)
            tokens = q.tokens
            for t in tokens:
                if not t or t.startswith("[") or t.endswith("]") or t != t.strip():
                    raise DataError(f"dataset {ds.name}: query {q.id} token {t!r} cannot be written in Flickr30K "
                                    "markup")
            opens: dict[int, str] = {}
            closes: set[int] = set()
            last_end = 0
            for j, m in sorted(enumerate(q.mentions), key=lambda jm: (jm[1].start, jm[0])):
                if m.object_ids:
                    key = tuple(sorted(set(m.object_ids)))
                    entity = entity_of_set.get(key)
                    if entity is None:
                        entity = entity_of_set[key] = str(next_entity)
                        next_entity += 1
                        for oid in key:
                            names_of[oid].append(entity)
                elif m.type == "notvisual":
                    entity = "0"
                else:
                    entity = str(next_entity)
                    next_entity += 1
                    nobox.append((entity, m.type == "scene"))
                if m.start < last_end:  # Flickr30K markup cannot nest or overlap phrases
                    unmarked += 1
                    continue
                opens[m.start] = f"[/EN#{entity}/{_markup_type(m.type)}"
                closes.add(m.end - 1)
                last_end = m.end
            words = []
            for t, tok in enumerate(tokens):
                if t in opens:
                    words.append(opens[t])
                words.append(tok + "]" if t in closes else tok)
            lines.append(" ".join(words))
            side_queries.append({
                "id": q.id, "index": index_of[k], "text": q.text, "raw": q.raw, "kind": q.kind, "split": q.split,
                "group": q.group,
                "mentions": [{"start": m.start, "end": m.end, "role": m.role, "object_ids": list(m.object_ids),
                              "type": m.type, "entity": m.entity, **({"kind": m.kind} if m.kind else {})}
                             for m in q.mentions],
                "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object}
                              for r in q.relations],
            })
        for o in objs:
            if not names_of[o.id]:  # unmentioned objects still need an entity id to be an <object>
                names_of[o.id].append(str(next_entity))
                next_entity += 1
        sentences[im.id] = "".join(line + "\n" for line in lines)
        xmls[im.id] = _annotation_xml(im, objs, names_of, nobox)
        side_images.append({
            "id": im.id, "split": im.split,
            "objects": [{"id": o.id, "category": o.category, "box": list(o.box),
                         "mask": o.mask["counts"] if o.mask else None, "attributes": dict(o.attributes)}
                        for o in objs],
            "queries": side_queries,
        })
        fsplit = _flickr_split(im.split)
        if fsplit is None:
            unlisted += 1
        else:
            split_lists[fsplit].append(im.id)

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / SIDECAR).unlink(missing_ok=True)  # never leave an old sidecar beside new files
    _write_folder(out_root / SENTENCES, {f"{iid}.txt": text.encode("utf-8") for iid, text in sentences.items()},
                  foreign[SENTENCES], {f"{i}.txt" for i in old_ids})
    _write_folder(out_root / ANNOTATIONS, {f"{iid}.xml": data for iid, data in xmls.items()},
                  foreign[ANNOTATIONS], {f"{i}.xml" for i in old_ids})
    for split, ids in split_lists.items():
        with atomic_file(out_root / f"{split}.txt") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
    copied, missing = copy_images(ds, out_root / IMAGES_DIR, force, plan) if plan is not None else (0, ds.num_images)
    with atomic_file(out_root / SIDECAR) as fh:
        json.dump({"format": SIDECAR_FORMAT, "version": 1, "name": ds.name, "categories": ds.categories,
                   "images": side_images}, fh, separators=(",", ":"))

    n_expr = int(ds.num_queries - len(caption_rows))
    notes = []
    if n_expr:
        notes.append(f"{n_expr} expression queries skipped (Flickr30K Entities holds captions only)")
    if unmarked:
        notes.append(f"{unmarked} overlapping mentions kept in {SIDECAR} only (markup cannot nest)")
    if unlisted:
        notes.append(f"{unlisted} images with split outside train/val/test listed in no split file "
                     f"({SIDECAR} keeps them)")
    if missing:
        notes.append(f"{missing} image files not found under the dataset's image root, not copied")
    for sub in (SENTENCES, ANNOTATIONS):
        if foreign[sub]:
            notes.append(f"--force: kept {len(foreign[sub])} files export did not write in {sub}/ (an import "
                         f"without {SIDECAR} counts those of images in no split file as skipped)")
    if problems and not any(foreign.values()):
        notes.append(f"--force: replaced files no refground export wrote ({problems[0]})")
    return {"format": "flickr30k", "out": str(out_root), "images": ds.num_images, "objects": ds.num_objects,
            "sentences": int(len(caption_rows)), "skipped_expressions": n_expr, "unmarked_mentions": unmarked,
            "unlisted_images": unlisted, "images_copied": copied, "images_missing": missing, "notes": notes}


def _annotation_xml(im: Image, objs: list[Object], names_of: dict[int, list[str]],
                    nobox: list[tuple[str, bool]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = im.file
    size = ET.SubElement(root, "size")
    for tag, v in (("width", im.width), ("height", im.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    for o in objs:
        el = ET.SubElement(root, "object")
        for n in names_of[o.id]:
            ET.SubElement(el, "name").text = n
        bb = ET.SubElement(el, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), _xml_box(o.box)):
            ET.SubElement(bb, tag).text = str(v)
    for entity, scene in nobox:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = entity
        ET.SubElement(el, "nobndbox").text = "1"
        ET.SubElement(el, "scene").text = "1" if scene else "0"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"
