"""`refground show --method cmrin` (CMRIN's Figure 4) and the score-map / colour helpers behind it."""

from __future__ import annotations

import colorsys
import shutil

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from conftest import TINY_CMRIN
from refground.cli.main import main
from refground.viz import PANEL_GAP, heat_colours, normalise_scores, score_map


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cmrin_cache(pipeline_cache, tmp_path_factory, one_thread):
    """A copy of the pipeline cache with one tiny CMRIN run "cmrin" and one "instance" run (no gates)."""
    from refground.methods.cmrin.model import CMRINConfig, variant_config
    from refground.methods.cmrin.run import train_cmrin

    root = tmp_path_factory.mktemp("show_cmrin") / "cache"
    shutil.copytree(pipeline_cache, root)
    train_cmrin("synth", root, "cmrin", CMRINConfig(**TINY_CMRIN), seed=0)
    train_cmrin("synth", root, "instance", variant_config("instance", **{**TINY_CMRIN, "epochs": 1}), seed=0)
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ----------------------------------------------------------------------------------------------------------
# score_map against a per-pixel reference


def score_map_reference(height, width, boxes, values, fill=0.0):
    out = np.full((height, width), fill, dtype=np.float64)
    for y in range(height):
        for x in range(width):
            cov = [v for (x1, y1, x2, y2), v in zip(boxes, values)
                   if x1 <= x + 0.5 < x2 and y1 <= y + 0.5 < y2]
            if cov:
                out[y, x] = max(cov)
    return out.astype(np.float32)


CASES = {
    "overlaps_fractional": ([[0.2, 0.7, 5.5, 4.49], [2.5, 1.5, 7.0, 6.0], [3.0, 0.0, 4.51, 9.0]], [0.3, 0.9, 0.5]),
    "partly_outside": ([[-3.2, -1.0, 2.6, 3.5], [6.4, 5.5, 20.0, 30.0]], [1.0, -0.5]),
    "lower_on_top_of_higher": ([[1, 1, 8, 6], [2, 2, 4, 4]], [0.8, 0.1]),
    "ties_and_negative": ([[0, 0, 3, 3], [1, 1, 5, 5], [2.5, 2.5, 2.5, 6]], [-0.2, -0.2, 7.0]),
    "fully_outside_and_edges": ([[10, 10, 12, 12], [0.5, 0.5, 1.5, 1.5], [0, 0, 9, 7]], [5.0, 2.0, 1.0]),
    "empty": (np.zeros((0, 4)), np.zeros(0)),
}


@pytest.mark.parametrize("name", CASES)
def test_score_map_matches_per_pixel_reference(name):
    boxes, values = CASES[name]
    got = score_map(7, 9, np.asarray(boxes, float), np.asarray(values, float))
    assert got.dtype == np.float32 and got.shape == (7, 9)
    np.testing.assert_array_equal(got, score_map_reference(7, 9, boxes, values))


def test_score_map_random_against_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        k = int(rng.integers(0, 12))
        xy = rng.uniform(-4, 16, size=(k, 2, 2))
        boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1)[:, [0, 1, 2, 3]]
        values = rng.normal(size=k).round(1)  # rounding makes ties
        got = score_map(11, 13, boxes, values, fill=-9.0)
        np.testing.assert_array_equal(got, score_map_reference(11, 13, boxes, values, fill=-9.0))
    with pytest.raises(ValueError):
        score_map(4, 4, np.zeros((2, 4)), np.zeros(3))


def test_normalise_and_colours():
    np.testing.assert_allclose(normalise_scores(np.array([-1.0, 0.0, 3.0])), [0.0, 0.25, 1.0])
    np.testing.assert_array_equal(normalise_scores(np.array([0.4, 0.4])), [1.0, 1.0])
    assert normalise_scores(np.zeros(0)).shape == (0,)
    c = heat_colours(np.array([0.0, 0.5, 1.0, 2.0]))
    assert c.dtype == np.uint8 and c.shape == (4, 3)
    assert c[0, 2] > c[0, 0] and c[2, 0] > c[2, 2] and (c[3] == c[2]).all()  # cold blue, warm red, clipped
    # warmer = higher: the hue falls monotonically from blue (240 degrees) to red (0)
    ramp = heat_colours(np.linspace(0, 1, 50)) / 255.0
    hue = np.array([colorsys.rgb_to_hsv(*rgb)[0] * 360 for rgb in ramp])
    assert (np.diff(hue) <= 1e-9).all() and hue[0] == pytest.approx(240) and hue[-1] == pytest.approx(0)


# ----------------------------------------------------------------------------------------------------------
# the command


def _expression(ds, split="val"):
    return ds.queries(split, "expression")[0]


def test_show_cmrin_writes_three_panel_png(capsys, cmrin_cache, synth_ds, tmp_path):
    q = _expression(synth_ds)
    w = synth_ds.image(q.image_id).width
    s = max(1, -(-512 // w))
    code, out, err = run(capsys, "show", "--cache", str(cmrin_cache), "--method", "cmrin", "--query", str(q.id))
    assert code == 0, err
    path = cmrin_cache / "synth" / "show" / f"cmrin_cmrin_query_{q.id}.png"
    assert path.is_file() and str(path) in err and len(err.strip().splitlines()) == 1
    with PILImage.open(path) as im:
        assert im.width == 3 * w * s + 2 * PANEL_GAP
        arr = np.asarray(im.convert("RGB"))
    h = synth_ds.image(q.image_id).height * s
    # panels 2 and 3 are heat maps: they differ from the plain ground-truth panel and hold saturated colour
    p2 = arr[:h, w * s + PANEL_GAP: 2 * w * s + PANEL_GAP].astype(int)
    p3 = arr[:h, 2 * (w * s + PANEL_GAP):].astype(int)
    assert p2.shape == p3.shape == (h, w * s, 3)
    assert np.abs(p2 - arr[:h, :w * s]).mean() > 5 and np.abs(p3 - p2).sum() > 0
    assert (p3[..., 0] - p3[..., 2]).max() > 100  # a warm (top-scoring) region exists
    assert out == ""

    # --run/--out and the proposals as candidates
    png = tmp_path / "props.png"
    code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "--method", "cmrin", "-q", str(q.id),
                       "--candidates", "proposals", "--top-n", "5", "-o", str(png))
    assert code == 0, err
    assert "proposals5 candidates" in err
    with PILImage.open(png) as im:
        assert im.width == 3 * w * s + 2 * PANEL_GAP


def test_show_cmrin_variant_without_gates(capsys, cmrin_cache, synth_ds, tmp_path):
    png = tmp_path / "inst.png"
    code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "--method", "cmrin", "--run", "instance",
                       "--split", "val", "--index", "0", "-o", str(png))
    assert code == 0, err
    q = _expression(synth_ds)
    assert f"query {q.id}" in err  # --index counts expression queries with --method
    w = synth_ds.image(q.image_id).width
    s = max(1, -(-512 // w))
    with PILImage.open(png) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.shape[1] == 3 * w * s + 2 * PANEL_GAP
    p2 = arr[:w * s, w * s + PANEL_GAP: 2 * w * s + PANEL_GAP]
    assert (p2[..., 0] - p2[..., 2]).max() < 60  # a dimmed image with a note, no heat colours


def test_show_cmrin_errors_are_one_line(capsys, cmrin_cache, synth_ds, tmp_path):
    caption = synth_ds.queries("all", "caption")[0]
    code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "--method", "cmrin", "-q", str(caption.id),
                       "-o", str(tmp_path / "c.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "caption" in err and "Traceback" not in err

    q = _expression(synth_ds)
    code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "--method", "cmrin", "--run", "nope",
                       "-q", str(q.id), "-o", str(tmp_path / "n.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refground train cmrin" in err

    for args, word in ((["--method", "mattnet"], "unknown method"), (["--method", "cmrin", "--candidates", "x"], "--candidates"),
                       (["--method", "cmrin", "--top-n", "0"], "--top-n"),
                       (["--method", "cmrin", "--proposals", "3"], "--method")):
        code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "-q", str(q.id), *args)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "n.png").exists()


def test_show_without_method_unchanged(capsys, cmrin_cache, synth_ds):
    q = synth_ds.queries("val")[0]
    code, _, err = run(capsys, "show", "--cache", str(cmrin_cache), "-q", str(q.id))
    assert code == 0
    path = cmrin_cache / "synth" / "show" / f"query_{q.id}.png"
    assert path.is_file() and err.strip() == f"wrote {path}"
    with PILImage.open(path) as im:
        assert im.width == synth_ds.image(q.image_id).width * max(1, -(-512 // synth_ds.image(q.image_id).width))
