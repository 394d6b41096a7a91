"""The artifact store: manifests with chained fingerprints, resumable chunked jobs, HDF5 and zarr layouts.

See :mod:`refground.cache.manifest` (what makes an artifact current or stale), :mod:`refground.cache.chunks`
(resume and ``--shard``), :mod:`refground.cache.h5store` (ragged region arrays) and
:mod:`refground.cache.zarrstore` (dense maps).
"""

from refground.cache.chunks import ChunkedJob, Shard, partial_progress
from refground.cache.h5store import RaggedH5, block_batches, write_h5
from refground.cache.manifest import (Manifest, Parent, current_extra, current_fingerprint, dataset_fingerprint, file_digest,
                                      fingerprint, is_current, manifest_path, parent, read_manifest_of, require,
                                      stale_parents, write_manifest)

__all__ = ["ChunkedJob", "Manifest", "Parent", "RaggedH5", "Shard", "block_batches", "current_extra", "current_fingerprint",
           "dataset_fingerprint", "file_digest", "fingerprint", "is_current", "manifest_path", "parent",
           "partial_progress", "read_manifest_of", "require", "stale_parents", "write_h5", "write_manifest"]
