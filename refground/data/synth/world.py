"""The vocabulary of the synthetic world: categories, colours, sizes, relations, locations, fillers.

Everything the generator says is drawn from these tables; ``tests/synth_oracle.py`` keeps its own copy of
the grammar on purpose (it is the independent check), so a change here must be mirrored there.
"""

from __future__ import annotations

GENERATOR = "refground.data.synth"
# Bump when the output for a given (seed, parameters) changes: it is part of the recorded parameters, so
# `refground data synth` regenerates a cached dataset made by an older version.
GENERATOR_VERSION = 2  # 2: captions with needs-relation phrases and phrase kinds, from their own random stream

CATEGORIES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "heart": "hearts", "cross": "crosses", "diamond": "diamonds", "hexagon": "hexagons"}

# Saturated, mutually distinct named colours (backgrounds are muted, so objects stand out).
COLORS = {
    "red": (215, 38, 38),
    "green": (46, 160, 58),
    "blue": (42, 82, 222),
    "yellow": (238, 212, 40),
    "purple": (136, 52, 184),
    "orange": (244, 134, 24),
    "pink": (246, 128, 196),
    "cyan": (40, 204, 214),
}
COLOR_NAMES = tuple(COLORS)

SIZES = ("small", "medium", "large")
# Object diameter as a fraction of the image side, per size class (jittered by +-8% per object; the
# classes never overlap).
SIZE_DIAMETER = (0.10, 0.14, 0.19)
SIZE_JITTER = 0.08

# The analogue of RefCOCO's people / other objects: testA images refer only to group A categories,
# testB images only to group B categories.
CATEGORY_GROUPS = {"A": ["heart", "star"], "B": ["circle", "square", "triangle", "cross", "diamond", "hexagon"]}
TESTA_GROUP, TESTB_GROUP = "A", "B"

# Relations between box centres (image y axis points down); surface forms per relation.
RELATIONS = ("left", "right", "above", "below")
RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# No relation beyond half the image diagonal (as in the CMRIN relation graph).
RELATION_MAX_DIST = 0.5

# Absolute locations: extreme centre among the objects matching the head, with a margin.
LOCATIONS = ("left", "right", "top", "bottom")
LOCATION_PRE = {  # premodifiers; comparatives ("upper") only where the head matches exactly two objects
    "left": ("leftmost", "left"),
    "right": ("rightmost", "right"),
    "top": ("top", "topmost"),
    "bottom": ("bottom", "bottommost", "lowest"),
}
LOCATION_PRE_TWO = {"top": ("upper",), "bottom": ("lower",)}
LOCATION_POST = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
LOCATION_MARGIN = 0.08  # of the image width (left/right) or height (top/bottom)

# Size comparison on visible mask area, with a clear ratio.
SIZE_COMPARE = {"big": ("biggest", "largest"), "small": ("smallest",)}
SIZE_COMPARE_TWO = {"big": ("bigger", "larger"), "small": ("smaller",)}
SIZE_RATIO = 1.5

# Unnecessary words (CMRIN's fourth word class).
CARRIERS = ("find", "please find", "look at", "pick", "click on", "select", "the one that is")
DETERMINERS = ("the", "a")
CONNECTORS = ("that is", "which is")  # "the circle [that is] left of ..."; nested clauses always use one
FILLER_NOUNS = ("shape", "object", "thing")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
CAPTION_OPENERS = ("there is", "we see", "a picture of", "an image with", "this shows")

# Generator-side clarity margins (not part of the semantics): a relation is only asserted when it holds
# clearly, and only denied for distractors that clearly do not satisfy it; locations and sizes keep a
# little more than the semantic margin so that no expression sits on a decision boundary.
REL_CLEAR_DOMINANCE = 1.3
REL_CLEAR_DIST = 0.45
REL_CLEAR_MIN_OFFSET = 0.04
REL_RELAXED_DOMINANCE = 0.75
REL_RELAXED_DIST = 0.56
GEN_LOCATION_MARGIN = 0.09
GEN_SIZE_RATIO = 1.6


def vocabulary() -> dict:
    """The vocabulary as a JSON-able dict (recorded in ``Dataset.meta['vocabulary']``)."""
    return {
        "categories": list(CATEGORIES),
        "plurals": dict(PLURALS),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": list(SIZES),
        "size_diameter": list(SIZE_DIAMETER),
        "relations": {k: list(v) for k, v in RELATION_WORDS.items()},
        "locations": {k: list(LOCATION_PRE[k]) + list(LOCATION_PRE_TWO.get(k, ())) + list(LOCATION_POST[k])
                      for k in LOCATIONS},
        "size_comparisons": {k: list(SIZE_COMPARE[k]) + list(SIZE_COMPARE_TWO[k]) for k in SIZE_COMPARE},
        "carriers": list(CARRIERS),
        "connectors": list(CONNECTORS),
        "filler_nouns": list(FILLER_NOUNS),
        "semantics": {
            "relation": "X rel Y: box centres, image y down; left: cx_X < cx_Y and |dx| > |dy|; right, above "
                        "(cy_X < cy_Y, |dy| > |dx|), below analogous; centre distance <= 0.5 x image diagonal",
            "location": "extreme box centre among the objects matching the head; the runner-up is at least "
                        f"{LOCATION_MARGIN} x width (left/right) or height (top/bottom) further",
            "size": "largest/smallest visible mask area among the objects matching the head, by a ratio "
                    f">= {SIZE_RATIO}",
            "caption": "a singular phrase names the one object matching its head; a plural phrase counts exactly "
                       "the objects matching it; a needs-relation phrase's head matches several objects and the "
                       "relation right after it, to a singular phrase, keeps one",
        },
    }
