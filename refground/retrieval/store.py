"""The cached index artifact: one faiss index (or one per shard) per CLIP embedding artifact and section.

Layout, beside the CLIP artifact ``<root>/<dataset>/clip/<model>.h5`` it indexes::

    <root>/<dataset>/index/<model>/<section>-<type>[-s<S>]/      (S > 1 shards)
        index.json          format, version, section, type, dim, ntotal, bounds int[S + 1], files, nlist[S], seed
        shard-000.faiss     faiss.write_index of shard 0 (rows bounds[0]:bounds[1] of the section), ...
        manifest.json       step, params, parent (the CLIP artifact), fingerprint, content of the files

``section``: ``images`` (images/embedding), ``regions`` (proposals/embedding: crops of the features
artifact's proposals), ``objects`` (objects/embedding: ground-truth boxes) or ``queries``
(queries/embedding). Index row r of the section is row r of that array.

The fingerprint chains the CLIP artifact's fingerprint with the index parameters (section, type, shards,
and for ``ivf`` its nlist and seed), so re-extracted embeddings or other parameters make a stale index a
cache miss: it is rebuilt, never silently reused. The folder is written under a temporary name and renamed
in one step (:func:`refground.atomic.atomic_dir`), holding the artifact's writer lock from the currency
check to the manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache import RaggedH5, fingerprint, is_current, parent, read_manifest_of, require, write_manifest
from refground.cache.lock import artifact_lock
from refground.cache.manifest import parent_fingerprints
from refground.data.store import dataset_dir
from refground.errors import ArtifactError, UsageError
from refground.retrieval import index as ix

INDEX_STEP = "retrieval.index@1"
INDEX_FORMAT = "refground-index"
FORMAT_VERSION = 1
META_FILE = "index.json"
# Section name -> the group of the CLIP artifact whose ``embedding`` it indexes.
SECTIONS = {"images": "images", "regions": "proposals", "objects": "objects", "queries": "queries"}


@dataclass(frozen=True)
class IndexSpec:
    """How to index a section. ``type``: flat | ivf; ``nlist``: IVF cells per shard (None: the default for the
    shard's size, :func:`refground.retrieval.index.default_nlist`); ``shards``: contiguous row ranges, one
    index file each; ``seed``: the IVF training sample and k-means seed (shard s uses seed + s)."""

    type: str = "flat"
    nlist: int | None = None
    shards: int = 1
    seed: int = 0

    def check(self) -> None:
        """One-line :class:`UsageError` for an impossible spec."""
        if self.type not in ix.INDEX_TYPES:
            raise UsageError(f"--index must be one of {', '.join(ix.INDEX_TYPES)}, got {self.type!r}")
        if self.shards < 1:
            raise UsageError(f"--shards must be at least 1, got {self.shards}")
        if self.nlist is not None and self.nlist < 1:
            raise UsageError(f"--nlist must be at least 1, got {self.nlist}")
        if self.nlist is not None and self.type != "ivf":
            raise UsageError("--nlist applies to --index ivf only")

    def params(self, section: str) -> dict[str, Any]:
        """The fingerprint's parameters (a flat index has no seed or nlist: they change nothing in it)."""
        p: dict[str, Any] = {"section": section, "type": self.type, "shards": int(self.shards),
                             "format_version": FORMAT_VERSION}
        if self.type == "ivf":
            p["seed"] = int(self.seed)
            if self.nlist is not None:
                p["nlist"] = int(self.nlist)
        return p

    def folder_name(self, section: str) -> str:
        return f"{section}-{self.type}" + (f"-s{self.shards}" if self.shards > 1 else "")


def clip_models(dataset: str, cache: Any = None) -> list[str]:
    """Names of the CLIP artifacts of ``dataset`` (``clip/<name>.h5``), sorted."""
    d = dataset_dir(dataset, cache).parent / "clip"
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.h5") if not p.name.startswith("."))


def clip_artifact(dataset: str, cache: Any = None, model: str | None = None) -> Path:
    """The path of CLIP artifact ``model`` of ``dataset`` (None: the only one there is). One-line errors: none
    extracted (names the command), several and none chosen (lists them), an unknown name."""
    names = clip_models(dataset, cache)
    hint = f"run `refground extract --dataset {dataset} --clip hf:PATH` first"
    if not names:
        raise ArtifactError(f"dataset {dataset}: no CLIP artifact (clip/<model>.h5); {hint}")
    if model is None or model == "":
        if len(names) > 1:
            raise UsageError(f"dataset {dataset} has {len(names)} CLIP artifacts ({', '.join(names)}); pick one "
                             "with --clip MODEL")
        model = names[0]
    model = model.removesuffix(".h5")
    if model not in names:
        raise UsageError(f"--clip {model}: no such CLIP artifact of dataset {dataset} (have: {', '.join(names)})")
    return dataset_dir(dataset, cache).parent / "clip" / f"{model}.h5"


def index_path(clip_path: str | Path, section: str, spec: IndexSpec) -> Path:
    """``<root>/<dataset>/index/<clip model>/<section>-<type>[-s<S>]`` for the CLIP artifact ``clip_path``."""
    clip_path = Path(clip_path)
    return clip_path.parent.parent / "index" / clip_path.stem / spec.folder_name(section)


def check_section(section: str) -> str:
    if section not in SECTIONS:
        raise UsageError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    return section


def rebuild_command(path: str | Path, root: str | Path | None = None) -> str:
    """The command that rebuilds the index folder ``path`` (from its manifest's parameters)."""
    path = Path(path)
    m = read_manifest_of(path)
    p = m.params if m else {}
    dataset = path.parent.parent.parent.name
    section = p.get("section") or path.name.split("-")[0]
    opts = f" --{section} --index {p.get('type', 'flat')}"
    if int(p.get("shards", 1)) > 1:
        opts += f" --shards {p['shards']}"
    if "nlist" in p:
        opts += f" --nlist {p['nlist']}"
    if p.get("type") == "ivf":
        opts += f" --seed {p.get('seed', 0)}"
    where = f" --dataset {dataset}" + (f" --cache {root}" if root is not None else "")
    return f"refground retrieve --build --rebuild{where} --clip {path.parent.name}{opts}"


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != INDEX_FORMAT or len(meta["bounds"]) != len(meta["files"]) + 1:
            raise ValueError("not a refground index")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path / META_FILE}: unreadable index description ({exc}); rebuild it: "
                            f"`{rebuild_command(path)}`") from None


def build_index_artifact(clip_path: str | Path, section: str, spec: IndexSpec | None = None,
                         force: bool = False) -> dict[str, Any]:
    """Write (or find current) the index of ``section`` of the CLIP artifact ``clip_path``.

    ``spec`` None: a flat index, one shard. Returns ``{"path", "status": "hit" | "written", "section", "type", "shards", "ntotal", "dim", "nlist"
    (per shard; 0 for flat), "bounds", "seconds", "fingerprint"}``. ``force``: rebuild even when current.
    Raises :class:`ArtifactError` when the CLIP artifact is missing, incomplete or damaged, or another process
    is writing the index now; :class:`UsageError` for an empty section or a bad spec."""
    t0 = time.perf_counter()
    clip_path = Path(clip_path)
    check_section(section)
    spec = spec or IndexSpec()
    spec.check()
    require(clip_path, remedy=f"refground extract --clip hf:PATH (the model that made {clip_path.name})")
    parents = {"clip": parent("artifact", clip_path)}
    params = spec.params(section)
    fp = fingerprint(INDEX_STEP, params, parent_fingerprints(parents))
    out = index_path(clip_path, section, spec)
    # One writer, and the currency check and the write are one: a concurrent build of the same index is refused.
    with artifact_lock(out):
        status = "hit"
        if force or not is_current(out, fp):
            status = "written"
            _write(out, clip_path, section, spec, params, parents, fp)
        meta = _read_meta(out)
    return {"path": str(out), "status": status, "section": section, "type": meta["type"],
            "shards": len(meta["files"]), "ntotal": int(meta["ntotal"]), "dim": int(meta["dim"]),
            "nlist": list(meta["nlist"]), "bounds": list(meta["bounds"]),
            "seconds": round(time.perf_counter() - t0, 3), "fingerprint": fp[:12]}


def _write(out: Path, clip_path: Path, section: str, spec: IndexSpec, params: dict[str, Any],
           parents: dict[str, Any], fp: str) -> None:
    import faiss

    from refground.atomic import atomic_dir
    from refground.progress import track

    group = SECTIONS[section]
    with RaggedH5(clip_path) as f:
        if not f.has(group, "embedding"):
            raise ArtifactError(f"{clip_path}: no {group}/embedding; re-run `refground extract --clip`")
        emb = f.file[group]["embedding"]
        n, d = int(emb.shape[0]), int(emb.shape[1]) if emb.ndim == 2 else 0
        if n == 0:
            raise UsageError(f"{clip_path}: the {section} section is empty (no {group} embeddings): nothing to index")
        bounds = ix.shard_bounds(n, spec.shards)
        files, nlists = [], []
        with atomic_dir(out) as stage:
            for s in track(range(spec.shards), total=spec.shards, description=f"index {section}"):
                # One shard in memory at a time: a section larger than memory is indexed shard by shard.
                a, b = int(bounds[s]), int(bounds[s + 1])
                index = ix.build_index(emb[a:b], spec.type, spec.nlist, spec.seed + s)
                name = f"shard-{s:03d}.faiss"
                faiss.write_index(index, str(stage / name))
                files.append(name)
                nlists.append(ix.index_lists(index))
                del index
            meta = {"format": INDEX_FORMAT, "version": FORMAT_VERSION, "section": section, "group": group,
                    "type": spec.type, "metric": "inner_product", "dim": d, "ntotal": n,
                    "bounds": [int(v) for v in bounds], "files": files, "nlist": nlists,
                    "seed": int(spec.seed), "clip": clip_path.stem}
            (stage / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    write_manifest(out, step=INDEX_STEP, params=params, parents=parents, fingerprint=fp, kind="index",
                   extra={"ntotal": n, "dim": d, "shards": spec.shards})


def search_index_artifact(path: str | Path, queries: np.ndarray, k: int, nprobe: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Search the index folder ``path`` (written by :func:`build_index_artifact`) for ``queries`` (float[Q, D],
    normalised here): shards opened one at a time, memory-mapped, merged exactly. Returns ``(scores
    float32[Q, k], rows int64[Q, k])``, rows of the section, best first, padded with (-inf, -1) where fewer
    than ``k`` were found."""
    path = Path(path)
    meta = _read_meta(path)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != int(meta["dim"]):
        raise UsageError(f"query vectors of shape {tuple(q.shape)} do not match the index's dimension {meta['dim']}")
    if nprobe is not None and nprobe < 1:
        raise UsageError(f"--nprobe must be at least 1, got {nprobe}")
    files = [path / name for name in meta["files"]]
    return ix.search_shards(files, meta["bounds"][:-1], q, k, nprobe, index_type=meta["type"])


def index_problems(path: str | Path) -> list[str]:
    """What is wrong with the index folder ``path`` beyond its manifest's content record (``refground cache
    verify``): an unreadable ``index.json``, or a shard file that faiss cannot read or whose size or dimension
    differ from what ``index.json`` says. Each shard is opened memory-mapped (its header only is read)."""
    path = Path(path)
    try:
        meta = _read_meta(path)
    except ArtifactError as exc:
        return [str(exc)]
    problems = []
    bounds = np.asarray(meta["bounds"], dtype=np.int64)
    for name, a, b in zip(meta["files"], bounds[:-1].tolist(), bounds[1:].tolist()):
        try:
            index = ix.read_index(path / name, meta.get("type"))
        except RuntimeError as exc:
            problems.append(f"{path / name}: faiss cannot read it ({str(exc).splitlines()[0][:120]})")
            continue
        if int(index.ntotal) != b - a or int(index.d) != int(meta["dim"]):
            problems.append(f"{path / name}: {index.ntotal} vectors of dimension {index.d}, index.json says "
                            f"{b - a} of {meta['dim']}")
    return problems
