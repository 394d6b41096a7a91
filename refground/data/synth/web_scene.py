"""Scenes of the web corpus: 1-6 of the world's shapes in one of five layouts, no occlusion.

Layouts (``LAYOUTS``): ``closeup`` (one object whose diameter is 30-80% of the image side, as in a product
photo or an icon; the built-in CLIP is later applied to crops of single objects), ``row`` (2-5 objects side
by side), ``column`` (2-4 stacked), ``grid`` (4-6 in a 2x2, 2x3 or 3x2 grid) and ``scatter`` (1-6 anywhere,
diameters from 7% to 50% of the side). Objects never overlap (a placement that touches an earlier object's
mask is resampled), so each mask is the whole shape. Objects sharing a category and colour form a group
(what a caption counts: "three blue hearts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refground.data.synth.render import WEB_BACKGROUNDS, shape_window
from refground.data.synth.scene import Scene
from refground.data.synth.world import CATEGORIES, COLOR_NAMES

LAYOUTS = ("closeup", "row", "column", "grid", "scatter")
LAYOUT_WEIGHTS = (0.3, 0.15, 0.1, 0.15, 0.3)
MAX_OBJECTS = 6
# Absolute size class of an object (``Object.attributes["size"]``, for inspection): its diameter as a share of
# the image side, small < 0.2 <= medium < 0.4 <= large.
SIZE_BOUNDS = (0.2, 0.4)
MIN_RADIUS_PX = 3.5  # below this a shape is a blob of a few pixels


@dataclass
class WebScene:
    """A web-corpus scene: the objects as a world :class:`~refground.data.synth.scene.Scene` (``size``: class
    by ``SIZE_BOUNDS``), the layout, the background kind (one of ``WEB_BACKGROUNDS``) and ``diameter``
    float64[n], each object's nominal diameter as a share of the image side."""

    scene: Scene
    layout: str
    background: str
    diameter: np.ndarray


def _slots(rng: np.random.Generator, layout: str, S: float) -> list[tuple[float, float, float]]:
    """Nominal (cx, cy, r) in pixels per object for an arranged layout (closeup, row, column, grid)."""
    if layout == "closeup":
        r = rng.uniform(0.3, 0.8) * S / 2
        return [(rng.uniform(r + 1, S - r - 1), rng.uniform(r + 1, S - r - 1), r)]
    if layout in ("row", "column"):
        k = int(rng.integers(2, 6 if layout == "row" else 5))
        slot = S / k
        same = rng.random() < 0.5
        r_same = slot * rng.uniform(0.25, 0.45)
        rs = np.full(k, r_same) if same else slot * rng.uniform(0.15, 0.45, k)
        rs = np.minimum(rs, 0.42 * S)
        rmax = float(rs.max())
        across = rng.uniform(rmax + 1, S - rmax - 1)
        out = []
        for i, r in enumerate(rs.tolist()):
            # Jitter along the line up to 15% of a slot, across it up to 5%: neighbours stay clearly in line.
            along = slot * (i + 0.5) + rng.uniform(-0.3, 0.3) * max(slot / 2 - r - 1, 0.0)
            off = min(max(across + rng.uniform(-0.05, 0.05) * slot, r + 1), S - r - 1)
            out.append((along, off, r) if layout == "row" else (off, along, r))
        return out
    rows, cols = ((2, 2), (2, 3), (3, 2))[int(rng.integers(3))]
    cw, ch = S / cols, S / rows
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    n = len(cells) if len(cells) == 4 else int(rng.integers(5, 7))
    keep = sorted(rng.permutation(len(cells))[:n].tolist())
    same = rng.random() < 0.6
    r_same = min(cw, ch) * rng.uniform(0.22, 0.42)
    out = []
    for c in keep:
        i, j = cells[c]
        r = r_same if same else min(cw, ch) * rng.uniform(0.15, 0.42)
        out.append((cw * (j + 0.5), ch * (i + 0.5), r))
    return out


def _rasterise(H: int, W: int, cats: list[int], nominal: list[tuple[float, float, float]],
               rng: np.random.Generator | None) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]],
                                                        list[int], list[float]]:
    """Rasterise objects without overlap into a label map. With ``rng`` (scatter) each object is placed at
    random, shrinking after failed tries, and dropped if it never fits; without, at its nominal place (an
    arranged layout never overlaps; a rare touching object is dropped). Returns (label int16[H, W], shapes,
    kept indices, radii of the kept objects)."""
    label = np.zeros((H, W), dtype=np.int16)
    shapes: list[tuple[int, int, np.ndarray]] = []
    kept: list[int] = []
    radii: list[float] = []
    for i, (cx, cy, r) in enumerate(nominal):
        tries = 40 if rng is not None else 1
        for t in range(tries):
            r = max(r, MIN_RADIUS_PX)
            if rng is not None:
                if t and t % 10 == 0:
                    r = max(r * 0.8, MIN_RADIUS_PX)
                cx, cy = rng.uniform(r + 1, W - r - 1), rng.uniform(r + 1, H - r - 1)
            x0, y0, m = shape_window(CATEGORIES[cats[i]], cx, cy, r, H, W)
            win = label[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
            if m.sum() < 6 or win[m].any():
                continue
            win[m] = len(shapes) + 1
            shapes.append((x0, y0, m))
            kept.append(i)
            radii.append(r)
            break
    return label, shapes, kept, radii


def _groups(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Category and colour per object: 1..n distinct (category, colour) groups, each with at least one object."""
    g = int(rng.integers(1, n + 1))
    keys = rng.choice(len(CATEGORIES) * len(COLOR_NAMES), size=g, replace=False)
    member = np.concatenate([np.arange(g), rng.integers(0, g, n - g)])
    member = keys[rng.permutation(member)]
    return member // len(COLOR_NAMES), member % len(COLOR_NAMES)


def sample_web_scene(rng: np.random.Generator, image_size: int) -> WebScene:
    """Sample a layout, its objects (categories, colours, places) and a background kind; see the module
    docstring."""
    H = W = int(image_size)
    S = float(image_size)
    while True:
        layout = LAYOUTS[int(rng.choice(len(LAYOUTS), p=LAYOUT_WEIGHTS))]
        if layout == "scatter":
            n = int(rng.integers(1, MAX_OBJECTS + 1))
            # Log-uniform diameters: tiny icons and large shapes in the same corpus.
            d = np.exp(rng.uniform(math.log(0.07), math.log(0.5), n))
            nominal = [(0.0, 0.0, float(v) * S / 2) for v in d]
        else:
            nominal = _slots(rng, layout, S)
        cats, cols = _groups(rng, len(nominal))
        label, shapes, kept, radii = _rasterise(H, W, cats.tolist(), nominal, rng if layout == "scatter" else None)
        if kept:
            break
    n = len(kept)
    keep = np.asarray(kept)
    box = np.zeros((n, 4), dtype=np.int64)
    for k, (x0, y0, m) in enumerate(shapes):
        cs, rs = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
        box[k] = (x0 + cs[0], y0 + rs[0], x0 + cs[-1] + 1, y0 + rs[-1] + 1)
    area = np.bincount(label.ravel(), minlength=n + 1)[1:].astype(np.int64)
    diameter = 2 * np.asarray(radii, dtype=np.float64) / S
    size = np.searchsorted(np.asarray(SIZE_BOUNDS), diameter, side="right").astype(np.int64)
    scene = Scene(H, W, cats[keep].astype(np.int64), cols[keep].astype(np.int64), size, box, area, label, shapes)
    background = WEB_BACKGROUNDS[int(rng.integers(len(WEB_BACKGROUNDS)))]
    return WebScene(scene, layout, background, diameter)
