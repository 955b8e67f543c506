"""FAISS-backed evaluation: kNN classification, patient-level accuracy, retrieval
metrics and the cross-magnification matrix.

Neighbour search is exact (a flat FAISS index) unless ``index="ivf"`` is asked for,
runs on a GPU when the installed faiss has GPUs and ``device`` allows, and goes in
chunks of queries so memory stays at the gallery plus one chunk of neighbours.
All metrics are computed from a [Q, k] neighbour table with bincount and boolean
algebra; nothing loops over queries in Python.
"""

from .evaluate import evaluate_embeddings, evaluate_predictions
from .index import FaissIndex
from .knn import KNNClassifier, Neighbours
from .metrics import ClassificationMetrics, EvaluationReport, RetrievalMetrics
from .symmetric import symmetric_knn

__all__ = [
    "ClassificationMetrics",
    "EvaluationReport",
    "FaissIndex",
    "KNNClassifier",
    "Neighbours",
    "RetrievalMetrics",
    "evaluate_embeddings",
    "evaluate_predictions",
    "symmetric_knn",
]
