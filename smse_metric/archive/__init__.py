"""A case archive: embeddings of past cases on disk, approximate indexes whose recall is
measured against exact search, and search results grouped by case.

The store needs numpy only; the approximate indexes need faiss (the ``[faiss]`` extra).
"""

from .cases import CaseEvaluation, CaseMatch, CaseSearch, PatchMatch, evaluate_cases, search_cases
from .index import KINDS, ArchiveIndex, exact_search
from .store import AddResult, EmbeddingStore

__all__ = [
    "KINDS",
    "AddResult",
    "ArchiveIndex",
    "CaseEvaluation",
    "CaseMatch",
    "CaseSearch",
    "EmbeddingStore",
    "PatchMatch",
    "evaluate_cases",
    "exact_search",
    "search_cases",
]
