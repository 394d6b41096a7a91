"""The CLIP crop recipe (refground.features.extract.clip_crops): windows and pixels against a per-pixel
reference for boxes inside, on the border of and outside the image; the recipe in the CLIP artifact's
manifest and attrs; an artifact cut under another recipe is stale and rebuilt."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from hf_tiny import make_tiny_backbone, make_tiny_clip

from refground.cache import RaggedH5, read_manifest_of
from refground.data.store import image_path
from refground.errors import UsageError
from refground.features import extract as X
from refground.features.base import read_image
from refground.features.pipeline import extract_dataset

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _window_ref(box, context: float, square: bool) -> tuple[int, int, int, int]:
    """The recipe written out for one box: pad each side by context x its own length, square on the longer
    side, whole pixels (at least 1), start at the integer nearest to centre - side / 2."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 0.0) * (1 + 2 * context), max(y2 - y1, 0.0) * (1 + 2 * context)
    if square:
        w = h = max(w, h)
    sw, sh = max(1, math.ceil(w - 1e-6)), max(1, math.ceil(h - 1e-6))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = math.floor(cx - sw / 2 + 0.5), math.floor(cy - sh / 2 + 0.5)
    return left, top, left + sw, top + sh


def _crop_ref(image: np.ndarray, box, context: float = 0.1, square: bool = True) -> np.ndarray:
    """Pixel by pixel: the image where the window is inside it, the image's rounded mean colour elsewhere."""
    x1, y1, x2, y2 = _window_ref(box, context, square)
    hh, ww = image.shape[:2]
    fill = [round(float(image[..., c].astype(np.float64).mean())) for c in range(3)]  # half to even, as np.round
    out = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
    for i in range(y2 - y1):
        for j in range(x2 - x1):
            y, x = y1 + i, x1 + j
            out[i, j] = image[y, x] if 0 <= y < hh and 0 <= x < ww else fill
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


BOXES = [
    [20.0, 10.0, 30.0, 30.0],    # inside, tall: squared to 24 x 24
    [5.3, 7.7, 40.2, 12.9],      # inside, wide, fractional: the square reaches above the image
    [0.0, 0.0, 60.0, 40.0],      # the whole image: padded on all sides
    [50.0, 30.0, 60.0, 40.0],    # in the bottom-right corner
    [-10.0, -5.0, 8.0, 6.0],     # partly outside (top-left)
    [70.0, 45.0, 80.0, 50.0],    # wholly outside: all fill
    [12.0, 12.0, 12.0, 12.0],    # empty: one pixel
    [33.4, 18.6, 33.6, 18.9],    # sub-pixel
]


def test_windows_by_hand():
    win = X.clip_crop_windows(np.array([[10.0, 20.0, 30.0, 60.0], [10.0, 20.0, 30.0, 60.0]]))
    # w 20 -> 24, h 40 -> 48, square 48 around (20, 40): [-4, 16, 44, 64].
    assert win.tolist()[0] == [-4, 16, 44, 64]
    assert X.clip_crop_windows(np.array([[10.0, 20.0, 30.0, 60.0]]), context=0.0, square=False).tolist() == \
        [[10, 20, 30, 60]]
    assert X.clip_crop_windows(np.zeros((0, 4))).shape == (0, 4)
    for b in BOXES:
        for context, square in ((0.1, True), (0.0, False), (0.25, False), (0.0, True)):
            assert tuple(X.clip_crop_windows(np.array([b]), context, square)[0]) == _window_ref(b, context, square)


@pytest.mark.parametrize("context,square", [(0.1, True), (0.0, False), (0.3, False)])
def test_crops_match_the_per_pixel_reference(image, context, square):
    crops = X.clip_crops(image, np.array(BOXES), context=context, square=square)
    assert len(crops) == len(BOXES)
    for b, c in zip(BOXES, crops):
        ref = _crop_ref(image, b, context, square)
        assert c.dtype == np.uint8 and c.shape == ref.shape and c.shape[0] >= 1 and c.shape[1] >= 1
        np.testing.assert_array_equal(c, ref)
        np.testing.assert_array_equal(X.clip_crop(image, np.array(b), context, square), ref)
        if square:
            assert c.shape[0] == c.shape[1]
    # With the defaults: square crops, the outside in the mean colour, the inside untouched.
    outside = X.clip_crop(image, np.array(BOXES[5]))
    assert (outside == np.round(image.reshape(-1, 3).mean(0)).astype(np.uint8)).all()
    # context 0, no square, a box on whole pixels inside the image: exactly the old cut.
    np.testing.assert_array_equal(X.clip_crop(image, np.array([3.0, 4.0, 17.0, 9.0]), 0.0, False),
                                  X.crop(image, np.array([3.0, 4.0, 17.0, 9.0])))


def test_bad_boxes_are_refused(image):
    with pytest.raises(UsageError, match="finite"):
        X.clip_crops(image, np.array([[0.0, 0.0, np.nan, 5.0]]))
    with pytest.raises(UsageError, match="far larger"):
        X.clip_crops(image, np.array([[0.0, 0.0, 1e6, 5.0]]))
    with pytest.raises(UsageError, match="context"):
        X.clip_crops(image, np.array([[0.0, 0.0, 5.0, 5.0]]), context=-0.1)


# ------------------------------------------------------------------------------- the CLIP artifact


@pytest.fixture(scope="module")
def hf(synth_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("clipcrop")
    shutil.copytree(synth_cache / "synth" / "dataset", root / "cache" / "synth" / "dataset")
    return {"cache": root / "cache", "clip": make_tiny_clip(root / "models" / "clip"),
            "backbone": make_tiny_backbone(root / "models" / "resnet")}


def _extract(hf) -> dict:
    # No detector: the CLIP artifact holds the ground-truth object crops (no proposals), no dense maps.
    return extract_dataset("synth", cache=hf["cache"], detector="none", backbone=f"hf:{hf['backbone']}",
                           clip=f"hf:{hf['clip']}", dense=False, chunk_size=12, batch_size=12)


def test_recipe_recorded_and_another_recipe_is_stale(hf, synth_ds, monkeypatch):
    from refground.features.hf import HFClip

    path = hf["cache"] / "synth" / "clip" / "hf-clip.h5"
    other = {"version": 1, "context": 0.0, "square": False, "fill": "mean"}
    with monkeypatch.context() as mp:
        mp.setattr(X, "CLIP_CROP", other)
        first = _extract(hf)
    assert first["artifacts"]["clip"]["status"] == "written"
    assert read_manifest_of(path).params["crop"] == other
    with RaggedH5(path) as f:
        assert f.attr("crop") == other
        old = f.table("objects", "embedding").copy()
    # The default recipe: the artifact cut the other way is no cache hit; it is rebuilt.
    again = _extract(hf)
    assert again["artifacts"]["clip"]["status"] == "written"
    assert again["artifacts"]["features"]["status"] == "hit"
    m = read_manifest_of(path)
    assert m.params["crop"] == X.CLIP_CROP == {"version": 1, "context": 0.1, "square": True, "fill": "mean"}
    clip = HFClip(hf["clip"])
    row = 2
    im = read_image(image_path(synth_ds, int(synth_ds.image_ids[row])))
    off = synth_ds.image_object_offsets
    boxes = synth_ds.object_boxes[off[row]:off[row + 1]]
    with RaggedH5(path) as f:
        assert f.attr("crop") == X.CLIP_CROP
        new = f.table("objects", "embedding")
        # The stored object embeddings are those of the recipe's crops (a reader can reproduce them).
        want = clip.embed_images(X.clip_crops(im, boxes, **{k: X.CLIP_CROP[k] for k in ("context", "square")}))
        np.testing.assert_allclose(f.image("objects", "embedding", row).astype(np.float32), want.numpy(), atol=2e-3)
    assert not np.allclose(old.astype(np.float32), new.astype(np.float32), atol=1e-2)
    # And the same recipe again is a hit.
    assert _extract(hf)["artifacts"]["clip"]["status"] == "hit"
