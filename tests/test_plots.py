"""The matplotlib charts (refground.plots): size, real content, legends beside the lines, empty inputs,
the same bytes for the same input, and the callers' PNGs (VL-NMS's recall@N, the quickstart's curve)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image as PILImage

from refground.plots import (NO_DATA, PANEL_SIZE, chart_figure, curve_figure, curve_series, line_chart,
                             render_curve, to_image)

RECALL_NS = (1, 3, 5, 10, 20, 100)
KINDS = ("attribute", "relation2")


def small_curve(epochs: int = 4, steps: bool = True) -> dict:
    rows = [{"epoch": e, "loss": 0.5 * math.exp(-e / 2), "seconds": 1.5, "val_precision@1": 0.2 * e,
             **{f"val_precision@1/{k}": 0.1 * e + 0.05 * i for i, k in enumerate(KINDS)}} for e in range(1, epochs + 1)]
    step_rows = [{"step": s, "epoch": 1 + s // 40, "loss": 0.6 - s / 400} for s in range(20, 40 * epochs + 1, 20)]
    return {"epochs": rows, "steps": step_rows if steps else []}


def recall_series() -> dict:
    return {name: (list(RECALL_NS), [min(100.0, base + 15 * math.log(n + 1)) for n in RECALL_NS])
            for name, base in (("detector", 20.0), ("VL-NMS-FC, BCE", 45.0))}


def ink(img: PILImage.Image) -> tuple[float, int]:
    """The share of pixels that are not white, and the number of distinct colours."""
    a = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return float((a.min(1) < 250).mean()), len(np.unique(a, axis=0))


def has_colour(img: PILImage.Image, rgb: tuple[int, int, int], min_pixels: int = 50) -> bool:
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).sum(-1) < 30).sum()) >= min_pixels


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def assert_legends_beside_lines(fig) -> int:
    """Every legend lies outside its axes (so outside every line), inside the figure; returns how many."""
    renderer = drawn(fig)
    fig_box = fig.bbox
    count = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        lb, ab = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not lb.overlaps(ab), (lb, ab)
        for line in ax.get_lines():  # and no line runs under it
            assert not lb.overlaps(line.get_window_extent(renderer))
        assert lb.x0 >= fig_box.x0 - 1 and lb.x1 <= fig_box.x1 + 1 and lb.y0 >= fig_box.y0 - 1, (lb, fig_box)
        count += 1
    return count


def test_training_curve_has_its_panels_size_and_content():
    img = render_curve(small_curve(), "cmrin training")
    assert img.mode == "RGB" and img.size == (3 * PANEL_SIZE[0], PANEL_SIZE[1])  # loss, steps, val
    share, colours = ink(img)
    assert 0.02 < share < 0.4 and colours > 50  # text, axes and antialiased lines; mostly white
    assert has_colour(img, C0) and has_colour(img, C1)  # the lines themselves, not only black text
    # Without logged steps: two panels.
    assert render_curve(small_curve(steps=False), "t").size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])


def test_curve_axes_are_labelled_and_val_figures_are_percent():
    fig = curve_figure(small_curve(), "cmrin training")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss per epoch", "loss per optimizer step", "val figures per epoch"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "step", "epoch"]
    assert all(ax.get_ylabel() for ax in fig.axes) and "%" in fig.axes[2].get_ylabel()
    val = fig.axes[2]
    assert val.get_ylim() == (0.0, 100.0)
    lines = {line.get_label(): line for line in val.get_lines()}
    assert set(lines) == {"precision@1", *[f"precision@1/{k}" for k in KINDS]}
    np.testing.assert_allclose(lines["precision@1"].get_ydata(), [20.0, 40.0, 60.0, 80.0])
    assert lines["precision@1"].get_linewidth() > lines["precision@1/attribute"].get_linewidth()
    # Epoch ticks are whole epochs, and the tick labels are there.
    drawn(fig)
    ticks = [t for t in val.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert any(t.get_text() for t in val.get_xticklabels())
    assert assert_legends_beside_lines(fig) == 3


def test_curve_series_takes_loss_terms_and_skips_gaps():
    curve = {"epochs": [{"epoch": 1, "loss": 7.3, "seconds": 0.1, "box": 1.0, "cls": 2.2},
                        {"epoch": 2, "loss": 5.0, "seconds": 0.1, "box": 0.8, "cls": 1.9, "val_recall@10": 0.5}]}
    panels = curve_series(curve)
    assert list(panels) == ["loss", "val"]  # no steps logged
    assert set(panels["loss"]) == {"train loss", "box", "cls"}
    assert panels["val"]["recall@10"] == ([1, 2], [None, 50.0])  # epoch 1 had no val figure: a gap
    fig = curve_figure(curve, "detector")
    (line,) = fig.axes[1].get_lines()
    assert list(line.get_xdata()) == [2.0] and list(line.get_ydata()) == [50.0]


def test_one_epoch_gets_one_whole_tick():
    fig = curve_figure({"epochs": [{"epoch": 1, "loss": 7.3, "seconds": 0.1}]}, "detector")
    drawn(fig)
    assert list(fig.axes[0].get_xticks()) == [1.0]


def test_recall_chart_log_axis_ticks_and_legend():
    fig = chart_figure(recall_series(), "referent recall@N, val", "N", "recall@N (%)", size=(720, 480),
                       y_range=(0.0, 100.0), x_log=True, x_ticks=RECALL_NS)
    (ax,) = fig.axes
    drawn(fig)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(n) for n in RECALL_NS]
    assert ax.get_title() == "referent recall@N, val" and ax.get_xlabel() == "N" and ax.get_ylabel() == "recall@N (%)"
    assert assert_legends_beside_lines(fig) == 1
    img = to_image(fig)
    assert img.size == (720, 480)
    share, colours = ink(img)
    assert 0.02 < share < 0.4 and colours > 50 and has_colour(img, C0) and has_colour(img, C1)


@pytest.mark.parametrize("curve", [{}, {"epochs": [], "steps": []}, {"epochs": [{"epoch": 1}]}])
def test_empty_curve_is_a_placeholder(curve):
    fig = curve_figure(curve, "nothing yet")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == [NO_DATA] and not ax.get_lines() and ax.get_legend() is None
    img = render_curve(curve, "nothing yet")
    assert img.size == PANEL_SIZE
    share, _ = ink(img)
    assert 0.005 < share < 0.2  # a frame, the title, the labels and "no data"


@pytest.mark.parametrize("series", [{}, {"a": ([], [])}, {"a": ([1, 2], [None, float("nan")])}])
def test_empty_chart_is_a_placeholder(series):
    fig = chart_figure(series, "t", "x", "y")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == [NO_DATA] and not ax.get_lines()
    assert line_chart(series, "t", "x", "y", size=(300, 200)).size == (300, 200)


def png_bytes(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_same_input_same_bytes_whatever_the_users_style():
    import matplotlib

    first = png_bytes(render_curve(small_curve(), "t"))
    assert png_bytes(render_curve(small_curve(), "t")) == first
    with matplotlib.rc_context({"lines.linewidth": 6.0, "axes.facecolor": "black", "font.size": 20}):
        assert png_bytes(render_curve(small_curve(), "t")) == first
    assert b"tEXt" not in first and b"tIME" not in first  # no software name, no date


def test_vlnms_recall_plot_writes_the_png(tmp_path):
    from refground.methods.vlnms.report import recall_plot

    t = {"labels": {"det": "detector", "fc": "VL-NMS-FC"},
         "recall": {"det": {"val": {f"recall@{n}": min(1.0, 0.1 * n) for n in RECALL_NS}},
                    "fc": {"val": {f"recall@{n}": None for n in RECALL_NS}}}}  # an empty split's recall
    path = recall_plot(t, "val", tmp_path / "recall_val.png")
    with PILImage.open(path) as img:
        assert img.format == "PNG" and img.size == (720, 480)
        assert has_colour(img, C0) and not has_colour(img, C1, min_pixels=1)  # the second set has no line
