"""The Markdown report of a run directory, with its plots.

``write_report(run_dir, metrics, history, test_points)`` renders a run's `RunMetrics`,
its per-epoch history and its test embeddings as ``report.md`` and ``plots/*.png``:
training curves, confusion matrices (pooled and per magnification, kNN and head), the
cross-magnification heatmap and a 2-D projection of the test embeddings. Matplotlib
runs headless (Agg); nothing is shown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from smse_metric.evaluation import EvaluationReport

from .data.breakhis import class_names
from .errors import RecipeError
from .results import PREDICTORS, RunMetrics, SplitMetrics
from .rundir import RunDir

__all__ = [
    "fold_summary",
    "fold_table",
    "format_score",
    "pca_2d",
    "read_history",
    "results_table",
    "write_report",
]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pca_2d(x: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2]: the projection on the two leading principal axes (signs fixed
    so that each axis' largest loading is positive, for stable pictures).

    Args:
        x: [N, D] points.

    Examples:
        >>> x = np.array([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [2, 1, 0]])
        >>> pca_2d(x).round(3).tolist()  # first axis: the direction of largest spread
        [[-1.0, -0.5], [1.0, -0.5], [-1.0, 0.5], [1.0, 0.5]]
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise RecipeError(f"x must be [N, D], got shape {x.shape}")
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = np.zeros((2, x.shape[1]))
    k = min(2, vt.shape[0])
    axes[:k] = vt[:k]
    peak = axes[np.arange(2), np.abs(axes).argmax(1)]
    axes *= np.where(peak < 0, -1.0, 1.0)[:, None]
    return centred @ axes.T


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def format_score(x: float | None) -> str:
    """Three decimals, or ``-`` for a missing score (``None``, NaN).

    Args:
        x: a score, or None.

    Examples:
        >>> format_score(0.81234), format_score(None)
        ('0.812', '-')
    """
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


#: (level, ClassificationMetrics field) of the accuracy tables
LEVELS = (("image", "accuracy"), ("patient", "patient_accuracy"))
LABELS = {"knn": "kNN", "head": "head"}


def results_table(test: SplitMetrics) -> list[str]:
    """Markdown rows: kNN and head, image / patient accuracy per magnification + pooled.

    Args:
        test: the test split's reports.

    Examples:
        >>> from smse_metric.evaluation import evaluate_predictions
        >>> r = evaluate_predictions([0, 1, 1, 1], [0, 1, 0, 1], groups=[1, 1, 2, 2],
        ...                          scales=[40, 40, 40, 40])
        >>> results_table(SplitMetrics(r, r))[2]
        '| kNN | image | 0.750 | 0.750 |'
    """
    scales = [str(s) for s in test.knn.scales]
    head = ["| method | level | " + " | ".join(f"{s}x" for s in scales) + " | pooled |"]
    head.append("|" + "---|" * (len(scales) + 3))
    for name in PREDICTORS:
        rep = test.predictor(name)
        for level, key in LEVELS:
            cells = [format_score(getattr(rep.per_scale[s], key)) for s in scales]
            head.append(
                f"| {LABELS[name]} | {level} | " + " | ".join(cells) + f" | "
                f"{format_score(getattr(rep.pooled, key))} |"
            )
    return head


def fold_summary(per_fold: dict[int, RunMetrics]) -> dict:
    """Mean and standard deviation (ddof = 1) over folds of each test accuracy, as
    ``folds.json`` holds it: ``{"folds": [...], "knn" | "head": {"image" | "patient":
    {"40" ... "pooled": {"mean", "std", "values"}}}, "cross_magnification_mean": {...}}``.

    Args:
        per_fold: ``{fold: metrics}`` of each fold.

    Examples:
        >>> from smse_metric.evaluation import evaluate_predictions
        >>> def fold(pred):
        ...     r = evaluate_predictions(pred, [0, 1, 0, 1], groups=[1, 2, 3, 4],
        ...                              scales=[40, 40, 40, 40])
        ...     return RunMetrics(0, "validation knn patient accuracy", 1.0,
        ...                       SplitMetrics(r, r), {}, {}, [])
        >>> s = fold_summary({1: fold([0, 1, 0, 1]), 2: fold([0, 1, 1, 1])})
        >>> pooled = s["knn"]["patient"]["pooled"]
        >>> round(pooled["mean"], 3), round(pooled["std"], 4)
        (0.875, 0.1768)
    """
    if not per_fold:
        raise RecipeError("per_fold is empty: no fold finished")

    def stats(values: list[float]) -> dict:
        v = np.asarray(values, dtype=float)
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return {"mean": float(v.mean()), "std": std, "values": v.tolist()}

    reports = {name: [m.test.predictor(name) for m in per_fold.values()] for name in PREDICTORS}
    scales = [str(s) for s in reports["knn"][0].scales]
    out: dict = {"folds": list(per_fold)}
    for name, reps in reports.items():
        out[name] = {}
        for level, key in LEVELS:
            cols = {s: [getattr(r.per_scale[s], key) for r in reps] for s in scales}
            cols["pooled"] = [getattr(r.pooled, key) for r in reps]
            out[name][level] = {s: stats(v) for s, v in cols.items()}
    cross = [r.cross_magnification_mean for r in reports["knn"]]
    out["cross_magnification_mean"] = None if None in cross else stats(cross)  # one magnification
    return out


def fold_table(summary: dict) -> list[str]:
    """Markdown rows of `fold_summary` in percent: mean +- std.

    Args:
        summary: what `fold_summary` returns.

    Examples:
        >>> cell = {"mean": 0.85, "std": 0.0707, "values": [0.8, 0.9]}
        >>> level = {"40": cell, "pooled": cell}
        >>> both = {"image": level, "patient": level}
        >>> s = {"knn": both, "head": both, "cross_magnification_mean": cell}
        >>> fold_table(s)[2]
        '| kNN | image | 0.850 +- 0.071 | 0.850 +- 0.071 |'
    """
    cols = list(summary["knn"]["image"])
    rows = [
        "| predictor | level | " + " | ".join(f"{c}x" if c != "pooled" else c for c in cols) + " |"
    ]
    rows.append("|" + "---|" * (len(cols) + 2))
    for name in PREDICTORS:
        for level, _ in LEVELS:
            cells = [summary[name][level][c] for c in cols]
            # fractions, as in a run's report (format_score)
            text = [f"{c['mean']:.3f} +- {c['std']:.3f}" for c in cells]
            rows.append(f"| {LABELS[name]} | {level} | " + " | ".join(text) + " |")
    x = summary["cross_magnification_mean"]
    if x is not None:
        rows += ["", f"kNN cross-magnification mean: {x['mean']:.3f} +- {x['std']:.3f}"]
    return rows


def _curves(history: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] + 1 for h in history]  # counted from 1, as the run printed them
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (
        ("val_patient_accuracy", "kNN patient"),
        ("val_accuracy", "kNN image"),
        ("val_head_accuracy", "head image"),
    ):
        if all(key in h for h in history):
            b.plot(epochs, [h[key] for h in history], marker="o", label=label)
    b.set(xlabel="epoch", ylabel="accuracy", title="validation", ylim=(0, 1.02))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _confusions(test: SplitMetrics, names: list[str], path: Path) -> None:
    plt = _pyplot()
    scales = [str(s) for s in test.knn.scales]
    cols = ["pooled", *scales]
    fig, axes = plt.subplots(2, len(cols), figsize=(2.4 * len(cols), 4.9), squeeze=False)
    for r, name in enumerate(PREDICTORS):
        report = test.predictor(name)
        for c, col in enumerate(cols):
            rep = report.pooled if col == "pooled" else report.per_scale[col]
            m = np.asarray(rep.confusion, dtype=float)
            ax = axes[r, c]
            ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, int(v), ha="center", va="center", fontsize=8)
            ax.set_title(f"{LABELS[name]} {col}{'' if col == 'pooled' else 'x'}", fontsize=9)
            ticks = range(len(names))
            ax.set_xticks(ticks, names, fontsize=7, rotation=45)
            ax.set_yticks(ticks, names if c == 0 else [], fontsize=7)
            ax.set_xlabel("predicted", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cross_magnification(knn: EvaluationReport, path: Path) -> None:
    plt = _pyplot()
    m = np.asarray(knn.cross_magnification, dtype=float)
    names = [f"{s}x" for s in knn.scales]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j,
            i,
            format_score(v),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v < 0.6 else "black",
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    mean = format_score(knn.cross_magnification_mean)
    ax.set(
        xlabel="gallery magnification",
        ylabel="query magnification",
        title=f"kNN accuracy (off-diagonal mean {mean})",
    )
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _projection(emb: Mapping[str, np.ndarray], names: list[str], path: Path) -> None:
    plt = _pyplot()
    xy = pca_2d(emb["embeddings"])
    labels, mags = emb["labels"], emb["magnifications"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for m_i, mag in enumerate(np.unique(mags)):
        for c in np.unique(labels):
            sel = (mags == mag) & (labels == c)
            ax.scatter(
                xy[sel, 0],
                xy[sel, 1],
                s=14,
                marker=MARKERS[m_i % len(MARKERS)],
                color=colours(int(c) % 10),
                alpha=0.75,
                label=f"{names[int(c)]} {mag}x",
            )
    ax.set(xlabel="PC 1", ylabel="PC 2", title="test embeddings (PCA)")
    ax.legend(fontsize=7, ncol=2, markerscale=1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_history(path: str | Path) -> list[dict]:
    """The per-epoch records of a ``history.jsonl`` (none if it is missing).

    Args:
        path: a run's ``history.jsonl``.

    Examples:
        >>> read_history("no/such/history.jsonl")
        []
    """
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_report(
    run_dir: str | Path,
    metrics: RunMetrics,
    history: Sequence[dict] = (),
    test_points: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png``; returns the report path.

    Args:
        run_dir: the run directory.
        metrics: the run's results.
        history: its per-epoch records (training curves; none: no curves).
        test_points: ``embeddings`` [N, D], ``labels`` [N] and ``magnifications`` [N] of
            the test images (a 2-D projection; None: none).

    Examples:
        Render a finished run's report (skipped here: it needs a run; the recipe calls it
        and tests/recipes/histopathology/test_training.py checks every file):

        >>> write_report("runs/example", metrics, history)  # doctest: +SKIP
        PosixPath('runs/example/report.md')
    """
    run = RunDir(run_dir)
    test, knn = metrics.test, metrics.test.knn
    n_classes = len(knn.pooled.confusion)  # a metrics.json of before class names were kept
    names = metrics.data.get("class_names") or list(
        class_names("binary" if n_classes == 2 else "subtype")
    )
    run.plots.mkdir(exist_ok=True)
    lines = [f"# Run report: {run.path.name}", ""]
    lines += [
        f"Best epoch {metrics.best_epoch + 1} ({metrics.selected_on} "
        f"{format_score(metrics.best_val_score)}); images train / validation / test: "
        f"{metrics.splits['train']} / {metrics.splits['val']} / {metrics.splits['test']}. "
        f"kNN: k = {knn.k}, {knn.distance}, exclude = {knn.exclude}, "
        "gallery = the training images.",
        "",
        "## Test accuracy",
        "",
        *results_table(test),
        "",
        f"Cross-magnification kNN accuracy, off-diagonal mean: "
        f"{format_score(knn.cross_magnification_mean)}.",
        "",
        "![cross-magnification](plots/cross_magnification.png)",
        "",
        "## Confusion matrices (rows: true class)",
        "",
        "![confusion](plots/confusion.png)",
        "",
    ]
    _plot_cross_magnification(knn, run.plot("cross_magnification"))
    _confusions(test, names, run.plot("confusion"))
    if history:
        _curves(list(history), run.plot("curves"))
        lines += ["## Training", "", "![curves](plots/curves.png)", ""]
    if test_points is not None:
        _projection(test_points, names, run.plot("projection"))
        lines += [
            "## Test embeddings",
            "",
            "Colour: class; marker: magnification.",
            "",
            "![projection](plots/projection.png)",
            "",
        ]
    lines += ["## Data", ""]
    shown = {k: v for k, v in metrics.data.items() if k != "rows_skipped"}
    lines += [f"- {k}: {v}" for k, v in shown.items() if not isinstance(v, dict | list)]
    lines.append(f"- classes: {', '.join(names)}")
    if "rows_skipped" in metrics.data:  # a manifest's rows whose files are missing
        lines.append(f"- manifest rows left out: {metrics.data['rows_skipped']}")
        lines += [f"  - {row}" for row in metrics.data.get("skipped_rows", [])]
    lines.append(f"- unreadable images left out: {len(metrics.bad_images)}")
    lines += [f"  - `{p}`: {why}" for p, why in metrics.bad_images]
    lines.append("")
    run.report.write_text("\n".join(lines))
    return run.report
