"""Where a run is: ``--run NAME`` (this dataset's), ``--run DATASET/NAME`` (another dataset's in the same cache)
or ``--run PATH`` (any run folder), and the same after ``--detector builtin:``.

A run trained on one dataset is applied to another as it is: its own vocabulary and feature statistics travel
with it (``vocab.json``, the model's buffers), and what it writes for the other dataset (predictions, proposal
sets, features) lives in *that* dataset's folder under a tag naming the run's origin (:attr:`RunRef.tag`), with
the run's folder, dataset and fingerprint in the manifest (:meth:`RunRef.origin`).

Spelling (no filesystem guessing, so the same value means the same run everywhere):

- ``NAME``: a plain folder name: ``<cache>/<dataset>/runs/<method>/NAME``;
- ``DATASET/NAME``: exactly one ``/`` between two plain names: ``<cache>/DATASET/runs/<method>/NAME``;
- anything else with a ``/`` (absolute, ``./``, ``../``, ``~``, or more than one ``/``): a run folder path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refground.errors import UsageError


def check_run_name(name: str) -> str:
    """``name`` if it is a plain folder name for a run, else a one-line UsageError."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name.startswith("~"):
        raise UsageError(f"run name {name!r}: expected a plain folder name")
    return name


def _plain(part: str) -> bool:
    return bool(part) and not part.startswith((".", "~")) and "\\" not in part


def is_path_spec(spec: str) -> bool:
    """Whether a ``--run`` value names a folder path rather than ``NAME`` or ``DATASET/NAME``."""
    if "/" not in spec and "\\" not in spec:
        return spec.startswith(("~", "."))
    parts = spec.split("/")
    return not (len(parts) == 2 and _plain(parts[0]) and _plain(parts[1]))


@dataclass(frozen=True)
class RunRef:
    """A resolved run: its folder, the dataset it was trained on (None for a folder outside any cache's
    ``<dataset>/runs/<method>/`` layout), its name and whether it belongs to the dataset it is applied to."""

    spec: str
    path: Path
    dataset: str | None
    name: str
    method: str
    local: bool

    @property
    def tag(self) -> str:
        """The name of what this run writes for the dataset it is applied to: its own name for a local run;
        ``DATASET.NAME`` for another dataset's; ``NAME@<hash of the folder>`` for a folder outside a cache
        (two folders of the same name never share one)."""
        if self.local:
            return self.name
        if self.dataset is not None:
            return f"{self.dataset}.{self.name}"
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:8]
        return f"{self.name}@{digest}"

    def origin(self, fingerprint: str | None = None) -> dict[str, Any]:
        """What a manifest records of where the run came from: ``{"run": folder, "dataset", "name", "spec",
        "fingerprint"}`` (the run manifest's fingerprint, where given)."""
        out = {"run": str(self.path), "dataset": self.dataset, "name": self.name, "spec": self.spec}
        return {**out, "fingerprint": fingerprint} if fingerprint else out

    def train_command(self) -> str:
        """The command that trains this run (for errors about a missing or interrupted one)."""
        ds = f" --dataset {self.dataset}" if self.dataset and not self.local else ""
        return f"refground train {self.method}{ds} --run {self.name}"


def _dataset_of(path: Path, method: str) -> str | None:
    """The dataset of ``<cache>/<dataset>/runs/<method>/<name>`` (None for a folder outside that layout, or one
    whose ``<dataset>`` holds no dataset: then it is no cache's)."""
    root = path.parent.parent.parent
    if path.parent.name == method and path.parent.parent.name == "runs" and (root / "dataset").is_dir():
        return root.name or None
    return None


def resolve_run(spec: str, method: str, dataset: str, cache: str | os.PathLike | None = None) -> RunRef:
    """The run ``spec`` of ``method`` as seen from ``dataset`` (see the module doc for the spelling). Only
    parses: whether the run exists and is complete is the loader's question (``complete_run``)."""
    from refground.data.store import cache_root

    spec = (spec or "").strip()
    if not spec:
        raise UsageError("--run: empty run name")
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(f"--run {spec}: {path} is a file; give a run folder, a run NAME or DATASET/NAME")
        origin = _dataset_of(path.resolve(), method) if path.exists() else _dataset_of(path, method)
        # A path into this very cache's folder of this dataset is the local run of that name.
        local = origin == dataset and path.resolve().parent.parent.parent == (cache_root(cache) / dataset).resolve()
        return RunRef(spec, path, origin, path.name, method, local)
    if "/" in spec:
        ds_name, name = spec.split("/")
    else:
        ds_name, name = dataset, check_run_name(spec)
    path = cache_root(cache) / ds_name / "runs" / method / name
    return RunRef(spec, path, ds_name, name, method, ds_name == dataset)


def applied_tag(spec: str, method: str, dataset: str, cache: str | os.PathLike | None = None) -> str:
    """The tag under which what run ``spec`` wrote for ``dataset`` is found (:attr:`RunRef.tag`): ``NAME`` for a
    plain name (also a reserved one such as VL-NMS's ``confidence``), ``DATASET.NAME`` for another dataset's."""
    if "/" not in spec and "\\" not in spec and not spec.startswith("~"):
        return check_run_name(spec)
    return resolve_run(spec, method, dataset, cache).tag


def local_run_name(spec: str, method: str, dataset: str) -> str:
    """The run name a *training* command writes: ``NAME`` or ``DATASET/NAME`` of this very dataset. Training
    writes only into the dataset it trains on, so another dataset's run or a folder path is a one-line
    UsageError saying how to train that one."""
    if "/" not in spec and "\\" not in spec:
        return check_run_name(spec)
    if not is_path_spec(spec):
        ds_name, name = spec.split("/")
        if ds_name == dataset:
            return check_run_name(name)
        raise UsageError(f"--run {spec}: training writes runs of the dataset it trains on ({dataset}); to train "
                         f"that run, give --dataset {ds_name} --run {name}")
    raise UsageError(f"--run {spec}: training writes into <cache>/{dataset}/runs/{method}/NAME; give a plain NAME")


__all__ = ["RunRef", "applied_tag", "check_run_name", "is_path_spec", "local_run_name", "resolve_run"]
