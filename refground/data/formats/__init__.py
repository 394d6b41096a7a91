"""Real dataset formats, read into and written from the unified :class:`~refground.data.model.Dataset`.

* :mod:`.refer` -- RefCOCO, RefCOCO+, RefCOCOg, RefCLEF/ReferItGame (``refs(<splitBy>).p`` +
  ``instances.json``): :func:`import_refer`, :func:`export_refer`.
* :mod:`.flickr30k` -- Flickr30K Entities (``Sentences/``, ``Annotations/``, split files, optional
  ``refground.json`` sidecar): :func:`import_flickr30k`, :func:`export_flickr30k`.
* :mod:`.safe_pickle` -- :func:`load_restricted`, the only way this package reads a pickle.

Each module docstring states the format decisions (coordinate conversion, ids, extra keys, sidecar).
"""

from refground.data.formats.flickr30k import export_flickr30k, import_flickr30k
from refground.data.formats.refer import SPLIT_BYS, check_split_by, export_refer, import_refer
from refground.data.formats.safe_pickle import load_restricted

__all__ = ["SPLIT_BYS", "check_split_by", "export_flickr30k", "export_refer", "import_flickr30k", "import_refer",
           "load_restricted"]
