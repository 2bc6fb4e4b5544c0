"""Evaluation: exact match per category and MME-style yes/no scores, on any backend."""

from .metrics import EvalReport, Prediction, normalize, score, yes_no  # noqa: F401
from .runner import evaluate  # noqa: F401
