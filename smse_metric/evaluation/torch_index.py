"""Exact nearest-neighbour search with torch alone, on the CPU or a GPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_choice, resolve_distance
from ._inputs import (
    CHUNK_ENTRIES,
    DEVICES,
    as_device_tensor,
    as_float32,
    prepare_tensor,
    prepare_vectors,
)
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
        embeddings: [G, D] gallery, numpy or torch on any device (copied once; a CUDA
            tensor searched on the GPU stays there, and so do CUDA queries).
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
        self.distance = distance
        self._gallery = self._rows("embeddings", embeddings)
        self.ntotal, self.dim = self._gallery.shape
        self._b = factors(self._gallery, distance).padded()

    def _rows(self, name: str, x: Any) -> torch.Tensor:
        """Rows as stored (L2-normalised for ``"cosine"``) on the index's device: a CUDA
        tensor for a CUDA index is checked and prepared there, the rest on the host."""
        if isinstance(x, torch.Tensor) and x.is_cuda and self.device == "cuda":
            return prepare_tensor(as_device_tensor(name, x.to(self.device)), self.distance)
        rows = prepare_vectors(as_float32(name, x), self.distance)
        return torch.from_numpy(rows).to(self.device)

    def vectors(self) -> np.ndarray:
        """[G, D] float32 gallery as stored (L2-normalised for ``"cosine"``), on the host
        (a copy from a GPU)."""
        return self._gallery.cpu().numpy()

    def tensor(self) -> torch.Tensor:
        """[G, D] float32 gallery as stored, on the index's device (no copy)."""
        return self._gallery

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest gallery items of each query: distances [Q, k] (ascending) and ids [Q, k]
        (``-1`` and ``inf`` where the gallery has fewer than k items).

        Args:
            queries: [Q, D] numpy or torch.
            k: neighbours per query.
        """
        q = self._rows("queries", queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        k, n_q = int(k), q.shape[0]
        kk = min(k, self.ntotal)
        a = factors(q, self.distance)
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
