"""The synthetic referring-expression world: the embedded default dataset every method trains on.

Images of textured backgrounds with 4-20 coloured shapes (8 categories, 8 colours, 3 size classes) that
partly occlude each other, exact visible instance masks, referring expressions of six kinds (category,
attribute, location, size, first- and second-order relations) each checked to denote exactly its
referent, and captions whose phrases link to their objects. Deterministic for a seed.

Public API: :func:`generate_dataset`, :func:`write_synthetic`, :func:`ensure_synthetic`, :func:`summary`; the
built-in CLIP's pretraining corpus (:mod:`refground.data.synth.web`, disjoint from the world):
:func:`generate_web_corpus`, :func:`write_web_corpus`, :func:`ensure_web_corpus`, :func:`web_summary`.
"""

from refground.data.synth.generate import (DEFAULT_FRACTIONS, SPLITS, assign_splits, ensure_synthetic, generate_dataset,
                                           params_dict, summary, write_synthetic)
from refground.data.synth.language import KINDS
from refground.data.synth.web import (WEB_GENERATOR_VERSION, ensure_web_corpus, generate_web_corpus, web_summary,
                                      write_web_corpus)
from refground.data.synth.world import (CATEGORIES, CATEGORY_GROUPS, COLORS, GENERATOR_VERSION, RELATION_WORDS,
                                        SIZES, vocabulary)

__all__ = ["CATEGORIES", "CATEGORY_GROUPS", "COLORS", "DEFAULT_FRACTIONS", "GENERATOR_VERSION", "KINDS",
           "RELATION_WORDS", "SIZES", "SPLITS", "WEB_GENERATOR_VERSION", "assign_splits", "ensure_synthetic",
           "ensure_web_corpus", "generate_dataset", "generate_web_corpus", "params_dict", "summary", "vocabulary",
           "web_summary", "write_synthetic", "write_web_corpus"]
