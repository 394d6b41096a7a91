"""TensorBoard event files beside curve.json (refground.tensorboard_log, written by refground.train.fit): the
scalars of the curve, no doubled curve after a resume or a fresh start, nothing without the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refground import progress
from refground.tensorboard_log import TENSORBOARD_DIR
from refground.train import CURVE_FILE, RunSpec, fit
from test_hostile_train import interrupt_in_epoch

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

EPOCHS, STEPS_PER_EPOCH = 2, 25  # more than STEP_LOG_EVERY steps an epoch: there are step rows


def fit_toy(out: Path, state=None):
    """A toy regression through :func:`fit` with a per-step learning rate, named loss terms and val figures."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spec = RunSpec(out, "test.tb@1", {}, {}, kind="runs/tb")
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 3, generator=g), torch.randn(100, 1, generator=g)

    def batches(rng):
        perm = rng.permutation(100)
        return [perm[i:i + 4] for i in range(0, 100, 4)]

    def step(rows, gen):
        err = (model(x[rows]) - y[rows]) ** 2
        return err.mean(), len(rows), {"half": err[: len(rows) // 2].mean().detach()}

    def evaluate():
        return {"val_mse": float(((model(x) - y) ** 2).mean()), "val_nan": float("nan")}

    if state == "resume":
        state = spec.resumable_state()
        assert state is not None
    return fit(model, opt, spec, epochs=EPOCHS, seed=0, batches=batches, train_step=step, evaluate=evaluate,
               select="val_mse", lr_at_step=lambda s: 0.05 / (1 + s), state=state)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_against_curve(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The event files hold curve.json's rows, each once: steps on the global step axis, epoch rows at their
    epoch's last step."""
    curve = json.loads((run / CURVE_FILE).read_text())
    got = scalars(run)
    assert set(got) == {"train/loss", "train/lr", "epoch/loss", "epoch/seconds", "epoch/half", "val/mse"}
    assert [s for s, _ in got["train/loss"]] == [r["step"] for r in curve["steps"]] == [20, 40]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [r["loss"] for r in curve["steps"]], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train/lr"]], [r["lr"] for r in curve["steps"]], rtol=1e-6)
    ends = [STEPS_PER_EPOCH * r["epoch"] for r in curve["epochs"]]
    for tag, key in (("epoch/loss", "loss"), ("epoch/half", "half"), ("val/mse", "val_mse")):
        assert [s for s, _ in got[tag]] == ends, tag
        np.testing.assert_allclose([v for _, v in got[tag]], [r[key] for r in curve["epochs"]], rtol=1e-5)
    return got


def test_event_files_hold_the_curve(tmp_path):
    fit_toy(tmp_path / "run")
    assert list((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    check_against_curve(tmp_path / "run")  # a NaN figure (val_nan) is left out, not drawn as a gap


def test_a_resumed_run_purges_what_the_interrupted_one_wrote_after_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    progress.set_tracker(interrupt_in_epoch(2, after_steps=22))  # after the step row of step 40 (epoch 2)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_toy(run)
    finally:
        progress.set_tracker(None)
    assert [s for s, _ in scalars(run)["train/loss"]] == [20, 40]  # the interrupted epoch's row was written
    assert fit_toy(run, state="resume").resumed_from == 1
    got = check_against_curve(run)  # each row once: step 40 of the killed epoch is gone, the resumed one is in
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    fit_toy(tmp_path / "straight")
    straight = scalars(tmp_path / "straight")
    assert [s for s, _ in got["train/loss"]] == [s for s, _ in straight["train/loss"]]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in straight["train/loss"]], rtol=0)


def test_a_fresh_start_removes_the_old_events(tmp_path):
    fit_toy(tmp_path / "run")
    fit_toy(tmp_path / "run")  # state None: training again from scratch
    assert len(list((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    check_against_curve(tmp_path / "run")


def test_without_tensorboard_nothing_is_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level("DEBUG", logger="refground"):
        fit_toy(tmp_path / "run")
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert (tmp_path / "run" / CURVE_FILE).is_file()
    assert any("no TensorBoard event files" in r.getMessage() for r in caplog.records)
