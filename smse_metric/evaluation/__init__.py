"""Evaluation: kNN classification, patient-level accuracy, retrieval and clustering
metrics (PML's definitions) and the cross-magnification matrix.

Neighbour search is exact unless ``index="ivf"`` is asked for: a flat FAISS index
where faiss is installed (on a GPU when it has GPUs and ``device`` allows), torch
matrix products otherwise (CPU or GPU), and the symmetric block search when the
queries are the gallery. It goes in chunks of queries so memory stays at the gallery
plus one chunk of neighbours.
All metrics are computed from a [Q, k] neighbour table with bincount and boolean
algebra; nothing loops over queries in Python.
"""

from .bounded import bounded_knn
from .clustering import ClusteringMetrics, kmeans, mutual_information
from .evaluate import evaluate_embeddings, evaluate_predictions
from .index import FaissIndex, make_index
from .knn import KNNClassifier, Neighbours
from .metrics import ClassificationMetrics, EvaluationReport, RetrievalMetrics
from .symmetric import symmetric_knn
from .torch_index import TorchIndex

__all__ = [
    "ClassificationMetrics",
    "ClusteringMetrics",
    "EvaluationReport",
    "FaissIndex",
    "KNNClassifier",
    "Neighbours",
    "RetrievalMetrics",
    "TorchIndex",
    "bounded_knn",
    "evaluate_embeddings",
    "evaluate_predictions",
    "kmeans",
    "make_index",
    "mutual_information",
    "symmetric_knn",
]
