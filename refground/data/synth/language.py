"""Referring expressions and captions for a scene, each checked by a symbolic model of the scene.

Grammar (tokens separated by single spaces; ``[...]`` optional, ``|`` alternatives)::

    expression := [CARRIER] np [clause]
    clause     := [CONNECTOR] REL np_l [CONNECTOR REL np_l]      (the nested clause attaches to the
                                                                  nearest noun phrase: right-branching)
    np         := DET [LOC_PRE | SIZE_CMP] [SIZE] [COLOR] NOUN [FILLER] [LOC_POST]
    caption    := [OPENER] cnp ((REL | "and") cnp){1,3}
    cnp        := DET [SIZE] [COLOR] NOUN  |  COUNT [SIZE] [COLOR] PLURAL

Semantics (see ``world.vocabulary()['semantics']``): a noun phrase denotes the objects of its category
with the given colour and size class; a location word keeps the one with the extreme box centre among
them (margin ``LOCATION_MARGIN``); a size comparison keeps the one with the extreme visible area (ratio
``SIZE_RATIO``); a clause keeps the objects in relation REL with some object the landmark phrase denotes.

Every expression denotes exactly its referent; relation expressions need their relation (the head alone
matches at least two objects); a second-order expression needs its nested clause (its first landmark's
head alone matches at least two objects, and without the nested clause another object would satisfy the
expression too). Relations are asserted only where they hold clearly and distractors only where they
clearly fail (``REL_*`` margins in :mod:`world`), so no expression sits on a decision boundary.
Kinds: ``category``, ``attribute``, ``location``, ``size``, ``relation1``, ``relation2``.

A caption's phrases each link to their objects, and each has a phrase kind (``Mention.kind``):
``singular`` (its head words alone name one object), ``plural`` ("two blue stars": exactly the objects
counted) or ``needs-relation`` (singular, but its head matches two or more objects; the relation that
immediately follows it, to a ``singular`` landmark phrase, singles its object out, with the same clear /
relaxed margins as a ``relation1`` expression). About a third of the phrases need their relation
(``NEEDS_RELATION_CHANCE``), as in the weakly supervised grounding setting, where a phrase's own words do
not always suffice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refground.data.model import EXPRESSION_KINDS, PHRASE_KINDS
from refground.data.synth.scene import Scene
from refground.data.synth.world import (CAPTION_OPENERS, CARRIERS, CATEGORIES, CATEGORY_GROUPS, COLOR_NAMES,
                                        CONNECTORS, COUNT_WORDS, FILLER_NOUNS, GEN_LOCATION_MARGIN,
                                        GEN_SIZE_RATIO, LOCATION_POST, LOCATION_PRE, LOCATION_PRE_TWO, LOCATIONS,
                                        PLURALS, REL_CLEAR_DIST, REL_CLEAR_DOMINANCE, REL_CLEAR_MIN_OFFSET,
                                        REL_RELAXED_DIST, REL_RELAXED_DOMINANCE, RELATION_MAX_DIST,
                                        RELATION_WORDS, RELATIONS, SIZE_COMPARE, SIZE_COMPARE_TWO, SIZES)

KINDS = EXPRESSION_KINDS
# Relative preference of kinds when a referent admits several (tuned so that about 40% of expressions
# use a relation and about 15% are second order; see tests/test_synth.py for the enforced minimums).
KIND_WEIGHTS = {"category": 0.7, "attribute": 1.1, "location": 1.0, "size": 0.8, "relation1": 2.2,
                "relation2": 3.5}
REFERENTS_PER_IMAGE = 3
CAPTIONS_PER_IMAGE = 3
SINGULAR, PLURAL, NEEDS_RELATION = PHRASE_KINDS
# Chance that a caption unit (where two phrases still fit and an option exists) is a needs-relation phrase
# with its landmark; tuned so that about a third of caption phrases need their relation (see
# tests/test_synth_captions.py for the enforced range).
NEEDS_RELATION_CHANCE = 0.75
# Chance that a single-phrase unit is plural where both kinds are free: needs-relation units (with their
# singular landmarks) take most of a caption, and plural phrases (several boxes, as in Flickr30K) should
# stay common among the rest.
PLURAL_CHANCE = 0.75
GROUP_A = frozenset(CATEGORIES.index(c) for c in CATEGORY_GROUPS["A"])

Key = tuple[int, int, int]  # (category, colour or -1, size or -1)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class Facts:
    """What is true of a scene, as Python int bitmasks over its objects (n <= 20, so set algebra is a
    handful of integer operations)."""

    def __init__(self, scene: Scene):
        self.n = n = scene.n
        self.W, self.H = scene.width, scene.height
        self.cat = scene.cat.tolist()
        self.color = scene.color.tolist()
        self.size = scene.size.tolist()
        self.area = scene.area.tolist()
        box = scene.box.astype(np.float64)
        cx = (box[:, 0] + box[:, 2]) / 2
        cy = (box[:, 1] + box[:, 3]) / 2
        self.cx, self.cy = cx.tolist(), cy.tolist()
        self.keys: dict[Key, int] = {}
        self.obj_keys: list[list[Key]] = []
        for o in range(n):
            c, col, sz = self.cat[o], self.color[o], self.size[o]
            ks = [(c, -1, -1), (c, col, -1), (c, -1, sz), (c, col, sz)]
            self.obj_keys.append(ks)
            for k in ks:
                self.keys[k] = self.keys.get(k, 0) | (1 << o)
        self.unique = [[k for k in ks if self.keys[k] == (1 << o)] for o, ks in enumerate(self.obj_keys)]
        # Relations: entry [x, y] = "x REL y" (vector from y's centre to x's centre).
        dx = cx[:, None] - cx[None, :]
        dy = cy[:, None] - cy[None, :]
        ax, ay = np.abs(dx), np.abs(dy)
        d2 = dx * dx + dy * dy
        diag2 = float(self.W * self.W + self.H * self.H)
        near = d2 <= (RELATION_MAX_DIST ** 2) * diag2
        clear_near = d2 <= (REL_CLEAR_DIST ** 2) * diag2
        relaxed_near = d2 <= (REL_RELAXED_DIST ** 2) * diag2
        pow2 = (np.int64(1) << np.arange(n, dtype=np.int64))
        self.crisp_row: dict[str, list[int]] = {}
        self.clear_row: dict[str, list[int]] = {}
        self.relaxed_col: dict[str, list[int]] = {}
        for r in RELATIONS:
            if r in ("left", "right"):
                sign = dx < 0 if r == "left" else dx > 0
                major, minor, extent = ax, ay, self.W
            else:
                sign = dy < 0 if r == "above" else dy > 0
                major, minor, extent = ay, ax, self.H
            crisp = sign & (major > minor) & near
            clear = crisp & (major >= REL_CLEAR_DOMINANCE * minor) & clear_near & \
                (major >= REL_CLEAR_MIN_OFFSET * extent)
            relaxed = sign & (major >= REL_RELAXED_DOMINANCE * minor) & relaxed_near
            self.crisp_row[r] = (crisp.astype(np.int64) * pow2[None, :]).sum(1).tolist()
            self.clear_row[r] = (clear.astype(np.int64) * pow2[None, :]).sum(1).tolist()
            self.relaxed_col[r] = (relaxed.astype(np.int64) * pow2[:, None]).sum(0).tolist()


# ------------------------------------------------------------------------------------- phrases
@dataclass
class NP:
    """A noun phrase plan. ``loc``: (direction, words, post); ``cmp``: size comparison word."""

    cat: int
    color: int = -1
    size: int = -1
    det: str = "the"
    loc: tuple[str, str, bool] | None = None
    cmp: str = ""
    filler: str = ""
    count: int = 1  # > 1: a caption's plural phrase ("two blue stars")

    def tokens(self) -> list[str]:
        out: list[str] = []
        if self.count > 1:
            out.append(COUNT_WORDS[self.count])
        else:
            mods = []
            if self.loc is not None and not self.loc[2]:
                mods.append(self.loc[1])
            if self.cmp:
                mods.append(self.cmp)
            if self.size >= 0:
                mods.append(SIZES[self.size])
            if self.color >= 0:
                mods.append(COLOR_NAMES[self.color])
            first = (mods[0] if mods else CATEGORIES[self.cat]).split(" ")[0]
            det = "an" if self.det == "a" and first[0] in "aeiou" else self.det
            out.append(det)
        if self.count == 1:
            out.extend(w for m in mods for w in m.split(" "))
            out.append(CATEGORIES[self.cat])
        else:
            if self.size >= 0:
                out.append(SIZES[self.size])
            if self.color >= 0:
                out.append(COLOR_NAMES[self.color])
            out.append(PLURALS[CATEGORIES[self.cat]])
        if self.filler:
            out.append(self.filler)
        if self.loc is not None and self.loc[2]:
            out.extend(self.loc[1].split(" "))
        return out


@dataclass
class Sentence:
    """Tokens with mention spans (start, end, role, object indices, type, phrase kind) and relation triples
    (subject mention index, predicate words, object mention index)."""

    tokens: list[str] = field(default_factory=list)
    mentions: list[tuple[int, int, str, tuple[int, ...], str, str]] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    def words(self, text: str) -> None:
        if text:
            self.tokens.extend(text.split(" "))

    def phrase(self, np_: NP, role: str, objects: tuple[int, ...], kind: str = "") -> int:
        """Append the phrase's tokens and its mention; ``kind``: a caption phrase kind, "" for expressions."""
        start = len(self.tokens)
        self.tokens.extend(np_.tokens())
        self.mentions.append((start, len(self.tokens), role, objects, CATEGORIES[np_.cat], kind))
        return len(self.mentions) - 1

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def _np_from_key(key: Key, rng: np.random.Generator, det: str | None = None) -> NP:
    c, col, sz = key
    return NP(c, col, sz, det or ("the" if rng.random() < 0.8 else "a"),
              filler=_pick(rng, FILLER_NOUNS) if rng.random() < 0.12 else "")


def _choose_key(rng: np.random.Generator, keys: list[Key]) -> Key:
    """Prefer short descriptions (fewer attribute words), as people do."""
    if len(keys) == 1:
        return keys[0]
    w = [3.0 if (k[1] < 0 and k[2] < 0) else 1.5 if (k[1] < 0 or k[2] < 0) else 1.0 for k in keys]
    u = rng.random() * sum(w)
    for k, wk in zip(keys, w):
        u -= wk
        if u < 0:
            return k
    return keys[-1]


def relation_options(f: Facts, x: int) -> list[tuple[Key, str, int]]:
    """Every ``(head key, relation r, landmark y)`` that singles out ``x`` by one relation: the head matches
    ``x`` and at least one other object, ``x`` clearly satisfies "x r y", no other object matching the head
    is even roughly in relation r to y, and y is unique (some key names it alone). Deterministic order
    (keys as in ``Facts.obj_keys``, then relations, then landmarks by index)."""
    options = []
    for k in f.obj_keys[x]:
        shared = f.keys[k]
        if shared.bit_count() < 2:
            continue
        for r in RELATIONS:
            for y in _bits(f.clear_row[r][x]):
                if f.unique[y] and not (f.relaxed_col[r][y] & shared & ~(1 << x)):
                    options.append((k, r, y))
    return options


# ------------------------------------------------------------------------------------- plans
@dataclass
class Plan:
    kind: str
    head: NP
    chain: list[tuple[str, NP, int]] = field(default_factory=list)  # (relation, landmark NP, object)


class Describer:
    """Finds, for one referent, one unambiguous expression plan of each kind (or None)."""

    def __init__(self, facts: Facts, rng: np.random.Generator):
        self.f = facts
        self.rng = rng

    def shared_keys(self, x: int) -> list[Key]:
        return [k for k in self.f.obj_keys[x] if self.f.keys[k].bit_count() >= 2]

    def category(self, x: int) -> Plan | None:
        k = self.f.obj_keys[x][0]
        if self.f.keys[k] != (1 << x):
            return None
        return Plan("category", _np_from_key(k, self.rng))

    def attribute(self, x: int) -> Plan | None:
        if self.f.keys[self.f.obj_keys[x][0]] == (1 << x):
            return None  # the category alone suffices
        uniq = [k for k in self.f.unique[x] if k[1] >= 0 or k[2] >= 0]
        if not uniq:
            return None
        return Plan("attribute", _np_from_key(_choose_key(self.rng, uniq), self.rng))

    def location(self, x: int) -> Plan | None:
        f = self.f
        options = []
        for k in self.shared_keys(x):
            others = _bits(f.keys[k] & ~(1 << x))
            mx = GEN_LOCATION_MARGIN * f.W
            my = GEN_LOCATION_MARGIN * f.H
            ok = {
                "left": min(f.cx[o] for o in others) - f.cx[x] >= mx,
                "right": f.cx[x] - max(f.cx[o] for o in others) >= mx,
                "top": min(f.cy[o] for o in others) - f.cy[x] >= my,
                "bottom": f.cy[x] - max(f.cy[o] for o in others) >= my,
            }
            options.extend((k, d, len(others) + 1) for d in LOCATIONS if ok[d])
        if not options:
            return None
        k, d, count = options[int(self.rng.integers(len(options)))]
        head = _np_from_key(k, self.rng, det="the")
        words = list(LOCATION_PRE[d]) + (list(LOCATION_PRE_TWO.get(d, ())) if count == 2 else [])
        if self.rng.random() < 0.35:
            head.loc = (d, _pick(self.rng, LOCATION_POST[d]), True)
        else:
            head.loc = (d, _pick(self.rng, words), False)
        return Plan("location", head)

    def size_cmp(self, x: int) -> Plan | None:
        f = self.f
        options = []
        for k in self.shared_keys(x):
            if k[2] >= 0:
                continue  # "the biggest small circle" mixes the size class with the comparison
            others = [f.area[o] for o in _bits(f.keys[k] & ~(1 << x))]
            if f.area[x] >= GEN_SIZE_RATIO * max(others):
                options.append((k, "big", len(others) + 1))
            if f.area[x] * GEN_SIZE_RATIO <= min(others):
                options.append((k, "small", len(others) + 1))
        if not options:
            return None
        k, which, count = options[int(self.rng.integers(len(options)))]
        head = _np_from_key(k, self.rng, det="the")
        words = list(SIZE_COMPARE[which]) + (list(SIZE_COMPARE_TWO[which]) if count == 2 else [])
        head.cmp = _pick(self.rng, words)
        return Plan("size", head)

    def _landmark_ok(self, r: str, x: int, shared: int, y: int) -> bool:
        """y clearly satisfies "x r y" and no other object of ``shared`` is even roughly in relation r to y."""
        return bool(self.f.clear_row[r][x] >> y & 1) and not (self.f.relaxed_col[r][y] & shared & ~(1 << x))

    def relation1(self, x: int) -> Plan | None:
        f = self.f
        options = relation_options(f, x)
        if not options:
            return None
        k, r, y = options[int(self.rng.integers(len(options)))]
        return Plan("relation1", _np_from_key(k, self.rng),
                    [(r, _np_from_key(_choose_key(self.rng, f.unique[y]), self.rng), y)])

    def relation2(self, x: int) -> Plan | None:
        f = self.f
        rng = self.rng
        heads = self.shared_keys(x)
        rng.shuffle(heads)
        for k in heads:
            shared = f.keys[k]
            others_x = _bits(shared & ~(1 << x))
            rels = list(RELATIONS)
            rng.shuffle(rels)
            for r1 in rels:
                ys = _bits(f.clear_row[r1][x])
                rng.shuffle(ys)
                for y in ys:
                    if f.relaxed_col[r1][y] & shared & ~(1 << x):
                        continue
                    k1s = self.shared_keys(y)
                    rng.shuffle(k1s)
                    for k1 in k1s:
                        s1 = f.keys[k1]
                        # The nested clause must be needed: with the landmark's head alone ("the circle
                        # above some square") another object would qualify too.
                        if not any(f.crisp_row[r1][o] & s1 for o in others_x):
                            continue
                        for r2 in RELATIONS:
                            zs = [z for z in _bits(f.clear_row[r2][y] & ~(1 << x))
                                  if f.unique[z] and not (f.relaxed_col[r2][z] & s1 & ~(1 << y))]
                            if zs:
                                z = _pick(rng, zs)
                                return Plan("relation2", _np_from_key(k, rng),
                                            [(r1, _np_from_key(k1, rng), y),
                                             (r2, _np_from_key(_choose_key(rng, f.unique[z]), rng), z)])
        return None

    def plan(self, kind: str, x: int) -> Plan | None:
        """A plan of ``kind`` for referent ``x`` (randomly chosen among the valid ones), or None."""
        return {"category": self.category, "attribute": self.attribute, "location": self.location,
                "size": self.size_cmp, "relation1": self.relation1, "relation2": self.relation2}[kind](x)

    def plans(self, x: int) -> dict[str, Plan]:
        """One plan per kind that ``x`` admits."""
        out = {}
        for kind in KINDS:
            p = self.plan(kind, x)
            if p is not None:
                out[kind] = p
        return out


def realise(plan: Plan, x: int, rng: np.random.Generator) -> Sentence:
    """Plan -> tokens, mentions (referent head; context landmarks) and relation triples."""
    s = Sentence()
    if rng.random() < 0.35:
        s.words(_pick(rng, CARRIERS))
    prev = s.phrase(plan.head, "referent", (x,))
    for depth, (r, lm, y) in enumerate(plan.chain):
        if depth > 0 or rng.random() < 0.4:
            s.words(_pick(rng, CONNECTORS))
        words = _pick(rng, RELATION_WORDS[r])
        s.words(words)
        cur = s.phrase(lm, "context", (y,))
        s.relations.append((prev, words, cur))
        prev = cur
    return s


def expressions(facts: Facts, rng: np.random.Generator, role: str = "") -> list[tuple[int, str, Sentence]]:
    """Expressions for about ``REFERENTS_PER_IMAGE`` referents, 2-3 each: (local group, kind, sentence).

    ``role``: "A" (testA: referents only from category group A), "B" (testB: only group B) or "".
    """
    d = Describer(facts, rng)
    eligible = [o for o in range(facts.n)
                if not role or ((facts.cat[o] in GROUP_A) == (role == "A"))]
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    out: list[tuple[int, str, Sentence]] = []
    group = 0
    for x in order:
        if group >= REFERENTS_PER_IMAGE:
            break
        plans = d.plans(x)
        if not plans:
            continue
        want = 3 if rng.random() < 0.6 else 2
        kinds = list(plans)
        w = np.array([KIND_WEIGHTS[k] for k in kinds])
        picked = rng.choice(len(kinds), size=min(want, len(kinds)), replace=False, p=w / w.sum())
        texts: set[str] = set()
        for i in sorted(picked.tolist(), key=lambda i: KINDS.index(kinds[i])):
            s = realise(plans[kinds[i]], x, rng)
            texts.add(s.text)
            out.append((group, kinds[i], s))
        if len(kinds) == 1:
            # One kind only (e.g. the one star of the image): a second, differently worded expression.
            for _ in range(4):
                s = realise(d.plan(kinds[0], x), x, rng)
                if s.text not in texts:
                    out.append((group, kinds[0], s))
                    break
        group += 1
    return out


# ------------------------------------------------------------------------------------- captions
@dataclass
class _Unit:
    """One or two caption phrases placed together: (NP, object bitmask, phrase kind) each; a needs-relation
    phrase comes with its relation and landmark phrase."""

    phrases: list[tuple[NP, int, str]]
    relation: str = ""  # between the two phrases of a needs-relation unit

    @property
    def mask(self) -> int:
        out = 0
        for _, m, _ in self.phrases:
            out |= m
        return out


def _caption_phrases(facts: Facts, rng: np.random.Generator) -> list[tuple[NP, int, str]]:
    """Single phrase candidates: (NP, object bitmask, kind). Singular phrases name exactly one object;
    plural ones ("two blue stars") exactly the objects they count."""
    out: list[tuple[NP, int, str]] = []
    for o in range(facts.n):
        if facts.unique[o]:
            k = _choose_key(rng, facts.unique[o])
            out.append((NP(k[0], k[1], k[2], "a" if rng.random() < 0.75 else "the"), 1 << o, SINGULAR))
    for k, mask in facts.keys.items():
        c = mask.bit_count()
        if 2 <= c <= 4 and not (k[1] >= 0 and k[2] >= 0):
            out.append((NP(k[0], k[1], k[2], count=c), mask, PLURAL))
    return out


def _needs_relation_options(facts: Facts) -> list[tuple[int, Key, str, int]]:
    """``(x, head key, relation, landmark y)`` for every object (see :func:`relation_options`)."""
    return [(x, k, r, y) for x in range(facts.n) for k, r, y in relation_options(facts, x)]


def _needs_relation_unit(facts: Facts, option: tuple[int, Key, str, int], rng: np.random.Generator) -> _Unit:
    x, k, r, y = option
    ky = _choose_key(rng, facts.unique[y])
    head = NP(k[0], k[1], k[2], "a" if rng.random() < 0.75 else "the")
    landmark = NP(ky[0], ky[1], ky[2], "a" if rng.random() < 0.75 else "the")
    return _Unit([(head, 1 << x, NEEDS_RELATION), (landmark, 1 << y, SINGULAR)], r)


def _holds(facts: Facts, r: str, a: int, b: int) -> bool:
    """Relation r clearly holds from every object of ``a`` to every object of ``b``."""
    rows = facts.clear_row[r]
    if a & (a - 1) == 0:
        return (rows[a.bit_length() - 1] & b) == b
    return all((rows[x] & b) == b for x in _bits(a))


def captions(facts: Facts, rng: np.random.Generator) -> list[Sentence]:
    """Up to ``CAPTIONS_PER_IMAGE`` distinct captions of 2-4 phrases (all role "referent", each with its
    phrase kind).

    A caption is a chain of units, each a single phrase or a needs-relation phrase with its relation and
    landmark; consecutive units are joined by "and" or by a relation that clearly holds from every object
    of the previous phrase to every object of the next. No object is linked by two phrases of a caption.
    """
    singles = [_Unit([c]) for c in _caption_phrases(facts, rng)]
    singular = [u for u in singles if u.phrases[0][2] == SINGULAR]
    plural = [u for u in singles if u.phrases[0][2] == PLURAL]
    pairs = _needs_relation_options(facts)
    out: list[Sentence] = []
    seen: set[str] = set()
    for _ in range(CAPTIONS_PER_IMAGE * 3):
        if len(out) >= CAPTIONS_PER_IMAGE or len(singles) + len(pairs) < 2:
            break
        target = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25]))
        chain: list[tuple[NP, int, str, str]] = []  # (NP, mask, kind, relation from the previous phrase)
        used = 0
        while len(chain) < target:
            free_pairs = [p for p in pairs if not ((1 << p[0] | 1 << p[3]) & used)] \
                if target - len(chain) >= 2 else []
            # (mask of the unit's first phrase, the unit or the needs-relation option it is made from)
            pool: list[tuple[int, _Unit | tuple[int, Key, str, int]]]
            if free_pairs and rng.random() < NEEDS_RELATION_CHANCE:
                pool = [(1 << p[0], p) for p in free_pairs]
            else:
                free = [[u for u in units if not (u.mask & used)] for units in (singular, plural)]
                units = free[1] if free[1] and (not free[0] or rng.random() < PLURAL_CHANCE) else free[0]
                pool = [(u.phrases[0][1], u) for u in units]
            if not pool:
                break
            linked = []
            if chain and rng.random() < 0.6:
                prev_mask = chain[-1][1]
                linked = [(c, r) for m, c in pool for r in RELATIONS if _holds(facts, r, prev_mask, m)]
            if linked:
                choice, r = linked[int(rng.integers(len(linked)))]
            else:
                choice, r = pool[int(rng.integers(len(pool)))][1], ""
            unit = choice if isinstance(choice, _Unit) else _needs_relation_unit(facts, choice, rng)
            links = [r] + ([unit.relation] if len(unit.phrases) == 2 else [])
            chain.extend((np_, mask, kind, link) for (np_, mask, kind), link in zip(unit.phrases, links))
            used |= unit.mask
        if len(chain) < 2:
            continue
        s = Sentence()
        if rng.random() < 0.4:
            s.words(_pick(rng, CAPTION_OPENERS))
        prev = -1
        for np_, mask, kind, r in chain:
            if prev >= 0:
                words = _pick(rng, RELATION_WORDS[r]) if r else "and"
                s.words(words)
            cur = s.phrase(np_, "referent", tuple(_bits(mask)), kind)
            if prev >= 0 and r:
                s.relations.append((prev, words, cur))
            prev = cur
        if s.text not in seen:
            seen.add(s.text)
            out.append(s)
    return out
