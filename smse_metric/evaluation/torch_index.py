"""Exact nearest-neighbour search with torch alone, on the CPU or a GPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_choice, resolve_distance
from ._inputs import CHUNK_ENTRIES, DEVICES, as_float32, prepare_vectors
from ._keys import distances, factors, order_keys, similarity

__all__ = ["TorchIndex"]


class TorchIndex:
    """Exact nearest-neighbour search over a gallery with torch matrix products: no
    FAISS needed, and a GPU search wherever torch has CUDA.

    The neighbours are the k smallest by ``(distance, gallery index)``, the same
    rule and the same arithmetic as [`symmetric_knn`][smse_metric.evaluation.symmetric_knn].
    Queries go in chunks so that a chunk's similarities stay under ``CHUNK_ENTRIES``.
    The interface is [`FaissIndex`][smse_metric.evaluation.FaissIndex]'s.

    Args:
        embeddings: [G, D] gallery, numpy or torch on any device (copied once).
        distance: ``"cosine"`` (default; ``1 - cos``), ``"l2"`` (euclidean) or
            ``"squared_l2"`` (its square: the same neighbours).
        device: ``"auto"`` (where the embeddings are), ``"cpu"`` or ``"cuda"``.
        metric: the old name of ``distance``; deprecated, warns.

    Examples:
        >>> idx = TorchIndex(np.eye(3, dtype="float32"), distance="l2")
        >>> dist, ids = idx.search(np.array([[1.0, 0, 0], [0, 0, 0]], dtype="float32"), k=2)
        >>> ids.tolist()
        [[0, 1], [0, 1]]
    """

    def __init__(
        self,
        embeddings: Any,
        distance: str | None = None,
        device: str = "auto",
        *,
        metric: str | None = None,
    ) -> None:
        distance = resolve_distance(distance, "cosine", metric=metric)
        check_choice("device", device, DEVICES)
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no GPU")
        self.device = "cuda" if device == "cuda" or (device == "auto" and on_cuda) else "cpu"
        self._gallery = prepare_vectors(as_float32("embeddings", embeddings), distance)
        self.distance, (self.ntotal, self.dim) = distance, self._gallery.shape
        self._b = factors(torch.from_numpy(self._gallery).to(self.device), distance).padded()

    def vectors(self) -> np.ndarray:
        """[G, D] float32 gallery as stored (L2-normalised for ``"cosine"``)."""
        return self._gallery

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest gallery items of each query: distances [Q, k] (ascending) and ids [Q, k]
        (``-1`` and ``inf`` where the gallery has fewer than k items).

        Args:
            queries: [Q, D] numpy or torch.
            k: neighbours per query.
        """
        q = prepare_vectors(as_float32("queries", queries), self.distance)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        k, n_q = int(k), q.shape[0]
        kk = min(k, self.ntotal)
        a = factors(torch.from_numpy(q).to(self.device), self.distance)
        ids = torch.arange(self.ntotal, device=self.device)
        dist = np.full((n_q, k), np.inf, dtype=np.float32)
        out = np.full((n_q, k), -1, dtype=np.int64)
        step = max(1, CHUNK_ENTRIES // self.ntotal)
        for s in range(0, n_q, step):
            sim = similarity(a.take(s, s + step), self._b, self.ntotal)
            keys = order_keys(sim, ids).topk(kk, dim=1).values
            d, i = distances(keys, self.distance)
            dist[s : s + step, :kk], out[s : s + step, :kk] = d.cpu().numpy(), i.cpu().numpy()
        return dist, out
