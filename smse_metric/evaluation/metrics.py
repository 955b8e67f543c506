"""Report types and the metrics computed from predictions and neighbour tables."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .._checks import deprecated
from ._inputs import as_ids
from .clustering import ClusteringMetrics

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


#: the ranking metrics, PML's ``AccuracyCalculator`` names but MAP@R's
RANKING = ("r_precision", "map_at_r", "mean_average_precision", "mean_reciprocal_rank")


@dataclass
class RetrievalMetrics:
    """Retrieval scores of one set of queries against their gallery, with the
    definitions of PML's ``AccuracyCalculator``.

    A query is scored when the gallery holds a usable item of its label (after
    ``exclude``); the others are left out of every metric alike and counted in
    ``queries_without_relevant`` (label in the gallery, none usable) and
    ``queries_unseen_label`` (label absent from the gallery). A metric is NaN when
    no query is scored. R is a query's usable same-label items; the ranking metrics
    look at its first ``retrieval_k`` neighbours (K).

    Attributes:
        precision_at_1: the nearest neighbour has the query's label.
        recall_at_k: some of the k nearest neighbours has the query's label.
        r_precision: same-label share of the first min(R, K) neighbours.
        map_at_r: sum over the first min(R, K) ranks i holding a same-label item of
            precision@i, divided by R (MAP@R, Musgrave et al. 2020).
        mean_average_precision: the same over the first K ranks (PML's MAP: with
            K = every gallery item, the textbook average precision).
        mean_reciprocal_rank: 1 / rank of the first same-label item within K (0 if none).
        queries_scored: queries every metric averages over.
        queries_without_relevant: left out: the label has no usable gallery item.
        queries_unseen_label: left out: the label is not in the gallery.
        per_class: each metric's mean over the scored queries of each class, in the
            report's class order (NaN for a class without scored queries).

    The ranking metrics are None when not computed (``ranking=False``).

    Examples:
        >>> from smse_metric.evaluation import evaluate_embeddings, evaluate_predictions
        >>> emb = np.array([[0.0, 1], [0, 1.1], [1, 0], [1.1, 0]], dtype="float32")
        >>> r = evaluate_embeddings(emb, [0, 0, 1, 1], k=1, exclude="self").retrieval
        >>> r.precision_at_1, r.map_at_r, r.mean_reciprocal_rank
        (1.0, 1.0, 1.0)
    """

    precision_at_1: float
    recall_at_k: float
    r_precision: float | None
    map_at_r: float | None
    mean_average_precision: float | None
    mean_reciprocal_rank: float | None
    queries_scored: int
    queries_without_relevant: int
    queries_unseen_label: int
    per_class: dict[str, list[float]] = field(default_factory=dict)

    def to_pml(self) -> dict[str, float]:
        """The values under the keys of PML's ``AccuracyCalculator.get_accuracy``."""
        names = {"map_at_r": "mean_average_precision_at_r"}
        keys = ("precision_at_1", *RANKING)
        return {names.get(k, k): getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class EvaluationReport:
    """Everything `evaluate_embeddings` measured; ``to_dict()`` / ``to_json()``.

    Attributes:
        classes: the class labels, in the order of per-class lists.
        scales: the magnifications present, in the order of ``per_scale``.
        k: neighbours per query (None for a classifier's predictions).
        distance: ``"cosine"``, ``"l2"`` or ``"squared_l2"`` (None for predictions).
        exclude: ``"none"``, ``"self"`` or ``"group"`` (None for predictions).
        pooled: classification metrics over every query.
        per_scale: classification metrics of each magnification's queries.
        retrieval: precision@1, recall@k and the ranking metrics (kNN only).
        retrieval_per_scale: the same per magnification.
        retrieval_k: depth of the ranking metrics as asked (an int, ``"max_bin_count"``
            or None for the whole gallery).
        average: ``"query"`` or ``"class"``: how the retrieval metrics average.
        clustering: NMI and AMI of k-means on the queries (None when not computed).
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
        >>> import json; [key for key in sorted(json.loads(report.to_json())) if key[0] == "c"]
        ['classes', 'clustering', 'cross_magnification', 'cross_magnification_mean']
        >>> EvaluationReport.from_dict(json.loads(report.to_json())) == report
        True
    """

    classes: list
    scales: list
    k: int | None
    distance: str | None
    exclude: str | None
    pooled: ClassificationMetrics
    per_scale: dict[str, ClassificationMetrics] = field(default_factory=dict)
    retrieval: RetrievalMetrics | None = None
    retrieval_per_scale: dict[str, RetrievalMetrics] = field(default_factory=dict)
    #: rows: query scale, columns: gallery restricted to that scale; kNN accuracy
    cross_magnification: list[list[float]] | None = None
    cross_magnification_mean: float | None = None  #: mean of the off-diagonal cells
    retrieval_k: int | str | None = None
    average: str = "query"
    clustering: ClusteringMetrics | None = None

    def to_dict(self) -> dict:
        """Plain lists, numbers and strings (scales as string keys)."""
        return jsonable(asdict(self))

    def to_json(self, **kwargs) -> str:
        """`to_dict` as JSON text; ``kwargs`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def metric(self) -> str | None:
        """The old name of `distance`; deprecated, warns."""
        deprecated("EvaluationReport.metric", "EvaluationReport.distance", 2)
        return self.distance

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationReport:
        """The report that `to_dict` wrote (e.g. read back from a JSON file).

        Args:
            d: a dict from `to_dict`.
        """
        retrieval, clustering = d.get("retrieval"), d.get("clustering")
        return cls(
            **{k: d[k] for k in ("classes", "scales", "k", "exclude")},
            # reports written before the one distance vocabulary call it "metric"
            distance=d["distance"] if "distance" in d else d["metric"],
            pooled=ClassificationMetrics(**d["pooled"]),
            per_scale={s: ClassificationMetrics(**m) for s, m in d.get("per_scale", {}).items()},
            retrieval=None if retrieval is None else RetrievalMetrics(**retrieval),
            retrieval_per_scale={
                s: RetrievalMetrics(**m) for s, m in d.get("retrieval_per_scale", {}).items()
            },
            cross_magnification=d.get("cross_magnification"),
            cross_magnification_mean=d.get("cross_magnification_mean"),
            retrieval_k=d.get("retrieval_k"),
            average=d.get("average", "query"),
            clustering=None if clustering is None else ClusteringMetrics(**clustering),
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


def retrieval_metrics(
    per_query: dict[str, np.ndarray | None],
    n_rel: np.ndarray,
    unseen: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    average: str,
) -> RetrievalMetrics:
    """Average per-query scores over the scored queries (``n_rel > 0``), per class and
    over queries (``average="query"``) or over classes (``"class"``, PML's avg_of_avgs)."""
    scored = n_rel > 0
    counts = np.bincount(codes[scored], minlength=n_classes)
    means, per_class = {}, {}
    for name, v in per_query.items():
        if v is None:
            means[name] = None
            continue
        sums = np.bincount(codes[scored], weights=v[scored], minlength=n_classes)
        with np.errstate(divide="ignore", invalid="ignore"):
            cls = np.where(counts > 0, sums / counts, np.nan)
        per_class[name] = cls.tolist()
        if not scored.any():
            means[name] = float("nan")
        elif average == "class":
            means[name] = float(cls[counts > 0].mean())
        else:
            means[name] = float(v[scored].mean())
    return RetrievalMetrics(
        **means,
        queries_scored=int(scored.sum()),
        queries_without_relevant=int((~scored & ~unseen).sum()),
        queries_unseen_label=int(unseen.sum()),
        per_class=per_class,
    )
