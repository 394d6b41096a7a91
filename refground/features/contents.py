"""What a features artifact holds, and the one-line error a step gives when it lacks what the step needs.

A features artifact (``features/<name>.h5``, :mod:`refground.features.extract`) holds only what its
sources could give, so a step must check for its sections before any work starts (loading the dataset, a
model, hours of training): :func:`require_sections` reads the manifest and the HDF5 keys, never the data,
and names what is missing, why (from the sources recorded in the manifest) and the ``refground extract``
options that supply it. The sections a step can need (:data:`NEEDS`):

- ``object_features``: ``objects/features``, region features of the ground-truth objects (CMRIN training,
  ``--candidates gt``). Only a source that pools *given* boxes gives them: the built-in detector or a
  ``--backbone``; a transformers detector (``--detector hf:PATH``) alone describes only its own queries, and
  MAttNet detections (``mattnet:FILE``) are boxes only.
- ``proposals``: at least one proposal box in the artifact (``--candidates proposals``); ``--detector none``
  writes none.
- ``proposal_features``: ``proposals/features``.
- ``detections``: ``detections/``, the pre-NMS detection set of VL-NMS (``refground extract --detections``,
  the built-in detector only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refground.errors import ArtifactError

NEEDS = ("object_features", "proposals", "proposal_features", "detections")
DEFAULT_NAME = "detector-default"  # the features name of `refground extract` with its default detector
# The built-in detector run a remedy can name as it is, when the dataset has one (`refground train detector`).
DEFAULT_DETECTOR_RUN = ("runs", "detector", "default")


@dataclass(frozen=True)
class FeaturesContents:
    """What a features artifact holds (from its keys) and the sources it was made with (from its manifest).

    ``proposals``: proposal boxes over all images (one element read: the last offset); ``detector`` and
    ``backbone``: the ``--detector`` / ``--backbone`` specs recorded in the manifest ('' when not given);
    ``stage``: where the proposals come from, ``"final"`` (the detector's detections) or ``"first"``
    (``refground extract --first-stage``: the built-in detector's first-stage boxes)."""

    path: Path
    object_features: bool
    proposals: int
    proposal_features: bool
    detections: bool
    detector: str
    backbone: str
    stage: str = "final"

    def has(self, need: str) -> bool:
        if need == "proposals":
            return self.proposals > 0
        return bool(getattr(self, need))


def features_contents(path: str | Path, remedy: str = "") -> FeaturesContents:
    """The :class:`FeaturesContents` of a complete features artifact (:class:`ArtifactError` naming ``remedy``,
    default the `refground extract` that writes it, when it is missing, half-written or unreadable). Reads
    the manifest, the keys and one offset, no data."""
    from refground.cache import require
    from refground.cache.h5store import _h5py

    path = Path(path)
    m = require(path, remedy or extract_command(path, force=False))
    params = m.params or {}
    try:
        with _h5py().File(path, "r") as f:
            def has(section: str, field: str) -> bool:
                return section in f and field in f[section]

            proposals = 0
            if has("proposals", "offsets") and len(f["proposals"]["offsets"]):
                proposals = int(f["proposals"]["offsets"][-1])
            return FeaturesContents(path, has("objects", "features"), proposals, has("proposals", "features"),
                                    "detections" in f, str(params.get("detector", "") or ""),
                                    str(params.get("backbone", "") or ""),
                                    str(params.get("proposal_stage", "final") or "final"))
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc}); run `{extract_command(path)}`") from None


def require_sections(path: str | Path, needs: tuple[str, ...] | list[str], step: str) -> FeaturesContents:
    """Check, before any work, that the features artifact ``path`` holds every section of ``needs`` (names of
    :data:`NEEDS`) that ``step`` (how the message names the consumer, e.g. "`refground train cmrin`") reads.

    Raises a one-line :class:`ArtifactError`: the artifact, what it has not, why (its recorded sources) and the
    ``refground extract`` options that supply it. Returns the contents."""
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"unknown features sections {unknown}; expected some of {NEEDS}")
    path = Path(path)
    c = features_contents(path, extract_command(path, detections=True, force=False) if "detections" in needs else "")
    for need in needs:
        if not c.has(need):
            raise ArtifactError(_lacks(c, need, step))
    return c


def _kind(spec: str) -> str:
    return (spec or "builtin").split(":", 1)[0]


def _dataset_flag(path: Path) -> str:
    dataset = path.parent.parent.name
    return f" --dataset {dataset}" if dataset and dataset != "synth" else ""


def _own_detector(path: Path) -> bool:
    """Whether the artifact's dataset has the default built-in detector run (so ``builtin`` works as printed)."""
    return (path.parent.parent.joinpath(*DEFAULT_DETECTOR_RUN) / "model.pt").is_file()


def _lacks(c: FeaturesContents, need: str, step: str) -> str:
    """The one-line message of :func:`require_sections` for the missing section ``need``."""
    path, det = c.path, c.detector or "builtin"
    kind = _kind(det)
    if need == "object_features":
        if kind == "hf" and not c.backbone:
            why = f"--detector {det} alone cannot pool given boxes: its features describe its own queries"
        elif kind == "mattnet" and not c.backbone:
            why = f"--detector {det} gives boxes only"
        else:
            why = "made without a source that pools given boxes"
        bb = "builtin" if _own_detector(path) else "hf:PATH"
        alt = "hf:PATH, a transformers backbone" if bb == "builtin" else "builtin[:NAME], a built-in detector run"
        return (f"{path} has no ground-truth object features ({why}), which {step} needs; re-extract with a "
                f"backbone: `{extract_command(path, backbone=bb, force=False)}` (or --backbone {alt})")
    if need in ("proposals", "proposal_features") and c.proposals == 0:
        if kind == "none":
            why = "made with --detector none: ground-truth object features only"
        else:
            why = f"--detector {det} found no box in any image"
        new = "builtin" if _own_detector(path) and kind != "builtin" else "hf:PATH"
        return (f"{path} has no proposals ({why}), which {step} needs; re-extract with a detector: "
                f"`{extract_command(path, detector=new, force=False)}` (or --detector builtin[:NAME], hf:PATH, "
                "mattnet:FILE)")
    if need == "proposal_features":
        return (f"{path} has proposals without region features (damaged or from an older version), which {step} "
                f"needs; run `{extract_command(path)}`")
    # detections
    if kind == "builtin":
        return (f"{path} has no pre-NMS detections (extracted without --detections), which {step} needs; run "
                f"`{extract_command(path, detections=True, force=False)}`")
    return (f"{path} has no pre-NMS detections (only the built-in detector gives them, not --detector {det}), "
            f"which {step} needs; extract with one: `refground extract{_dataset_flag(path)} --detector builtin "
            "--detections --no-dense` (a `refground train detector` run; builtin:DATASET/NAME for one trained on "
            f"another dataset), then give {step} --features {DEFAULT_NAME}")


def extract_command(features_file: str | Path, *, detector: str | None = None, backbone: str | None = None,
                    detections: bool | None = None, force: bool = True) -> str:
    """The ``refground extract`` command that rewrites the features artifact ``features_file``
    (``<cache>/<dataset>/features/<name>.h5``) with the options recorded in its manifest, changed by
    ``detector`` / ``backbone`` / ``detections`` where given (then ``--features <name>`` keeps the name the
    consumer reads, whatever name extract would choose for the new sources). ``force``: end with ``--force``
    (a damaged artifact needs none, as it is no cache hit; changed options give a new fingerprint)."""
    from refground.cache import read_manifest_of

    path = Path(features_file)
    m = read_manifest_of(path)
    p = dict(m.params) if m is not None else {}
    changed = m is not None and any(x is not None for x in (detector, backbone, detections))
    if detector is not None:
        p["detector"] = detector
    if backbone is not None:
        p["backbone"] = backbone
    if detections is True and p.get("detections") is None:
        p["detections"] = 0.05
    elif detections is False:
        p.pop("detections", None)
    parts = ["refground extract" + _dataset_flag(path)]
    if p.get("detector", "builtin") != "builtin":
        parts.append(f"--detector {p['detector']}")
    if p.get("backbone"):
        parts.append(f"--backbone {p['backbone']}")
    if p.get("detections") is not None:
        parts.append("--detections" + (f" --detection-threshold {p['detections']}" if p["detections"] != 0.05 else ""))
    first = p.get("proposal_stage") == "first"
    if first:
        parts.append("--first-stage")
    # extract's default: 100 proposals, 50 with --first-stage (refground.features.pipeline).
    if p.get("max_proposals", 100) != (50 if first else 100):
        parts.append(f"--max-proposals {p['max_proposals']}")
    if changed or path.stem != DEFAULT_NAME:
        parts.append(f"--features {path.stem}")
    if not first and not (path.parent.parent / "dense" / f"{path.stem}.zarr").exists():
        parts.append("--no-dense")  # it was made without dense maps: do not add hours of them
    return " ".join(parts + (["--force"] if force else []))


def lacks_object_features(path: str | Path, detector: Any, backbone: Any) -> str:
    """Why the features artifact ``path`` made from the resolved sources ``detector`` / ``backbone``
    (:class:`refground.features.sources.SourceSpec`, ``backbone`` None when not given) will have no
    ground-truth object features, or '' when it will have them (`refground extract`'s warning)."""
    if backbone is not None or detector.kind in ("builtin", "none"):
        return ""
    return (f"{path} will have no ground-truth object features (--detector {detector.spec} alone cannot pool "
            "given boxes), which `refground train cmrin` and --candidates gt need; add --backbone hf:PATH (a "
            "transformers backbone) or builtin[:NAME] (a built-in detector run) to get them")
