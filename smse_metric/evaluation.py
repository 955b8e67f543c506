"""FAISS-backed evaluation: kNN classification, patient-level accuracy, retrieval
metrics and the cross-magnification matrix.

Neighbour search is exact (a flat FAISS index) unless ``index="ivf"`` is asked for,
runs on a GPU when the installed faiss has GPUs and ``device`` allows, and goes in
chunks of queries so memory stays at the gallery plus one chunk of neighbours.
All metrics are computed from a [Q, k] neighbour table with bincount and boolean
algebra; nothing loops over queries in Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .symmetric_knn import symmetric_knn


def _faiss():
    """faiss, imported where an index is built: ``import smse_metric`` must not need it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "this needs FAISS: pip install 'smse-metric[faiss]' (CPU) or 'smse-metric[gpu]' (CUDA)"
        ) from e
    return faiss


__all__ = [
    "ClassificationMetrics",
    "EvaluationReport",
    "FaissIndex",
    "KNNClassifier",
    "RetrievalMetrics",
    "evaluate_embeddings",
    "evaluate_predictions",
]

METRICS = ("cosine", "l2")
EXCLUDE = ("none", "self", "group")
WEIGHTS = ("uniform", "distance")
DEVICES = ("auto", "cpu", "cuda")
#: neighbour-table entries per chunk (indices + distances: 12 bytes each)
CHUNK_ENTRIES = 1 << 24
#: leave-one-out searches of at least this many rows use the symmetric search
SYMMETRIC_MIN_ROWS = 4096


# --------------------------------------------------------------------------- inputs


def as_float32(name: str, x: Any) -> np.ndarray:
    """[N, D] embeddings from numpy or torch (any device) as one C-contiguous float32 copy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN or inf")
    return arr


def as_ids(name: str, y: Any, n: int) -> np.ndarray:
    """[n] labels / groups / scales (ints or strings) as a numpy array."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} elements but the embeddings have {n} rows")
    if arr.dtype.kind == "f":
        raise TypeError(f"{name} must hold integers or strings, got {arr.dtype}")
    return arr


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------- index


def _faiss_gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissIndex:
    """Exact (or IVF) nearest-neighbour search over a gallery, hiding index and device.

    Args:
        embeddings: [G, D] gallery, numpy or torch on any device (copied once).
        metric: ``"cosine"`` (inner product of L2-normalised vectors; distance
            ``1 - cos``) or ``"l2"`` (euclidean distance).
        device: ``"auto"`` (a GPU index when faiss has GPUs and the embeddings are a
            CUDA tensor), ``"cpu"`` or ``"cuda"``.
        index: ``"flat"`` (exact) or ``"ivf"`` (approximate, for very large galleries).
        nlist: IVF cells (default ``4 * sqrt(G)``).
        nprobe: IVF cells visited per query.

    Examples:
        >>> idx = FaissIndex(np.eye(3, dtype="float32"), metric="l2")
        >>> dist, ids = idx.search(np.eye(3, dtype="float32"), k=1)
        >>> ids.ravel().tolist()
        [0, 1, 2]
    """

    def __init__(
        self,
        embeddings: Any,
        metric: str = "cosine",
        device: str = "auto",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        faiss = _faiss()
        _choice("metric", metric, METRICS)
        _choice("device", device, DEVICES)
        _choice("index", index, ("flat", "ivf"))
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        gallery = self._prepare(as_float32("embeddings", embeddings), metric)
        self.metric, self.ntotal, self.dim = metric, gallery.shape[0], gallery.shape[1]
        gpus = _faiss_gpus()
        if device == "cuda" and gpus == 0:
            raise ValueError("device='cuda' but the installed faiss has no GPU support")
        self.device = (
            "cuda" if device == "cuda" or (device == "auto" and gpus and on_cuda) else "cpu"
        )
        flat = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
        if index == "ivf":
            nlist = nlist or max(1, int(4 * np.sqrt(self.ntotal)))
            ivf_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
            cpu_index = faiss.IndexIVFFlat(flat, self.dim, nlist, ivf_metric)
            cpu_index.train(gallery)
            cpu_index.nprobe = nprobe
            self._quantizer = flat  # the IVF index does not own it
        else:
            cpu_index = flat
        if self.device == "cuda":
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
        else:
            self.index = cpu_index
        self.index.add(gallery)

    def vectors(self) -> np.ndarray:
        """[G, D] float32 view of the stored gallery (L2-normalised for ``"cosine"``);
        flat CPU indexes only."""
        faiss = _faiss()
        if not isinstance(self.index, faiss.IndexFlat):
            raise ValueError("vectors() needs a flat CPU index")
        return (
            faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim)
            .view(np.float32)
            .reshape(self.ntotal, self.dim)
        )

    def save(self, path: str | Path) -> None:
        """Write the index with ``faiss.write_index`` (a GPU index is copied to the CPU)."""
        faiss = _faiss()
        index = faiss.index_gpu_to_cpu(self.index) if self.device == "cuda" else self.index
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> FaissIndex:
        """Read an index written by `save`; its metric follows the index type
        (inner product: ``"cosine"``, L2: ``"l2"``)."""
        faiss = _faiss()
        _choice("device", device, DEVICES)
        if not Path(path).is_file():
            raise ValueError(f"no FAISS index at {path}")
        index = faiss.read_index(str(path))
        self = cls.__new__(cls)
        inner = index.metric_type == faiss.METRIC_INNER_PRODUCT
        self.metric, self.ntotal, self.dim = ("cosine" if inner else "l2"), index.ntotal, index.d
        self.device = "cpu"
        if device == "cuda":
            if _faiss_gpus() == 0:
                raise ValueError("device='cuda' but the installed faiss has no GPU support")
            self._resources = faiss.StandardGpuResources()
            index, self.device = faiss.index_cpu_to_gpu(self._resources, 0, index), "cuda"
        self.index = index
        return self

    @staticmethod
    def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
        faiss = _faiss()
        if metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest gallery items of each query: distances [Q, k] (ascending) and ids [Q, k]
        (``-1`` where the gallery has fewer than k items)."""
        q = self._prepare(as_float32("queries", queries), self.metric)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        raw, ids = self.index.search(q, int(k))
        dist = 1.0 - raw if self.metric == "cosine" else np.sqrt(np.maximum(raw, 0))
        dist[ids < 0] = np.inf
        return dist, ids


# --------------------------------------------------------------------------- kNN


@dataclass
class _Neighbours:
    """Neighbour table of a chunk of queries, after exclusions: [q, k] each."""

    rows: slice
    dist: np.ndarray
    ids: np.ndarray


class KNNClassifier:
    """k-nearest-neighbour classifier over a FAISS index, with leave-one-patient-out.

    Args:
        k: neighbours that vote.
        metric: ``"cosine"`` or ``"l2"``.
        weights: ``"uniform"`` or ``"distance"`` (``1 / d``; a query at distance 0
            from some neighbours takes only those, as scikit-learn does).
        device: see `FaissIndex`.
        index: see `FaissIndex`.

    Ties: neighbours at equal distance are ordered by gallery index; classes with
    equal votes go to the smaller class index (scikit-learn's rule).

    Examples:
        >>> emb = np.array([[0.0, 1], [0, 2], [5, 5], [5, 6]], dtype="float32")
        >>> knn = KNNClassifier(k=1, metric="l2").fit(emb, ["a", "a", "b", "b"], [1, 2, 3, 4])
        >>> knn.predict(emb, query_groups=[1, 2, 3, 4], exclude="group").tolist()
        ['a', 'a', 'b', 'b']
    """

    def __init__(
        self,
        k: int = 5,
        metric: str = "cosine",
        weights: str = "uniform",
        device: str = "auto",
        index: str = "flat",
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        _choice("metric", metric, METRICS)
        _choice("weights", weights, WEIGHTS)
        self.k, self.metric, self.weights = int(k), metric, weights
        self.device, self.index_type = device, index

    def fit(self, embeddings: Any, labels: Any, groups: Any = None) -> KNNClassifier:
        """Index the gallery. ``groups`` (patients) enable ``exclude="group"``."""
        self.index_ = FaissIndex(embeddings, self.metric, self.device, self.index_type)
        n = self.index_.ntotal
        self.classes_, self.labels_ = np.unique(as_ids("labels", labels, n), return_inverse=True)
        self.groups_ = None
        if groups is not None:
            self._group_values, self.groups_ = np.unique(
                as_ids("groups", groups, n), return_inverse=True
            )
            self._group_count = np.bincount(self.groups_)
        return self

    def _query_groups(self, query_groups: Any, n: int) -> np.ndarray:
        """Query groups as gallery group codes; -1 for groups absent from the gallery."""
        if self.groups_ is None:
            raise ValueError("exclude='group' needs fit(..., groups=...)")
        if query_groups is None:
            raise ValueError("exclude='group' needs query_groups")
        qg = as_ids("query_groups", query_groups, n)
        pos = np.searchsorted(self._group_values, qg)
        pos = np.minimum(pos, len(self._group_values) - 1)
        return np.where(self._group_values[pos] == qg, pos, -1)

    def kneighbors_chunks(
        self,
        queries: Any,
        query_groups: Any = None,
        exclude: str = "none",
        k: int | None = None,
        extra: np.ndarray | None = None,
    ) -> Iterator[_Neighbours]:
        """Yield, per chunk of queries, the k nearest usable neighbours.

        ``exclude="self"``: the queries are the fitted gallery in the same order and
        query i never sees gallery item i. ``exclude="group"``: no query sees an item
        of its own group (leave-one-patient-out). Enough extra neighbours are retrieved
        that exactly k usable ones remain, or a ValueError says which query lacks them.
        ``extra`` [Q] asks for more neighbours per query (used for MAP@R).
        """
        _choice("exclude", exclude, EXCLUDE)
        k = self.k if k is None else int(k)
        q = as_float32("queries", queries)
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
            qg = self._query_groups(query_groups, n_q)
            excluded = np.where(qg >= 0, self._group_count[np.maximum(qg, 0)], 0)
        usable = n_g - excluded
        if (usable < k).any():
            i = int(np.argmax(usable < k))
            raise ValueError(
                f"k={k} is larger than the usable gallery of query {i}: {n_g} items, "
                f"{excluded[i]} excluded by exclude={exclude!r}"
            )
        if extra is None and self._symmetric(q, qg, exclude):
            groups = self.groups_ if exclude == "group" else None
            dist, ids = symmetric_knn(self.index_.vectors(), k, self.metric, groups)
            step = max(1, CHUNK_ENTRIES // k)
            for start in range(0, n_q, step):
                rows = slice(start, min(n_q, start + step))
                yield _Neighbours(rows, dist[rows], ids[rows])
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
            yield _Neighbours(slice(start, stop), np.where(valid, dist, np.inf),
                              np.where(valid, ids, -1))  # fmt: skip
            start = stop

    def _symmetric(self, q: np.ndarray, qg: np.ndarray | None, exclude: str) -> bool:
        """Whether the queries are this exact-CPU gallery itself, so that
        [`symmetric_knn`][smse_metric.symmetric_knn.symmetric_knn] can answer at half the cost."""
        if exclude == "none" or self.index_type != "flat" or self.index_.device != "cpu":
            return False
        if len(q) != self.index_.ntotal or len(q) < SYMMETRIC_MIN_ROWS:
            return False
        if exclude == "group" and not np.array_equal(qg, self.groups_):
            return False
        return np.array_equal(FaissIndex._prepare(q, self.metric), self.index_.vectors())

    def _votes(self, nb: _Neighbours) -> np.ndarray:
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
            v = self._votes(nb)
            out.append(v / v.sum(1, keepdims=True))
        return np.concatenate(out)

    def predict(self, queries: Any, query_groups: Any = None, exclude: str = "none"):
        """[Q] predicted labels (values of the fitted labels)."""
        return self.classes_[self.predict_proba(queries, query_groups, exclude).argmax(1)]


# --------------------------------------------------------------------------- metrics


@dataclass
class ClassificationMetrics:
    """Classification scores of one set of queries. Per-class lists follow ``classes``.

    Attributes:
        n: number of images scored.
        accuracy: correct images / images.
        patient_accuracy: mean over patients of each patient's image accuracy.
        balanced_accuracy: mean over classes of the per-class recall.
        precision: per-class precision, in class order.
        recall: per-class recall, in class order.
        f1: per-class F1, in class order.
        confusion: rows: true class, columns: predicted class, image counts.

    Examples:
        >>> r = evaluate_predictions([0, 1, 1, 1], [0, 1, 0, 1], groups=[7, 7, 8, 8])
        >>> m = r.pooled  # a ClassificationMetrics
        >>> m.accuracy, m.patient_accuracy, m.confusion
        (0.75, 0.75, [[1, 1], [0, 2]])
    """

    n: int
    accuracy: float  #: correct images / images
    patient_accuracy: float  #: mean over patients of each patient's image accuracy
    balanced_accuracy: float  #: mean recall over the classes present
    precision: list[float]
    recall: list[float]
    f1: list[float]
    confusion: list[list[int]]  #: rows true class, columns predicted class


@dataclass
class RetrievalMetrics:
    """Retrieval scores of one set of queries against their gallery.

    Attributes:
        precision_at_1: share of queries whose nearest neighbour has their label.
        recall_at_k: share of queries with a same-label item among the k neighbours.
        map_at_r: mean average precision at R (None when not computed).
        queries_without_relevant: queries with no same-label item in the gallery.

    Examples:
        >>> emb = np.array([[0.0, 1], [0, 1.1], [1, 0], [1.1, 0]], dtype="float32")
        >>> r = evaluate_embeddings(emb, [0, 0, 1, 1], k=1, exclude="self").retrieval
        >>> r.precision_at_1, r.map_at_r
        (1.0, 1.0)
    """

    precision_at_1: float
    recall_at_k: float  #: queries with a same-class item among their k neighbours
    map_at_r: float | None  #: mean average precision at R (None when not computed)
    queries_without_relevant: int  #: left out of MAP@R: no same-class item usable


@dataclass
class EvaluationReport:
    """Everything `evaluate_embeddings` measured; ``to_dict()`` / ``to_json()``.

    Attributes:
        classes: the class labels, in the order of per-class lists.
        scales: the magnifications present, in the order of ``per_scale``.
        k: neighbours per query (None for a classifier's predictions).
        metric: ``"cosine"`` or ``"l2"`` (None for predictions).
        exclude: ``"none"``, ``"self"`` or ``"group"`` (None for predictions).
        pooled: classification metrics over every query.
        per_scale: classification metrics of each magnification's queries.
        retrieval: precision@1, recall@k and MAP@R over every query (kNN only).
        retrieval_per_scale: the same per magnification.
        cross_scale: query magnification x gallery magnification kNN accuracy.
        cross_scale_mean: mean of the off-diagonal cells (None with one magnification).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 40)
        >>> emb = rng.standard_normal((80, 4)) + 3 * labels[:, None]
        >>> report = evaluate_embeddings(emb, labels, groups=np.arange(80) // 4,
        ...                              scales=np.tile([40, 400], 40), k=3)
        >>> report.pooled.accuracy > 0.9, sorted(report.per_scale), len(report.cross_scale)
        (True, ['40', '400'], 2)
        >>> import json; sorted(json.loads(report.to_json()))[:3]
        ['classes', 'cross_scale', 'cross_scale_mean']
    """

    classes: list
    scales: list
    k: int | None
    metric: str | None
    exclude: str | None
    pooled: ClassificationMetrics
    per_scale: dict[str, ClassificationMetrics] = field(default_factory=dict)
    retrieval: RetrievalMetrics | None = None
    retrieval_per_scale: dict[str, RetrievalMetrics] = field(default_factory=dict)
    #: rows: query scale, columns: gallery restricted to that scale; kNN accuracy
    cross_scale: list[list[float]] | None = None
    cross_scale_mean: float | None = None  #: mean of the off-diagonal cells

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _classification(pred: np.ndarray, true: np.ndarray, groups: np.ndarray, n_classes: int):
    """pred / true: class codes [Q]; groups: group codes [Q]."""
    n = len(true)
    correct = pred == true
    conf = np.bincount(true * n_classes + pred, minlength=n_classes**2).reshape(n_classes, -1)
    support, predicted, hits = conf.sum(1), conf.sum(0), np.diag(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, hits / support, 0.0)
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_group = np.bincount(groups, minlength=groups.max() + 1)
    group_hits = np.bincount(groups, weights=correct, minlength=len(per_group))
    present = per_group > 0
    return ClassificationMetrics(
        n=n,
        accuracy=float(correct.mean()),
        patient_accuracy=float((group_hits[present] / per_group[present]).mean()),
        balanced_accuracy=float(recall[support > 0].mean()),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        confusion=conf.tolist(),
    )


def _codes(name, values, n, table=None):
    arr = as_ids(name, values, n)
    if table is None:
        table, codes = np.unique(arr, return_inverse=True)
        return table, codes
    codes = np.searchsorted(table, arr)
    codes = np.minimum(codes, len(table) - 1)
    if not (table[codes] == arr).all():
        missing = arr[table[codes] != arr][0]
        raise ValueError(f"{name} holds {missing!r}, which the labels of the gallery do not")
    return table, codes


def evaluate_predictions(
    pred: Any, labels: Any, groups: Any = None, scales: Any = None, classes: Any = None
) -> EvaluationReport:
    """Score predicted labels (e.g. a classifier head's) like kNN predictions: image- and
    patient-level accuracy, balanced accuracy, per-class scores, confusion matrices,
    pooled and per scale. ``groups=None`` makes every image its own patient.

    Args:
        pred: [N] predicted labels.
        labels: [N] true labels.
        groups: [N] patient ids (None: every image its own patient).
        scales: [N] magnification ids (None: one scale).
        classes: every class label to report (default: those present).

    Examples:
        >>> r = evaluate_predictions(pred=[1, 1, 0, 0, 1], labels=[1, 1, 1, 0, 0],
        ...                          groups=[0, 0, 0, 1, 1], scales=[40, 40, 400, 40, 400])
        >>> round(r.pooled.accuracy, 3), r.pooled.patient_accuracy  # (2/3 + 1/2) / 2
        (0.6, 0.5833333333333333)
        >>> r.per_scale["40"].accuracy
        1.0
    """
    y = as_ids("labels", labels, len(np.asarray(labels)))
    n = len(y)
    table = np.unique(y if classes is None else np.asarray(classes))
    _, true = _codes("labels", y, n, table)
    _, p = _codes("pred", pred, n, table)
    g = (
        np.arange(n)
        if groups is None
        else np.unique(as_ids("groups", groups, n), return_inverse=True)[1]
    )
    report = EvaluationReport(
        classes=table.tolist(), scales=[], k=None, metric=None, exclude=None,
        pooled=_classification(p, true, g, len(table)),
    )  # fmt: skip
    if scales is not None:
        s_table, s = np.unique(as_ids("scales", scales, n), return_inverse=True)
        report.scales = s_table.tolist()
        for i, name in enumerate(s_table.tolist()):
            m = s == i
            report.per_scale[str(name)] = _classification(p[m], true[m], g[m], len(table))
    return report


def _retrieval(p1, hit_k, ap, n_rel, with_map: bool) -> RetrievalMetrics:
    has = n_rel > 0
    return RetrievalMetrics(
        precision_at_1=float(p1.mean()),
        recall_at_k=float(hit_k.mean()),
        map_at_r=(float(ap[has].mean()) if has.any() else 0.0) if with_map else None,
        queries_without_relevant=int((~has).sum()),
    )


def _gallery(gallery, n_queries: int, dim: int):
    if isinstance(gallery, dict):
        gallery = tuple(gallery.get(key) for key in ("embeddings", "labels", "groups", "scales"))
    if not isinstance(gallery, tuple | list) or len(gallery) != 4:
        raise ValueError("gallery must be (embeddings, labels, groups, scales) or a dict of those")
    emb = as_float32("gallery embeddings", gallery[0])
    if emb.shape[1] != dim:
        raise ValueError(f"gallery has dimension {emb.shape[1]}, the embeddings {dim}")
    n = len(emb)
    y = as_ids("gallery labels", gallery[1], n)
    # without groups, gallery images are their own patients, distinct from every query's
    g = None if gallery[2] is None else as_ids("gallery groups", gallery[2], n)
    s = None if gallery[3] is None else as_ids("gallery scales", gallery[3], n)
    return emb, y, g, s


def _joint_codes(a: np.ndarray | None, n_a: int, b: np.ndarray | None, n_b: int):
    """Integer codes of two group arrays in one table. A side without groups (None)
    gets negative codes of its own, one per image, which match nothing."""
    if a is not None and b is not None:
        if a.dtype.kind != b.dtype.kind:
            a, b = a.astype(str), b.astype(str)
        codes = np.unique(np.concatenate([a, b]), return_inverse=True)[1]
        return codes[:n_a], codes[n_a:]
    ca = -1 - np.arange(n_a) if a is None else np.unique(a, return_inverse=True)[1]
    cb = -1 - n_a - np.arange(n_b) if b is None else np.unique(b, return_inverse=True)[1]
    return ca, cb


def evaluate_embeddings(
    embeddings: Any,
    labels: Any,
    groups: Any = None,
    scales: Any = None,
    k: int = 5,
    exclude: str = "group",
    gallery: tuple | dict | None = None,
    metric: str = "cosine",
    weights: str = "uniform",
    map_at_r: bool = True,
    cross_scale: bool = True,
    device: str = "auto",
) -> EvaluationReport:
    """kNN evaluation of embeddings: classification and retrieval, pooled and per scale,
    and the cross-magnification matrix.

    Args:
        embeddings: [N, D] queries.
        labels: [N] class of each query.
        groups: [N] patient of each query; None makes every image its own patient
            (``exclude="group"`` is then leave-one-out).
        scales: [N] magnification of each query, or None.
        k: neighbours that vote (and recall@k).
        exclude: ``"group"`` (leave-one-patient-out), ``"self"`` or ``"none"``.
        gallery: None (the queries are their own gallery) or ``(embeddings, labels,
            groups, scales)`` / a dict with those keys (groups, scales may be None).
        metric: see `KNNClassifier`.
        weights: see `KNNClassifier`.
        device: see `KNNClassifier`.
        map_at_r: also compute MAP@R, which retrieves R neighbours per query (R = the
            usable gallery items of its class); turn off for huge galleries.
        cross_scale: compute the matrix of kNN accuracy (query scale x gallery
            restricted to one scale); needs ``scales``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> emb = rng.normal(size=(40, 8)).astype("float32")
        >>> y = np.repeat([0, 1], 20)
        >>> emb[y == 1] += 2
        >>> r = evaluate_embeddings(emb, y, groups=np.arange(40) // 4, scales=np.arange(40) % 2,
        ...                         metric="l2")
        >>> r.pooled.accuracy > 0.9
        True
    """
    _choice("exclude", exclude, EXCLUDE)
    _choice("device", device, DEVICES)
    if device == "auto":  # decided on the caller's tensors, before they become numpy
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        device = "cuda" if on_cuda and _faiss_gpus() else "cpu"
    q = as_float32("embeddings", embeddings)
    n = q.shape[0]
    qy = as_ids("labels", labels, n)
    qg = None if groups is None else as_ids("groups", groups, n)
    qs = None if scales is None else as_ids("scales", scales, n)
    if gallery is None:
        g_emb, gy, gg, gs = q, qy, qg, qs
    else:
        if exclude == "self":
            raise ValueError("exclude='self' needs the queries to be the gallery (gallery=None)")
        g_emb, gy, gg, gs = _gallery(gallery, n, q.shape[1])
    # Exclusion works on group codes; "self" is "group" with one group per image.
    if exclude == "self":
        ex_q = ex_g = np.arange(n)
    elif gallery is None:
        ex_q = ex_g = np.arange(n) if qg is None else np.unique(qg, return_inverse=True)[1]
    else:
        ex_q, ex_g = _joint_codes(qg, n, gg, len(g_emb))
    knn_exclude = "none" if exclude == "none" else "group"
    q_group_codes = np.arange(n) if qg is None else np.unique(qg, return_inverse=True)[1]

    classes, g_codes = np.unique(gy, return_inverse=True)
    _, q_codes = _codes("labels", qy, n, classes)
    n_classes = len(classes)
    knn = KNNClassifier(k, metric, weights, device).fit(g_emb, gy, groups=ex_g)

    # R of each query: usable gallery items of its class.
    n_rel = np.bincount(g_codes, minlength=n_classes)[q_codes].astype(np.int64)
    if knn_exclude == "group":
        own = knn._query_groups(ex_q, n)
        same = np.bincount(knn.groups_ * n_classes + g_codes,
                           minlength=len(knn._group_count) * n_classes)  # fmt: skip
        n_rel -= np.where(own >= 0, same[np.maximum(own, 0) * n_classes + q_codes], 0)
    extra = np.maximum(n_rel - k, 0) if map_at_r else None

    pred = np.empty(n, dtype=np.int64)
    p1 = np.empty(n, dtype=bool)
    hit_k = np.empty(n, dtype=bool)
    ap = np.zeros(n)
    for nb in knn.kneighbors_chunks(q, ex_q, knn_exclude, k, extra):
        r = nb.rows
        pred[r] = knn._votes(nb).argmax(1)
        rel = (knn.labels_[np.maximum(nb.ids, 0)] == q_codes[r, None]) & (nb.ids >= 0)
        p1[r], hit_k[r] = rel[:, 0], rel[:, :k].any(1)
        if map_at_r:
            rank = np.arange(1, rel.shape[1] + 1)[None, :]
            rel &= rank <= n_rel[r, None]
            precision_at_hits = np.where(rel, np.cumsum(rel, axis=1) / rank, 0.0)
            ap[r] = precision_at_hits.sum(1) / np.maximum(n_rel[r], 1)

    report = EvaluationReport(
        classes=classes.tolist(), scales=[], k=k, metric=metric, exclude=exclude,
        pooled=_classification(pred, q_codes, q_group_codes, n_classes),
        retrieval=_retrieval(p1, hit_k, ap, n_rel, map_at_r),
    )  # fmt: skip
    if qs is None:
        return report
    s_table, s_codes = np.unique(qs, return_inverse=True)
    report.scales = s_table.tolist()
    for i, name in enumerate(report.scales):
        m = s_codes == i
        report.per_scale[str(name)] = _classification(
            pred[m], q_codes[m], q_group_codes[m], n_classes
        )
        report.retrieval_per_scale[str(name)] = _retrieval(
            p1[m], hit_k[m], ap[m], n_rel[m], map_at_r
        )
    if cross_scale and gs is not None:
        report.cross_scale = _cross_scale_matrix(
            q, q_codes, ex_q, s_codes, s_table, g_emb, gy, ex_g, gs, knn_exclude,
            KNNClassifier(k, metric, weights, device), classes,
        )  # fmt: skip
        cells = np.array(report.cross_scale, dtype=float)
        off = cells[~np.eye(len(cells), dtype=bool)]
        off = off[np.isfinite(off)]
        report.cross_scale_mean = float(off.mean()) if off.size else None
    return report


def _cross_scale_matrix(q, q_codes, ex_q, s_codes, s_table, g_emb, gy, ex_g, gs, exclude, knn,
                        classes):  # fmt: skip
    """Cell (a, b): kNN accuracy of scale-a queries against the gallery's scale-b items.
    A cell whose gallery has fewer than k usable items for some query is NaN."""
    matrix = np.full((len(s_table), len(s_table)), np.nan)
    for b, name in enumerate(s_table.tolist()):
        in_b = gs == name
        if not in_b.any():
            continue
        knn.fit(g_emb[in_b], gy[in_b], groups=ex_g[in_b])
        for a in range(len(s_table)):
            m = s_codes == a
            try:
                pred = knn.predict(q[m], ex_q[m], exclude)
            except ValueError:
                continue
            matrix[a, b] = float((pred == classes[q_codes[m]]).mean())
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]
