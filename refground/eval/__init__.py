"""Evaluation: metric definitions (:mod:`.metrics`), the predictions file (:mod:`.predictions`) and
scoring a predictions file against a dataset split (:mod:`.evaluate`)."""

from refground.eval.evaluate import EvalResult, TableData, evaluate
from refground.eval.metrics import mask_iou_stats, pointit, precision_at_1, proposal_recall
from refground.eval.predictions import (
    PhrasePrediction, Predictions, QueryPrediction, read_predictions, write_predictions,
)

__all__ = [
    "EvalResult", "TableData", "evaluate",
    "precision_at_1", "pointit", "mask_iou_stats", "proposal_recall",
    "Predictions", "QueryPrediction", "PhrasePrediction", "read_predictions", "write_predictions",
]
