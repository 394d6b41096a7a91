"""Alt-text captions of the web corpus: two per image, a full one and a short one, in words the way web image
descriptions are written, never a sentence of the world's grammar.

Grammar (tokens separated by single spaces; ``[...]`` optional, ``|`` alternatives)::

    full   := [PREFIX] phrase (JOIN phrase)* [LAYOUT] [BACKGROUND] [SUFFIX]
    phrase := ("a" | "an") [SIZE] [COLOUR] NOUN  |  COUNT [SIZE] [COLOUR] PLURAL
    JOIN   := "and" | "with" | REL            REL: a world relation phrase ("left of", "above", ...) or "next to"
    short  := [PREFIX] bare ("and" bare)* [BACKGROUND] [SUFFIX]
    bare   := [COLOUR] NOUN | [COLOUR] PLURAL      (no determiner, no count: "red star icon", "blue hearts")

NOUN is the category or, now and then, a filler ("shape", "object"; then the colour is always said). A phrase
names one group of objects (same category and colour) and links to all of them; the full caption names every
group, the short one the one to three largest. SIZE is relative, as web text is: "large"/"big" for the
clearly biggest objects of the image, "small"/"tiny" for the clearly smallest (absolute in a one-object
image). A relation joins two phrases only where it holds clearly from every object of the first to every
object of the second (:func:`relation_matrix`); LAYOUT ("in a row", "in a column", "in a grid") only where
the scene is that arrangement.

Disjoint from the world by construction: every caption carries at least one word of ``WEB_MARKERS`` (its
prefix, background phrase or suffix), and no marker word is in the world's vocabulary
(:func:`world_words`), so no caption equals any sentence the world generator can produce.
"""

from __future__ import annotations

import numpy as np

from refground.data.synth.language import Sentence
from refground.data.synth.world import (CAPTION_OPENERS, CARRIERS, CATEGORIES, COLOR_NAMES, CONNECTORS,
                                        COUNT_WORDS, DETERMINERS, FILLER_NOUNS, LOCATION_POST, LOCATION_PRE,
                                        LOCATION_PRE_TWO, PLURALS, RELATION_WORDS, SIZE_COMPARE, SIZE_COMPARE_TWO,
                                        SIZES)
from refground.data.synth.web_scene import WebScene

CAPTION_KIND = "alt-text"
WEB_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PREFIXES = ("photo of", "a photo of", "clipart of", "illustration of", "a drawing of", "vector illustration of",
            "stock photo of", "cartoon of")
CLOSEUP_PREFIXES = ("close up photo of", "closeup of", "macro photo of")
SUFFIXES = ("icon", "clipart", "illustration", "sticker", "vector art", "cartoon")
BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a solid background"),
    "white": ("on a white background", "isolated on white"),
    "dots": ("on a dotted background", "on a polka dot background"),
    "waves": ("on a wavy background", "on a wave pattern background"),
    "radial": ("on a radial gradient background", "on a glowing background"),
    "grid": ("on a grid background", "on a diagonal grid background"),
    "blotches": ("on a blotchy background", "on a mottled background"),
}
LAYOUT_PHRASES = {"row": ("in a row", "lined up"), "column": ("in a column", "stacked vertically"),
                  "grid": ("in a grid", "arranged in a grid")}
WEB_FILLERS = {"shape": "shapes", "object": "objects"}
BIG_WORDS, SMALL_WORDS, TINY = ("large", "big"), ("small",), "tiny"
# Words that mark a caption as web text; none is a word of the world's grammar (see tests/test_web_corpus.py).
WEB_MARKERS = frozenset({"photo", "clipart", "illustration", "drawing", "vector", "cartoon", "closeup", "icon",
                         "sticker", "background", "isolated"})
# Relations between box centres, image y down (the world's semantics with its clear margins), plus "next to".
WEB_RELATION_WORDS = {**RELATION_WORDS, "next": ("next to",)}
CLEAR_DOMINANCE = 1.3  # |major offset| >= 1.3 |minor offset|
CLEAR_MIN_OFFSET = 0.04  # of the image side
NEXT_GAP = 0.15  # "next to": boxes at most this share of the side apart, side by side (|dx| > |dy|)
SIZE_CONTRAST = 1.6  # relative size words need the biggest and smallest diameters this far apart
SIZE_CLOSE = 1.25  # ... and an object within this ratio of the extreme to share its word
TINY_DIAMETER = 0.1  # "tiny": a small object below this share of the side
# Choices (tuned so that most objects are named with their colour and about a third of the full captions use
# a relation; see tests/test_web_corpus.py for the enforced minimums).
COLOUR_CHANCE = 0.92
FILLER_CHANCE = 0.08
SIZE_WORD_CHANCE = 0.5
RELATION_CHANCE = 0.6


def world_words() -> frozenset[str]:
    """Every word the world's grammar (:mod:`refground.data.synth.language`) can put into an expression or a
    caption: its categories, plurals, colours, sizes, relation and location words, size comparisons,
    carriers, determiners, connectors, fillers, count words, caption openers and "and"."""
    phrases = [*CATEGORIES, *PLURALS.values(), *COLOR_NAMES, *SIZES, *DETERMINERS, "an", "and", *CARRIERS,
               *CONNECTORS, *FILLER_NOUNS, *COUNT_WORDS.values(), *CAPTION_OPENERS]
    for table in (RELATION_WORDS, LOCATION_PRE, LOCATION_PRE_TWO, LOCATION_POST, SIZE_COMPARE, SIZE_COMPARE_TWO):
        phrases += [w for words in table.values() for w in words]
    return frozenset(w for p in phrases for w in p.split(" "))


def relation_matrix(box: np.ndarray, side: float, rel: str) -> np.ndarray:
    """bool[n, n]: entry [x, y] says "x REL y" holds clearly for boxes ``box`` float[n, 4] (xyxy pixels) in an
    image of side ``side``. ``rel``: left/right/above/below (box centres, image y down; the major offset at
    least ``CLEAR_DOMINANCE`` times the minor one and ``CLEAR_MIN_OFFSET`` of the side) or ``next`` (side
    by side, |dx| > |dy|, with a gap between the boxes of at most ``NEXT_GAP`` of the side)."""
    b = np.asarray(box, dtype=np.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    dx, dy = cx[:, None] - cx[None, :], cy[:, None] - cy[None, :]
    ax, ay = np.abs(dx), np.abs(dy)
    if rel == "next":
        gx = np.maximum(0, np.maximum(b[:, None, 0], b[None, :, 0]) - np.minimum(b[:, None, 2], b[None, :, 2]))
        gy = np.maximum(0, np.maximum(b[:, None, 1], b[None, :, 1]) - np.minimum(b[:, None, 3], b[None, :, 3]))
        out = (ax > ay) & (np.hypot(gx, gy) <= NEXT_GAP * side)
    else:
        if rel in ("left", "right"):
            sign, major, minor = (dx < 0) if rel == "left" else (dx > 0), ax, ay
        elif rel in ("above", "below"):
            sign, major, minor = (dy < 0) if rel == "above" else (dy > 0), ay, ax
        else:
            raise ValueError(f"unknown relation {rel!r}")
        out = sign & (major >= CLEAR_DOMINANCE * minor) & (major >= CLEAR_MIN_OFFSET * side)
    np.fill_diagonal(out, False)
    return out


def size_words(diameter: np.ndarray) -> list[str]:
    """Relative size class per object: "big", "small" or "" (see the module docstring). With one object: big
    from 45% of the side, small up to 15%."""
    d = np.asarray(diameter, dtype=np.float64)
    if len(d) == 1:
        return ["big" if d[0] >= 0.45 else "small" if d[0] <= 0.15 else ""]
    lo, hi = float(d.min()), float(d.max())
    if hi < SIZE_CONTRAST * lo:
        return [""] * len(d)
    return ["big" if v * SIZE_CLOSE >= hi else "small" if v <= SIZE_CLOSE * lo else "" for v in d.tolist()]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


class _Group:
    """Objects sharing category and colour: their indices, common relative size class ("" if mixed) and
    whether all are tiny."""

    def __init__(self, cat: int, color: int, members: list[int], sizes: list[str], diameter: np.ndarray):
        self.cat, self.color, self.members = cat, color, members
        classes = {sizes[k] for k in members}
        self.size = classes.pop() if len(classes) == 1 else ""
        self.tiny = self.size == "small" and bool((diameter[members] < TINY_DIAMETER).all())
        self.extent = float(diameter[members].sum())


def groups_of(ws: WebScene) -> list[_Group]:
    """The scene's groups, in order of first appearance."""
    sc = ws.scene
    sizes = size_words(ws.diameter)
    order: dict[tuple[int, int], list[int]] = {}
    for k, key in enumerate(zip(sc.cat.tolist(), sc.color.tolist())):
        order.setdefault(key, []).append(k)
    return [_Group(c, col, m, sizes, ws.diameter) for (c, col), m in order.items()]


def _phrase_tokens(g: _Group, rng: np.random.Generator, bare: bool) -> list[str]:
    """Tokens of a phrase naming group ``g``; ``bare``: the short caption's form (no determiner or count)."""
    n = len(g.members)
    filler = rng.random() < FILLER_CHANCE
    colour = filler or rng.random() < COLOUR_CHANCE
    size = ""
    if g.size and rng.random() < (SIZE_WORD_CHANCE if not bare else 0.2):
        size = (TINY if g.tiny and rng.random() < 0.5 else _pick(rng, SMALL_WORDS)) if g.size == "small" \
            else _pick(rng, BIG_WORDS)
    if filler:
        noun = _pick(rng, tuple(WEB_FILLERS))
        noun = WEB_FILLERS[noun] if n > 1 else noun
    else:
        noun = PLURALS[CATEGORIES[g.cat]] if n > 1 else CATEGORIES[g.cat]
    mods = [w for w in (size, COLOR_NAMES[g.color] if colour else "") if w]
    if bare:
        return mods + [noun]
    first = (mods + [noun])[0]
    det = WEB_COUNT_WORDS[n] if n > 1 else ("an" if first[0] in "aeiou" else "a")
    return [det] + mods + [noun]


def _add_phrase(s: Sentence, tokens: list[str], g: _Group) -> int:
    start = len(s.tokens)
    s.tokens.extend(tokens)
    s.mentions.append((start, len(s.tokens), "referent", tuple(g.members), CATEGORIES[g.cat], ""))
    return len(s.mentions) - 1


def _markers(rng: np.random.Generator, short: bool) -> tuple[bool, bool, bool]:
    """Which of prefix, background phrase and suffix a caption gets: at least one (each carries a marker)."""
    u = rng.random()
    if short:
        return (u < 0.3, 0.3 <= u < 0.55, u >= 0.55)
    return (u < 0.35 or u >= 0.8, 0.35 <= u < 0.65 or u >= 0.8, 0.65 <= u < 0.8)


def full_caption(ws: WebScene, groups: list[_Group], rng: np.random.Generator) -> Sentence:
    """The full caption: every group named (largest first, or in drawing order), joined by "and", "with" or a
    relation that clearly holds, then maybe the layout, with its markers."""
    mats = {r: relation_matrix(ws.scene.box, float(ws.scene.width), r) for r in WEB_RELATION_WORDS}
    order = sorted(groups, key=lambda g: -g.extent) if rng.random() < 0.6 else list(groups)
    prefix, bg, suffix = _markers(rng, short=False)
    s = Sentence()
    if prefix:
        s.words(_pick(rng, CLOSEUP_PREFIXES) if ws.layout == "closeup" and rng.random() < 0.5
                else _pick(rng, PREFIXES))
    prev = -1
    for k, g in enumerate(order):
        if k:
            options = [r for r, m in mats.items() if m[np.ix_(order[k - 1].members, g.members)].all()]
            if options and rng.random() < RELATION_CHANCE:
                words = _pick(rng, WEB_RELATION_WORDS[_pick(rng, options)])
            else:
                words = "with" if k == 1 and len(order) == 2 and rng.random() < 0.3 else "and"
            s.words(words)
        cur = _add_phrase(s, _phrase_tokens(g, rng, bare=False), g)
        if k and words not in ("and", "with"):
            s.relations.append((prev, words, cur))
        prev = cur
    if ws.layout in LAYOUT_PHRASES and ws.scene.n >= 2 and rng.random() < 0.5:
        s.words(_pick(rng, LAYOUT_PHRASES[ws.layout]))
    if bg:
        s.words(_pick(rng, BACKGROUND_PHRASES[ws.background]))
    if suffix:
        s.words(_pick(rng, SUFFIXES))
    return s


def short_caption(ws: WebScene, groups: list[_Group], rng: np.random.Generator) -> Sentence:
    """The short caption: the one to three largest groups, bare ("red star", "blue hearts"), joined by "and",
    with its markers."""
    order = sorted(groups, key=lambda g: -g.extent)
    k = 1 if len(order) == 1 else int(rng.integers(1, min(3, len(order)) + 1))
    prefix, bg, suffix = _markers(rng, short=True)
    s = Sentence()
    if prefix:
        s.words(_pick(rng, PREFIXES))
    for j, g in enumerate(order[:k]):
        if j:
            s.words("and")
        _add_phrase(s, _phrase_tokens(g, rng, bare=True), g)
    if bg:
        s.words(_pick(rng, BACKGROUND_PHRASES[ws.background]))
    if suffix:
        s.words(_pick(rng, SUFFIXES))
    return s


def alt_texts(ws: WebScene, rng: np.random.Generator) -> list[Sentence]:
    """The image's two captions, full then short (different: the full one's phrases start with a determiner
    or a count, the short one's never)."""
    groups = groups_of(ws)
    return [full_caption(ws, groups, rng), short_caption(ws, groups, rng)]
