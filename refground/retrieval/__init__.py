"""Retrieval over the CLIP embedding artifact with faiss: text -> images / regions / objects, image -> queries.

- :mod:`refground.retrieval.index`: faiss indexes over unit vectors (flat = exact, ivf = approximate), shards
  and their exact merge, the numpy references they are checked against;
- :mod:`refground.retrieval.store`: the cached index artifact ``<root>/<dataset>/index/<clip model>/...``;
- :mod:`refground.retrieval.search`: :func:`retrieve`, what ``refground retrieve`` runs;
- :mod:`refground.retrieval.strip`: the PNG strip of the hits.

faiss is imported inside the functions that use it, so importing this package (and ``refground --help``)
stays fast.
"""

from refground.retrieval.search import Hit, Retrieval, retrieve
from refground.retrieval.store import SECTIONS, IndexSpec, build_index_artifact, clip_artifact, clip_models

__all__ = ["SECTIONS", "Hit", "IndexSpec", "Retrieval", "build_index_artifact", "clip_artifact", "clip_models",
           "retrieve"]
