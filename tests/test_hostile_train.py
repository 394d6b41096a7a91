"""Issue 14 ("nothing lost, nothing silently wrong") for training and the method steps: a finished run is not
overwritten with other settings, a resumed run is bit-identical with dropout on, NaN features and a NaN loss
are one-line errors, truncated weights are one-line errors, and one process at a time writes a run folder or
a predictions file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_CMRIN, fail, lock_held_elsewhere, run_json
from refground import progress
from refground.errors import ArtifactError
from refground.methods.cmrin.model import CMRINConfig
from refground.methods.cmrin.run import run_dir, train_cmrin
from refground.train import (CHECKPOINT_FILE, MODEL_FILE, NonFiniteLossError, RunSpec, fit, load_weights,
                             params_difference)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def cache(pipeline_cache, tmp_path) -> Path:
    return Path(shutil.copytree(pipeline_cache, tmp_path / "cache"))


@pytest.fixture
def tiny_cfg(tmp_path) -> Path:
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_CMRIN))
    return cfg


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def features_file(root: Path) -> Path:
    return root / "synth" / "features" / "detector-default.h5"


def forget_content_record(artifact_manifest: Path) -> None:
    """Drop the manifest's record of its files' content (as in a manifest written before content records,
    or by a writer that stored damaged values itself): only the reader's own checks can then catch them."""
    d = json.loads(artifact_manifest.read_text())
    d.pop("files", None)
    artifact_manifest.write_text(json.dumps(d))


def interrupt_in_epoch(epoch: int, after_steps: int = 0):
    """A progress tracker that raises KeyboardInterrupt (a stand-in for kill -9) in ``epoch``."""
    def tracker(iterable, total, description):
        for k, item in enumerate(iterable):
            if f"epoch {epoch}/" in description and k == after_steps:
                raise KeyboardInterrupt
            yield item
    return tracker


# ------------------------------------------------------------- case 4: a finished run is not overwritten
def test_finished_run_with_other_settings_is_refused(cache, tiny_cfg, capsys):
    args = ["train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R"]
    first = run_json(capsys, *args)
    run = Path(first["run"])
    before = {f: sha(run / f) for f in (MODEL_FILE, CHECKPOINT_FILE, "manifest.json", "metrics.json")}

    err = fail(capsys, *args, "--lr", "0.001")
    assert str(run) in err and "lr: 0.002 -> 0.001" in err
    assert "--force" in err and "--run NAME" in err
    assert {f: sha(run / f) for f in before} == before  # nothing touched

    err = fail(capsys, *args, "--lr", "0.001", "--seed", "3")
    assert "lr: 0.002 -> 0.001" in err and "seed: 0 -> 3" in err

    # The ways out: another run name, or --force to retrain in place.
    other = run_json(capsys, *args[:-1], "R2", "--lr", "0.001")
    assert other["cache_hit"] is False and {f: sha(run / f) for f in before} == before
    forced = run_json(capsys, *args, "--lr", "0.001", "--force")
    assert forced["cache_hit"] is False and sha(run / MODEL_FILE) != before[MODEL_FILE]
    assert json.loads((run / "manifest.json").read_text())["params"]["config"]["lr"] == 0.001
    # The same settings as the run now holds: a cache hit, not a refusal.
    assert run_json(capsys, *args, "--lr", "0.001")["cache_hit"] is True


def test_refusal_says_when_only_the_inputs_changed(cache):
    cfg = CMRINConfig(**TINY_CMRIN)
    train_cmrin("synth", cache, "R", cfg, seed=0)
    spec_params = json.loads((run_dir("synth", cache, "R") / "manifest.json").read_text())
    # Another graph artifact fingerprint (as after `refground graph --force` by another version).
    m = cache / "synth" / "graph" / "detector-default.h5.manifest.json"
    d = json.loads(m.read_text())
    d["fingerprint"] = "0" * 64
    m.write_text(json.dumps(d))
    with pytest.raises(ArtifactError) as exc:
        train_cmrin("synth", cache, "R", CMRINConfig(**TINY_CMRIN), seed=0)
    msg = str(exc.value)
    assert "same settings on other inputs (graph changed since)" in msg and "--force" in msg
    assert "\n" not in msg
    assert json.loads((run_dir("synth", cache, "R") / "manifest.json").read_text()) == spec_params


def test_params_difference_lists_changed_fields():
    old = {"config": {"lr": 0.0005, "epochs": 2}, "seed": 0, "features": "a"}
    new = {"config": {"lr": 0.001, "epochs": 2, "dropout": 0.1}, "seed": 0, "features": "b"}
    assert params_difference(old, new) == ["dropout: unset -> 0.1", "lr: 0.0005 -> 0.001",
                                           "features: \"a\" -> \"b\""]
    assert params_difference(old, old) == []


def test_interrupted_or_damaged_run_is_not_refused(cache, tiny_cfg, capsys):
    """An interrupted run of other settings holds no finished model: it is restarted (with a notice-free
    start, as before). A damaged complete run of the *same* settings is retrained, not refused."""
    args = ["train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R"]
    progress.set_tracker(interrupt_in_epoch(2))
    try:
        with pytest.raises(KeyboardInterrupt):
            train_cmrin("synth", cache, "R", CMRINConfig(**{**TINY_CMRIN, "lr": 0.001}), seed=0)
    finally:
        progress.set_tracker(None)
    res = run_json(capsys, *args)
    assert res["cache_hit"] is False and res["resumed_from"] == 0  # other fingerprint: a fresh start
    run = Path(res["run"])
    good = sha(run / MODEL_FILE)

    # Truncate model.pt of the complete run: not a cache hit any more (content records), and not refused.
    size = (run / MODEL_FILE).stat().st_size
    os.truncate(run / MODEL_FILE, size // 2)
    again = run_json(capsys, *args)
    assert again["cache_hit"] is False
    assert again["resumed_from"] == 0  # the best weights so far are gone: no resume onto them
    assert sha(run / MODEL_FILE) == good  # same seed and settings: the same weights again
    load_weights(run / MODEL_FILE)


# --------------------------------------------------------- case 6: resume is bit-identical with dropout
class Dropper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _fit_dropper(out: Path, epochs: int = 3, state=None):
    """Train :class:`Dropper` through :func:`fit`; every step draws from torch's global generator (dropout),
    numpy's global generator and Python's ``random`` (none of them seeded per epoch)."""
    torch.manual_seed(0)  # a fresh process: the trainer seeds once, builds the model, then fit resumes
    np.random.seed(0)
    random.seed(0)
    model = Dropper()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    spec = RunSpec(out, "test.dropper@1", {"epochs": epochs}, {}, kind="runs/dropper")
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

    def batches(rng):
        perm = rng.permutation(64)
        return [perm[i:i + 8] for i in range(0, 64, 8)]

    def step(rows, gen):
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        return ((model(x[rows] * scale) - y[rows]) ** 2).mean(), len(rows)

    if state == "resume":
        state = spec.resumable_state()
        assert state is not None
    return fit(model, opt, spec, epochs=epochs, seed=0, batches=batches, train_step=step, state=state)


def test_resume_is_bit_identical_with_dropout(tmp_path):
    _fit_dropper(tmp_path / "straight")
    progress.set_tracker(interrupt_in_epoch(2, after_steps=3))
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit_dropper(tmp_path / "killed")
    finally:
        progress.set_tracker(None)
    assert load_weights(tmp_path / "killed" / CHECKPOINT_FILE)["epoch"] == 1
    torch.manual_seed(123)  # the process that resumes has drawn other numbers before
    np.random.seed(123)
    random.seed(123)
    fr = _fit_dropper(tmp_path / "killed", state="resume")
    assert fr.resumed_from == 1
    assert (tmp_path / "killed" / MODEL_FILE).read_bytes() == (tmp_path / "straight" / MODEL_FILE).read_bytes()
    ckpt = torch.load(tmp_path / "killed" / CHECKPOINT_FILE, weights_only=True)  # still loads safely
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}


def test_cmrin_resume_is_identical_with_default_dropout(cache):
    cfg = dict(TINY_CMRIN, epochs=3)
    assert CMRINConfig(**cfg).dropout > 0
    a = train_cmrin("synth", cache, "a", CMRINConfig(**cfg), seed=3)
    progress.set_tracker(interrupt_in_epoch(2, after_steps=1))
    try:
        with pytest.raises(KeyboardInterrupt):
            train_cmrin("synth", cache, "b", CMRINConfig(**cfg), seed=3)
    finally:
        progress.set_tracker(None)
    b = train_cmrin("synth", cache, "b", CMRINConfig(**cfg), seed=3)
    assert b["resumed_from"] == 1
    # The last epoch's weights (model.pt holds the best epoch, which may be epoch 1 on this tiny world).
    wa = load_weights(Path(a["run"]) / CHECKPOINT_FILE)["model"]
    wb = load_weights(Path(b["run"]) / CHECKPOINT_FILE)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [e["loss"] for e in a["curve"]["epochs"]] == [e["loss"] for e in b["curve"]["epochs"]]
    assert (Path(a["run"]) / MODEL_FILE).read_bytes() == (Path(b["run"]) / MODEL_FILE).read_bytes()


# ------------------------------------------------------------------ case 7e: NaN features, NaN loss
def test_nan_features_are_refused_by_train_and_eval(cache, tiny_cfg, capsys):
    run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R")
    f = features_file(cache)
    size = f.stat().st_size
    with h5py.File(f, "r+") as h:
        h["objects/features"][...] = np.nan
    assert f.stat().st_size == size
    forget_content_record(f.with_name(f.name + ".manifest.json"))
    err = fail(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R2")
    assert str(f) in err and "objects/features" in err and "NaN" in err
    assert "`refground extract --max-proposals 20 --no-dense --force`" in err  # as the fixture made it
    assert not run_dir("synth", cache, "R2").exists() or not (run_dir("synth", cache, "R2") / MODEL_FILE).exists()
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")
    assert str(f) in err and "refground extract" in err
    # The advice repairs it.
    run_json(capsys, "extract", "--cache", str(cache), "--max-proposals", "20", "--no-dense", "--force")
    run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R2")


def test_inf_in_proposal_features_is_refused(cache, synth_ds):
    from refground.grounding.candidates import load_candidates

    f = features_file(cache)
    with h5py.File(f, "r+") as h:
        feats = h["proposals/features"][...]
        feats[-1, -1] = np.inf  # one value, in the last image's proposals
        h["proposals/features"][...] = feats
    forget_content_record(f.with_name(f.name + ".manifest.json"))
    load_candidates(synth_ds, f, "gt")  # ground-truth features are fine
    with pytest.raises(ArtifactError, match="proposals/features holds NaN or Inf"):
        load_candidates(synth_ds, f, "proposals", top_n=100)


def test_all_finite_checks_every_block(monkeypatch):
    import refground.grounding.candidates as C

    monkeypatch.setattr(C, "FINITE_BLOCK", 7)
    a = np.zeros((10, 5), np.float16)
    assert C.all_finite(a)
    a[9, 4] = np.nan
    assert not C.all_finite(a)
    assert C.all_finite(np.zeros(3, np.int64))


def test_non_finite_loss_stops_training(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = RunSpec(tmp_path / "synth" / "runs" / "toy" / "nan", "test.toy@1", {}, {}, kind="runs/toy")
    spec.out_dir.mkdir(parents=True)
    calls = {"n": 0}

    def step(rows, gen):
        calls["n"] += 1
        loss = model(torch.ones(1, 2)).sum() ** 2
        return (loss * float("nan") if calls["n"] == 6 else loss), 1

    with pytest.raises(NonFiniteLossError) as exc:
        fit(model, opt, spec, epochs=3, seed=0, batches=lambda rng: [0, 1, 2, 3], train_step=step)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert str(spec.out_dir) in msg and "nan at epoch 2, step 6" in msg
    assert "`refground train toy --run nan --force`" in msg
    assert load_weights(spec.out_dir / CHECKPOINT_FILE)["epoch"] == 1  # the last good epoch stays
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no step was taken with the NaN


# -------------------------------------------------------------------- case 7f: truncated weights
def test_truncated_weights_are_one_line_errors(cache, tiny_cfg, capsys, tmp_path):
    run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R")
    run = run_dir("synth", cache, "R")
    os.truncate(run / MODEL_FILE, (run / MODEL_FILE).stat().st_size // 2)
    forget_content_record(run / "manifest.json")  # so the run passes its manifest checks: only torch.load fails
    remedy = "`refground train cmrin --run R --force`"
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")
    assert str(run / MODEL_FILE) in err and remedy in err
    err = fail(capsys, "show", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val",
               "--out", str(tmp_path / "x.png"))
    assert str(run / MODEL_FILE) in err and remedy in err

    # A truncated checkpoint: a one-line error where it is read, and simply not resumable.
    ck = run / CHECKPOINT_FILE
    os.truncate(ck, ck.stat().st_size // 3)
    with pytest.raises(ArtifactError, match=f"{ck}: unreadable .*{remedy}"):
        load_weights(ck)
    spec = RunSpec(run, "train.cmrin@1", {}, {}, kind="runs/cmrin")
    assert spec.resumable_state() is None
    # The advice repairs it.
    run_json(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R", "--force")
    run_json(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")


def test_truncated_weights_with_content_record_are_retrained_by_the_advised_command(cache, tiny_cfg, capsys):
    """The usual case (the manifest records model.pt's size): eval names the file and `train` without --force,
    which used to answer "cache hit", retrains the damaged run."""
    args = ("train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R")
    run_json(capsys, *args)
    run = run_dir("synth", cache, "R")
    os.truncate(run / MODEL_FILE, (run / MODEL_FILE).stat().st_size // 2)
    err = fail(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")
    assert f"{run / MODEL_FILE}: " in err and "run `refground train cmrin --run R`" in err
    assert run_json(capsys, *args)["cache_hit"] is False
    run_json(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")


# ----------------------------------------------------------------------------------- 11f: one writer
def test_training_and_predicting_refuse_a_locked_artifact(cache, tiny_cfg, capsys):
    from refground.cache.lock import is_locked
    from refground.grounding.candidates import CandidateSpec
    from refground.methods.cmrin.run import predictions_path

    args = ["train", "cmrin", "--cache", str(cache), "--config", str(tiny_cfg), "--run", "R"]
    run = run_dir("synth", cache, "R")
    with lock_held_elsewhere(run):
        err = fail(capsys, *args)
        assert str(run) in err and "another process is writing it" in err
        assert not (run / "manifest.json").exists()  # refused before writing anything
    run_json(capsys, *args)
    assert not is_locked(run)  # released after training

    path = predictions_path(run, "val", CandidateSpec())
    with lock_held_elsewhere(path):
        err = fail(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")
        assert str(path) in err and "another process is writing it" in err
        assert not path.exists()
    run_json(capsys, "eval", "--method", "cmrin", "--run", "R", "--cache", str(cache), "--split", "val")
    assert path.is_file() and not is_locked(path)


def test_training_lock_is_released_on_error(cache):
    from refground.cache.lock import is_locked

    train_cmrin("synth", cache, "R", CMRINConfig(**TINY_CMRIN), seed=0)
    with pytest.raises(ArtifactError):  # refused, inside the lock: a finished run of other settings
        train_cmrin("synth", cache, "R", CMRINConfig(**{**TINY_CMRIN, "lr": 0.001}), seed=0)
    assert not is_locked(run_dir("synth", cache, "R"))


def test_finished_detector_run_of_other_settings_is_refused(tmp_path, synth_ds, synth_cache, torch_one_thread):
    """The detector goes through the same RunSpec.start as the methods: its finished run is not retrained
    in place with other settings either."""
    from refground.features.detector_train import train_detector
    from test_detector import tiny_config

    run = tmp_path / "synth" / "runs" / "detector" / "d"
    ds_dir = synth_cache / "synth" / "dataset"
    train_detector(synth_ds, run, tiny_config(epochs=1), seed=0, dataset_dir=ds_dir, evaluate=False)
    before = (run / MODEL_FILE).read_bytes()
    with pytest.raises(ArtifactError, match="holds a finished detector run of other settings .*--force"):
        train_detector(synth_ds, run, tiny_config(epochs=2), seed=0, dataset_dir=ds_dir, evaluate=False)
    assert (run / MODEL_FILE).read_bytes() == before
    hit = train_detector(synth_ds, run, tiny_config(epochs=1), seed=0, dataset_dir=ds_dir, evaluate=False)
    assert hit["cache_hit"] and hit["epochs"] == 1
