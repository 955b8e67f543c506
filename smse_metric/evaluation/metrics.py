"""Report types and the metrics computed from predictions and neighbour tables."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ._inputs import as_ids

__all__ = ["ClassificationMetrics", "EvaluationReport", "RetrievalMetrics"]


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
        >>> from smse_metric.evaluation import evaluate_embeddings, evaluate_predictions
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
        >>> from smse_metric.evaluation import evaluate_embeddings, evaluate_predictions
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
        cross_magnification: query magnification x gallery magnification kNN accuracy.
        cross_magnification_mean: mean of the off-diagonal cells (None with one magnification).

    Examples:
        >>> from smse_metric.evaluation import evaluate_embeddings, evaluate_predictions
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 40)
        >>> emb = rng.standard_normal((80, 4)) + 3 * labels[:, None]
        >>> report = evaluate_embeddings(emb, labels, groups=np.arange(80) // 4,
        ...                              scales=np.tile([40, 400], 40), k=3)
        >>> report.pooled.accuracy > 0.9, sorted(report.per_scale), len(report.cross_magnification)
        (True, ['40', '400'], 2)
        >>> import json; sorted(json.loads(report.to_json()))[:3]
        ['classes', 'cross_magnification', 'cross_magnification_mean']
        >>> EvaluationReport.from_dict(json.loads(report.to_json())) == report
        True
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
    cross_magnification: list[list[float]] | None = None
    cross_magnification_mean: float | None = None  #: mean of the off-diagonal cells

    def to_dict(self) -> dict:
        """Plain lists, numbers and strings (scales as string keys)."""
        return jsonable(asdict(self))

    def to_json(self, **kwargs) -> str:
        """`to_dict` as JSON text; ``kwargs`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationReport:
        """The report that `to_dict` wrote (e.g. read back from a JSON file).

        Args:
            d: a dict from `to_dict`.
        """
        retrieval = d.get("retrieval")
        return cls(
            **{k: d[k] for k in ("classes", "scales", "k", "metric", "exclude")},
            pooled=ClassificationMetrics(**d["pooled"]),
            per_scale={s: ClassificationMetrics(**m) for s, m in d.get("per_scale", {}).items()},
            retrieval=None if retrieval is None else RetrievalMetrics(**retrieval),
            retrieval_per_scale={
                s: RetrievalMetrics(**m) for s, m in d.get("retrieval_per_scale", {}).items()
            },
            cross_magnification=d.get("cross_magnification"),
            cross_magnification_mean=d.get("cross_magnification_mean"),
        )


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def classification_metrics(pred: np.ndarray, true: np.ndarray, groups: np.ndarray, n_classes: int):
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


def encode_ids(name, values, n, table=None):
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


def retrieval_metrics(p1, hit_k, ap, n_rel, with_map: bool) -> RetrievalMetrics:
    has = n_rel > 0
    return RetrievalMetrics(
        precision_at_1=float(p1.mean()),
        recall_at_k=float(hit_k.mean()),
        map_at_r=(float(ap[has].mean()) if has.any() else 0.0) if with_map else None,
        queries_without_relevant=int((~has).sum()),
    )
