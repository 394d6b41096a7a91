"""An independent evaluator of the synthetic world's language (written from the grammar's description,
importing nothing from ``refground.data.synth``).

It parses a sentence into noun phrases, location and size words and (nested) relation clauses,
evaluates it against an image's objects as stored in a :class:`~refground.data.model.Dataset` (boxes,
categories, attributes, visible mask areas from the RLEs) and returns the set of satisfying object ids.

Grammar::

    expression := [carrier] np
    np         := det [location | size-comparison] [size] [colour] noun [filler] [location-post] [clause]
    clause     := [connector] relation np        (a clause attaches to the nearest noun phrase)
    caption    := [opener] cnp ((relation | "and") cnp)*
    cnp        := det [size] [colour] noun  |  count [size] [colour] plural

Semantics: a noun phrase's base set is the objects of its category with its colour and size class; a
location word keeps the object whose box centre is extreme, when the runner-up is at least 8% of the
image width (height) further (comparatives "upper"/"lower" need exactly two candidates); a size
comparison keeps the object with the extreme visible mask area, by a ratio of at least 1.5
("bigger"/"larger"/"smaller" need exactly two candidates); a clause keeps the objects X for which some
object Y of the clause's phrase has "X rel Y": box centres, y axis down, left: cx_X < cx_Y and
|dx| > |dy|, and so on, and centre distance at most half the image diagonal. A caption's plural phrase
"two blue stars" denotes its objects only when exactly that many match.

Caption phrase kinds: a singular phrase denotes one object by itself; a plural phrase its counted
objects; a needs-relation phrase's base set holds two or more objects, and its relation to the next phrase
(which denotes one object) keeps exactly one. The generator asserts such a relation only with a clear
margin (the major offset at least 1.3 times the minor one and at least 4% of the image width (left/right)
or height (above/below), centres at most 0.45 diagonals apart) and only where no other object of the base
set is even roughly in that relation (major offset at least 0.75 times the minor one, centres at most 0.56
diagonals apart): :func:`relation_clear`, :func:`relation_rough`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from refground.masks import area as rle_area

NOUNS = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
          "hearts": "heart", "crosses": "cross", "diamonds": "diamond", "hexagons": "hexagon"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
SIZE_CLASSES = ("small", "medium", "large")
DETERMINERS = ("the", "a", "an")
COUNTS = {"two": 2, "three": 3, "four": 4}
FILLERS = ("shape", "object", "thing")
CARRIERS = (("please", "find"), ("look", "at"), ("click", "on"), ("the", "one", "that", "is"), ("find",),
            ("pick",), ("select",))
OPENERS = (("there", "is"), ("we", "see"), ("a", "picture", "of"), ("an", "image", "with"), ("this", "shows"))
CONNECTORS = (("that", "is"), ("which", "is"))
# word -> (direction, needs exactly two candidates)
LOCATION_WORDS = {
    "leftmost": ("left", False), "left": ("left", False),
    "rightmost": ("right", False), "right": ("right", False),
    "top": ("top", False), "topmost": ("top", False), "upper": ("top", True),
    "bottom": ("bottom", False), "bottommost": ("bottom", False), "lowest": ("bottom", False),
    "lower": ("bottom", True),
}
LOCATION_POST = {("on", "the", "left"): "left", ("on", "the", "right"): "right",
                 ("at", "the", "top"): "top", ("at", "the", "bottom"): "bottom"}
SIZE_WORDS = {"biggest": ("max", False), "largest": ("max", False), "smallest": ("min", False),
              "bigger": ("max", True), "larger": ("max", True), "smaller": ("min", True)}
RELATION_PHRASES = {
    ("to", "the", "left", "of"): "left", ("left", "of"): "left",
    ("to", "the", "right", "of"): "right", ("right", "of"): "right",
    ("above",): "above", ("over",): "above",
    ("below",): "below", ("under",): "below", ("beneath",): "below",
}
LOCATION_MARGIN = 0.08
SIZE_RATIO = 1.5


class ParseError(ValueError):
    pass


@dataclass
class Phrase:
    """A parsed noun phrase. ``start``/``end``: its token span (clause excluded)."""

    start: int
    end: int
    noun: str
    colour: str | None = None
    size: str | None = None
    location: tuple[str, bool] | None = None
    comparison: tuple[str, bool] | None = None
    count: int = 1
    clause: tuple[str, str, "Phrase"] | None = None  # (relation, predicate words, phrase)

    def depth(self) -> int:
        return 0 if self.clause is None else 1 + self.clause[2].depth()

    def chain(self) -> list["Phrase"]:
        out = [self]
        while out[-1].clause is not None:
            out.append(out[-1].clause[2])
        return out


@dataclass
class Obj:
    id: int
    category: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int


@dataclass
class View:
    """One image's objects as the oracle sees them."""

    width: int
    height: int
    objects: list[Obj] = field(default_factory=list)

    @classmethod
    def of(cls, ds, image_id: int) -> "View":
        im = ds.image(image_id)
        objs = []
        for o in ds.objects_of(image_id):
            x1, y1, x2, y2 = o.box
            objs.append(Obj(o.id, o.category, o.attributes.get("color", ""), o.attributes.get("size", ""),
                            (x1 + x2) / 2, (y1 + y2) / 2, rle_area(o.mask)))
        return cls(im.width, im.height, objs)

    def get(self, oid: int) -> Obj:
        return next(o for o in self.objects if o.id == oid)


# ------------------------------------------------------------------------------------- parsing
def _match(tokens: list[str], pos: int, options) -> tuple | None:
    for opt in sorted(options, key=len, reverse=True):
        if tuple(tokens[pos:pos + len(opt)]) == tuple(opt):
            return opt
    return None


def _phrase(tokens: list[str], pos: int, allow_clause: bool = True, caption: bool = False) -> tuple[Phrase, int]:
    start = pos
    if pos >= len(tokens):
        raise ParseError("expected a noun phrase at the end")
    count = 1
    if caption and tokens[pos] in COUNTS:
        count = COUNTS[tokens[pos]]
    elif tokens[pos] not in DETERMINERS:
        raise ParseError(f"expected a determiner at {pos}: {tokens[pos]!r}")
    pos += 1
    p = Phrase(start, start, "", count=count)
    while pos < len(tokens):
        w = tokens[pos]
        if w in LOCATION_WORDS and p.location is None and p.comparison is None and p.size is None \
                and p.colour is None and count == 1:
            p.location = LOCATION_WORDS[w]
        elif w in SIZE_WORDS and p.comparison is None and p.location is None and p.size is None \
                and p.colour is None and count == 1:
            p.comparison = SIZE_WORDS[w]
        elif w in SIZE_CLASSES and p.size is None and p.colour is None:
            p.size = w
        elif w in COLOURS and p.colour is None:
            p.colour = w
        else:
            break
        pos += 1
    if pos >= len(tokens):
        raise ParseError("missing noun")
    w = tokens[pos]
    if count == 1 and w in NOUNS:
        p.noun = w
    elif count > 1 and w in PLURAL:
        p.noun = PLURAL[w]
    else:
        raise ParseError(f"expected a {'plural ' if count > 1 else ''}noun at {pos}: {w!r}")
    pos += 1
    if count == 1 and pos < len(tokens) and tokens[pos] in FILLERS and not caption:
        pos += 1
    post = _match(tokens, pos, LOCATION_POST) if count == 1 and not caption else None
    if post is not None:
        if p.location is not None or p.comparison is not None:
            raise ParseError("two location words")
        p.location = (LOCATION_POST[post], False)
        pos += len(post)
    if tokens[start] == "an" and (tokens[start + 1][0] not in "aeiou"):
        raise ParseError(f"'an' before {tokens[start + 1]!r}")
    if tokens[start] == "a" and (tokens[start + 1][0] in "aeiou"):
        raise ParseError(f"'a' before {tokens[start + 1]!r}")
    p.end = pos
    if allow_clause and pos < len(tokens):
        conn = _match(tokens, pos, CONNECTORS)
        at = pos + (len(conn) if conn else 0)
        rel = _match(tokens, at, RELATION_PHRASES)
        if rel is not None:
            sub, after = _phrase(tokens, at + len(rel), allow_clause=True)
            p.clause = (RELATION_PHRASES[rel], " ".join(rel), sub)
            pos = after
        elif conn is not None:
            raise ParseError(f"connector without a relation at {pos}")
    return p, pos


def parse_expression(text: str) -> Phrase:
    """Parse a referring expression into its head phrase (with nested clauses)."""
    tokens = text.split(" ")
    carrier = _match(tokens, 0, CARRIERS)
    pos = len(carrier) if carrier else 0
    head, pos = _phrase(tokens, pos)
    if pos != len(tokens):
        raise ParseError(f"trailing words from {pos}: {' '.join(tokens[pos:])!r}")
    return head


def parse_caption(text: str) -> tuple[list[Phrase], list[tuple[int, str, str, int]]]:
    """Parse a caption into phrases and relation links (subject index, relation, words, object index)."""
    tokens = text.split(" ")
    opener = _match(tokens, 0, OPENERS)
    pos = len(opener) if opener else 0
    phrases: list[Phrase] = []
    links: list[tuple[int, str, str, int]] = []
    p, pos = _phrase(tokens, pos, allow_clause=False, caption=True)
    phrases.append(p)
    while pos < len(tokens):
        if tokens[pos] == "and":
            rel = None
            pos += 1
        else:
            words = _match(tokens, pos, RELATION_PHRASES)
            if words is None:
                raise ParseError(f"expected 'and' or a relation at {pos}: {tokens[pos]!r}")
            rel = (RELATION_PHRASES[words], " ".join(words))
            pos += len(words)
        p, pos = _phrase(tokens, pos, allow_clause=False, caption=True)
        if rel is not None:
            links.append((len(phrases) - 1, rel[0], rel[1], len(phrases)))
        phrases.append(p)
    return phrases, links


# ------------------------------------------------------------------------------------ semantics
def relation_holds(view: View, rel: str, x: Obj, y: Obj) -> bool:
    """"x rel y" on box centres (image y axis down), within half the image diagonal."""
    if x.id == y.id:
        return False
    dx, dy = x.cx - y.cx, x.cy - y.cy
    if math.hypot(dx, dy) > 0.5 * math.hypot(view.width, view.height):
        return False
    if rel == "left":
        return dx < 0 and abs(dx) > abs(dy)
    if rel == "right":
        return dx > 0 and abs(dx) > abs(dy)
    if rel == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if rel == "below":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(rel)


CLEAR_DOMINANCE, CLEAR_DIST, CLEAR_MIN_OFFSET = 1.3, 0.45, 0.04
ROUGH_DOMINANCE, ROUGH_DIST = 0.75, 0.56


def _offsets(view: View, rel: str, x: Obj, y: Obj) -> tuple[float, float, float, bool]:
    """(major offset, minor offset, image extent along the major axis, sign right) of "x rel y"."""
    dx, dy = x.cx - y.cx, x.cy - y.cy
    if rel in ("left", "right"):
        return abs(dx), abs(dy), view.width, (dx < 0 if rel == "left" else dx > 0)
    if rel in ("above", "below"):
        return abs(dy), abs(dx), view.height, (dy < 0 if rel == "above" else dy > 0)
    raise ValueError(rel)


def relation_clear(view: View, rel: str, x: Obj, y: Obj) -> bool:
    """"x rel y" holds with the generator's clear margin."""
    major, minor, extent, sign = _offsets(view, rel, x, y)
    dist = math.hypot(x.cx - y.cx, x.cy - y.cy)
    return (x.id != y.id and sign and major >= CLEAR_DOMINANCE * minor and major > minor
            and major >= CLEAR_MIN_OFFSET * extent and dist <= CLEAR_DIST * math.hypot(view.width, view.height))


def relation_rough(view: View, rel: str, x: Obj, y: Obj) -> bool:
    """"x rel y" holds even roughly (what the generator avoids for a phrase's other candidates)."""
    major, minor, _, sign = _offsets(view, rel, x, y)
    dist = math.hypot(x.cx - y.cx, x.cy - y.cy)
    return (x.id != y.id and sign and major >= ROUGH_DOMINANCE * minor
            and dist <= ROUGH_DIST * math.hypot(view.width, view.height))


def _extreme(cands: list[Obj], key, margin: float, lowest: bool) -> list[Obj]:
    if len(cands) < 2:
        return cands
    ordered = sorted(cands, key=key, reverse=not lowest)
    best, runner = key(ordered[0]), key(ordered[1])
    return [ordered[0]] if abs(runner - best) >= margin else []


def base_set(view: View, p: Phrase) -> list[Obj]:
    """Objects matching the phrase's noun, colour and size class (no location, comparison or clause)."""
    return [o for o in view.objects if o.category == p.noun and (p.colour is None or o.colour == p.colour)
            and (p.size is None or o.size == p.size)]


def evaluate_phrase(view: View, p: Phrase, use_clause: bool = True) -> set[int]:
    """Ids of the objects the phrase denotes."""
    cands = base_set(view, p)
    if p.count > 1:
        return {o.id for o in cands} if len(cands) == p.count else set()
    if p.location is not None:
        direction, two = p.location
        if two and len(cands) != 2:
            return set()
        if direction in ("left", "right"):
            cands = _extreme(cands, lambda o: o.cx, LOCATION_MARGIN * view.width, direction == "left")
        else:
            cands = _extreme(cands, lambda o: o.cy, LOCATION_MARGIN * view.height, direction == "top")
    if p.comparison is not None:
        which, two = p.comparison
        if two and len(cands) != 2:
            return set()
        if len(cands) >= 2:
            ordered = sorted(cands, key=lambda o: o.area, reverse=(which == "max"))
            a, b = ordered[0].area, ordered[1].area
            ok = a >= SIZE_RATIO * b if which == "max" else a * SIZE_RATIO <= b
            cands = [ordered[0]] if ok else []
    if use_clause and p.clause is not None:
        rel, _, sub = p.clause
        landmarks = [view.get(i) for i in evaluate_phrase(view, sub)]
        cands = [x for x in cands if any(relation_holds(view, rel, x, y) for y in landmarks)]
    return {o.id for o in cands}


def evaluate(view: View, text: str) -> set[int]:
    """Ids of the objects a referring expression denotes."""
    return evaluate_phrase(view, parse_expression(text))


def kind_of(p: Phrase) -> str:
    """The expression kind implied by the parse."""
    if p.clause is not None:
        return "relation2" if p.depth() >= 2 else "relation1"
    if p.location is not None:
        return "location"
    if p.comparison is not None:
        return "size"
    if p.colour is not None or p.size is not None:
        return "attribute"
    return "category"
