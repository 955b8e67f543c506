"""``evaluate_embeddings`` (kNN) and ``evaluate_predictions`` (a classifier's labels):
image- and patient-level accuracy, per-class scores, retrieval metrics, per
magnification and pooled, and the cross-magnification matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_choice, resolve_distance
from ._inputs import DEVICES, EXCLUDE, as_device_tensor, as_float32, as_ids, has_faiss
from .clustering import ClusteringMetrics, kmeans, mutual_information
from .knn import KNNClassifier
from .metrics import (
    RANKING,
    EvaluationReport,
    classification_metrics,
    encode_ids,
    retrieval_metrics,
)

__all__ = ["evaluate_embeddings", "evaluate_predictions"]


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
    _, true = encode_ids("labels", y, n, table)
    _, p = encode_ids("pred", pred, n, table)
    g = (
        np.arange(n)
        if groups is None
        else np.unique(as_ids("groups", groups, n), return_inverse=True)[1]
    )
    report = EvaluationReport(
        classes=table.tolist(),
        scales=[],
        k=None,
        distance=None,
        exclude=None,
        pooled=classification_metrics(p, true, g, len(table)),
    )
    if scales is not None:
        s_table, s = np.unique(as_ids("scales", scales, n), return_inverse=True)
        report.scales = s_table.tolist()
        for i, name in enumerate(s_table.tolist()):
            m = s == i
            report.per_scale[str(name)] = classification_metrics(p[m], true[m], g[m], len(table))
    return report


def _gallery(gallery, n_queries: int, dim: int | None, empty_ok: bool = False):
    if isinstance(gallery, dict):
        gallery = tuple(gallery.get(key) for key in ("embeddings", "labels", "groups", "scales"))
    if not isinstance(gallery, tuple | list) or len(gallery) != 4:
        raise ValueError("gallery must be (embeddings, labels, groups, scales) or a dict of those")
    if empty_ok:  # a rank's shard
        from .sharded import local_vectors

        emb = local_vectors("gallery embeddings", gallery[0])
    else:
        emb = _vectors("gallery embeddings", gallery[0])
    if dim is not None and len(emb) and emb.shape[1] != dim:
        raise ValueError(f"gallery has dimension {emb.shape[1]}, the embeddings {dim}")
    n = len(emb)
    y = as_ids("gallery labels", gallery[1], n)
    # without groups, gallery images are their own patients, distinct from every query's
    g = None if gallery[2] is None else as_ids("gallery groups", gallery[2], n)
    s = None if gallery[3] is None else as_ids("gallery scales", gallery[3], n)
    return emb, y, g, s


def _vectors(name: str, x: Any) -> np.ndarray | torch.Tensor:
    """Checked [N, D] float32 embeddings: a torch tensor stays one on its device, so
    that a GPU's rows reach a GPU search without a trip through the host."""
    if isinstance(x, torch.Tensor):
        return as_device_tensor(name, x)
    return as_float32(name, x)


def _rows(x: np.ndarray | torch.Tensor, mask: np.ndarray) -> np.ndarray | torch.Tensor:
    """The rows of ``x`` where the boolean numpy ``mask`` holds, on ``x``'s device."""
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(np.flatnonzero(mask)).to(x.device)]
    return x[mask]


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
    distance: str | None = None,
    weights: str = "uniform",
    ranking: bool = True,
    retrieval_k: int | str | None = "max_bin_count",
    average: str = "query",
    clustering: bool = True,
    cross_magnification: bool = True,
    device: str = "auto",
    backend: str = "auto",
    *,
    distributed: bool = False,
    process_group: Any = None,
    metric: str | None = None,
) -> EvaluationReport:
    """kNN evaluation of embeddings: classification and retrieval, pooled and per scale,
    and the cross-magnification matrix.

    Args:
        embeddings: [N, D] queries, numpy or torch on any device (CUDA tensors are
            checked and searched on their GPU; only the neighbours come to the host).
        labels: [N] class of each query.
        groups: [N] patient of each query; None makes every image its own patient
            (``exclude="group"`` is then leave-one-out).
        scales: [N] magnification of each query, or None.
        k: neighbours that vote (and recall@k).
        exclude: ``"group"`` (leave-one-patient-out), ``"self"`` or ``"none"``.
        gallery: None (the queries are their own gallery) or ``(embeddings, labels,
            groups, scales)`` / a dict with those keys (groups, scales may be None).
        distance: ``"cosine"`` (default), ``"l2"`` or ``"squared_l2"``; see `KNNClassifier`.
        weights: see `KNNClassifier`.
        device: see `KNNClassifier`.
        backend: see `KNNClassifier`.
        ranking: compute r-precision, MAP@R, MAP and MRR, which retrieve K neighbours
            per query; turn off for huge galleries.
        retrieval_k: K, the depth of the ranking metrics: ``"max_bin_count"`` (the
            largest R, PML's choice for MAP@R), an int, or None (the whole usable
            gallery: PML's ``k=None``).
        average: ``"query"`` (mean over scored queries) or ``"class"`` (mean of the
            per-class means: PML's ``avg_of_avgs``); per-class values are always kept.
        clustering: k-means on the queries, one cluster per class, scored by NMI and
            AMI (faiss k-means where faiss is installed, as PML; torch otherwise).
        cross_magnification: compute the matrix of kNN accuracy (query scale x gallery
            restricted to one scale); needs ``scales``.
        distributed: every rank of a ``torch.distributed`` process group passes its own
            shard of the queries (and of the gallery), any size, even empty, and every
            rank gets the report of the union: the one a single process gives for the
            shards concatenated in rank order with ``backend="torch"``. Gallery shards
            travel one at a time (`KNNClassifier`'s ``distributed``; leave-one-out
            computes each pair of rows once, over a ring of the ranks); only metadata
            and per-query results are gathered, except that ``clustering`` gathers the
            queries on rank 0 (turn it off at scale). A collective: every rank calls it.
        process_group: the process group (None: the default one).
        metric: the old name of ``distance``; deprecated, warns.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> emb = rng.normal(size=(40, 8)).astype("float32")
        >>> y = np.repeat([0, 1], 20)
        >>> emb[y == 1] += 2
        >>> r = evaluate_embeddings(emb, y, groups=np.arange(40) // 4, scales=np.arange(40) % 2,
        ...                         distance="l2")
        >>> r.pooled.accuracy > 0.9
        True
    """
    distance = resolve_distance(distance, "cosine", metric=metric)
    check_choice("exclude", exclude, EXCLUDE)
    check_choice("device", device, DEVICES)
    check_choice("average", average, ("query", "class"))
    _check_retrieval_k(retrieval_k)
    if device == "auto":  # where the caller's queries are
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        device = "cuda" if on_cuda else "cpu"
    if gallery is not None and exclude == "self":
        raise ValueError("exclude='self' needs the queries to be the gallery (gallery=None)")
    settings = dict(
        k=k, exclude=exclude, distance=distance, weights=weights, ranking=ranking,
        retrieval_k=retrieval_k, average=average, clustering=clustering,
        cross_magnification=cross_magnification,
    )  # fmt: skip
    if distributed:
        parts = _Parts.sharded(embeddings, labels, groups, scales, gallery, settings, process_group)
    else:
        parts = _Parts.single(embeddings, labels, groups, scales, gallery)
    q, qy, qg, qs = parts.q, parts.qy, parts.qg, parts.qs
    g_emb, gy, gg, gs = parts.g_emb, parts.gy, parts.gg, parts.gs
    n = len(qy)
    # Exclusion works on group codes; "self" is "group" with one group per image.
    if exclude == "self":
        ex_q = ex_g = np.arange(n)
    elif gallery is None:
        ex_q = ex_g = np.arange(n) if qg is None else np.unique(qg, return_inverse=True)[1]
    else:
        ex_q, ex_g = _joint_codes(qg, n, gg, len(g_emb))
    knn_exclude = "none" if exclude == "none" else "group"
    q_group_codes = np.arange(n) if qg is None else np.unique(qg, return_inverse=True)[1]
    # query labels the gallery lacks are classes too: never predicted, always wrong
    if gy.dtype.kind != qy.dtype.kind and {gy.dtype.kind, qy.dtype.kind} != {"i", "u"}:
        raise TypeError(
            f"labels are {qy.dtype} but the gallery labels {gy.dtype}: give both "
            "as integers or both as strings"
        )
    classes = np.unique(np.concatenate([gy, qy]))
    _, g_codes = encode_ids("gallery labels", gy, len(gy), classes)
    _, q_codes = encode_ids("labels", qy, n, classes)

    def new_knn() -> KNNClassifier:
        return KNNClassifier(
            k,
            distance,
            weights,
            device,
            backend=backend,
            distributed=distributed,
            process_group=process_group,
        )

    knn = new_knn().fit(g_emb, parts.mine(gy, "g"), groups=parts.mine(ex_g, "g"))
    n_rel = _relevant(knn, g_codes, q_codes, ex_q, knn_exclude, len(classes))
    unseen = np.bincount(g_codes, minlength=len(classes))[q_codes] == 0
    depth = _depth(retrieval_k, n_rel, len(gy)) if ranking else None
    mine = parts.mine
    pred, per_query = _scores(
        knn, q, mine(ex_q), knn_exclude, mine(q_codes), classes, mine(n_rel), depth
    )
    pred = parts.gather(pred)
    per_query = {key: None if v is None else parts.gather(v) for key, v in per_query.items()}

    def scores(m=slice(None)):
        part = {key: v if v is None else v[m] for key, v in per_query.items()}
        return (
            classification_metrics(pred[m], q_codes[m], q_group_codes[m], len(classes)),
            retrieval_metrics(part, n_rel[m], unseen[m], q_codes[m], len(classes), average),
        )

    pooled, retrieval = scores()
    report = EvaluationReport(
        classes=classes.tolist(),
        scales=[],
        k=k,
        distance=distance,
        exclude=exclude,
        pooled=pooled,
        retrieval=retrieval,
        retrieval_k=retrieval_k,
        average=average,
    )
    if clustering:
        report.clustering = parts.on_rank_0(lambda all_q: _clustering(all_q, qy), q)
    if qs is None:
        return report
    s_table, s_codes = np.unique(qs, return_inverse=True)
    report.scales = s_table.tolist()
    for i, name in enumerate(report.scales):
        report.per_scale[str(name)], report.retrieval_per_scale[str(name)] = scores(s_codes == i)
    if cross_magnification and gs is not None:
        report.cross_magnification = _cross_magnification_matrix(
            parts,
            q_codes,
            ex_q,
            s_codes,
            s_table,
            ex_g,
            knn_exclude,
            new_knn(),
            classes,
        )
        cells = np.array(report.cross_magnification, dtype=float)
        off = cells[~np.eye(len(cells), dtype=bool)]
        off = off[np.isfinite(off)]
        report.cross_magnification_mean = float(off.mean()) if off.size else None
    return report


def _relevant(knn, g_codes, q_codes, ex_q, exclude, n_classes) -> np.ndarray:
    """R of each query: the usable gallery items of its class."""
    n_rel = np.bincount(g_codes, minlength=n_classes)[q_codes].astype(np.int64)
    if exclude == "group":
        own = knn.query_group_codes(ex_q, len(q_codes))
        same = np.bincount(
            knn.groups_ * n_classes + g_codes, minlength=len(knn.group_sizes_) * n_classes
        )
        n_rel -= np.where(own >= 0, same[np.maximum(own, 0) * n_classes + q_codes], 0)
    return n_rel


def _check_retrieval_k(retrieval_k) -> None:
    if retrieval_k is None or retrieval_k == "max_bin_count":
        return
    if isinstance(retrieval_k, bool) or not isinstance(retrieval_k, int | np.integer):
        raise ValueError(
            f"retrieval_k must be a positive int, 'max_bin_count' or None, got {retrieval_k!r}"
        )
    if retrieval_k < 1:
        raise ValueError(f"retrieval_k must be a positive int, got {retrieval_k}")


def _depth(retrieval_k, n_rel: np.ndarray, n_gallery: int) -> int:
    """K: neighbours ranked per query (the search stops at each query's usable gallery)."""
    if retrieval_k is None:
        return n_gallery
    if retrieval_k == "max_bin_count":
        return max(int(n_rel.max(initial=0)), 1)
    return int(retrieval_k)


def _scores(knn, q, ex_q, exclude, q_codes, classes, n_rel, depth):
    """Per query: kNN prediction (class code) and the retrieval scores, each [Q]."""
    n, k = len(q), knn.k
    # the classifier codes the gallery's labels; the report, gallery's and queries' alike
    codes = np.searchsorted(classes, knn.classes_)
    pred = np.empty(n, dtype=np.int64)
    scores = {name: np.zeros(n) for name in ("precision_at_1", "recall_at_k")}
    # ranking metrics: arrays where computed, None (not computed) otherwise
    scores |= {name: None if depth is None else np.zeros(n) for name in RANKING}
    extra = None if depth is None else np.full(n, max(depth - k, 0))
    for nb in knn.kneighbors_chunks(q, ex_q, exclude, k, extra):
        r = nb.rows
        pred[r] = codes[knn.votes(nb).argmax(1)]
        rel = (codes[knn.labels_[np.maximum(nb.ids, 0)]] == q_codes[r, None]) & (nb.ids >= 0)
        scores["precision_at_1"][r], scores["recall_at_k"][r] = rel[:, 0], rel[:, :k].any(1)
        if depth is not None:
            for name, v in _ranking(rel[:, :depth], n_rel[r]).items():
                scores[name][r] = v
    return pred, scores


def _ranking(rel: np.ndarray, n_rel: np.ndarray) -> dict[str, np.ndarray]:
    """PML's ranking metrics of [q, K] same-label flags (ranked neighbours) and R [q]."""
    rank = np.arange(1, rel.shape[1] + 1)[None, :]
    first_r = rank <= n_rel[:, None]  # the first min(R, K) ranks
    r = np.maximum(n_rel, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hits_at_r = rel & first_r
        precision = np.cumsum(rel, axis=1) / rank  # before rank R the two cumsums agree
        first = np.argmax(rel, axis=1)
        return {
            "r_precision": hits_at_r.sum(1) / np.maximum(first_r.sum(1), 1),
            "map_at_r": np.where(hits_at_r, precision, 0.0).sum(1) / r,
            "mean_average_precision": np.where(rel, precision, 0.0).sum(1) / r,
            "mean_reciprocal_rank": np.where(rel.any(1), 1.0 / (first + 1), 0.0),
        }


def _clustering(q: np.ndarray | torch.Tensor, qy: np.ndarray) -> ClusteringMetrics:
    """Whatever searched, k-means is faiss's where installed: PML's clusters."""
    n_clusters = len(np.unique(qy))
    use = "faiss" if has_faiss() else "torch"
    nmi, ami = mutual_information(qy, kmeans(q, n_clusters, use))
    return ClusteringMetrics(nmi=nmi, ami=ami, n_clusters=n_clusters, backend=use)


def _cross_magnification_matrix(
    parts: _Parts, q_codes, ex_q, s_codes, s_table, ex_g, exclude, knn, classes
):
    """Cell (a, b): kNN accuracy of scale-a queries against the gallery's scale-b items.
    A cell whose gallery has fewer than k usable items for some query is NaN."""
    matrix = np.full((len(s_table), len(s_table)), np.nan)
    mine = parts.mine
    for b, name in enumerate(s_table.tolist()):
        in_b = parts.gs == name
        if not in_b.any():
            continue
        here = mine(in_b, "g")
        knn.fit(_rows(parts.g_emb, here), mine(parts.gy, "g")[here], groups=mine(ex_g, "g")[here])
        for a in range(len(s_table)):
            m = mine(s_codes == a)
            try:  # distributed: every rank raises alike (the check is collective)
                pred = knn.predict(_rows(parts.q, m), mine(ex_q)[m], exclude)
            except ValueError:
                continue
            hit = parts.gather(pred == classes[mine(q_codes)[m]])
            matrix[a, b] = float(hit.mean())
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


class _Parts:
    """The inputs of `evaluate_embeddings`: this process's query and gallery
    embeddings, and the metadata (labels, groups, scales) of all of them; in a single
    process the two are the same, across ranks the metadata is gathered and ``mine``
    picks this rank's rows of it."""

    def __init__(self, q, qy, qg, qs, g_emb, gy, gg, gs, group=None, rows=None, g_rows=None):
        self.q, self.qy, self.qg, self.qs = q, qy, qg, qs
        self.g_emb, self.gy, self.gg, self.gs = g_emb, gy, gg, gs
        self.group, self.rows, self.g_rows = group, rows, g_rows

    @classmethod
    def single(cls, embeddings, labels, groups, scales, gallery) -> _Parts:
        q = _vectors("embeddings", embeddings)
        n = q.shape[0]
        qy = as_ids("labels", labels, n)
        qg = None if groups is None else as_ids("groups", groups, n)
        qs = None if scales is None else as_ids("scales", scales, n)
        if gallery is None:
            return cls(q, qy, qg, qs, q, qy, qg, qs)
        return cls(q, qy, qg, qs, *_gallery(gallery, n, q.shape[1]))

    @classmethod
    def sharded(cls, embeddings, labels, groups, scales, gallery, settings, group) -> _Parts:
        from . import sharded

        error, meta = None, dict(settings)
        try:
            q = sharded.local_vectors("embeddings", embeddings)
            n = q.shape[0]
            qy = as_ids("labels", labels, n)
            qg = None if groups is None else as_ids("groups", groups, n)
            qs = None if scales is None else as_ids("scales", scales, n)
            if gallery is None:
                g = (q, qy, qg, qs)
            else:
                g = _gallery(gallery, n, q.shape[1] if n else None, empty_ok=True)
            meta |= {
                "embedding dimension": q.shape[1] if n else None,
                "gallery dimension": g[0].shape[1] if len(g[0]) else None,
                "label type": qy.dtype.kind if n else None,
                "gallery given": gallery is not None,
                "groups given": groups is not None,
                "scales given": scales is not None,
            }
        except (ValueError, TypeError) as e:
            error = f"{type(e).__name__}: {e}"
        sharded.agree(error, meta, group)
        sizes, offset = sharded.shard_layout(n, group)
        g_sizes, g_offset = sharded.shard_layout(len(g[0]), group)
        if sum(sizes) == 0 or sum(g_sizes) == 0:
            raise ValueError("the embeddings are empty on every rank")
        gathered = [sharded.gather_arrays(a, group) for a in (qy, qg, qs, *g[1:])]
        rows = slice(offset, offset + n)
        g_rows = slice(g_offset, g_offset + len(g[0]))
        return cls(q, *gathered[:3], g[0], *gathered[3:], group, rows, g_rows)

    def mine(self, values, side: str = "q"):
        """This process's rows of a per-query (``side="q"``) or per-gallery (``"g"``)
        array of the union."""
        rows = self.rows if side == "q" else self.g_rows
        return values if rows is None else values[rows]

    def gather(self, values: np.ndarray) -> np.ndarray:
        """The union's [N] array from this process's part, in rank order."""
        if self.rows is None:
            return values
        from . import sharded

        out = sharded.gather_arrays(values, self.group)
        return values if out is None else out

    def on_rank_0(self, fn, q: np.ndarray):
        """``fn`` of the union's query embeddings, computed on rank 0 alone (gathered
        there) and sent to every rank."""
        if self.rows is None:
            return fn(q)
        import torch.distributed as dist

        from . import sharded

        rank, world = sharded.rank_and_world(self.group)
        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        parts = [None] * world if rank == 0 else None
        dist.gather_object(q, parts, dst=root, group=self.group)
        out = [fn(np.concatenate([p for p in parts if len(p)])) if parts else None]
        dist.broadcast_object_list(out, src=root, group=self.group)
        return out[0]
