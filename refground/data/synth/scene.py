"""Scenes: which objects, where, and what is visible of each.

Objects are placed one after another; a later object occludes the earlier ones it overlaps. A placement
that would leave any object less than half visible is rejected and resampled, so every object keeps at
least half of its own pixels. The label map (0 = background, k + 1 = object k) is the exact visible
instance segmentation: a pixel belongs to at most one object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refground.data.synth.render import shape_window
from refground.data.synth.world import (CATEGORIES, CATEGORY_GROUPS, COLOR_NAMES, SIZE_DIAMETER, SIZE_JITTER,
                                        SIZES)

MIN_OBJECTS, MAX_OBJECTS = 4, 20
MEAN_OBJECTS, SD_OBJECTS = 10.0, 3.5
MIN_VISIBLE = 0.5  # share of an object's own pixels that must stay visible
NEAR_PROB = 0.35  # chance to place an object next to an earlier one (occlusion happens often)

GROUP_A = tuple(CATEGORIES.index(c) for c in CATEGORY_GROUPS["A"])


@dataclass
class Scene:
    """One image's objects (n of them, in drawing order; later on top).

    ``cat``/``color``/``size``: int[n] indices into CATEGORIES / COLOR_NAMES / SIZES; ``box``: int64[n, 4]
    tight xyxy box of the visible mask (pixel edges); ``area``: int64[n] visible pixels; ``label``:
    int16[H, W] visible instance map; ``shapes``: per object (x0, y0, full shape window mask) for painting.
    """

    height: int
    width: int
    cat: np.ndarray
    color: np.ndarray
    size: np.ndarray
    box: np.ndarray
    area: np.ndarray
    label: np.ndarray
    shapes: list[tuple[int, int, np.ndarray]]
    _label_t: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.cat)

    def visible_mask(self, k: int) -> np.ndarray:
        """uint8[H, W] (0/1) visible mask of object k, Fortran-ordered (what RLE encoding wants: no copy)."""
        if self._label_t is None:
            self._label_t = np.ascontiguousarray(self.label.T)
        return (self._label_t == (k + 1)).view(np.uint8).T


def _category_mix(rng: np.random.Generator, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Categories present in the image and their weights. Few categories, uneven weights: objects share
    categories (distractors) while some categories stay unique. ``role``: "A" (testA: referents from
    group A, so group A is plentiful), "B" (testB) or "" (anything)."""
    k = int(rng.integers(3, 7))
    cats = rng.permutation(len(CATEGORIES))[:k]
    w = rng.dirichlet(np.full(k, 1.2))
    if role == "A":
        others = [c for c in cats.tolist() if c not in GROUP_A][: k - len(GROUP_A)]
        cats = np.array(list(GROUP_A) + others)
        w = rng.dirichlet(np.full(len(cats), 1.2))
        w[: len(GROUP_A)] += 0.35
        w /= w.sum()
    elif role == "B":
        b = [c for c in cats.tolist() if c not in GROUP_A]
        if len(b) < 2:
            extra = [c for c in rng.permutation(len(CATEGORIES)).tolist() if c not in GROUP_A and c not in b]
            cats = np.array(b + extra[: 2 - len(b)] + [c for c in cats.tolist() if c in GROUP_A])
            w = rng.dirichlet(np.full(len(cats), 1.2))
    return cats, w


def sample_scene(rng: np.random.Generator, image_size: int, role: str = "") -> Scene:
    """Sample objects and place them with occlusion (see the module docstring)."""
    H = W = int(image_size)
    while True:
        n = int(np.clip(round(rng.normal(MEAN_OBJECTS, SD_OBJECTS)), MIN_OBJECTS, MAX_OBJECTS))
        cats, cw = _category_mix(rng, role)
        kc = int(rng.integers(3, 7))
        cols = rng.permutation(len(COLOR_NAMES))[:kc]
        colw = rng.dirichlet(np.full(kc, 1.5))
        obj_cat = cats[rng.choice(len(cats), size=n, p=cw)]
        obj_col = cols[rng.choice(kc, size=n, p=colw)]
        obj_size = rng.integers(0, len(SIZES), size=n)
        scene = _place(rng, H, W, obj_cat, obj_col, obj_size)
        if scene is not None:
            return scene


def _place(rng: np.random.Generator, H: int, W: int, obj_cat: np.ndarray, obj_col: np.ndarray,
           obj_size: np.ndarray) -> Scene | None:
    label = np.zeros((H, W), dtype=np.int16)
    full: list[int] = []
    vis = np.zeros(0, dtype=np.int64)
    centres: list[tuple[float, float, float]] = []
    shapes: list[tuple[int, int, np.ndarray]] = []
    kept: list[int] = []
    for i in range(len(obj_cat)):
        cat = CATEGORIES[int(obj_cat[i])]
        placed = False
        for _ in range(30):
            r = SIZE_DIAMETER[int(obj_size[i])] * 0.5 * min(H, W) * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
            lo_x, hi_x, lo_y, hi_y = r + 1, W - r - 1, r + 1, H - r - 1
            if centres and rng.random() < NEAR_PROB:
                px, py, pr = centres[int(rng.integers(len(centres)))]
                ang = rng.uniform(0, 2 * math.pi)
                dist = (r + pr) * rng.uniform(0.5, 1.0)
                cx = min(max(px + dist * math.cos(ang), lo_x), hi_x)
                cy = min(max(py + dist * math.sin(ang), lo_y), hi_y)
            else:
                cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            x0, y0, m = shape_window(cat, cx, cy, r, H, W)
            own = int(m.sum())
            if own < 6:
                continue
            win = label[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
            hidden = np.bincount(win[m], minlength=len(full) + 1)[1:]
            if len(full) and np.any((vis - hidden) < MIN_VISIBLE * np.asarray(full)):
                continue
            win[m] = len(full) + 1
            vis = np.append(vis - hidden, own)
            full.append(own)
            centres.append((cx, cy, r))
            shapes.append((x0, y0, m))
            kept.append(i)
            placed = True
            break
        if not placed:
            continue
    if len(kept) < MIN_OBJECTS:
        return None
    n = len(kept)
    box = np.zeros((n, 4), dtype=np.int64)
    for k, (x0, y0, m) in enumerate(shapes):
        win = label[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] == (k + 1)
        cols = np.flatnonzero(win.any(axis=0))
        rows = np.flatnonzero(win.any(axis=1))
        box[k] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
    area = np.bincount(label.ravel(), minlength=n + 1)[1:].astype(np.int64)
    keep = np.array(kept)
    return Scene(H, W, obj_cat[keep].astype(np.int64), obj_col[keep].astype(np.int64),
                 obj_size[keep].astype(np.int64), box, area, label, shapes)
