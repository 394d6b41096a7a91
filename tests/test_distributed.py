"""Distributed training (refground.distributed, refground.train.fit under a process group): the no-op helpers
of a single process, the batch shards, gradient averaging, and `refground train cmrin` on 2 gloo processes
under torchrun (determinism, rank 0 alone writing and printing, resume after a kill)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CMRIN, fail
from refground import distributed
from refground.cache.manifest import read_manifest_of
from refground.errors import ArtifactError, UsageError
from refground.methods.cmrin.run import load_run, run_dir
from refground.train import CHECKPOINT_FILE, MODEL_FILE, RunSpec, epoch_rng, fit, load_weights

BIN = Path(sys.executable).parent
TORCHRUN, REFGROUND = BIN / "torchrun", BIN / "refground"
needs_torchrun = pytest.mark.skipif(not (TORCHRUN.exists() and REFGROUND.exists() and torch.distributed.is_available()),
                                    reason="torchrun or the refground script is not beside the interpreter")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")


def clean_env() -> dict[str, str]:
    """This environment without torchrun's variables (a test may itself run under a launcher)."""
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}


def torchrun(*args: str, python: bool = False) -> list[str]:
    """The command line of 2 processes on this machine; ``--`` keeps refground's ``--run`` from torchrun's
    option parser (which would take it for an abbreviation of its ``--run-path``)."""
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *([] if python else ["--no-python"]), "--",
            *args]


# ------------------------------------------------------------------------------ one process: no-ops
def test_without_a_process_group_every_helper_is_local(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_from_env()
    with distributed.from_env() as several:
        assert several is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    obj = {"a": torch.ones(2)}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.all_gather_object(obj) == [obj]
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.on_main(lambda: 7) == 7
    with pytest.raises(ArtifactError, match="boom"):
        distributed.on_main(lambda: (_ for _ in ()).throw(ArtifactError("boom")))
    exc = UsageError("x")
    assert distributed.fail_together(exc) is exc


def test_torchrun_environment_errors_are_one_line_usage_errors(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="without LOCAL_RANK, MASTER_ADDR, MASTER_PORT.*torchrun"):
        distributed.init_from_env()


def test_exit_codes_of_failures_on_rank_0():
    assert distributed.exit_code_of(ArtifactError("x")) == 2
    assert distributed.exit_code_of(KeyboardInterrupt()) == 130
    assert distributed.exit_code_of(RuntimeError("bug")) == 1
    quiet = distributed.FailedOnMain(2)
    assert quiet.exit_code == 2 and quiet.quiet


@pytest.mark.parametrize("make", [np.arange, lambda n: list(range(n)), torch.arange])
def test_shards_are_disjoint_nearly_equal_and_cover_the_batch(make):
    for world in (1, 2, 3, 4):
        for n in range(world, 12):
            parts = [distributed.shard(make(n), r, world) for r in range(world)]
            sizes = [len(p) for p in parts]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert [int(v) for p in parts for v in p] == list(range(n))  # in order: disjoint and complete


def test_fit_without_a_process_group_is_the_plain_loop(tmp_path):
    """No sharding, no generator of its own, no reseeding, no extra draws (TensorBoard included): fit's
    weights equal those of the documented loop, byte for byte, and nothing distributed is recorded."""
    def make():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g)

    def batches(rng):
        perm = rng.permutation(40)
        return [perm[i:i + 8] for i in range(0, 40, 8)]

    def step_of(model):
        def step(rows, gen):
            noise = torch.rand(len(rows), 1, generator=gen)  # the epoch generator, continued by the steps
            return ((model(x[rows]) + 0.1 * noise - y[rows]) ** 2).mean(), len(rows)
        return step

    model, opt = make()
    spec = RunSpec(tmp_path / "run", "test.plain@1", {"epochs": 3}, {}, kind="runs/plain")
    spec.out_dir.mkdir(parents=True)
    fr = fit(model, opt, spec, epochs=3, seed=5, batches=batches, train_step=step_of(model))

    ref, ref_opt = make()
    step = step_of(ref)
    for epoch in range(3):
        rng, gen = epoch_rng(5, epoch)
        ref.train()
        for rows in batches(rng):
            loss, _ = step(rows, gen)
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()
    ckpt = load_weights(spec.out_dir / CHECKPOINT_FILE)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in ref.state_dict().items())
    assert fr.items == 120 and fr.steps == 15
    assert "world_size" not in spec.params and "rng_ranks" not in ckpt and ckpt["world_size"] == 1


# ------------------------------------------------------------------------- 2 processes under torchrun
TOY = textwrap.dedent('''
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from refground import distributed
    from refground.train import RunSpec, fit

    out = Path(sys.argv[1])
    with distributed.from_env():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        spec = RunSpec(out / "run", "test.toy@1", {}, {}, kind="runs/toy")
        seen = []

        def step(rows, gen):
            seen.extend(rows.tolist())
            return ((model(x[rows]) - y[rows]) ** 2).mean(), len(rows)

        with spec.lock():
            spec.begin({}, None, resume=False, force=False)
            # one batch of 8, then one of a single item: too small to split, left out by both ranks
            fr = fit(model, opt, spec, epochs=1, seed=0, batches=lambda rng: [np.arange(8), np.arange(1)],
                     train_step=step)
        weights = {k: v.clone() for k, v in model.state_dict().items()}

        def outcome(fn):
            try:
                fn()
            except BaseException as exc:
                return [type(exc).__name__, distributed.exit_code_of(exc), bool(getattr(exc, "quiet", False))]

        # A failure of rank 0 at a shared decision reaches rank 1 as a quiet error with its exit code.
        failed = outcome(lambda: distributed.on_main(lambda: spec.out_dir.joinpath("missing").read_text()))

        # A NaN loss on rank 1 alone stops both (the losses are summed over the ranks before any step).
        def nan_on_rank_1(rows, gen):
            loss = ((model(x[rows]) - y[rows]) ** 2).mean()
            return (loss * float("nan") if distributed.rank() == 1 else loss), len(rows)

        nan = outcome(lambda: fit(model, opt, RunSpec(out / "nan", "test.toy@1", {}, {}, kind="runs/toy"), epochs=1,
                                  seed=0, batches=lambda rng: [np.arange(8)], train_step=nan_on_rank_1))
        torch.save({"weights": weights, "seen": seen, "items": fr.items, "steps": fr.steps, "params": spec.params,
                    "failed": failed, "nan": nan}, out / f"rank{distributed.rank()}.pt")
''')


@needs_torchrun
def test_gradients_are_averaged_over_the_ranks(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    proc = subprocess.run(torchrun(str(script), str(tmp_path), python=True), env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["seen"] == [0, 1, 2, 3] and r1["seen"] == [4, 5, 6, 7]  # disjoint halves; the 1-item batch left out
    assert r0["items"] == r1["items"] == 8 and r0["steps"] == 1 and r0["params"] == {"world_size": 2}
    assert r0["failed"] == ["FileNotFoundError", 1, False] and r1["failed"] == ["FailedOnMain", 1, True]
    assert r0["nan"] == ["NonFiniteLossError", 2, False] and r1["nan"] == ["FailedOnMain", 2, True]

    def sgd_step(rows):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        ((m(x[rows]) - y[rows]) ** 2).mean().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
        return m.state_dict()

    full, local = sgd_step(np.arange(8)), sgd_step(np.arange(4))
    for k in full:
        assert torch.equal(r0["weights"][k], r1["weights"][k])  # the ranks agree, bit for bit
        torch.testing.assert_close(r0["weights"][k], full[k], rtol=0, atol=1e-6)  # the full batch's step
        assert not torch.allclose(r0["weights"][k], local[k], atol=1e-3)  # not rank 0's own half's step
    assert {f.name for f in (tmp_path / "run").iterdir() if f.is_file()} == {
        "manifest.json", "config.json", "model.pt", "curve.json", "checkpoint.pt"}  # rank 0's, written once


@pytest.fixture
def cache(pipeline_cache, tmp_path) -> Path:
    return Path(shutil.copytree(pipeline_cache, tmp_path / "cache"))


def train_args(cache: Path, cfg: Path, run: str) -> list[str]:
    return [str(REFGROUND), "train", "cmrin", "--cache", str(cache), "--config", str(cfg), "--run", run, "--json"]


def run_files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts}


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each in a session of its own) and torchrun (started in a session of its own):
    nothing unwinds. The walk over /proc is examples/kill_resume.py's, which kills the same way."""
    import importlib.util

    script = Path(__file__).parents[1] / "examples" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("kill_resume", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.torchrun_workers(proc) or proc.poll() is not None, "no torchrun workers found"
    module.kill_tree(proc)
    proc.wait(timeout=30)


@needs_torchrun
def test_two_process_cmrin_is_deterministic_writes_once_and_resumes_after_a_kill(cache, tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(TINY_CMRIN, epochs=3, batch_size=4)))
    proc = subprocess.run(torchrun(*train_args(cache, cfg, "a")), env=clean_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout)  # one JSON object: rank 1 printed nothing
    assert "error" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    a = run_dir("synth", cache, "a")
    assert first["world_size"] == 2 and first["resumed_from"] == 0 and first["threads"] == 1
    m = read_manifest_of(a)
    assert m.complete and m.params["world_size"] == 2 and m.extra["world_size"] == 2
    assert run_files(a) == {"checkpoint.pt", "config.json", "curve.json", "manifest.json", "metrics.json",
                            "model.pt", "vocab.json"}  # nothing else, no leftovers of a second writer
    assert any((a / "tensorboard").iterdir())
    assert load_run(a).params["world_size"] == 2  # loadable like any run
    ckpt = load_weights(a / CHECKPOINT_FILE)
    assert len(ckpt["rng_ranks"]) == 2 and not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])

    # A real interruption: every process killed once the first checkpoint exists, then the same command. Its
    # weights equal run a's, byte for byte: the epochs before the kill ran in another launch than a's (same
    # seed, same world size: same weights), the rest after a resume.
    proc = subprocess.Popen(torchrun(*train_args(cache, cfg, "c")), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    c = run_dir("synth", cache, "c")
    try:
        deadline = time.monotonic() + 120
        while not (c / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        kill_all(proc)
    assert not read_manifest_of(c).complete, "the run finished before it could be killed"
    proc = subprocess.run(torchrun(*train_args(cache, cfg, "c")), env=clean_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout)
    assert 1 <= resumed["resumed_from"] < 3
    assert (c / MODEL_FILE).read_bytes() == (a / MODEL_FILE).read_bytes()
    wa, wc = load_weights(a / CHECKPOINT_FILE)["model"], load_weights(c / CHECKPOINT_FILE)["model"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)

    # A 2-process run is another artifact: one process neither hits nor silently replaces it.
    err = fail(capsys, "train", "cmrin", "--cache", str(cache), "--config", str(cfg), "--run", "a")
    assert "world_size: 2 -> unset" in err and "--force" in err


def test_a_quiet_failure_prints_nothing_and_keeps_the_exit_code(cache, tmp_path, capsys, monkeypatch):
    """What rank 1 does when rank 0 failed at a shared decision: exit with rank 0's code, print nothing."""
    import refground.methods.cmrin.run as cmrin_run
    from refground.cli.main import main

    def refused(*args, **kwargs):
        raise distributed.FailedOnMain(2)

    monkeypatch.setattr(cmrin_run, "train_cmrin", refused)
    assert main(["train", "cmrin", "--cache", str(cache), "--run", "x"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
