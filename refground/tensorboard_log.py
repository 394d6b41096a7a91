"""A training run's curves as TensorBoard event files, beside ``curve.json``: ``<run>/tensorboard/``.

Written by :func:`refground.train.fit` (rank 0) when the ``tensorboard`` package is importable, else nothing
(a debug log line). The scalars, all against the global training step so that the step and epoch curves share
one axis (and one purge point on resume)::

    train/loss, train/lr            the step rows of curve.json (every STEP_LOG_EVERY steps)
    epoch/loss, epoch/seconds       the epoch rows, at the epoch's last step
    epoch/<term>                    the named loss terms (the detector's)
    val/<figure>                    every ``val_*`` figure (``val_precision@1`` -> ``val/precision@1``)

A fresh start removes the events of an earlier run in the folder; a resumed run (after step S) purges the events
an interrupted one wrote after S (TensorBoard's ``purge_step``), so no curve is drawn twice.

The event files are written before the run's complete manifest, so its content record covers them like
``curve.json`` (an interrupted run's partial file included: it is hashed as it stands when the run completes).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("refground")

TENSORBOARD_DIR = "tensorboard"


class CurveLog:
    """An open event writer of one run; :meth:`close` it (``fit`` does, on any exit)."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self._writer.add_scalar(tag, float(value), int(step))

    def step(self, row: dict[str, Any]) -> None:
        """A step row of the curve: ``{"step", "epoch", "loss", ["lr"]}``."""
        for key in ("loss", "lr"):
            if key in row:
                self._scalar(f"train/{key}", row[key], row["step"])

    def epoch(self, row: dict[str, Any], step: int) -> None:
        """An epoch row of the curve (``{"epoch", "loss", "seconds", **terms, **val_figures}``) at global
        step ``step``; written to disk at once (an epoch is worth a flush)."""
        for key, value in row.items():
            if key == "epoch":
                continue
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"
            self._scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_curve_log(run_dir: Path, resumed_step: int | None) -> CurveLog | None:
    """The event writer of ``<run_dir>/tensorboard/``, or None without the ``tensorboard`` package.

    ``resumed_step``: the global step a resumed run continues after (events past it are purged); None for a
    fresh start, which first removes the folder's old events."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # the optional extra is not installed
        logger.debug("no TensorBoard event files: %s", exc)
        return None
    folder = Path(run_dir) / TENSORBOARD_DIR
    if resumed_step is None:
        shutil.rmtree(folder, ignore_errors=True)
    purge = None if resumed_step is None else int(resumed_step) + 1
    return CurveLog(SummaryWriter(log_dir=str(folder), purge_step=purge))


__all__ = ["CurveLog", "TENSORBOARD_DIR", "open_curve_log"]
