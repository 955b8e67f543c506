"""k-nearest-neighbour classification with leave-one-out and leave-one-patient-out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_choice, positive_int, resolve_distance
from ._inputs import (
    BACKENDS,
    CHUNK_ENTRIES,
    EXCLUDE,
    SYMMETRIC_MIN_ROWS,
    WEIGHTS,
    as_device_tensor,
    as_float32,
    as_ids,
    prepare_tensor,
    prepare_vectors,
)
from .bounded import PRECISIONS, bounded_knn
from .index import make_index
from .symmetric import symmetric_knn
from .torch_index import TorchIndex

__all__ = ["KNNClassifier", "Neighbours"]


@dataclass
class Neighbours:
    """The neighbour table of one chunk of queries, after exclusions, as
    `KNNClassifier.kneighbors_chunks` yields it.

    Attributes:
        rows: which queries of the call this chunk holds.
        dist: [q, k] distances, ascending; ``inf`` where fewer neighbours remain.
        ids: [q, k] gallery row of each neighbour (``-1`` with ``inf``).

    Examples:
        >>> knn = KNNClassifier(k=1, distance="l2").fit(np.array([[0.0], [1.0]]), [0, 1])
        >>> nb = next(knn.kneighbors_chunks(np.array([[0.9]])))
        >>> nb.rows, nb.ids.tolist()
        (slice(0, 1, None), [[1]])
    """

    rows: slice
    dist: np.ndarray
    ids: np.ndarray


class KNNClassifier:
    """k-nearest-neighbour classifier over an exact index, with leave-one-patient-out.

    Args:
        k: neighbours that vote.
        distance: ``"cosine"`` (default; ``1 - cos``), ``"l2"`` (euclidean) or
            ``"squared_l2"`` (its square: the same neighbours).
        weights: ``"uniform"`` or ``"distance"`` (``1 / d``; a query at distance 0
            from some neighbours takes only those, as scikit-learn does).
        device: see [`make_index`][smse_metric.evaluation.make_index].
        index: see [`make_index`][smse_metric.evaluation.make_index].
        backend: ``"auto"`` (FAISS where it is installed and serves the device, else
            torch), ``"faiss"`` or ``"torch"``; see `make_index`.
        distributed: each rank of a ``torch.distributed`` process group fits its own
            shard of the gallery and queries its own shard of queries; the answers are
            those of one process given the shards concatenated in rank order (ids in
            that concatenation; the torch arithmetic, on the device the process
            group's backend uses). Every call is then a collective: every rank makes it
            (and iterates `kneighbors_chunks` to its end).
        process_group: the process group (None: the default one).
        precision: how a leave-one-out search of the gallery itself (``exclude="self"``
            or ``"group"`` on the fitted embeddings) computes: ``"auto"`` (default:
            ``"tf32"`` on a GPU, ``"float32"`` elsewhere), ``"float32"``
            ([`symmetric_knn`][smse_metric.evaluation.symmetric_knn]), ``"tf32"`` or
            ``"bf16"`` (candidates from that product within its error bound, ranked
            in float32: [`bounded_knn`][smse_metric.evaluation.bounded_knn]; emulated,
            and slow, off a GPU). The neighbours are exact whichever is chosen.
        metric: the old name of ``distance``; deprecated, warns.

    Ties: neighbours at equal distance are ordered by gallery index; classes with
    equal votes go to the smaller class index (scikit-learn's rule).

    Examples:
        >>> emb = np.array([[0.0, 1], [0, 2], [5, 5], [5, 6]], dtype="float32")
        >>> knn = KNNClassifier(k=1, distance="l2").fit(emb, ["a", "a", "b", "b"], [1, 2, 3, 4])
        >>> knn.predict(emb, query_groups=[1, 2, 3, 4], exclude="group").tolist()
        ['a', 'a', 'b', 'b']
    """

    def __init__(
        self,
        k: int = 5,
        distance: str | None = None,
        weights: str = "uniform",
        device: str = "auto",
        index: str = "flat",
        backend: str = "auto",
        *,
        distributed: bool = False,
        process_group: Any = None,
        precision: str = "auto",
        metric: str | None = None,
    ) -> None:
        self.k = positive_int("k", k)
        check_choice("precision", precision, ("auto", "float32", *PRECISIONS))
        self.precision = precision
        self.distributed, self.process_group = bool(distributed), process_group
        self.distance = resolve_distance(distance, "cosine", metric=metric)
        check_choice("weights", weights, WEIGHTS)
        self.weights = weights
        check_choice("backend", backend, BACKENDS)
        self.device, self.index_type, self.backend = device, index, backend

    def fit(self, embeddings: Any, labels: Any, groups: Any = None) -> KNNClassifier:
        """Index the gallery. ``groups`` (patients) enable ``exclude="group"``.

        Args:
            embeddings: [G, D] gallery (``distributed``: this rank's shard, maybe empty).
            labels: [G] their labels.
            groups: [G] their groups (patients), or None.
        """
        if self.distributed:
            from . import sharded

            return sharded.fit(self, embeddings, labels, groups, self.process_group)
        self.index_ = make_index(
            embeddings,
            distance=self.distance,
            device=self.device,
            index=self.index_type,
            backend=self.backend,
        )
        n = self.index_.ntotal
        self.classes_, self.labels_ = np.unique(as_ids("labels", labels, n), return_inverse=True)
        self.groups_ = None
        if groups is not None:
            self.group_values_, self.groups_ = np.unique(
                as_ids("groups", groups, n), return_inverse=True
            )
            self.group_sizes_ = np.bincount(self.groups_)  # gallery images per group
        return self

    def query_group_codes(self, query_groups: Any, n: int) -> np.ndarray:
        """Query groups as the gallery's group codes; -1 for groups the gallery lacks.

        Args:
            query_groups: [n] group (patient) of each query.
            n: number of queries.
        """
        if self.groups_ is None:
            raise ValueError("exclude='group' needs fit(..., groups=...)")
        if query_groups is None:
            raise ValueError("exclude='group' needs query_groups")
        qg = as_ids("query_groups", query_groups, n)
        pos = np.searchsorted(self.group_values_, qg)
        pos = np.minimum(pos, len(self.group_values_) - 1)
        return np.where(self.group_values_[pos] == qg, pos, -1)

    def kneighbors_chunks(
        self,
        queries: Any,
        query_groups: Any = None,
        exclude: str = "none",
        k: int | None = None,
        extra: np.ndarray | None = None,
    ) -> Iterator[Neighbours]:
        """Yield, per chunk of queries, the k nearest usable neighbours.

        ``exclude="self"``: the queries are the fitted gallery in the same order and
        query i never sees gallery item i. ``exclude="group"``: no query sees an item
        of its own group (leave-one-patient-out). Enough extra neighbours are retrieved
        that exactly k usable ones remain, or a ValueError says which query lacks them.
        ``extra`` [Q] asks for more neighbours per query (used for MAP@R).
        """
        check_choice("exclude", exclude, EXCLUDE)
        if not hasattr(self, "index_" if not self.distributed else "shard_"):
            raise ValueError("this KNNClassifier is not fitted yet: call fit(embeddings, labels)")
        k = self.k if k is None else int(k)
        if self.distributed:
            from . import sharded

            yield from sharded.kneighbors(
                self, queries, query_groups, exclude, k, extra, self.process_group
            )
            return
        q = self._queries(queries)
        n_q, n_g = q.shape[0], self.index_.ntotal
        if exclude == "self" and n_q != n_g:
            raise ValueError(
                f"exclude='self' needs the queries to be the fitted gallery ({n_g} rows), got {n_q}"
            )
        excluded = np.zeros(n_q, dtype=np.int64)
        qg = None
        if exclude == "self":
            excluded += 1
        elif exclude == "group":
            qg = self.query_group_codes(query_groups, n_q)
            excluded = np.where(qg >= 0, self.group_sizes_[np.maximum(qg, 0)], 0)
        usable = n_g - excluded
        if (usable < k).any():
            i = int(np.argmax(usable < k))
            raise ValueError(
                f"k={k} is larger than the usable gallery of query {i}: {n_g} items, "
                f"{excluded[i]} excluded by exclude={exclude!r}"
            )
        if extra is None and self._symmetric(q, qg, exclude):
            groups = self.groups_ if exclude == "group" else None
            dist, ids = self._self_search(k, groups)
            step = max(1, CHUNK_ENTRIES // k)
            for start in range(0, n_q, step):
                rows = slice(start, min(n_q, start + step))
                yield Neighbours(rows, dist[rows], ids[rows])
            return
        want = k + (np.zeros(n_q, dtype=np.int64) if extra is None else extra)
        want = np.minimum(want, usable)
        need = np.minimum(want + excluded, n_g)
        start = 0
        while start < n_q:
            # Chunks sized so that chunk x neighbours stays under CHUNK_ENTRIES.
            ahead = need[start : start + max(1, CHUNK_ENTRIES // max(k, 1))]
            cum = np.maximum.accumulate(ahead) * np.arange(1, len(ahead) + 1)
            rows = max(1, int(np.searchsorted(cum, CHUNK_ENTRIES, side="right")))
            stop = min(n_q, start + rows)
            kk = int(need[start:stop].max())
            dist, ids = self.index_.search(q[start:stop], kk)
            # Deterministic order: distance, then gallery index.
            order = np.lexsort((ids, dist))
            dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
            drop = ids < 0
            if exclude == "self":
                drop |= ids == np.arange(start, stop)[:, None]
            elif exclude == "group":
                drop |= self.groups_[np.maximum(ids, 0)] == qg[start:stop, None]
            keep_first = np.argsort(drop, axis=1, kind="stable")
            width = int(want[start:stop].max())
            sel = keep_first[:, :width]
            dist, ids = np.take_along_axis(dist, sel, 1), np.take_along_axis(ids, sel, 1)
            valid = np.arange(width)[None, :] < want[start:stop, None]
            yield Neighbours(
                slice(start, stop), np.where(valid, dist, np.inf), np.where(valid, ids, -1)
            )
            start = stop

    def _queries(self, queries: Any) -> np.ndarray | torch.Tensor:
        """Checked queries: a CUDA tensor for a torch index on the GPU stays there."""
        on_gpu = isinstance(self.index_, TorchIndex) and self.index_.device == "cuda"
        if on_gpu and isinstance(queries, torch.Tensor) and queries.is_cuda:
            return as_device_tensor("queries", queries)
        return as_float32("queries", queries)

    def _self_search(self, k: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out neighbours of the fitted gallery, by ``precision``."""
        index = self.index_
        rows = index.tensor() if isinstance(index, TorchIndex) else index.vectors()
        precision = self.precision
        if precision == "auto":
            precision = "tf32" if index.device == "cuda" else "float32"
        if precision == "float32":
            return symmetric_knn(rows, k, self.distance, groups, device=index.device)
        return bounded_knn(rows, k, self.distance, groups, precision=precision, device=index.device)

    def _symmetric(self, q: np.ndarray | torch.Tensor, qg: np.ndarray | None, exclude: str) -> bool:
        """Whether the queries are this exact gallery itself, so that
        [`symmetric_knn`][smse_metric.evaluation.symmetric_knn] can answer at half the
        cost: on the CPU, or on a GPU with the torch backend (a FAISS GPU index searches
        itself)."""
        if exclude == "none" or self.index_type != "flat":
            return False
        if self.index_.device != "cpu" and not isinstance(self.index_, TorchIndex):
            return False
        if len(q) != self.index_.ntotal or len(q) < SYMMETRIC_MIN_ROWS:
            return False
        if exclude == "group" and not np.array_equal(qg, self.groups_):
            return False
        if isinstance(q, torch.Tensor):  # compared on its device
            return torch.equal(prepare_tensor(q, self.distance), self.index_.tensor())
        return np.array_equal(prepare_vectors(q, self.distance), self.index_.vectors())

    def votes(self, nb: Neighbours) -> np.ndarray:
        """[q, C] votes of a chunk's first ``k`` neighbours for each of ``classes_``
        (counts, or ``1 / d`` weights with ``weights="distance"``).

        Args:
            nb: a chunk from `kneighbors_chunks`.
        """
        d, ids = nb.dist[:, : self.k], nb.ids[:, : self.k]
        if self.weights == "uniform":
            w = np.ones_like(d, dtype=np.float64)
        else:
            exact = d <= 0
            with np.errstate(divide="ignore"):
                w = np.where(exact.any(1, keepdims=True), exact, 1.0 / d).astype(np.float64)
        n_classes = len(self.classes_)
        flat = (np.arange(len(ids))[:, None] * n_classes + self.labels_[ids]).ravel()
        votes = np.bincount(flat, weights=w.ravel(), minlength=len(ids) * n_classes)
        return votes.reshape(len(ids), n_classes)

    def predict_proba(self, queries: Any, query_groups: Any = None, exclude: str = "none"):
        """[Q, C] vote shares over ``classes_``."""
        out = []
        for nb in self.kneighbors_chunks(queries, query_groups, exclude):
            v = self.votes(nb)
            out.append(v / v.sum(1, keepdims=True))
        # a rank's shard may hold no queries
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)))

    def predict(self, queries: Any, query_groups: Any = None, exclude: str = "none"):
        """[Q] predicted labels (values of the fitted labels)."""
        proba = self.predict_proba(queries, query_groups, exclude)  # checks fit() first
        return self.classes_[proba.argmax(1)]
