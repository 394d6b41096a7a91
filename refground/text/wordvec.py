"""Word vectors for text similarity: GloVe text files, or the toolkit's own count-based embeddings.

:class:`WordVectors` maps words to float32 unit vectors. A *phrase* ("traffic light") is the mean of its
in-vocabulary word vectors, renormalised; a phrase with no word in the vocabulary is the zero vector, so
its cosine similarity with anything is 0.

Without a GloVe file, :func:`toolkit_vectors` builds embeddings from the dataset itself: PPMI of word
co-occurrence (a symmetric window inside each training query) plus *grounded* contexts (the words of a
mention co-occur with the category of each object the mention links to, ``<cat:name>``), reduced by a
truncated SVD. The grounded contexts matter: in a generated world every category name appears in the same
word contexts ("the large red ___ left of"), so pure distributional vectors make all category names
near-synonyms; the annotations of the training split tell them apart, the way GloVe's web text tells
"zebra" from "man".
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from refground.errors import DataError, UsageError


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0).astype(np.float32)


def phrase_words(phrase: str) -> list[str]:
    """Lower-case words of a phrase or category name ("traffic_light" and "traffic light" alike)."""
    return phrase.lower().replace("_", " ").split()


class WordVectors:
    """Word -> float32 unit vector. ``words``: list[str]; ``matrix``: float32[V, d], unit rows;
    ``identity``: what made them ("toolkit" or the sha256 hex of the GloVe file)."""

    def __init__(self, words: Sequence[str], matrix: np.ndarray, identity: str = ""):
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(words):
            raise ValueError(f"matrix {matrix.shape} does not match {len(words)} words")
        self.words = list(words)
        self.matrix = _unit_rows(matrix)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.identity = identity

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def vectors(self, phrases: Sequence[str]) -> np.ndarray:
        """float32[n, d] unit vectors of ``phrases`` (mean of in-vocabulary words; zeros where none)."""
        out = np.zeros((len(phrases), self.dim), dtype=np.float32)
        for k, p in enumerate(phrases):
            rows = [self.index[w] for w in phrase_words(p) if w in self.index]
            if rows:
                out[k] = self.matrix[rows].mean(axis=0)
        return _unit_rows(out)

    def similarity(self, a_words: Sequence[str], b_words: Sequence[str]) -> np.ndarray:
        """float32[len(a), len(b)] cosine similarities (0 where either side is out of vocabulary)."""
        return self.vectors(a_words) @ self.vectors(b_words).T


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def load_glove(path: str | Path, restrict_to: set[str] | None = None) -> WordVectors:
    """Read a GloVe-format text file (``word v1 v2 ... vd`` per line; ``.gz`` accepted; a word2vec
    ``count dim`` header line is skipped). Words are lower-cased; the first occurrence of a word wins.

    ``restrict_to``: keep only these (lower-case) words, so a 400k-word file costs memory for the few
    hundred the dataset needs. Every line is checked for its field count; only kept lines are parsed
    as floats. A malformed line raises :class:`DataError` naming ``file:line``. ``identity`` is the
    file's sha256.
    """
    from refground.cache import file_digest

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: word-vector file not found")
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = 0
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.rstrip("\n\r").rstrip(" ").split(" ")
            if lineno == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                continue  # word2vec text header
            if len(fields) < 2 or not fields[0]:
                if line.strip() == "":
                    continue
                raise DataError(f"{path}:{lineno}: expected a word and its vector")
            if dim == 0:
                dim = len(fields) - 1
            if len(fields) < dim + 1:
                raise DataError(f"{path}:{lineno}: {len(fields) - 1} values, expected {dim}")
            # Some GloVe releases have words containing spaces (". . ."): the vector is the last dim fields.
            word = " ".join(fields[:len(fields) - dim]).lower()
            if (restrict_to is not None and word not in restrict_to) or word in seen:
                continue
            try:
                vec = np.array(fields[len(fields) - dim:], dtype=np.float32)
            except ValueError:
                raise DataError(f"{path}:{lineno}: non-numeric value in the vector of {word!r}") from None
            if not np.all(np.isfinite(vec)):
                raise DataError(f"{path}:{lineno}: non-finite value in the vector of {word!r}")
            seen.add(word)
            words.append(word)
            rows.append(vec)
    if dim == 0:
        raise DataError(f"{path}: no word vectors in the file")
    matrix = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return WordVectors(words, matrix, identity=file_digest(path))


def _corpus(ds, grounded_links: bool = True) -> tuple[list[list[str]], list[tuple[list[str], list[str]]]]:
    """Training sentences (lower-case tokens) and grounded pairs (mention words, category names). Without
    ``grounded_links`` no mention's objects are read (the pairs are only each category name with itself): for a
    method whose supervision forbids phrase-to-object links (ReIR)."""
    rows = ds.query_rows("train") if "train" in set(ds.query_splits) else ds.query_rows("all")
    sentences: list[list[str]] = []
    grounded: list[tuple[list[str], list[str]]] = []
    row_of = {int(i): k for k, i in enumerate(ds.object_ids.tolist())} if grounded_links else {}
    for k in rows.tolist():
        toks = [t.lower() for t in ds.query_texts[k].split(" ") if t]
        sentences.append(toks)
        if not grounded_links:
            continue
        for j in range(int(ds.query_mention_offsets[k]), int(ds.query_mention_offsets[k + 1])):
            o0, o1 = int(ds.mention_object_offsets[j]), int(ds.mention_object_offsets[j + 1])
            cats = sorted({ds.categories[int(ds.object_categories[row_of[int(i)]])]
                           for i in ds.mention_object_ids[o0:o1].tolist() if int(i) in row_of})
            if cats:
                grounded.append((toks[int(ds.mention_starts[j]):int(ds.mention_ends[j])], cats))
    for c in ds.categories:  # every category word is in the vocabulary, even if no query says it
        sentences.append(phrase_words(c))
        grounded.append((phrase_words(c), [c]))
    return sentences, grounded


def toolkit_vectors(ds, dim: int = 100, seed: int = 0, window: int = 3, max_contexts: int = 2000,
                    grounded_weight: float = 1.0) -> WordVectors:
    """The toolkit's own word vectors for dataset ``ds`` (deterministic; see the module docstring).

    Rows: every word of the training queries and category names. Columns: the ``max_contexts`` most
    frequent words (ties alphabetical) as window contexts (``window`` words either side), plus one
    ``<cat:name>`` column per category (mention words x linked objects' categories, counted
    ``grounded_weight`` times). PPMI with context-distribution smoothing (alpha 0.75), then the top
    ``dim`` singular directions, rows ``U S^0.5`` (``grounded_weight`` 0: no mention's objects are read at all,
    the vectors come from the sentences alone) (keep ``dim`` well above the number of categories: a
    small ``dim`` keeps mostly the shared word-context directions and the category names collapse
    together; the default keeps every direction of the synthetic world's 81-word vocabulary). ``seed``
    is recorded for uniformity: nothing is random (the SVD is exact and cosine similarity does not
    depend on the sign of singular vectors).
    """
    del seed
    sentences, grounded = _corpus(ds, grounded_weight > 0)
    counts = Counter(w for s in sentences for w in s)
    vocab = sorted(counts)
    index = {w: i for i, w in enumerate(vocab)}
    ctx_words = sorted(counts, key=lambda w: (-counts[w], w))[:max_contexts]
    ctx_index = {w: i for i, w in enumerate(ctx_words)}
    cat_index = {c: len(ctx_words) + i for i, c in enumerate(ds.categories)}
    n_cols = len(ctx_words) + len(cat_index)
    flat = np.zeros(len(vocab) * n_cols, dtype=np.float64)
    # Window co-occurrence over all sentences at once: token k and token k + off of the same sentence.
    tok = np.array([index[w] for s in sentences for w in s], dtype=np.int64)
    ctx = np.array([ctx_index.get(w, -1) for s in sentences for w in s], dtype=np.int64)
    sent = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
    for off in range(1, window + 1):
        same = sent[:-off] == sent[off:]
        for a, b in ((tok[:-off], ctx[off:]), (tok[off:], ctx[:-off])):
            keep = same & (b >= 0)
            flat += np.bincount(a[keep] * n_cols + b[keep], minlength=flat.size)
    g_rows: list[int] = []
    g_cols: list[int] = []
    for words, cats in grounded:
        rows = [index[w] for w in words if w in index]
        for c in cats:
            g_rows.extend(rows)
            g_cols.extend([cat_index[c]] * len(rows))
    if g_rows:
        flat += grounded_weight * np.bincount(np.array(g_rows, np.int64) * n_cols + np.array(g_cols, np.int64),
                                              minlength=flat.size)
    m = flat.reshape(len(vocab), n_cols)
    total = m.sum()
    if total == 0:
        return WordVectors(vocab, np.zeros((len(vocab), 1), np.float32), identity="toolkit")
    p_w = m.sum(axis=1, keepdims=True) / total
    c_smooth = m.sum(axis=0) ** 0.75
    p_c = (c_smooth / c_smooth.sum())[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log((m / total) / (p_w * p_c))
    ppmi = np.where(m > 0, np.maximum(pmi, 0.0), 0.0)
    # Truncated SVD through the (small) column Gram matrix: ppmi = U S V^T, rows U S^0.5 = ppmi V S^-0.5.
    gram = ppmi.T @ ppmi
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(-evals, kind="stable")
    keep = [i for i in order[:dim] if evals[i] > 1e-9 * max(evals.max(), 1e-300)]
    s = np.sqrt(evals[keep])
    vecs = ppmi @ evecs[:, keep] / np.sqrt(s)[None, :]
    return WordVectors(vocab, vecs.astype(np.float32), identity="toolkit")
