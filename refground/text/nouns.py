"""Noun extraction for text-similarity pseudo ground truth (VL-NMS Sec. 3.3).

The paper POS-tags the expression with spaCy and keeps the nouns. The toolkit ships its own deterministic
heuristic tagger (no model, no download) and uses spaCy only when asked (``--parser spacy``).

The heuristic (:func:`extract_nouns`), on lower-cased tokens:

1. *Lexicon nouns*: a token (or a run of tokens, for multi-word names such as ``traffic light``) found in
   the :class:`NounLexicon` is a noun. The lexicon holds the dataset's category names, generic head nouns
   (``object``, ``shape``, ``thing``, ``one``...) and plural forms (``circles`` -> ``circle``); a plural of a
   lexicon noun is returned as its singular, so it matches the category name exactly.
2. *Head position*: any other open-class word (alphabetic, not in the closed-class lists below) that ends
   a noun phrase is a noun: it is followed by a boundary (preposition, relative pronoun, conjunction,
   copula, spatial word, punctuation, the end of the sentence) or by a participle (``-ing``/``-ed``:
   "man *holding* an umbrella"), and is not itself a participle after a copula ("who is *standing*").
   Closed-class words never are: determiners, numerals, prepositions, pronouns, conjunctions, copulas,
   colour and size adjectives, spatial and comparative words.

Where it fails (compared with a real tagger): an unknown *predicate* adjective at the end ("the man who is
happy" -> "happy"), an unknown adjective before a boundary ("the one in white" -> "white" is a colour and
excluded, but "the one in plaid" -> "plaid"), nouns used as modifiers ("tennis racket" gives "racket"
only, unless "tennis racket" is in the lexicon), verbs in head position without a participle suffix
("man sits on the bench" -> "sits" is not followed by a boundary, so it is skipped, but "the dog that
runs" -> "runs"), and irregular plurals outside the lexicon ("men" stays "men"). On the synthetic world
the lexicon covers every noun the generator says, so the heuristic is exact there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from refground.errors import UsageError

DETERMINERS = frozenset(
    "the a an this that these those each every some any all both no another other either neither my your "
    "his her its our their whose which what".split())
NUMBERS = frozenset("two three four five six seven eight nine ten first second third fourth last".split())
PREPOSITIONS = frozenset(
    "of on in at to from with without by for near beside besides behind between among under over above "
    "below beneath underneath across along around against into onto inside outside within through toward "
    "towards next front back up down off out via than like upon atop".split())
PRONOUNS = frozenset(
    "i me you he him she it we us they them who whom whose which that what where when why how "
    "himself herself itself themselves there here".split())
RELATIVES = frozenset("who whom whose which that where".split())
CONJUNCTIONS = frozenset("and or but nor so yet while".split())
COPULAS = frozenset("is are was were be been being am has have had does do did can could will would".split())
COLORS = frozenset(
    "red green blue yellow purple orange pink cyan black white gray grey brown golden silver dark light "
    "beige tan maroon navy teal violet".split())
SIZES = frozenset(
    "small medium large big little tiny huge tall short long wide narrow bigger larger smaller biggest "
    "largest smallest tallest shortest taller shorter".split())
SPATIAL = frozenset(
    "left right top bottom middle center centre upper lower leftmost rightmost topmost bottommost lowest "
    "highest closest nearest farthest furthest far close closer side corner edge".split())
FUNCTION = frozenset("not only just also very please find look pick click select is".split())
CLOSED_CLASS = (DETERMINERS | NUMBERS | PREPOSITIONS | PRONOUNS | CONJUNCTIONS | COPULAS | COLORS | SIZES
                | SPATIAL | FUNCTION)
# A word after one of these ends its noun phrase (the head-position rule).
BOUNDARY = PREPOSITIONS | RELATIVES | CONJUNCTIONS | COPULAS | frozenset(",.;:!?") | SPATIAL
GENERIC_NOUNS = ("object", "shape", "thing", "one", "item")


@dataclass
class NounLexicon:
    """Known nouns: ``nouns`` (single lower-case words), ``phrases`` (multi-word names as token tuples),
    ``plurals`` (surface form -> lemma). ``head_rule``: also take open-class words in head position."""

    nouns: set[str] = field(default_factory=set)
    phrases: set[tuple[str, ...]] = field(default_factory=set)
    plurals: dict[str, str] = field(default_factory=dict)
    head_rule: bool = True

    @classmethod
    def from_names(cls, names: Iterable[str], generic: Iterable[str] = GENERIC_NOUNS,
                   plurals: dict[str, str] | None = None, head_rule: bool = True) -> NounLexicon:
        """A lexicon of category ``names`` (multi-word names become phrases), ``generic`` head nouns and
        ``plurals`` (default: regular English plurals of every single-word name)."""
        lex = cls(head_rule=head_rule)
        for name in [*names, *generic]:
            words = tuple(name.lower().replace("_", " ").split())
            if len(words) == 1:
                lex.nouns.add(words[0])
            elif words:
                lex.phrases.add(words)
        if plurals is None:
            plurals = {_regular_plural(n): n for n in lex.nouns}
            plurals.pop("ones", None)
        lex.plurals.update({k.lower(): v.lower() for k, v in plurals.items()})
        return lex

    @classmethod
    def for_dataset(cls, ds) -> NounLexicon:
        """The lexicon of a :class:`~refground.data.model.Dataset`: its category names, generic head
        nouns and, for the synthetic world, its plural table and filler nouns (``meta['vocabulary']``)."""
        vocab = ds.meta.get("vocabulary") or {}
        generic = list(GENERIC_NOUNS) + list(vocab.get("filler_nouns") or [])
        plurals = None
        if vocab.get("plurals"):
            plurals = {_regular_plural(c.lower()): c.lower() for c in ds.categories if " " not in c}
            plurals.update({p: c for c, p in vocab["plurals"].items()})
        return cls.from_names(ds.categories, generic, plurals)

    @property
    def max_phrase(self) -> int:
        return max((len(p) for p in self.phrases), default=1)


def _regular_plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def default_lexicon() -> NounLexicon:
    """The synthetic world's lexicon: its categories, plurals and filler nouns, plus generic heads."""
    from refground.data.synth import world

    return NounLexicon.from_names(world.CATEGORIES, (*GENERIC_NOUNS, *world.FILLER_NOUNS),
                                  {v: k for k, v in world.PLURALS.items()})


def _open_class(word: str) -> bool:
    return word.isalpha() and word not in CLOSED_CLASS


def extract_nouns(tokens: Sequence[str], lexicon: NounLexicon | None = None) -> list[str]:
    """The nouns of ``tokens`` in sentence order (lower-case; lexicon plurals as their singular;
    multi-word lexicon names as one space-joined noun; duplicates kept). See the module docstring."""
    lex = lexicon if lexicon is not None else default_lexicon()
    toks = [t.lower() for t in tokens if t]
    out: list[str] = []
    i, n = 0, len(toks)
    longest = lex.max_phrase
    while i < n:
        matched = False
        for span in range(min(longest, n - i), 1, -1):  # longest multi-word name first
            if tuple(toks[i:i + span]) in lex.phrases:
                out.append(" ".join(toks[i:i + span]))
                i += span
                matched = True
                break
        if matched:
            continue
        w = toks[i]
        if w in lex.nouns:
            out.append(w)
        elif w in lex.plurals:
            out.append(lex.plurals[w])
        elif lex.head_rule and _open_class(w) and _is_head(toks, i):
            out.append(w)
        i += 1
    return out


def _is_head(toks: Sequence[str], i: int) -> bool:
    """Whether toks[i] ends a noun phrase: followed by a boundary, a participle or the end (and is not
    itself a participle after a copula: "who is standing")."""
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    ends = nxt is None or nxt in BOUNDARY or (nxt.isalpha() and nxt not in CLOSED_CLASS
                                              and len(nxt) > 4 and nxt.endswith(("ing", "ed")))
    if not ends:
        return False
    if toks[i].endswith("ing") and len(toks[i]) > 4 and i > 0 and toks[i - 1] in COPULAS:
        return False  # "who is standing": a verb, not a noun
    return True


def extract_nouns_spacy(text: str, model: str = "en_core_web_sm") -> list[str]:
    """Nouns (NOUN and PROPN, as lower-case lemmas) of ``text`` tagged by spaCy's ``model``.

    spaCy is not a dependency of the toolkit: a one-line :class:`UsageError` says how to install it."""
    nlp = spacy_model(model)
    return [t.lemma_.lower() for t in nlp(text) if t.pos_ in ("NOUN", "PROPN")]


_SPACY: dict[tuple[str, bool], object] = {}


def spacy_model(model: str, parser: bool = False):
    """spaCy's ``model`` (cached), without its named-entity recogniser and, unless ``parser``, without its
    dependency parser (the noun tagger needs tags only; the relation parser needs the parse). spaCy is not a
    dependency of the toolkit: a missing spaCy, model or parser is a one-line :class:`UsageError` saying how to
    install it."""
    key = (model, parser)
    if key in _SPACY:
        return _SPACY[key]
    try:
        import spacy
    except ImportError:
        raise UsageError(f"--parser spacy needs spaCy: `pip install spacy && python -m spacy download {model}`"
                         ) from None
    try:
        nlp = spacy.load(model, disable=["ner"] if parser else ["ner", "parser"])
    except OSError:
        raise UsageError(f"spaCy model {model!r} is not installed: `python -m spacy download {model}`") from None
    if parser and "parser" not in nlp.pipe_names:
        raise UsageError(f"spaCy model {model!r} has no dependency parser; use one that has (en_core_web_sm)")
    _SPACY[key] = nlp
    return nlp
