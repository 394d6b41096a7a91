"""One seeded training loop for the methods and the built-in detector: run folders, epoch checkpoints, resume,
curves, best-on-val.

A run folder (``<cache>/<dataset>/runs/<method>/<name>/``) holds::

    manifest.json     step, params, parent fingerprints, complete flag (written first incomplete, last complete)
    config.json       the resolved model config (and anything else the method saves beside it)
    checkpoint.pt     after every epoch: model, optimizer, epoch, best score so far (atomic rewrite)
    model.pt          the weights to use: those of the best epoch on the selection metric (else the last)
    curve.json        {"steps": [{"step", "epoch", "loss"}...], "epochs": [{"epoch", "loss", "seconds", **val}...]}
    metrics.json      the method's final figures

Randomness is derived from (seed, epoch) for every epoch (batch order, negative draws), and every epoch
checkpoint also holds the global random states a training step may draw from besides (torch's CPU and CUDA
generators, which dropout uses; numpy's and Python's), restored before the first resumed epoch: so a run
resumed after its last finished epoch produces the same weights, byte for byte, as an uninterrupted one. An
interrupted epoch is redone from the start; ``checkpoint.pt`` is only ever replaced whole.

A run folder is written by one process at a time (:meth:`RunSpec.lock`), and a complete run is never
retrained with other settings or inputs unless asked (``force``): :meth:`RunSpec.start` refuses it with the
difference, so a finished model is not lost to a mistyped option.

Under torchrun (a process group of :mod:`refground.distributed`), :func:`fit` trains with
DistributedDataParallel: every process draws the same batches and trains on its own slice of each
(:func:`refground.distributed.shard`), the gradients are averaged, and rank 0 alone holds the lock and writes
the run folder (manifests, config, vocabulary, checkpoints, weights, curve, metrics); the others write
nothing. The number of processes is a run parameter (``world_size``, recorded only above 1, so single-process
fingerprints are unchanged): the weights depend on it, so a run of another world size is another artifact
(never a cache hit, and its checkpoint is not resumed: training starts afresh with a warning). For a fixed
world size the same seed gives the same weights, and a resumed run the weights of an uninterrupted one (the
checkpoint holds every rank's random states).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground import distributed
from refground.atomic import atomic_file
from refground.cache import fingerprint, is_current, write_manifest
from refground.cache.listing import retrain_command
from refground.cache.manifest import Parent, parent_fingerprints, read_manifest_of
from refground.errors import ArtifactError, UsageError
from refground.progress import track
from refground.tensorboard_log import open_curve_log

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
CURVE_FILE = "curve.json"
METRICS_FILE = "metrics.json"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
STEP_LOG_EVERY = 20
logger = logging.getLogger("refground")


def run_names(text: str | None) -> tuple[str, ...] | None:
    """The run names of a comma-separated ``--runs`` value (None when not given)."""
    return tuple(r.strip() for r in text.split(",") if r.strip()) if text else None



def read_json(path: Path) -> Any:
    """The JSON content of ``path``, or None when missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(Path(path)) as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)


class NonFiniteLossError(ArtifactError):
    """The training loss became NaN or Inf: damaged inputs, or a learning rate too high (exit 2)."""


def load_weights(path: Path, remedy: str | None = None) -> dict[str, Any]:
    """A checkpoint or weights file, loaded safely (tensors and plain containers only).

    A missing, truncated or otherwise unreadable file is a one-line ArtifactError naming it and ``remedy``
    (default: :func:`retrain_command` of the run folder it sits in)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and zip errors come in many types (OSError, RuntimeError, ...)
        what = "missing" if isinstance(exc, FileNotFoundError) else \
            f"unreadable ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]})"
        raise ArtifactError(f"{path}: {what}; run `{remedy or retrain_command(path.parent)}`") from None


def step_decay(lr: float, decay_epochs: int) -> Callable[[int], float]:
    """``lr_at(epoch)`` for :func:`fit`: ``lr``, divided by 10 from epoch ``decay_epochs`` on (0: never)."""
    def lr_at(epoch: int) -> float:
        return lr * 0.1 if decay_epochs and epoch >= decay_epochs else lr
    return lr_at


def complete_run(path: Path, method: str) -> Any:
    """The manifest of a complete run folder of ``method`` with its config and weights, else a one-line
    ArtifactError naming ``refground train <method> --run <run>``."""
    from refground.cache import require
    from refground.errors import ArtifactError

    # With --dataset when the run is another dataset's than the default one.
    retrain = retrain_command(path).replace("train <method>", f"train {method}")
    m = require(path, retrain.removesuffix(" --force"))
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise ArtifactError(f"{path}: run without config or weights; run `{retrain}`")
    return m


@dataclass
class LoadedRun:
    """A trained run: its folder, model (eval mode, best weights), vocabulary (None for a method that saves
    none), config and manifest params."""

    path: Path
    model: torch.nn.Module
    vocab: Any
    config: Any
    params: dict[str, Any]
    fingerprint: str


def load_run_folder(path: Path, method: str, config_from_dict: Callable[[dict[str, Any]], Any],
                    build: Callable[[Any], torch.nn.Module]) -> LoadedRun:
    """Load a complete run folder of ``method``: its config (``config_from_dict`` of config.json), the model
    ``build(config)`` with the best weights (eval mode) and the vocabulary (vocab.json, where the method saved
    one). A missing, interrupted or unreadable run is a one-line ArtifactError."""
    from refground.errors import ArtifactError
    from refground.text.vocab import Vocabulary

    path = Path(path)
    m = complete_run(path, method)
    cfg = read_json(path / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path / CONFIG_FILE}: unreadable; "
                            f"run `refground train {method} --run {path.name} --force`")
    remedy = retrain_command(path)
    try:
        config = config_from_dict(cfg)
    except (TypeError, ValueError, UsageError) as exc:
        raise ArtifactError(f"{path / CONFIG_FILE}: not a {method} config of this version ({exc}); "
                            f"run `{remedy}`") from None
    model = build(config)
    weights = load_weights(path / MODEL_FILE, remedy)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:  # another architecture's or a damaged state dict
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ArtifactError(f"{path / MODEL_FILE}: its weights do not fit {path / CONFIG_FILE} ({first}); "
                            f"run `{remedy}`") from None
    model.eval()
    vocab = Vocabulary.load(path / VOCAB_FILE) if (path / VOCAB_FILE).is_file() else None
    return LoadedRun(path, model, vocab, config, m.params, m.fingerprint)


def epoch_rng(seed: int, epoch: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one epoch (independent of how many epochs ran before)."""
    return (np.random.default_rng([int(seed), int(epoch), 1]),
            torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch)))


_MISSING = object()


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``{"config.lr": 0.001, "seed": 0, ...}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["lr: 0.0005 -> 0.001", "seed: 0 -> 1", ...]``: the parameters that differ between two runs (model
    config fields without their ``config.`` prefix; ``unset`` where one run has no such parameter)."""
    a, b = _flat_params(old), _flat_params(new)

    def show(v: Any) -> str:
        return "unset" if v is _MISSING else json.dumps(v)

    return [f"{k.removeprefix('config.')}: {show(a.get(k, _MISSING))} -> {show(b.get(k, _MISSING))}"
            for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]


@dataclass
class RunSpec:
    """What identifies a run: its folder, step name, parameters and inputs (their fingerprints chain).

    A trainer holds :meth:`lock` from :meth:`start` to :meth:`finish`; :meth:`start` refuses to retrain a
    complete run made with other settings (:meth:`check_overwrite`), :meth:`begin` opens the folder,
    :func:`fit` trains, :meth:`finish` marks it complete.
    """

    out_dir: Path
    step: str
    params: dict[str, Any]
    parents: dict[str, Parent]
    kind: str
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        world = distributed.world_size()
        if world > 1:  # absent means one process: the fingerprints of single-process runs stay what they were
            self.params = {**self.params, "world_size": world}
        self.fingerprint = fingerprint(self.step, self.params, parent_fingerprints(self.parents))

    @property
    def method(self) -> str:
        """The method (or ``detector``) of the run: the last part of ``kind`` (``runs/cmrin`` -> ``cmrin``)."""
        return self.kind.rsplit("/", 1)[-1] or "<method>"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder's writer lock (:func:`refground.cache.lock.artifact_lock`) for the block: a
        second process training (or force-retraining) the same run is refused with a one-line ArtifactError
        instead of interleaving its checkpoints with this one's. Released on any exit, an error included.

        Under a process group rank 0 alone holds it (the others write nothing); a refusal stops every rank."""
        from refground.cache.lock import artifact_lock

        with contextlib.ExitStack() as stack:
            distributed.on_main(lambda: stack.enter_context(artifact_lock(self.out_dir)))
            yield

    def is_complete(self) -> bool:
        """A complete run with this fingerprint, its weights and metrics present."""
        return (is_current(self.out_dir, self.fingerprint) and (self.out_dir / MODEL_FILE).is_file()
                and (self.out_dir / METRICS_FILE).is_file())

    def mark(self, complete: bool, extra: dict[str, Any] | None = None) -> None:
        """Write the run's manifest (rank 0 only)."""
        if not distributed.is_main():
            return
        write_manifest(self.out_dir, step=self.step, params=self.params, parents=self.parents,
                       fingerprint=self.fingerprint, complete=complete, kind=self.kind, extra=extra)

    def check_overwrite(self, force: bool) -> None:
        """Refuse (one-line ArtifactError, exit 2) to retrain, without ``force``, a *complete* run folder whose
        fingerprint differs from this one: it holds a finished model of other settings or inputs, which
        training here would replace. The message lists what differs (parameters ``old -> new``, or the inputs
        that changed) and the ways out: ``--force`` (retrain in place) or another ``--run``.

        A complete run with this very fingerprint is never refused (a damaged one is retrained or resumed in
        place: same settings, nothing else to lose), nor is an interrupted one (it holds no finished model)."""
        if force:
            return
        m = read_manifest_of(self.out_dir)
        if m is None or not m.complete or m.fingerprint == self.fingerprint:
            return
        what = params_difference(m.params, self.params)
        if m.step != self.step:
            what.insert(0, f"step: {m.step} -> {self.step}")
        now = parent_fingerprints(self.parents)
        inputs = sorted(r for r in set(now) | set(m.parents)
                        if r not in now or r not in m.parents or m.parents[r].fingerprint != now[r])
        if len(what) > 4:
            what = what[:4] + [f"and {len(what) - 4} more"]
        if what:
            kind = "of other settings"
            if inputs:
                what.append(f"inputs changed: {', '.join(inputs)}")
        elif inputs:
            kind, what = "of the same settings on other inputs", [f"{', '.join(inputs)} changed since"]
        else:  # e.g. made by a library version whose fingerprints hash differently
            kind, what = "with another fingerprint", [f"{m.fingerprint[:12]} -> {self.fingerprint[:12]}"]
        raise ArtifactError(f"{self.out_dir}: holds a finished {self.method} run {kind} ({'; '.join(what)}), "
                            "which training would overwrite; add --force to retrain it in place, or train into a "
                            "new --run NAME")

    def resumable_state(self) -> dict[str, Any] | None:
        """The last epoch checkpoint of an interrupted run with the same fingerprint, else None.

        A resume keeps the weights of the best epoch so far (model.pt) and the curve so far (curve.json), so
        both must be readable too: a damaged one makes the run start afresh rather than finish with it."""
        path = self.out_dir / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            state = load_weights(path)
        except ArtifactError:  # an unreadable checkpoint is simply not resumable
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            old, now = int(state.get("world_size", 1)) if isinstance(state, dict) else 1, distributed.world_size()
            if old != now:
                logger.warning(f"{path}: a checkpoint of a run on {old} process(es); training starts afresh on "
                               f"{now} (the number of processes is a setting of the run)")
            return None
        try:
            done = int(state["epoch"])
            if int(state.get("best_epoch", 0)) > 0:
                load_weights(self.out_dir / MODEL_FILE)
        except (ArtifactError, KeyError, TypeError, ValueError):
            return None
        curve = read_json(self.out_dir / CURVE_FILE)
        rows = curve.get("epochs") if isinstance(curve, dict) else None
        epochs = {r.get("epoch") for r in rows if isinstance(r, dict)} if isinstance(rows, list) else set()
        # The curve goes with the state: processes on other machines may not see the run folder.
        return {**state, "curve": curve} if set(range(1, done + 1)) <= epochs else None

    def start(self, name: str, force: bool, started: float | None = None) -> dict[str, Any]:
        """The run's summary so far, ``{"run", "name", "fingerprint", "cache_hit"}``; for a complete run with this
        fingerprint (and not ``force``) ``cache_hit`` is True and its cached figures are merged in, with
        ``seconds`` since ``started`` (a ``time.perf_counter()`` value) where given, so the trainer returns it
        as it is, without training. A complete run of other settings is refused (:meth:`check_overwrite`).
        Call it holding :meth:`lock`; rank 0 decides for every rank."""
        result = distributed.on_main(lambda: self._start(name, force))
        if result["cache_hit"] and started is not None:
            result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    def _start(self, name: str, force: bool) -> dict[str, Any]:
        result: dict[str, Any] = {"run": str(self.out_dir), "name": name, "fingerprint": self.fingerprint,
                                  "cache_hit": False}
        cached = None if force else self.cached_summary()
        if cached is not None:
            result.update(cached)
        else:
            self.check_overwrite(force)
        return result

    def cached_summary(self) -> dict[str, Any] | None:
        """``{"cache_hit": True, "metrics", **manifest extra}`` of a complete run, else None."""
        if not self.is_complete():
            return None
        extra = (read_json(self.out_dir / "manifest.json") or {}).get("extra", {})
        return {"cache_hit": True, "metrics": read_json(self.out_dir / METRICS_FILE) or {}, **extra}

    def begin(self, config: dict[str, Any], vocab: Any, resume: bool, force: bool) -> dict[str, Any] | None:
        """Open the run folder for training (after :meth:`start`, which refused a complete run of other settings):
        mark it incomplete, write config.json and, where the method has a vocabulary (``vocab`` not None),
        vocab.json; returns the checkpoint to resume from (None for a fresh start, or with ``force`` / without
        ``resume``). Call it holding :meth:`lock`. Rank 0 writes and finds the checkpoint; every rank gets it."""
        def open_folder() -> dict[str, Any] | None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            state = self.resumable_state() if resume and not force else None
            self.mark(complete=False)
            write_json(self.out_dir / CONFIG_FILE, config)
            if vocab is not None:
                vocab.save(self.out_dir / VOCAB_FILE)
            return state

        return distributed.on_main(open_folder)

    def finish(self, fr: "FitResult", epochs: int, items: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write metrics.json and the complete manifest after :func:`fit`; returns the summary of the run
        (``resumed_from``, ``best_epoch``, ``metrics``, ``curve``, timing and counts, ``world_size``); rank 0
        writes."""
        extra = {"train_seconds": round(fr.train_seconds, 2), "queries_per_s": round(fr.items_per_s, 1),
                 "epochs_trained_now": epochs - fr.resumed_from, "steps": fr.steps,
                 "threads": torch.get_num_threads(), "train_queries": int(items),
                 "world_size": distributed.world_size()}

        def write() -> None:
            write_json(self.out_dir / METRICS_FILE, metrics)
            self.mark(complete=True, extra=extra)

        distributed.on_main(write)
        return {"resumed_from": fr.resumed_from, "best_epoch": fr.best_epoch, "metrics": metrics, "curve": fr.curve,
                **extra}


def config_params(config: dict[str, Any], derived: tuple[str, ...] = ("vocab_size", "visual_dim")) -> dict[str, Any]:
    """A model config as run parameters: without the fields derived from the data (vocabulary size, feature
    width), which the inputs' fingerprints already cover."""
    return {k: v for k, v in config.items() if k not in derived}


def check_training_fields(**fields: Any) -> dict[str, Any]:
    """The config fields given (None: not given), checked with the option's name in the error: ``epochs``,
    ``batch_size`` and ``layers`` at least 1, ``input_size`` (the detector's) at least 32, ``lr`` positive,
    ``lr_decay_epochs`` at least 0."""
    given = {k: v for k, v in fields.items() if v is not None}
    for key, ok, rule in (("epochs", lambda v: v >= 1, "must be at least 1"),
                          ("batch_size", lambda v: v >= 1, "must be at least 1"),
                          ("layers", lambda v: v >= 1, "must be at least 1"),
                          ("input_size", lambda v: v >= 32, "must be at least 32"),
                          ("lr", lambda v: v > 0, "must be positive"),
                          ("lr_decay_epochs", lambda v: v >= 0, "must be at least 0")):
        if key in given and not ok(given[key]):
            raise UsageError(f"--{key.replace('_', '-')} {given[key]}: {rule}")
    return given


def config_of(from_dict: Callable[[dict[str, Any]], Any], fields: dict[str, Any], what: str) -> Any:
    """``from_dict(fields)``; a field the config does not take, or a bad value, is a one-line UsageError naming
    ``what`` (e.g. the --config file)."""
    try:
        return from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what}: {exc}") from None


def best_epoch_figures(fr: "FitResult") -> dict[str, Any]:
    """The ``val_*`` figures of the best epoch of ``fr``'s curve, without the prefix."""
    best = next((r for r in fr.curve["epochs"] if r["epoch"] == fr.best_epoch), {})
    return {k[4:]: v for k, v in best.items() if k.startswith("val_")}


def rng_state() -> dict[str, Any]:
    """Every global random state a training step may draw from, in a form ``torch.load(weights_only=True)``
    reads: ``torch`` (CPU generator, ByteTensor), ``cuda`` (one ByteTensor per device, only where CUDA is
    available and in use), ``numpy`` (the legacy global MT19937: ``keys`` int64[624], ``pos``, ``has_gauss``,
    ``cached_gaussian``) and ``python`` (``random``'s MT: ``version``, ``state`` int64[625], ``gauss_next``).

    The epoch generators of :func:`epoch_rng` cover what a method draws on purpose; these cover what library
    code draws behind its back (dropout, from torch's global generator)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)}}
    # Only once CUDA is in use: a CPU-only run on a GPU machine has drawn nothing there, and asking would
    # start a CUDA context for nothing.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global random states of :func:`rng_state` (CUDA ones on as many devices as both have)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for device in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][device], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))


@dataclass
class FitResult:
    epochs: int
    resumed_from: int
    best_epoch: int
    best_score: float | None
    steps: int
    train_seconds: float
    items_per_s: float
    curve: dict[str, list[dict[str, Any]]]
    items: int = 0  # trained now (this call), summed over the processes


class _Step(torch.nn.Module):
    """A training step as a module's forward, for DistributedDataParallel: its gradient hooks only average what
    a forward *of the wrapped module* computed, and the step closures call the raw model (or parts of it: the
    detector's losses never go through ``forward``). Wrapping the whole step makes every parameter use count."""

    def __init__(self, model: torch.nn.Module, step: Callable[[Any, torch.Generator], tuple[Any, ...]]) -> None:
        super().__init__()
        self.model = model
        self.step = step
        # Never used: DDP (find_unused_parameters) then always finds one unused parameter, instead of printing
        # on every rank that it found none. Not the model's, so neither in model.pt nor in the optimizer.
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch: Any, generator: torch.Generator) -> tuple[Any, ...]:
        return self.step(batch, generator)


def rank_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The torch generator a training step of ``rank`` draws from in ``epoch`` when several processes train
    (one process: the epoch's own, :func:`epoch_rng`): every rank draws other flips and negatives for its
    slice, and the draws do not depend on earlier epochs."""
    state = np.random.SeedSequence([int(seed), int(epoch), 2, int(rank)]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def _seed_rank_globals(seed: int, rank: int) -> None:
    """Other global random states per rank at a fresh start (dropout masks differ between the ranks' slices);
    the model is built before, from the same seed on every rank."""
    s = np.random.SeedSequence([int(seed), 3, int(rank)]).generate_state(3)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[2]))


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: RunSpec, *, epochs: int, seed: int,
        batches: Callable[[Any], Sequence[Any]],
        train_step: Callable[[Any, torch.Generator], tuple[Any, ...]],
        evaluate: Callable[[], dict[str, Any]] | None = None, select: str | None = None,
        lr_at: Callable[[int], float] | None = None, state: dict[str, Any] | None = None,
        description: str = "train", lr_at_step: Callable[[int], float] | None = None,
        clip_grad_norm: float | None = None, batch_rng: str = "numpy",
        shard: Callable[[Any, int, int], Any] | None = None) -> FitResult:
    """Train ``model`` for ``epochs`` epochs, checkpointing into ``spec.out_dir`` after each.

    ``batches(rng)`` gives one epoch's batches from the epoch's numpy generator (``batch_rng="torch"``: from
    its torch generator, which ``train_step`` then continues); ``train_step(batch, generator)`` returns
    (loss, items) for one batch, or (loss, items, parts) with ``parts`` named loss terms whose epoch means go
    into the curve's epoch rows (the loop does zero_grad / backward / optional ``clip_grad_norm`` / step).
    After each epoch ``evaluate()`` gives figures (e.g. val Precision@1) that go into the curve; the epoch
    with the highest ``figures[select]`` is kept as ``model.pt`` (without ``select``, the last epoch).
    ``lr_at(epoch)`` sets the learning rate of each epoch, ``lr_at_step(step)`` that of each step from the
    global step count (so a resumed run follows the same schedule; it is also logged in the step rows).
    ``state`` is a :meth:`RunSpec.resumable_state` to continue from; its global random states
    (:func:`rng_state`, saved with every epoch checkpoint) are restored before the first resumed epoch, so the
    resumed run draws what the uninterrupted one drew. A NaN or infinite loss stops training with a one-line
    :class:`NonFiniteLossError` naming the run, epoch and step (the run stays incomplete at its last
    checkpoint). With the ``tensorboard`` package the curve also goes to ``<run>/tensorboard/``
    (:mod:`refground.tensorboard_log`).

    Under a process group (:mod:`refground.distributed`, torchrun) the model trains wrapped in
    DistributedDataParallel: every rank draws the same batches, takes its slice ``shard(batch, rank, world)``
    of each (default :func:`refground.distributed.shard`: nearly equal consecutive slices of anything with
    ``len`` and slicing) and runs ``train_step`` on it with a generator of its own (:func:`rank_generator`);
    the gradients are averaged over the ranks, so the steps are the single process's with the mean of the
    slices' gradients. A batch with fewer items than processes is left out on every rank. The logged loss
    and terms are the means over the ranks (every rank's step returns the same term names), ``items`` their
    sum. Rank 0 alone evaluates (its figures go to
    every rank, so all keep the same best epoch) and writes; the checkpoint holds every rank's random states
    (``rng_ranks``), each rank restores its own.
    """
    if batch_rng not in ("numpy", "torch"):
        raise ValueError(f"batch_rng {batch_rng!r}: expected 'numpy' or 'torch'")
    out = spec.out_dir
    world, rank = distributed.world_size(), distributed.rank()
    start, steps, best_epoch, best_score = 0, 0, 0, None
    curve: dict[str, list[dict[str, Any]]] = {"steps": [], "epochs": []}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, steps = int(state["epoch"]), int(state["steps"])
        best_epoch = int(state.get("best_epoch", 0))
        best_score = state.get("best_score")
        old = state.get("curve") or read_json(out / CURVE_FILE) or {}
        curve = {"steps": [r for r in old.get("steps", []) if r.get("epoch", 0) <= start],
                 "epochs": [r for r in old.get("epochs", []) if r.get("epoch", 0) <= start]}
        ranks = state.get("rng_ranks")
        if world > 1 and ranks is not None and len(ranks) == world:
            set_rng_state(ranks[rank])
        elif state.get("rng") is not None:  # checkpoints written before the random states were saved have none
            set_rng_state(state["rng"])
    elif world > 1:
        _seed_rank_globals(seed, rank)
    net = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a step may leave parameters without a gradient (a variant's unused module,
        # a slice without some kind of target); DDP would otherwise wait for their gradients for ever.
        net = DistributedDataParallel(_Step(model, train_step), find_unused_parameters=True)
    cut = shard or distributed.shard
    tb = open_curve_log(out, steps if state is not None else None) if rank == 0 else None
    train_seconds, items = 0.0, 0
    try:
        for epoch in range(start, epochs):
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch)
            rng, gen = epoch_rng(seed, epoch)
            epoch_batches = batches(gen if batch_rng == "torch" else rng)
            step_gen = gen if net is None else rank_generator(seed, epoch, rank)
            if net is not None and epoch_batches and all(len(b) < world for b in epoch_batches):
                raise distributed.fail_together(UsageError(
                    f"{out}: batches of {max(len(b) for b in epoch_batches)} items cannot be split over {world} "
                    f"processes; use --batch-size {world} or more, or fewer processes"))
            model.train()
            t0 = time.perf_counter()
            losses = []
            part_sums: dict[str, float] = {}
            for batch in track(epoch_batches, total=len(epoch_batches),
                               description=f"{description} epoch {epoch + 1}/{epochs}"):
                if net is not None and len(batch) < world:
                    continue  # some rank would get nothing; every rank leaves it out alike
                lr = lr_at_step(steps) if lr_at_step is not None else None
                if lr is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                if net is None:
                    loss, n, *parts = train_step(batch, step_gen)
                else:
                    loss, n, *parts = net(cut(batch, rank, world), step_gen)
                terms = {name: float(v) for name, v in (parts[0] if parts else {}).items()}
                value = float(loss.detach())
                if net is not None:  # every rank sees the same figures, a non-finite loss on any rank included
                    names = sorted(terms)
                    sums = distributed.all_reduce_sum([value, float(n), *(terms[k] for k in names)])
                    value, n = sums[0] / world, int(round(sums[1]))
                    terms = {k: v / world for k, v in zip(names, sums[2:])}
                if not math.isfinite(value):
                    raise distributed.fail_together(NonFiniteLossError(
                        f"{out}: the training loss is {value} at epoch {epoch + 1}, step {steps + 1} (non-finite "
                        "inputs, or a learning rate too high); the run stays incomplete at its last checkpoint; "
                        f"check its inputs or lower --lr, then run `{retrain_command(out)}`"))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()
                steps += 1
                items += n
                losses.append(value)
                for name, part in terms.items():
                    part_sums[name] = part_sums.get(name, 0.0) + part
                if steps % STEP_LOG_EVERY == 0:
                    curve["steps"].append({"step": steps, "epoch": epoch + 1,
                                           "loss": round(float(np.mean(losses[-STEP_LOG_EVERY:])), 6),
                                           **({"lr": lr} if lr is not None else {})})
                    if tb is not None:
                        tb.step(curve["steps"][-1])
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)) if losses else 0.0, 6),
                                   "seconds": round(seconds, 2)}
            row.update({name: round(total / len(losses), 6) for name, total in part_sums.items()})
            if evaluate is not None:
                model.eval()

                def figures() -> dict[str, Any]:
                    with torch.no_grad():
                        return evaluate()

                row.update(distributed.on_main(figures))
            curve["epochs"].append(row)
            score = row.get(select) if select else None
            improved = select is None or best_score is None or (score is not None and score > best_score)
            if improved:
                best_epoch, best_score = epoch + 1, score
            ranks_rng = distributed.all_gather_object(rng_state()) if net is not None else None

            def write_epoch() -> None:
                if improved:
                    with atomic_file(out / MODEL_FILE, "wb") as fh:
                        torch.save(model.state_dict(), fh)
                # The curve first: a kill between the two writes leaves a curve one epoch ahead of the
                # checkpoint (a resume drops the extra row), never a checkpoint ahead of its curve.
                write_json(out / CURVE_FILE, curve)
                if tb is not None:
                    tb.epoch(row, steps)
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                        "steps": steps, "best_epoch": best_epoch, "best_score": best_score, "seed": int(seed),
                        "fingerprint": spec.fingerprint, "world_size": world,
                        "rng": rng_state() if ranks_rng is None else ranks_rng[0]}
                if ranks_rng is not None:
                    ckpt["rng_ranks"] = ranks_rng
                with atomic_file(out / CHECKPOINT_FILE, "wb") as fh:
                    torch.save(ckpt, fh)

            distributed.on_main(write_epoch)
    finally:
        if tb is not None:
            tb.close()
    return FitResult(epochs, start, best_epoch, best_score, steps, train_seconds,
                     items / train_seconds if train_seconds > 0 else float("nan"), curve, items)


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "CURVE_FILE", "FitResult", "METRICS_FILE", "MODEL_FILE",
           "NonFiniteLossError", "RunSpec", "epoch_rng", "fit", "load_weights", "params_difference", "read_json",
           "retrain_command", "rng_state", "set_rng_state", "write_json"]
