"""Restricted unpickling for the refer ``refs(<splitBy>).p`` files.

The refer annotations ship as (Python 2) pickles, and a plain :func:`pickle.load` of a file from the
internet runs whatever callable the file names. :class:`RestrictedUnpickler` admits only the globals that
plain containers and scalars need (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``str``,
``bytes``, ``int``, ``float``, ``bool``, ``complex`` from ``builtins`` or Python 2's ``__builtin__``);
anything else -- ``os.system``, ``copy_reg._reconstructor``, any class -- is refused with a
:class:`~refground.errors.DataError` naming the file and the global, before it is called.

Python 2 ``str`` objects are decoded as latin-1 (every byte maps to one code point, so nothing fails
to decode); Python 2 ``unicode`` objects are stored as UTF-8 and come back exactly.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from refground.errors import DataError

_SAFE_NAMES = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool",
                         "complex"})
# Python 2 pickles name the builtins module "__builtin__"; Python 2 ``long`` and ``unicode`` are the
# Python 3 ``int`` and ``str``.
_PY2_ALIASES = {"long": "int", "unicode": "str"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only plain container and scalar types (see module docstring)."""

    def __init__(self, file: io.BufferedIOBase, source: str = "<pickle>", **kwargs: Any):
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":
            module, name = "builtins", _PY2_ALIASES.get(name, name)
        if module == "builtins" and name in _SAFE_NAMES:
            import builtins

            return getattr(builtins, name)
        raise DataError(f"{self.source}: refused to unpickle forbidden global {module}.{name} "
                        "(only plain containers and scalars are allowed)")

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: refused to unpickle a persistent id (only plain data is allowed)")


def loads_restricted(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (latin-1 for Python 2 ``str``)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_restricted(path: str | os.PathLike) -> Any:
    """Read a pickle file allowing only plain containers and scalars; :class:`DataError` otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return loads_restricted(data, str(path))
