"""Line charts drawn with matplotlib's Agg renderer: training curves and VL-NMS's recall@N.

The figures use matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no global backend, no display,
nothing left open. They are drawn under matplotlib's default style, so a user's matplotlibrc changes nothing
(the style is switched for the drawing through process-wide rcParams: draw from one thread at a time), and
returned as PIL images (``refground.viz.save_png`` writes them; PIL's PNGs carry no date or version), so
the same input gives the same bytes. matplotlib is imported inside the functions: it costs a second, and
``refground --help`` must not pay it.

Every chart has a title, labelled axes with ticks, and its legend outside the plotted area (right of the
axes); a chart without data says so in the middle of its axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image as PILImage

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# name -> (xs, ys); a None y is a gap (an epoch without that figure).
Series = dict[str, tuple[Sequence[float], Sequence[float | None]]]

DPI = 100
PANEL_SIZE = (560, 420)  # pixels of one panel of a training curve
NO_DATA = "no data"
_LINE_STYLES = ("-", "--", ":", "-.")  # after matplotlib's ten colours, the same colours dashed
# Keys of a curve's epoch rows that are no loss term.
_NOT_LOSS_TERMS = {"epoch", "loss", "seconds", "lr"}


@contextlib.contextmanager
def _default_style() -> Iterator[None]:
    import matplotlib.style

    with matplotlib.style.context("default"):
        yield


def new_figure(size: tuple[int, int], panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of exactly ``size`` pixels (width, height) with ``panels`` axes side by side; constrained
    layout makes room for titles, labels and the legends outside the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with _default_style():
        fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    return fig, axes


def to_image(fig: Figure) -> PILImage.Image:
    """Render ``fig`` (Agg) to an RGB PIL image of the figure's size in pixels."""
    import numpy as np

    with _default_style():
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
    return PILImage.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")


def draw_lines(ax: Axes, series: Series, title: str, x_label: str, y_label: str,
               y_range: tuple[float, float] | None = None, x_log: bool = False,
               x_ticks: Sequence[float] | None = None, integer_x: bool = False,
               main: Sequence[str] = ()) -> None:
    """One panel: a line with markers per series, axis labels, ticks, a grid, the legend right of the axes.

    ``x_ticks``: exactly these ticks, labelled with their values (e.g. N = 1, 3, ..., 100 on a log axis);
    ``integer_x``: integer ticks only (epochs); ``main``: series drawn thicker than the others (the figure a
    run is selected by, beside its per-kind breakdown). No point in any series: "no data" in the middle."""
    from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator

    with _default_style():
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if x_log:
            ax.set_xscale("log")
        drawn = 0
        for k, (name, (xs, ys)) in enumerate(series.items()):
            pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and y == y]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=f"C{k % 10}",
                    linestyle=_LINE_STYLES[(k // 10) % len(_LINE_STYLES)], marker="o", markersize=3.5,
                    linewidth=2.4 if name in main else 1.4)
            drawn += 1
        if y_range is not None:
            ax.set_ylim(*y_range)
        if x_ticks is not None:
            ax.set_xticks([float(t) for t in x_ticks], [f"{t:g}" for t in x_ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs_drawn = {x for line in ax.get_lines() for x in line.get_xdata()}
        if len(xs_drawn) == 1 and x_ticks is None:
            # One epoch: a single tick at it (a locator would invent fractional ones around it).
            (x,) = xs_drawn
            ax.set_xticks([x], [f"{x:g}"])
            ax.set_xlim((x / 2, x * 2) if x_log else (x - 0.5, x + 0.5))
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=14)
            ax.set_xticks([])  # ticks of an empty axis would be made-up numbers
            ax.set_yticks([])
            return
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                  frameon=False)


def chart_figure(series: Series, title: str, x_label: str, y_label: str, size: tuple[int, int] = (640, 400),
                 y_range: tuple[float, float] | None = None, x_log: bool = False,
                 x_ticks: Sequence[float] | None = None) -> Figure:
    """The figure of :func:`line_chart` (for callers that add to it, and for tests of its layout)."""
    fig, (ax,) = new_figure(size)
    draw_lines(ax, series, title, x_label, y_label, y_range=y_range, x_log=x_log, x_ticks=x_ticks)
    return fig


def line_chart(series: Series, title: str, x_label: str, y_label: str, size: tuple[int, int] = (640, 400),
               y_range: tuple[float, float] | None = None, x_log: bool = False,
               x_ticks: Sequence[float] | None = None) -> PILImage.Image:
    """One panel with a line per series (``name -> (xs, ys)``) as an RGB image of ``size`` pixels."""
    return to_image(chart_figure(series, title, x_label, y_label, size, y_range, x_log, x_ticks))


def curve_series(curve: dict[str, Any]) -> dict[str, Series]:
    """The panels of a run's ``curve.json`` (``refground.train``): ``"loss"`` (the training loss per epoch
    and the named loss terms, e.g. the detector's ``box``/``cls``), ``"steps"`` (the loss logged every few
    optimizer steps) and ``"val"`` (the val figures that are shares, in percent: Precision@1, recall@N,
    their per-kind breakdowns). A panel without data is left out."""
    from refground.tables import PERCENT, column_kind

    epochs = [r for r in curve.get("epochs") or [] if isinstance(r, dict) and "epoch" in r]
    xs = [r["epoch"] for r in epochs]
    keys = list(dict.fromkeys(k for r in epochs for k in r))

    def column(key: str, scale: float = 1.0) -> tuple[list[Any], list[float | None]]:
        return xs, [scale * r[key] if isinstance(r.get(key), (int, float)) else None for r in epochs]

    loss: Series = {"train loss": column("loss")} if "loss" in keys else {}
    loss.update({k: column(k) for k in keys if k not in _NOT_LOSS_TERMS and not k.startswith("val_")
                 and column_kind(k) != PERCENT})
    loss.update({k.replace("_", " ", 1): column(k) for k in keys if k.startswith("val_") and "loss" in k})
    val: Series = {k[4:]: column(k, 100.0) for k in keys if k.startswith("val_") and column_kind(k[4:]) == PERCENT}
    steps = [r for r in curve.get("steps") or [] if isinstance(r, dict) and "step" in r and "loss" in r]
    panels: dict[str, Series] = {"loss": loss, "steps": {"train loss": ([r["step"] for r in steps],
                                                                         [r["loss"] for r in steps])}, "val": val}
    return {name: s for name, s in panels.items() if any(y is not None for _, ys in s.values() for y in ys)}


def curve_figure(curve: dict[str, Any], title: str) -> Figure:
    """A run's ``curve.json`` as panels side by side (:func:`curve_series`): loss per epoch, loss per step
    (when logged), val figures per epoch in percent; one "no data" panel when the curve has nothing."""
    panels = curve_series(curve)
    fig, axes = new_figure((PANEL_SIZE[0] * max(1, len(panels)), PANEL_SIZE[1]), max(1, len(panels)))
    if not panels:
        draw_lines(axes[0], {}, "training curve", "epoch", "loss")
    layouts = {"loss": ("loss per epoch", "epoch", "loss (mean over the epoch)", None, True),
               "steps": ("loss per optimizer step", "step", "loss (mean since the previous point)", None, True),
               "val": ("val figures per epoch", "epoch", "val figure (%)", (0.0, 100.0), True)}
    for ax, (name, series) in zip(axes, panels.items()):
        panel_title, x_label, y_label, y_range, integer_x = layouts[name]
        # The unbroken-down figures (no "/kind") and the total loss are the ones to read first: drawn thicker.
        main = [k for k in series if "/" not in k] if name == "val" else ["train loss"]
        draw_lines(ax, series, panel_title, x_label, y_label, y_range=y_range, integer_x=integer_x, main=main)
    with _default_style():
        fig.suptitle(title)
    return fig


def render_curve(curve: dict[str, Any], title: str) -> PILImage.Image:
    """:func:`curve_figure` as an RGB image (``PANEL_SIZE`` per panel)."""
    return to_image(curve_figure(curve, title))
