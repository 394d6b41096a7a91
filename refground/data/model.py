"""The unified dataset model shared by all five methods.

A dataset is images, objects and queries:

* :class:`Image` -- id, file (relative to the dataset's image root), width, height, split.
* :class:`Object` -- id, image id, category name, box (xyxy, continuous absolute pixels, no +1),
  visible instance mask as COCO compressed RLE (``{"size": [h, w], "counts": str}``) or None,
  attributes (``{"color": "red", "size": "small"}``; empty for most real data).
* :class:`Query` -- one sentence about one image. ``task`` is ``"expression"`` (a referring expression
  with exactly one referent object: comprehension, segmentation) or ``"caption"`` (a sentence whose
  phrases each link to one or more objects: phrase grounding). ``text`` is the tokens joined by single
  spaces, so ``text.split(" ")`` are the tokens and :class:`Mention` spans index them.
  ``mentions`` are the noun phrases with their role (``"referent"``: a grounding target;
  ``"context"``: mentioned but not the target) and linked objects; ``relations`` are triples
  (subject mention index, predicate words, object mention index) where known.

In memory the dataset is columnar (numpy arrays + lists of strings) so that a 20k-image dataset loads in
well under 2 s; records are built on access. Objects are stored grouped by image, so the objects of an
image are one contiguous slice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refground.errors import DataError, UsageError

TASKS = ("expression", "caption")
# Query.kind values of the synthetic world, in the order tables list them (real data leaves kind "").
EXPRESSION_KINDS = ("category", "attribute", "location", "size", "relation1", "relation2")
RELATION_KINDS = ("relation1", "relation2")
# Mention.kind values of the synthetic world's caption phrases: "singular" names one object that its head
# words alone single out, "plural" counts several ("two blue stars"), "needs-relation" is singular but its
# head matches several objects and only its relation to the next (unique) phrase singles one out.
PHRASE_KINDS = ("singular", "plural", "needs-relation")
KIND_ORDER = EXPRESSION_KINDS + ("caption",) + PHRASE_KINDS
ROLES = ("referent", "context")

# Split names as the refer API understands them. A query's stored split may be a compound such as
# "testAB" (member of testA and testB); see :func:`split_matches`.
BASE_SPLITS = ("train", "val", "test", "testA", "testB", "testC")
SPLIT_NAMES = BASE_SPLITS + ("testAB", "testBC", "testAC", "all")


def split_matches(stored: str, requested: str) -> bool:
    """Whether a query stored under split ``stored`` belongs to the ``requested`` split.

    Follows refer.py's ``getRefIds`` semantics: ``testA``/``testB``/``testC`` select every stored split
    that starts with ``test`` and contains that letter (so ``testAB`` is in testA and testB);
    ``testAB``-style names select exactly; ``test`` selects every stored split containing ``test``;
    ``train``/``val`` select exactly; ``all`` selects everything.
    """
    if requested == "all":
        return True
    if requested in ("testA", "testB", "testC"):
        return stored.startswith("test") and requested[-1] in stored[4:]
    if requested == "test":
        return "test" in stored
    return stored == requested


def check_split_name(requested: str) -> str:
    """Return ``requested`` or raise :class:`UsageError` naming the valid split names."""
    if requested not in SPLIT_NAMES:
        raise UsageError(f"unknown split {requested!r}; expected one of: {', '.join(SPLIT_NAMES)}")
    return requested


@dataclass(frozen=True, slots=True)
class Image:
    """One image. ``file`` is relative to the dataset's image root."""

    id: int
    file: str
    width: int
    height: int
    split: str


@dataclass(frozen=True, slots=True)
class Object:
    """One object instance. ``box``: xyxy, continuous absolute pixels; ``mask``: COCO RLE or None."""

    id: int
    image_id: int
    category: str
    box: tuple[float, float, float, float]
    mask: dict[str, Any] | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mention:
    """A noun phrase: tokens ``[start, end)`` of its query, its role and the objects it refers to.

    ``object_ids`` is empty for a phrase without a box (kept out of evaluation). ``entity`` is the
    Flickr30K entity chain id where one exists; ``type`` its coarse type (``"people"``, ``"notvisual"``,
    or the category head word for synthetic data). ``kind`` is the synthetic caption phrase kind (one of
    :data:`PHRASE_KINDS`), ``""`` elsewhere (expressions' mentions: their kind is the query's; real data).
    """

    start: int
    end: int
    role: str
    object_ids: tuple[int, ...]
    type: str = ""
    entity: str = ""
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Relation:
    """A relation triple between two mentions of the same query (indices into ``Query.mentions``)."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True, slots=True)
class Query:
    """A sentence about one image (see module docstring).

    ``split`` is the query's own split (refer data splits refs, not images); ``group`` groups sentences
    describing the same thing (refer ``ref_id``), -1 where none; ``kind`` is the synthetic expression
    kind (``category``, ``attribute``, ``location``, ``size``, ``relation1``, ``relation2``, ``caption``)
    or ``""`` for real data; ``raw`` the original sentence.
    """

    id: int
    image_id: int
    task: str
    text: str
    mentions: tuple[Mention, ...]
    relations: tuple[Relation, ...] = ()
    kind: str = ""
    split: str = ""
    group: int = -1
    raw: str = ""

    @property
    def tokens(self) -> list[str]:
        return self.text.split(" ")

    @property
    def referent(self) -> Mention:
        """The first referent mention (for an expression: the one referent)."""
        for m in self.mentions:
            if m.role == "referent":
                return m
        raise DataError(f"query {self.id} has no referent mention")

    @property
    def referent_object_id(self) -> int:
        """The referent's object id of an expression query."""
        ids = self.referent.object_ids
        if len(ids) != 1:
            raise DataError(f"query {self.id} refers to {len(ids)} objects, expected exactly one")
        return ids[0]


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


class Dataset:
    """A columnar dataset. Build with :meth:`from_records`; save/load with :mod:`refground.data.store`.

    Public columns (numpy, one row per record, in storage order):

    * images: ``image_ids`` int64[N], ``image_width``/``image_height`` int32[N], ``image_files``,
      ``image_splits`` (lists of str)
    * objects (grouped by image, images' order): ``object_ids`` int64[M], ``object_image_ids`` int64[M],
      ``object_categories`` int32[M] (index into ``categories``), ``object_boxes`` float64[M, 4] xyxy,
      ``object_masks`` (list of RLE counts str, "" where none), ``object_attributes``
      (dict name -> list[str], "" where absent); ``image_object_offsets`` int64[N+1]
    * queries: ``query_ids``, ``query_image_ids`` int64[Q], ``query_tasks`` int8[Q] (index into TASKS),
      ``query_texts``, ``query_raws``, ``query_kinds``, ``query_splits`` (lists of str),
      ``query_groups`` int64[Q], ``query_mention_offsets`` / ``query_relation_offsets`` int64[Q+1]
    * mentions: ``mention_starts``/``mention_ends`` int32[K], ``mention_roles`` int8[K] (index into ROLES),
      ``mention_types``, ``mention_entities``, ``mention_kinds`` (lists of str),
      ``mention_object_offsets`` int64[K+1],
      ``mention_object_ids`` int64[...]
    * relations: ``relation_subjects``/``relation_objects`` int32[R], ``relation_predicates`` list[str]

    ``meta`` is a free JSON dict (source, image_root, category groups, generator parameters).
    """

    def __init__(self, name: str, categories: list[str], meta: dict[str, Any], columns: dict[str, Any]):
        self.name = name
        self.categories = list(categories)
        self.meta = dict(meta)
        for key, value in columns.items():
            setattr(self, key, value)
        self._index()

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_records(
        cls,
        name: str,
        images: Iterable[Image],
        objects: Iterable[Object],
        queries: Iterable[Query],
        categories: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> "Dataset":
        """Build a dataset from records. Objects are regrouped by image (images' order, then input order).

        ``categories`` fixes the category order (default: sorted names seen in ``objects``).
        """
        images = list(images)
        objects = list(objects)
        queries = list(queries)
        cats = list(categories) if categories is not None else sorted({o.category for o in objects})
        cat_index = {c: i for i, c in enumerate(cats)}
        image_pos = {im.id: i for i, im in enumerate(images)}
        if len(image_pos) != len(images):
            raise DataError(f"dataset {name}: duplicate image ids")
        for o in objects:
            if o.image_id not in image_pos:
                raise DataError(f"dataset {name}: object {o.id} refers to unknown image {o.image_id}")
            if o.category not in cat_index:
                raise DataError(f"dataset {name}: object {o.id} has unknown category {o.category!r}")
        order = sorted(range(len(objects)), key=lambda k: image_pos[objects[k].image_id])
        objects = [objects[k] for k in order]
        per_image = np.bincount([image_pos[o.image_id] for o in objects], minlength=len(images))
        attr_names = sorted({k for o in objects for k in o.attributes})
        mentions = [m for q in queries for m in q.mentions]
        relations = [r for q in queries for r in q.relations]
        for m in mentions:
            if m.role not in ROLES:
                raise DataError(f"dataset {name}: unknown mention role {m.role!r}")
        for q in queries:
            if q.task not in TASKS:
                raise DataError(f"dataset {name}: query {q.id} has unknown task {q.task!r}")
        columns = dict(
            image_ids=np.array([im.id for im in images], dtype=np.int64),
            image_width=np.array([im.width for im in images], dtype=np.int32),
            image_height=np.array([im.height for im in images], dtype=np.int32),
            image_files=[im.file for im in images],
            image_splits=[im.split for im in images],
            image_object_offsets=_offsets(per_image),
            object_ids=np.array([o.id for o in objects], dtype=np.int64),
            object_image_ids=np.array([o.image_id for o in objects], dtype=np.int64),
            object_categories=np.array([cat_index[o.category] for o in objects], dtype=np.int32),
            object_boxes=np.array([o.box for o in objects], dtype=np.float64).reshape(-1, 4),
            object_masks=[o.mask["counts"] if o.mask else "" for o in objects],
            object_attributes={a: [o.attributes.get(a, "") for o in objects] for a in attr_names},
            query_ids=np.array([q.id for q in queries], dtype=np.int64),
            query_image_ids=np.array([q.image_id for q in queries], dtype=np.int64),
            query_tasks=np.array([TASKS.index(q.task) for q in queries], dtype=np.int8),
            query_texts=[q.text for q in queries],
            query_raws=[q.raw for q in queries],
            query_kinds=[q.kind for q in queries],
            query_splits=[q.split for q in queries],
            query_groups=np.array([q.group for q in queries], dtype=np.int64),
            query_mention_offsets=_offsets([len(q.mentions) for q in queries]),
            query_relation_offsets=_offsets([len(q.relations) for q in queries]),
            mention_starts=np.array([m.start for m in mentions], dtype=np.int32),
            mention_ends=np.array([m.end for m in mentions], dtype=np.int32),
            mention_roles=np.array([ROLES.index(m.role) for m in mentions], dtype=np.int8),
            mention_types=[m.type for m in mentions],
            mention_entities=[m.entity for m in mentions],
            mention_kinds=[m.kind for m in mentions],
            mention_object_offsets=_offsets([len(m.object_ids) for m in mentions]),
            mention_object_ids=np.array([i for m in mentions for i in m.object_ids], dtype=np.int64),
            relation_subjects=np.array([r.subject for r in relations], dtype=np.int32),
            relation_objects=np.array([r.object for r in relations], dtype=np.int32),
            relation_predicates=[r.predicate for r in relations],
        )
        return cls(name, cats, meta or {}, columns)

    def _index(self) -> None:
        self._image_pos = {int(i): k for k, i in enumerate(self.image_ids.tolist())}
        self._object_pos = {int(i): k for k, i in enumerate(self.object_ids.tolist())}
        self._query_pos = {int(i): k for k, i in enumerate(self.query_ids.tolist())}
        if len(self._image_pos) != len(self.image_ids):
            raise DataError(f"dataset {self.name}: duplicate image ids")
        if len(self._object_pos) != len(self.object_ids):
            raise DataError(f"dataset {self.name}: duplicate object ids")
        if len(self._query_pos) != len(self.query_ids):
            raise DataError(f"dataset {self.name}: duplicate query ids")

    COLUMN_NAMES = (
        "image_ids", "image_width", "image_height", "image_files", "image_splits", "image_object_offsets",
        "object_ids", "object_image_ids", "object_categories", "object_boxes", "object_masks",
        "object_attributes", "query_ids", "query_image_ids", "query_tasks", "query_texts", "query_raws",
        "query_kinds", "query_splits", "query_groups", "query_mention_offsets", "query_relation_offsets",
        "mention_starts", "mention_ends", "mention_roles", "mention_types", "mention_entities",
        "mention_kinds", "mention_object_offsets", "mention_object_ids", "relation_subjects", "relation_objects",
        "relation_predicates",
    )

    def columns(self) -> dict[str, Any]:
        """All columns by name (what :mod:`refground.data.store` writes)."""
        return {k: getattr(self, k) for k in self.COLUMN_NAMES}

    # ------------------------------------------------------------------------------------ sizes
    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, images={self.num_images}, objects={self.num_objects}, "
                f"queries={self.num_queries}, categories={len(self.categories)})")

    # ---------------------------------------------------------------------------------- records
    def image(self, image_id: int) -> Image:
        k = self._pos(self._image_pos, image_id, "image")
        return Image(int(self.image_ids[k]), self.image_files[k], int(self.image_width[k]),
                     int(self.image_height[k]), self.image_splits[k])

    def images(self) -> list[Image]:
        return [self.image(int(i)) for i in self.image_ids]

    def _object_at(self, k: int) -> Object:
        counts = self.object_masks[k]
        img = self._image_pos[int(self.object_image_ids[k])]
        mask = ({"size": [int(self.image_height[img]), int(self.image_width[img])], "counts": counts}
                if counts else None)
        attrs = {a: vals[k] for a, vals in self.object_attributes.items() if vals[k]}
        return Object(int(self.object_ids[k]), int(self.object_image_ids[k]),
                      self.categories[int(self.object_categories[k])],
                      tuple(float(v) for v in self.object_boxes[k]), mask, attrs)

    def object(self, object_id: int) -> Object:
        return self._object_at(self._pos(self._object_pos, object_id, "object"))

    def objects(self) -> list[Object]:
        return [self._object_at(k) for k in range(self.num_objects)]

    def object_slice(self, image_id: int) -> slice:
        """Rows of the object columns that belong to ``image_id`` (contiguous)."""
        k = self._pos(self._image_pos, image_id, "image")
        return slice(int(self.image_object_offsets[k]), int(self.image_object_offsets[k + 1]))

    def objects_of(self, image_id: int) -> list[Object]:
        s = self.object_slice(image_id)
        return [self._object_at(k) for k in range(s.start, s.stop)]

    def image_row(self, image_id: int) -> int:
        """Row of ``image_id`` in the image columns."""
        return self._pos(self._image_pos, image_id, "image")

    def object_row(self, object_id: int) -> int:
        """Row of ``object_id`` in the object columns."""
        return self._pos(self._object_pos, object_id, "object")

    def _query_at(self, k: int) -> Query:
        m0, m1 = int(self.query_mention_offsets[k]), int(self.query_mention_offsets[k + 1])
        mentions = []
        for j in range(m0, m1):
            o0, o1 = int(self.mention_object_offsets[j]), int(self.mention_object_offsets[j + 1])
            mentions.append(Mention(int(self.mention_starts[j]), int(self.mention_ends[j]),
                                    ROLES[int(self.mention_roles[j])],
                                    tuple(int(v) for v in self.mention_object_ids[o0:o1]),
                                    self.mention_types[j], self.mention_entities[j], self.mention_kinds[j]))
        r0, r1 = int(self.query_relation_offsets[k]), int(self.query_relation_offsets[k + 1])
        relations = tuple(Relation(int(self.relation_subjects[j]), self.relation_predicates[j],
                                   int(self.relation_objects[j])) for j in range(r0, r1))
        return Query(int(self.query_ids[k]), int(self.query_image_ids[k]), TASKS[int(self.query_tasks[k])],
                     self.query_texts[k], tuple(mentions), relations, self.query_kinds[k],
                     self.query_splits[k], int(self.query_groups[k]), self.query_raws[k])

    def query_row(self, query_id: int) -> int:
        """Row of ``query_id`` in the query columns."""
        return self._pos(self._query_pos, query_id, "query")

    def query(self, query_id: int) -> Query:
        return self._query_at(self._pos(self._query_pos, query_id, "query"))

    def query_rows(self, split: str = "all", task: str | None = None) -> np.ndarray:
        """Rows (int64, storage order) of the queries in ``split`` (refer semantics) and ``task``."""
        check_split_name(split)
        keep = np.array([split_matches(s, split) for s in self.query_splits], dtype=bool)
        if task is not None:
            if task not in TASKS:
                raise UsageError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
            keep &= self.query_tasks == TASKS.index(task)
        return np.flatnonzero(keep)

    def queries(self, split: str = "all", task: str | None = None) -> list[Query]:
        """Query records of ``split`` and ``task`` in storage order."""
        return [self._query_at(int(k)) for k in self.query_rows(split, task)]

    def splits(self) -> list[str]:
        """Distinct stored query splits, in first-seen order."""
        return list(dict.fromkeys(self.query_splits))

    @staticmethod
    def _pos(index: dict[int, int], key: int, what: str) -> int:
        try:
            return index[int(key)]
        except KeyError:
            raise DataError(f"unknown {what} id {key}") from None

    # ------------------------------------------------------------------------------- equality
    def records(self) -> dict[str, Any]:
        """Everything as plain records (for equality tests and exporters)."""
        return {
            "name": self.name,
            "categories": self.categories,
            "images": self.images(),
            "objects": self.objects(),
            "queries": [self._query_at(k) for k in range(self.num_queries)],
        }

    def to_json_records(self) -> str:
        """A canonical JSON dump of :meth:`records` (debugging, diffs)."""
        from dataclasses import asdict

        rec = self.records()
        return json.dumps({k: ([asdict(r) for r in v] if k in ("images", "objects", "queries") else v)
                           for k, v in rec.items()}, sort_keys=True)
