"""A CLIP tokenizer made from a corpus: byte-level BPE in CLIP's own file layout (vocab.json + merges.txt).

CLIP's tokenizer lowercases, splits text into words and punctuation, and encodes each word with byte-level BPE
whose last symbol carries ``</w>``. Learning merges by frequency (real BPE training) would need the
``tokenizers`` trainer and a pre-tokenizer matching CLIP's; a small closed corpus does not need it: every word
the corpus uses gets one merge chain that builds it from its bytes, so it is one token, and any other text
still tokenises (byte by byte). The result loads with ``transformers.CLIPTokenizer`` (so ``AutoProcessor``
reads it back with the image processor), which is what a real CLIP folder holds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation for plain lowercase text: words, single digits, runs of other non-space characters.
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to chr(256 + k)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def corpus_words(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """The words of ``texts`` as CLIP pre-tokenises them (lowercased), used at least ``min_count`` times,
    most frequent first (ties alphabetical, so the list depends only on the texts)."""
    counts = Counter(w for t in texts for w in _WORDS.findall(t.lower()))
    return sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))


def write_clip_vocab(path: str | Path, words: Sequence[str]) -> tuple[int, int]:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level BPE in CLIP's layout into folder ``path``: the
    256 byte symbols, the same with ``</w>``, one merge chain per word of ``words`` (so each is one token; the
    symbols are the word's UTF-8 bytes in the byte alphabet), then ``<|startoftext|>`` and ``<|endoftext|>``.
    Every text tokenises (unknown words byte by byte). Returns ``(bos_id, eos_id)``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for sym in list(alphabet.values()) + [a + "</w>" for a in alphabet.values()]:
        vocab.setdefault(sym, len(vocab))
    merges: list[str] = []
    seen: set[str] = set()
    for word in words:
        chars = [alphabet[b] for b in word.encode("utf-8")]
        if not chars:
            continue
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        acc = symbols[0]
        for sym in symbols[1:]:
            merge = f"{acc} {sym}"
            acc = acc + sym
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
                vocab.setdefault(acc, len(vocab))
    bos, eos = len(vocab), len(vocab) + 1
    vocab[BOS], vocab[EOS] = bos, eos
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return bos, eos


def build_clip_tokenizer(path: str | Path, texts: Iterable[str], max_length: int, min_count: int = 1):
    """A ``transformers.CLIPTokenizer`` whose vocabulary is the words of ``texts`` (:func:`write_clip_vocab`),
    written to ``path`` and loaded back from it, truncating at ``max_length`` tokens (BOS and EOS included)."""
    from transformers import CLIPTokenizer

    write_clip_vocab(path, corpus_words(texts, min_count))
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=int(max_length))


__all__ = ["BOS", "EOS", "build_clip_tokenizer", "bytes_to_unicode", "corpus_words", "write_clip_vocab"]
