"""``smse-metric demo``: SMSE against a plain classifier on the synthetic dataset.

One synthetic BreakHis with many patients and few images each (about 44 test patients
per fold), both methods trained with the same small CNN, image size and epochs on each
of several paired replicates: replicate ``k`` uses fold ``k + 1`` of the data's
``Folds.csv`` and training seed ``k`` for both methods. Everything is fixed before
looking at test numbers; epochs are selected on validation patients. The verdict per
headline metric comes from the 95% confidence interval of the paired difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from smse_metric.evaluation import EvaluationReport, evaluate_predictions

from .compare import paired_comparison
from .config import load_config
from .data import make_synthetic_breakhis
from .data.breakhis import MAGNIFICATIONS
from .data.synthetic import DEFAULT_PATIENTS
from .errors import RecipeError
from .report import LABELS, LEVELS, format_score
from .results import PREDICTORS, RunMetrics, SplitMetrics
from .rundir import RunDir

__all__ = [
    "DEMO_METHODS",
    "DEMO_OVERRIDES",
    "HEADLINE",
    "comparison_table",
    "demo_comparison",
    "demo_table",
    "demo_verdict",
    "frozen_overrides",
    "run_demo",
]

DEMO_METHODS = ("smse-triplet", "baseline-ce")
DEMO_SEEDS = 5
#: six times the default synthetic patients, one image per magnification (+-1)
DEMO_PATIENTS = {k: 6 * v for k, v in DEFAULT_PATIENTS.items()}
DEMO_DATA = {"images_per_magnification": 1, "image_size": (48, 32)}
#: the paper's kind of small CNN, small images and few epochs: 2 x 5 runs in minutes
DEMO_OVERRIDES = {
    "data": {"image_size": [32, 32], "num_workers": 0},
    "model": {"backbone": "smse-cnn", "embedding_dim": 32},
    "optim": {"epochs": 8, "step_size": 6, "patience": 0},
}
#: (name, predictor, level key): each method judged by the predictor it was selected on
HEADLINE = (
    ("pooled patient accuracy", "selected", "patient_accuracy"),
    ("pooled image accuracy", "selected", "accuracy"),
    ("cross-magnification mean (kNN)", "knn", "cross_magnification_mean"),
)
COLUMNS = ("40x", "100x", "200x", "400x", "pooled", "cross-mag mean")


def _row(method: str, name: str, level: str, report: EvaluationReport) -> list[str]:
    key = "accuracy" if level == "image" else "patient_accuracy"
    cells = [getattr(report.per_scale[str(s)], key) for s in MAGNIFICATIONS]
    cells.append(getattr(report.pooled, key))
    cells.append(report.cross_magnification_mean if name == "knn" else None)
    return [method, LABELS[name], level] + ["-" if c is None else f"{c:.3f}" for c in cells]


def _example(patient_accuracy: float) -> RunMetrics:
    """A RunMetrics whose every accuracy is ``patient_accuracy`` (for the examples)."""
    r = evaluate_predictions(
        [0, 1, 0, 1], [0, 1, 0, 1], groups=[1, 2, 3, 4], scales=list(MAGNIFICATIONS)
    )
    for m in (r.pooled, *r.per_scale.values()):
        m.accuracy = m.patient_accuracy = patient_accuracy
    r.cross_magnification_mean = patient_accuracy
    return RunMetrics(0, "validation knn patient accuracy", 1.0, SplitMetrics(r, r), {}, {}, [])


def demo_table(results: dict[str, RunMetrics]) -> str:
    """A Markdown table: method x predictor (kNN, head) x level (image, patient), the
    accuracy per magnification, pooled, and the cross-magnification mean (kNN).

    Args:
        results: ``{method: metrics}`` of one replicate, as `train` returns them.

    Examples:
        >>> table = demo_table({"m": _example(0.5)})
        >>> table.splitlines()[0].split("|")[1].strip(), len(table.splitlines())
        ('method', 6)
    """
    rows = [["method", "predictor", "level", *COLUMNS]]
    for method, metrics in results.items():
        for name in PREDICTORS:
            for level, _ in LEVELS:
                rows.append(_row(method, name, level, metrics.test.predictor(name)))
    return _markdown(rows)


def demo_verdict(results: dict[str, RunMetrics]) -> str:
    """One line per headline number: each method judged by the predictor its epoch was
    selected on (kNN for smse-triplet, the head for baseline-ce), and the kNN
    cross-magnification mean.

    Args:
        results: ``{method: metrics}`` of one replicate, as `train` returns them.

    Examples:
        >>> print(demo_verdict({"m": _example(0.75)}))
        m: pooled patient accuracy 0.750 (kNN, as selected on validation), cross-mag... 0.750
    """
    lines = []
    for method, m in results.items():
        select = m.selected_predictor
        patient = m.test.predictor(select).pooled.patient_accuracy
        cross = format_score(m.test.knn.cross_magnification_mean)
        lines.append(
            f"{method}: pooled patient accuracy {patient:.3f} ({LABELS[select]}, "
            f"as selected on validation), cross-magnification mean {cross}"
        )
    return "\n".join(lines)


def _headline(metrics: RunMetrics, predictor: str, key: str) -> float | None:
    name = metrics.selected_predictor if predictor == "selected" else predictor
    report = metrics.test.predictor(name)
    if key == "cross_magnification_mean":
        return report.cross_magnification_mean
    return getattr(report.pooled, key)


def demo_comparison(results: list[dict[str, RunMetrics]]) -> dict[str, dict]:
    """Per headline metric: the paired comparison of the first method against the second
    over the replicates (``results[k]`` = {method: metrics} of replicate ``k``).

    Args:
        results: one ``{method: metrics}`` per replicate; methods in the same order.

    Examples:
        >>> runs = [{"a": _example(0.8 + e), "b": _example(0.7)} for e in (0.0, 0.01, 0.02)]
        >>> demo_comparison(runs)["pooled patient accuracy"]["verdict"]
        'better'
    """
    a, b = list(results[0])
    out = {}
    for name, predictor, key in HEADLINE:
        va = [_headline(r[a], predictor, key) for r in results]
        vb = [_headline(r[b], predictor, key) for r in results]
        if any(v is None for v in va + vb):
            continue  # one magnification: nothing to cross
        out[name] = {
            "a": a,
            "b": b,
            "values_a": va,
            "values_b": vb,
            **paired_comparison(va, vb).to_dict(),
        }
    return out


def comparison_table(comparison: dict[str, dict], results: list[dict[str, RunMetrics]]) -> str:
    """Markdown: per headline metric, each method's mean, the paired difference, its 95%
    confidence interval and the verdict.

    Args:
        comparison: what `demo_comparison` returns.
        results: the replicates' ``{method: metrics}``, for the column names.

    Examples:
        >>> runs = [{"a": _example(0.8), "b": _example(0.7 + e)} for e in (0.0, 0.05, 0.1)]
        >>> row = comparison_table(demo_comparison(runs), runs).splitlines()[2]
        >>> [c.strip() for c in row.strip("|").split("|")]  # doctest: +NORMALIZE_WHITESPACE
        ['pooled patient accuracy', '0.800', '0.750', '+0.050', '[-0.074, +0.174]',
         'no significant difference']
    """
    first = results[0]
    names = {m: f"{m} ({LABELS[first[m].selected_predictor]})" for m in first}
    rows = [["metric", *names.values(), "difference", "95% CI", "verdict"]]
    for metric, c in comparison.items():
        rows.append(
            [
                metric,
                f"{c['mean_a']:.3f}",
                f"{c['mean_b']:.3f}",
                f"{c['difference']:+.3f}",
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]",
                c["verdict"],
            ]
        )
    return _markdown(rows)


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def frozen_overrides(backbone: str, pretrained: bool, weights: str | None, cache: Path) -> dict:
    """The demo's overrides for both methods on a frozen ``backbone``: its features
    computed once into ``cache`` and shared by every replicate and method (with its own
    or loaded weights; seeded random weights otherwise, which differ per replicate), the
    SMSE heads against a linear probe: the baseline's embedding and classifier layers
    without the normalisation between them, one linear map of the features (eva's
    protocol: frozen backbone, linear head).

    Args:
        backbone: the frozen backbone's name (timm, ``hf-hub:`` or ``smse-cnn``).
        pretrained: load the backbone's own pretrained weights.
        weights: a local weights file for the backbone, or None.
        cache: where the features are kept.

    Examples:
        >>> o = frozen_overrides("smse-cnn", False, None, Path("runs/demo/features"))
        >>> o["model"]["freeze_backbone"], o["baseline-ce"]["model"]["normalize"]
        (True, False)
    """
    return {
        "model": {
            "backbone": backbone,
            "pretrained": pretrained,
            "weights": weights,
            "freeze_backbone": True,
        },
        "data": {"cache_dir": str(cache)},
        "baseline-ce": {"model": {"normalize": False}},
    }


def run_demo(
    out_dir: str | Path,
    epochs: int | None = None,
    seeds: int = DEMO_SEEDS,
    device: str = "auto",
    quiet: bool = False,
    frozen: str | None = None,
    pretrained: bool = False,
    weights: str | None = None,
) -> dict:
    """Train both methods on ``seeds`` paired replicates under ``out_dir/seed<k>/<method>``
    and write ``summary.md`` / ``summary.json``; returns ``{"runs": [{method: metrics}],
    "comparison": {metric: ...}, "seconds": wall time}``.

    Args:
        out_dir: where the data, the runs and the summary go.
        epochs: epochs per run (default 8).
        seeds: paired replicates, at least 2 (default 5).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        quiet: print nothing while training.
        frozen: a backbone name: compare SMSE's heads with a linear probe on its frozen
            features, cached once in ``out_dir/features`` (`frozen_overrides`).
        pretrained: with ``frozen``, the backbone's pretrained weights.
        weights: with ``frozen``, a local weights file for the backbone.

    Examples:
        About four minutes on two CPU cores (skipped here; `make demo` and
        tests/recipes/histopathology/test_demo.py run it):

        >>> summary = run_demo("runs/demo")  # doctest: +SKIP
        >>> summary["comparison"]["pooled patient accuracy"]["verdict"]  # doctest: +SKIP
    """
    from .training import train

    if seeds < 2:
        raise RecipeError(f"seeds must be at least 2 for a confidence interval, got {seeds}")
    t0 = time.perf_counter()
    out = RunDir(out_dir)
    root = out.data
    if not (root / "Folds.csv").is_file():
        make_synthetic_breakhis(root, DEMO_PATIENTS, seed=0, folds=max(5, seeds), **DEMO_DATA)
    extra = frozen_overrides(frozen, pretrained, weights, out.features) if frozen else {}
    runs = []
    for k in range(seeds):
        results = {}
        for method in DEMO_METHODS:
            overrides = {key: dict(v) for key, v in DEMO_OVERRIDES.items()}
            for part in (extra, extra.get(method, {})):
                for section in ("model", "data"):
                    overrides.setdefault(section, {}).update(part.get(section, {}))
            overrides["data"].update(path=str(root.resolve()), fold=k + 1)
            overrides["run"] = {"seed": k, "device": device}
            if epochs is not None:
                overrides["optim"]["epochs"] = epochs
            cfg = load_config(method, overrides)
            if not quiet:
                print(
                    f"replicate {k + 1}/{seeds}: {method} ({cfg.optim.epochs} epochs)", flush=True
                )
            results[method] = train(cfg, out.replicate(k, method), root, quiet=True)
        runs.append(results)
    comparison = demo_comparison(runs)
    seconds = time.perf_counter() - t0
    summary = {"runs": runs, "comparison": comparison, "seconds": seconds}
    title = (
        f"SMSE heads vs a linear probe on frozen {frozen} features"
        if frozen
        else "SMSE vs a plain classifier"
    )
    out.summary_md.write_text(
        f"# Demo: {title}, {seeds} paired replicates\n\n"
        + comparison_table(comparison, runs)
        + "\n\n## Replicate 1\n\n"
        + demo_table(runs[0])
        + "\n\n"
        + demo_verdict(runs[0]).replace("\n", "\n\n")
        + "\n"
    )
    out.summary_json.write_text(
        json.dumps(
            {
                "comparison": comparison,
                "seconds": seconds,
                "runs": [{m: r.test.to_dict() for m, r in results.items()} for results in runs],
            },
            indent=1,
        )
    )
    return summary
