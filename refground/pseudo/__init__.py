"""Pseudo ground truth: contextual objects for VL-NMS (text similarity, Sec. 3.3)."""

from refground.pseudo.vlnms import (PseudoContexts, build_pseudo_vlnms, evaluate_pseudo, load_pseudo_vlnms,
                                    pseudo_contexts, pseudo_path, read_pseudo)

__all__ = ["PseudoContexts", "build_pseudo_vlnms", "evaluate_pseudo", "load_pseudo_vlnms", "pseudo_contexts",
           "pseudo_path", "read_pseudo"]
