"""Word vocabularies built from a dataset's training queries.

CMRIN (Sec. 4.2): "we count the number of occurrences of each word in the training set. If a word appears
more than five times, we add it to the vocabulary." Tokens are the dataset's own tokens
(``Query.tokens``), lower-cased; id 0 is padding and id 1 stands for every word outside the vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refground.atomic import atomic_file
from refground.errors import DataError

PAD, UNK = "<pad>", "<unk>"


class Vocabulary:
    """Word -> id. ``words[0]`` is ``<pad>``, ``words[1]`` ``<unk>``, then the kept words in decreasing
    count, ties alphabetical (so the same training text gives the same ids)."""

    def __init__(self, words: Sequence[str]):
        if list(words[:2]) != [PAD, UNK]:
            raise DataError("a vocabulary starts with <pad>, <unk>")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise DataError("a vocabulary holds each word once")

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 6) -> Vocabulary:
        """Words seen at least ``min_count`` times (the paper's "more than five times" is 6)."""
        counts = Counter(t.lower() for tokens in token_lists for t in tokens if t)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept])

    @classmethod
    def of_split(cls, ds: Any, split: str = "train", min_count: int = 6) -> Vocabulary:
        """:meth:`build` from the tokens of the expression queries of ``split`` of a dataset."""
        return cls.build((ds._query_at(k).tokens for k in ds.query_rows(split, "expression")), min_count=min_count)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """int64[T] ids of ``tokens`` (unknown words -> 1)."""
        return np.array([self.index.get(t.lower(), 1) for t in tokens], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        with atomic_file(Path(path)) as fh:
            json.dump({"words": self.words}, fh, indent=0)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            words = json.loads(Path(path).read_text())["words"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a vocabulary file ({exc})") from None
        return cls(words)
