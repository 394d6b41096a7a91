"""``refground graph``: the spatial relation graphs of every image, over ground-truth objects and proposals.

``graph/<features name>.h5`` (``graph/gt.h5`` without proposals)::

    images/ids int64[I]
    objects/offsets int64[I + 1]; objects/labels uint8[sum K_i^2]     ground-truth objects, dataset order
    proposals/offsets int64[I + 1]; proposals/labels uint8[sum P_i^2] the features artifact's proposals
    attrs: format, version, relation_names (JSON), features (name or "")

Image i's K x K matrix is ``labels[offsets[i]:offsets[i + 1]].reshape(K, K)`` with entry [a, b] the relation
of box a to box b (:func:`refground.graph.spatial_relations`, labels 0-11).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from refground.cache import RaggedH5, fingerprint, is_current, parent, write_h5, write_manifest
from refground.cache.lock import artifact_lock
from refground.cache.manifest import parent_fingerprints
from refground.data.store import dataset_dir, load_dataset
from refground.graph import RELATION_NAMES, spatial_relations_many
from refground.structures import RaggedBoxes

GRAPH_FORMAT = "refground-graph"
GRAPH_STEP = "graph@1"
FORMAT_VERSION = 1


def graph_path(dataset: str, cache: Any, features: str) -> Path:
    return dataset_dir(dataset, cache).parent / "graph" / f"{features or 'gt'}.h5"


def read_graph(f: RaggedH5, section: str, image_row: int) -> np.ndarray:
    """The K x K label matrix (int64) of one image from an open graph artifact."""
    flat = f.image(section, "labels", image_row)
    k = int(round(np.sqrt(len(flat))))
    return flat.astype(np.int64).reshape(k, k)


def build_graphs(dataset: str, cache: Any = None, features: str = "detector-default", force: bool = False
                 ) -> dict[str, Any]:
    """Write (or find current) the graph artifact of ``dataset`` for the features artifact ``features``
    ("" for ground-truth objects only). Returns a summary with timing and counts."""
    from refground.features.pipeline import features_path, require_features

    t0 = time.perf_counter()
    ds_dir = dataset_dir(dataset, cache)
    parents = {"dataset": parent("dataset", ds_dir)}
    fpath = features_path(dataset, cache, features) if features else None
    if fpath is not None:
        require_features(fpath)
        parents["features"] = parent("artifact", fpath)
    out = graph_path(dataset, cache, features)
    params = {"format_version": FORMAT_VERSION}
    fp = fingerprint(GRAPH_STEP, params, parent_fingerprints(parents))
    result: dict[str, Any] = {"dataset": dataset, "path": str(out), "features": features}
    if not force and is_current(out, fp):
        result.update(status="hit", seconds=round(time.perf_counter() - t0, 3))
        return result
    # One writer: a second `refground graph` of this artifact while this one runs is refused, not raced.
    with artifact_lock(out):
        ds = load_dataset(ds_dir)
        sizes = list(zip(ds.image_height.tolist(), ds.image_width.tolist()))
        off = ds.image_object_offsets
        gt = [ds.object_boxes[off[i]:off[i + 1]] for i in range(ds.num_images)]
        labels, offsets = spatial_relations_many(gt, sizes)
        chunk: dict[str, np.ndarray] = {"images.ids": ds.image_ids, "objects.counts": np.diff(offsets),
                                        "objects.labels": labels}
        if fpath is not None:
            with RaggedH5(fpath) as f:
                if not np.array_equal(f.table("images", "ids"), ds.image_ids):
                    from refground.errors import ArtifactError

                    raise ArtifactError(f"{fpath}: its images differ from the dataset's; run `refground extract --force`")
                props = RaggedBoxes.read(f, "proposals")
            plabels, poffsets = spatial_relations_many([props.group(i) for i in range(ds.num_images)], sizes)
            chunk.update({"proposals.counts": np.diff(poffsets), "proposals.labels": plabels})
        attrs = {"format": GRAPH_FORMAT, "version": FORMAT_VERSION, "relation_names": list(RELATION_NAMES),
                 "features": features}
        write_h5(out, [chunk], attrs)
        write_manifest(out, step=GRAPH_STEP, params=params, parents=parents, fingerprint=fp, kind="graph",
                       extra={"images": ds.num_images})
    result.update(status="written", seconds=round(time.perf_counter() - t0, 3),
                  relations_gt=int(len(labels)), relations_proposals=int(len(chunk.get("proposals.labels", []))))
    return result
