"""Where proposals, region features and CLIP embeddings come from, spelled as one option each.

Specs (the ``refground extract`` options):

- ``--detector``: ``builtin`` or ``builtin:NAME`` (the run ``runs/detector/NAME`` of
  ``refground train detector``; NAME defaults to ``default``), ``builtin:DATASET/NAME`` (another dataset's
  run in the same cache: train on one dataset, extract on another) or ``builtin:/path/to/run``: a complete run
  folder, read as its ``model.pt`` weights and ``config.json`` (:meth:`BuiltinDetector.load`), fingerprinted
  as a whole (its files' digests), so retraining or editing it makes what was extracted with it stale;
  ``hf:PATH`` (a transformers object detector folder); ``mattnet:FILE`` (precomputed detections in MAttNet's
  JSON format); ``none`` (no proposals: ground-truth object features only).
- ``--backbone``: the region feature source; ``builtin[:NAME]`` or ``hf:PATH`` (an AutoBackbone folder), or
  empty for the detector's own (the built-in detector is both).
- ``--clip``: ``hf:PATH`` (or a bare PATH) of a CLIP folder, or ``builtin[:NAME]``: the built-in CLIP of
  ``refground train clip`` (trained on the ``web`` corpus), loaded as the folder it saved.

Resolving a spec is cheap: it finds the input file and fingerprints it (a :class:`Parent`) without loading
any model, so a cache hit never pays for model loading; :meth:`SourceSpec.load` builds the model on a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refground.cache import Parent, parent, require
from refground.errors import ArtifactError, UsageError

# refground.train.MODEL_FILE and CONFIG_FILE, spelled here: resolving a spec must not import torch.
RUN_FILES = ("model.pt", "config.json")


@dataclass
class SourceSpec:
    """A resolved spec: ``kind`` (builtin | hf | mattnet | none), the input ``path``, a short ``name`` for
    artifact names, its :class:`Parent` (None for ``none``) and a loader."""

    spec: str
    kind: str
    path: Path | None
    name: str
    parent: Parent | None
    loader: Callable[[Any], Any] | None = None
    _model: Any = None

    def load(self, ds: Any) -> Any:
        """The model (built once, on first use); ``ds`` is the dataset (imported detections need it)."""
        if self._model is None and self.loader is not None:
            self._model = self.loader(ds)
        return self._model


def _builtin(rest: str, runs_dir: Path, method: str = "detector", dataset: str | None = None,
             files: tuple[str, ...] = RUN_FILES, what: str = "detector") -> tuple[Path, str]:
    """The run folder of ``builtin[:NAME | :DATASET/NAME | :PATH]`` (:func:`refground.runs.resolve_run`) of
    ``method``, seen from ``dataset`` (default: the dataset of ``runs_dir``), checked to hold ``files`` and a
    complete manifest, and the artifact name it gives: ``<method>-NAME`` for that dataset's run or a run
    folder, ``<method>-DATASET.NAME`` for another dataset's (two datasets' runs of one name never share an
    artifact). ``what`` names the model in the error."""
    from refground.runs import is_path_spec, resolve_run

    ref = resolve_run(rest or "default", method, dataset or runs_dir.parent.name, runs_dir.parent.parent)
    run = ref.path
    remedy = ref.train_command()
    if ref.local and ref.name == "default":
        remedy = f"refground train {method}"
    if not all((run / f).is_file() for f in files):
        raise ArtifactError(f"{run}: no trained built-in {what} here; run `{remedy}`")
    # An interrupted training run has the weights of its last finished epoch but no complete manifest.
    require(run, remedy)
    # A folder keeps the name it always had (its fingerprint tells two folders of one name apart).
    return run, f"{method}-{run.name if is_path_spec(rest or 'default') else ref.tag}"


def _builtin_clip(spec: str, rest: str, runs_dir: Path) -> SourceSpec:
    """``--clip builtin[:NAME | :DATASET/NAME | :PATH]``: the built-in CLIP of ``refground train clip``, trained
    on its own corpus (dataset ``web`` unless DATASET/ says otherwise), loaded through the very code path of
    ``hf:PATH`` (its ``pretrained/`` folder). Artifact name ``clip-NAME`` (``clip-DATASET.NAME`` for a corpus
    other than ``web``, the folder's name for a path)."""
    from refground.features.clip_train import CORPUS, PRETRAINED_DIR

    run, name = _builtin(rest, runs_dir, "clip", CORPUS, (f"{PRETRAINED_DIR}/config.json",), "CLIP")
    folder = run / PRETRAINED_DIR

    def load_builtin(ds: Any) -> Any:
        from refground.features import hf

        return hf.HFClip(folder)

    return SourceSpec(spec, "builtin", folder, name, parent("run", run), load_builtin)


def _model_type(path: Path) -> str:
    import json

    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def resolve(spec: str, role: str, runs_dir: Path, class_names: list[str] | None = None) -> SourceSpec:
    """Parse and fingerprint a spec for ``role`` (detector | backbone | clip). ``runs_dir`` is the
    dataset's ``runs`` folder; ``class_names`` the text queries of open-vocabulary detectors."""
    spec = (spec or "").strip()
    kind, _, rest = spec.partition(":")
    if role == "clip" and kind not in ("hf", "builtin", "none"):
        kind, rest = "hf", spec
    if kind == "none":
        if role == "backbone":
            raise UsageError("--backbone none: leave --backbone empty to use the detector's own features")
        return SourceSpec(spec, "none", None, "none", None)
    if kind == "builtin":
        if role == "clip":
            return _builtin_clip(spec, rest, runs_dir)
        run, name = _builtin(rest, runs_dir)

        def load_builtin(ds: Any) -> Any:
            from refground.features.detector import BuiltinDetector

            return BuiltinDetector.load(run)

        return SourceSpec(spec, "builtin", run, name, parent("run", run), load_builtin)
    if kind == "hf":
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise UsageError(f"--{role} {spec}: {path} is not a folder (a transformers model saved with "
                             "save_pretrained)")

        def load_hf(ds: Any) -> Any:
            from refground.features import hf

            if role == "detector":
                # Open-vocabulary detectors (OWL) take text queries: the dataset's category names.
                if class_names is None and ds is not None and "owl" in _model_type(path):
                    return hf.HFDetector(path, class_names=list(ds.categories))
                return hf.HFDetector(path, class_names=class_names)
            if role == "backbone":
                return hf.HFBackbone(path)
            return hf.HFClip(path)

        return SourceSpec(spec, "hf", path, f"hf-{path.name}", parent("file", path), load_hf)
    if kind == "mattnet":
        if role != "detector":
            raise UsageError(f"--{role} {spec}: mattnet detections are proposals (--detector mattnet:FILE)")
        path = Path(rest).expanduser()
        if not path.is_file():
            raise UsageError(f"--detector {spec}: {path} is not a file")

        def load_mattnet(ds: Any) -> Any:
            from refground.data.formats.mattnet import ImportedDetections

            return ImportedDetections(path, ds)

        return SourceSpec(spec, "mattnet", path, f"mattnet-{path.stem}", parent("file", path), load_mattnet)
    raise UsageError(f"--{role} {spec!r}: expected builtin[:NAME], hf:PATH" +
                     (", mattnet:FILE or none" if role == "detector" else ""))
