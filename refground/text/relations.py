"""Relation phrases between the noun phrases of a caption (ReIR Sec. 3.2.3 and L_rel of Sec. 3.3).

ReIR runs an external language parser (SceneGraphParser) over each caption to find *relation phrases*
between its noun phrases: they connect the phrase nodes of the visual object graph (train and test time)
and their most frequent predicates are the classes of the relation loss. The phrases themselves are an
input of phrase grounding, so both parsers here take them as given (token spans) and only decide which
pairs are related and by which words.

The toolkit ships its own deterministic parser (:func:`parse_relations`: no model, no download) and uses
spaCy's dependency parse only when asked (:func:`parse_relations_spacy`, ``--parser spacy``).

The heuristic (:func:`parse_relations`), on lower-cased tokens, walks the phrases left to right and reads
the *gap* (the words) between each phrase and the next:

1. *Cleaning*: tokens without a letter (punctuation) are dropped; the gap is cut at conjunctions
   (``and``, ``or``, ``but``, ``while``...) and commas, and only its last piece can be a predicate (in
   "is sitting and reading" the earlier pieces only tell that the clause has its main verb). A gap that
   holds a sentence mark (``. ; : ! ?``) ends the clause: no relation across it, and the next phrase is
   the subject of a new clause.
2. *Predicate or not*: the piece is a predicate when it holds a preposition or spatial word (``in``,
   ``next to``, ``to the left of``, ``above``), a verb (an open-class word: not a determiner, number,
   pronoun, colour, size, adverb in ``-ly``...) or an auxiliary other than a form of *be*. An empty gap
   (adjacent phrases), a pure conjunction (``and``) or a lone copula ("a dog is a poodle") gives no
   relation.
3. *Normalised string*: the piece's words, lower case, single spaces; a leading relative pronoun
   (``who``/``that``/``which``) is dropped, and so is a leading form of *be* when no verb follows it, so
   "is on", "are on" and "that is on" are all the class ``on``, while a copula before a verb is kept
   ("is holding", "are playing on": the surface form; "holding" and "is holding" are then two classes, as
   two surface relations of SceneGraphParser are).
4. *Attachment* (who is the subject; the object is always the phrase after the gap):
   - a *relative* predicate ("a woman who is holding a baby") attaches to the phrase before it;
   - a *finite* verb predicate (led by an auxiliary, or its first verb not a participle: "is holding",
     "rides", "has") attaches to the clause's subject (its first phrase): "a man in a shirt is holding a
     dog" -> (man, in, shirt), (man, is holding, dog);
   - a *participle* predicate ("holding", "dressed in") attaches to the phrase before it, climbing the
     chain of prepositional attachments: "a man in a shirt holding a dog" -> (man, holding, dog);
   - a *prepositional* predicate attaches to the phrase before it: "two dogs are playing on the grass next
     to a tree" -> (dogs, are playing on, grass), (grass, next to, tree).
5. *Coordination*: a phrase after a pure conjunction takes the role of the phrase before it (subject,
   prepositional object...) without a relation, except that once the clause has its finite verb, a
   conjunct followed by a finite predicate starts a new clause ("a man is holding a dog and a woman is
   petting a cat" -> (woman, is petting, cat)); before it, it does not ("a man in a blue shirt and jeans is
   playing a guitar" -> (man, is playing, guitar)).

Triples are returned once each, in the order found; a phrase is never related to itself.

Where it fails (compared with a real parser): coordination is not propagated ("a man is holding a dog
and a cat" gives (man, is holding, dog) only; SceneGraphParser also gives (man, holding, cat), and "a man
and a woman are sitting on a bench" relates the man only); words of an unannotated noun phrase become part
of the predicate ("a man is holding a cup of coffee" with phrases "a man" and "coffee" gives
(man, is holding a cup of, coffee)); a prepositional phrase always attaches low ("a man is walking a dog
on a leash" is right, "a man is eating a sandwich in the kitchen" gives (sandwich, in, kitchen), where
the man is in the kitchen); an irregular participle outside a short list counts as a finite verb ("a man
with a dog bitten by a snake" gives (man, bitten by, snake)); a noun of an unannotated phrase inside a
gap reads as a verb ("on the top of" is fine, "top" is a spatial word; "in the shade of" makes "shade" a
finite verb, so the predicate attaches to the clause's subject); possessives ("a man 's hat") give no
relation; pronouns standing for a phrase ("a man holding his dog") are not resolved. Unlike SceneGraphParser the
predicate is not lemmatised ("holds" and "holding" are distinct). On the synthetic world's captions (an
opener, phrases, ``and`` or a relation phrase between them) the heuristic is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from refground.errors import DataError
from refground.text.nouns import (COLORS, CONJUNCTIONS, COPULAS, DETERMINERS, NUMBERS, PREPOSITIONS, PRONOUNS,
                                  RELATIVES, SIZES, SPATIAL)

BE = frozenset("is are was were be been being am".split())
AUXILIARIES = COPULAS  # is, are, has, have, does, can, will...: they make a predicate finite
CLAUSE_MARKS = frozenset(".;:!?")
ADVERBS = frozenset(
    "not only just also very still even too there here then now together each all both again away almost "
    "always never often really quite so".split())
# Pronoun-like words of quantity ("one of the dogs"): not verbs either.
QUANTITIES = frozenset("one ones".split())
# A word of these classes is never the verb of a predicate.
NON_VERBS = (DETERMINERS | NUMBERS | PREPOSITIONS | PRONOUNS | CONJUNCTIONS | COLORS | SIZES | SPATIAL | ADVERBS
             | QUANTITIES | AUXILIARIES)
# Past participles without an -ed ending (the common ones in image captions).
IRREGULAR_PARTICIPLES = frozenset(
    "worn held seen made taken shown built hung lit drawn written done given known caught dressed stuck "
    "tied laid spread hidden frozen broken fallen ridden".split())

Triple = tuple[int, str, int]


def _is_word(token: str) -> bool:
    """A token with a letter in it (punctuation and bare numbers are dropped from predicates)."""
    return any(c.isalpha() for c in token)


def _is_verb(word: str) -> bool:
    return word.isalpha() and word not in NON_VERBS and not (word.endswith("ly") and len(word) > 4)


def _is_participle(word: str) -> bool:
    return ((word.endswith("ing") and len(word) > 4) or (word.endswith("ed") and len(word) > 3)
            or word in IRREGULAR_PARTICIPLES)


@dataclass(frozen=True)
class _Predicate:
    """One gap read as a predicate: its normalised ``text`` and how it attaches."""

    text: str
    kind: str  # "relative" | "finite" | "participle" | "preposition"


def _pieces(words: list[str]) -> list[list[str]]:
    """The gap's words cut at conjunctions and commas (empty pieces kept: "and holding" -> [[], [holding]])."""
    out: list[list[str]] = [[]]
    for w in words:
        if w in CONJUNCTIONS or w == ",":
            out.append([])
        elif _is_word(w):
            out[-1].append(w)
    return out


def _read_piece(piece: list[str]) -> _Predicate | None:
    """A piece of a gap as a predicate, or None when it is none (see the module docstring, rules 2-4)."""
    words = list(piece)
    relative = bool(words) and words[0] in RELATIVES and len(words) > 1
    if relative:
        words = words[1:]
    if not words:
        return None
    verbs = [w for w in words if _is_verb(w)]
    has_prep = any(w in PREPOSITIONS or w in SPATIAL for w in words)
    has_aux = any(w in AUXILIARIES and w not in BE for w in words)
    if not (verbs or has_prep or has_aux):
        return None  # a lone copula, adverbs, determiners of an unannotated phrase
    finite = words[0] in AUXILIARIES or bool(verbs and not _is_participle(verbs[0]))
    if words[0] in BE and not verbs and not has_aux:
        words = [w for w in words if w not in BE] or words  # "is on" -> "on"; the copula made it finite
    text = " ".join(words)
    if relative:
        return _Predicate(text, "relative")
    if finite:
        return _Predicate(text, "finite")
    if verbs:
        return _Predicate(text, "participle")
    return _Predicate(text, "preposition")


def _read_gap(words: list[str]) -> tuple[bool, bool, _Predicate | None, bool]:
    """``(clause_break, conjunction, predicate, finite_before)`` of a gap's lower-cased tokens:
    whether it ends the clause (a sentence mark), whether it starts with a conjunction or comma, its
    predicate (last piece) and whether an earlier piece held a finite verb ("is sitting and reading")."""
    if any(w in CLAUSE_MARKS for w in words):
        return True, False, None, False
    pieces = _pieces(words)
    pred = _read_piece(pieces[-1])
    finite_before = any(p is not None and p.kind == "finite" for p in map(_read_piece, pieces[:-1]))
    return False, len(pieces) > 1, pred, finite_before


def _check_spans(n_tokens: int, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for k, (a, b) in enumerate(spans):
        a, b = int(a), int(b)
        if not 0 <= a < b <= n_tokens:
            raise DataError(f"phrase {k}: span [{a}, {b}) is not inside the {n_tokens} tokens of the caption")
        out.append((a, b))
    return out


def parse_relations(tokens: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[Triple]:
    """Relation triples between the noun phrases of a caption, with the toolkit heuristic.

    ``tokens``: the caption's tokens (``Query.text.split(" ")``); ``spans``: the noun phrases as token
    spans ``[start, end)`` (any order; overlapping spans count as adjacent). Returns ``(subject phrase
    index, predicate, object phrase index)`` triples, indices into ``spans``, the predicate lower case with
    single spaces (see the module docstring for the rules and where they fail). Deterministic; reads
    nothing but its arguments. A span outside the tokens is a :class:`DataError`."""
    toks = [t.lower() for t in tokens]
    checked = _check_spans(len(toks), spans)
    order = sorted(range(len(checked)), key=lambda k: (checked[k][0], checked[k][1], k))
    if len(order) < 2:
        return []
    gaps = []
    for a, b in pairwise(order):
        lo, hi = checked[a][1], checked[b][0]
        gaps.append(_read_gap(toks[lo:hi] if hi > lo else []))
    out: list[Triple] = []
    seen: set[Triple] = set()
    subject = order[0]  # the clause's subject
    finite_seen = False  # the clause has its main (finite) verb
    up: dict[int, int] = {}  # phrase -> the phrase it is a prepositional object of (the attachment chain)

    def emit(s: int, pred: str, o: int) -> None:
        t = (s, pred, o)
        if s != o and t not in seen:
            seen.add(t)
            out.append(t)

    for g, (prev, nxt) in enumerate(pairwise(order)):
        clause_break, conj, pred, finite_before = gaps[g]
        finite_seen |= finite_before
        if clause_break:
            subject, finite_seen = nxt, False
            continue
        if pred is None:
            # Adjacent phrases, a pure conjunction or a lone copula: no relation; the next phrase is a
            # conjunct of the previous one, unless the clause already has its verb and the conjunct heads
            # a finite predicate of its own (a new clause).
            after = gaps[g + 1] if g + 1 < len(gaps) else None
            if (conj and finite_seen and after is not None and not after[0] and not after[1] and after[2] is not None
                    and after[2].kind == "finite"):
                subject, finite_seen = nxt, False
            elif prev in up:
                up[nxt] = up[prev]
            continue
        if pred.kind == "relative":
            emit(prev, pred.text, nxt)
        elif pred.kind == "finite":
            emit(subject, pred.text, nxt)
            finite_seen = True
        elif pred.kind == "participle":
            head = prev
            while head in up:
                head = up[head]
            emit(head, pred.text, nxt)
        else:
            emit(prev, pred.text, nxt)
            up[nxt] = prev
    return out


# ------------------------------------------------------------------------------------------------ spaCy
SUBJECT_DEPS = ("nsubj", "nsubjpass", "csubj", "expl")
OBJECT_DEPS = ("dobj", "obj", "dative", "attr", "oprd", "iobj")
PREP_DEPS = ("prep", "agent")
VERB_POS = ("VERB", "AUX")
PREDICATE_CHILD_DEPS = ("aux", "auxpass", "neg", "prt")


def relations_from_parse(words: Sequence[str], heads: Sequence[int], deps: Sequence[str], pos: Sequence[str],
                         spans: Sequence[tuple[int, int]]) -> list[Triple]:
    """Relation triples from a dependency parse (SceneGraphParser's rules, on given phrases).

    ``words`` the tokens; ``heads[i]`` the index of token i's head (the root is its own head); ``deps[i]``
    its ClearNLP dependency label (spaCy English: ``nsubj``, ``prep``, ``pobj``, ``dobj``, ``relcl``...),
    ``pos[i]`` its universal POS tag; ``spans`` the phrases as in :func:`parse_relations`. For each phrase
    (object) its root token (the one whose head lies outside the span) is followed upwards through
    prepositions and words of no phrase (``in front of``) to a phrase token (a prepositional relation with
    that phrase as subject) or to a verb, whose subject is its ``nsubj`` child's phrase, or for a
    relative/participial clause (``relcl``, ``acl``) the phrase it modifies, or for a ``conj``/``xcomp``/
    ``advcl`` verb its head verb's subject. The predicate is the verb with its auxiliaries, negation and
    particle plus the prepositions on the path, in sentence order, normalised as in
    :func:`parse_relations` (a leading form of *be* dropped before a bare preposition)."""
    n = len(words)
    checked = _check_spans(n, spans)
    owner: dict[int, int] = {}
    for k, (a, b) in sorted(enumerate(checked), key=lambda kv: (kv[1][1] - kv[1][0], kv[0]), reverse=True):
        for t in range(a, b):
            owner[t] = k  # the shortest span wins a token shared by two
    children: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        if h != i:
            children.setdefault(int(h), []).append(i)

    def span_root(k: int) -> int:
        a, b = checked[k]
        for t in range(a, b):
            if not a <= heads[t] < b or heads[t] == t:
                return t
        return a

    def verb_subject(v: int, depth: int = 0) -> int | None:
        if depth > n:
            return None
        for c in children.get(v, []):
            if deps[c] in SUBJECT_DEPS and c in owner:
                return owner[c]
        if deps[v] in ("relcl", "acl") and heads[v] in owner:
            return owner[heads[v]]
        if deps[v] in ("conj", "xcomp", "advcl", "ccomp") and heads[v] != v:
            return verb_subject(int(heads[v]), depth + 1)
        return None

    out: list[Triple] = []
    seen: set[Triple] = set()
    for j in range(len(checked)):
        t = span_root(j)
        path: list[int] = []
        cur = t
        for _ in range(n):
            h = int(heads[cur])
            if h == cur:
                break
            if h in owner and owner[h] != j:
                break
            if pos[h] in VERB_POS and h not in owner:
                break
            path.append(h)
            cur = h
        else:
            continue
        h = int(heads[cur])
        if h == cur or (h in owner and owner[h] == j):
            continue
        if deps[t] in SUBJECT_DEPS and not path:
            continue  # the phrase is a subject itself
        preds = [p for p in path if p not in owner]
        if h in owner:
            subj, verb_words = owner[h], []
        else:
            subj = verb_subject(h)
            verb_words = [h, *[c for c in children.get(h, []) if deps[c] in PREDICATE_CHILD_DEPS]]
        if subj is None or subj == j:
            continue
        if not preds and not verb_words:
            continue
        if verb_words and not preds and deps[cur] not in OBJECT_DEPS:
            continue  # a subject, a modifier of the verb, not its object
        idx = sorted(set(verb_words) | set(preds))
        ws = [words[i].lower() for i in idx if _is_word(words[i])]
        if ws and ws[0] in BE and not any(_is_verb(w) for w in ws[1:]) and len(ws) > 1:
            ws = [w for w in ws if w not in BE]
        triple = (subj, " ".join(ws), j)
        if ws and triple not in seen:
            seen.add(triple)
            out.append(triple)
    return out


def _spacy_parser(model: str):
    """spaCy's ``model`` with its dependency parser (:func:`refground.text.nouns.spacy_model`)."""
    from refground.text.nouns import spacy_model

    return spacy_model(model, parser=True)


def spacy_identity(model: str = "en_core_web_sm") -> str:
    """``<model>@<model version>/spacy <version>``: what a cached parse depends on (loads the model, so a
    missing spaCy or model is the one-line :class:`UsageError` before any work)."""
    nlp = _spacy_parser(model)
    import spacy

    return f"{model}@{nlp.meta.get('version', '?')}/spacy {spacy.__version__}"


def parse_relations_spacy(text: str, spans: Sequence[tuple[int, int]], model: str = "en_core_web_sm") -> list[Triple]:
    """Relation triples of a caption from spaCy's dependency parse (:func:`relations_from_parse`).

    ``text`` is the caption's tokens joined by single spaces; the parse runs on exactly those tokens (a
    pre-tokenised Doc), so ``spans`` index them as in :func:`parse_relations`. spaCy is not a dependency
    of the toolkit: a missing spaCy or model is a one-line :class:`UsageError` saying how to install it."""
    nlp = _spacy_parser(model)
    from spacy.tokens import Doc

    words = text.split(" ")
    doc = Doc(nlp.vocab, words=words)
    for _, proc in nlp.pipeline:
        doc = proc(doc)
    return relations_from_parse(words, [t.head.i for t in doc], [t.dep_ for t in doc], [t.pos_ for t in doc],
                                spans)
