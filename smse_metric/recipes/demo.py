"""``smse-metric demo``: SMSE against a plain classifier on the synthetic dataset.

Generates the synthetic BreakHis (twice the default patients, so validation and test
hold enough patients to mean something), trains ``smse-triplet`` and ``baseline-ce``
with the same backbone, image size and epochs, and prints one table. Everything is
chosen before looking at test numbers; model selection uses validation patients.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import make_synthetic_breakhis
from ..data.synthetic import DEFAULT_PATIENTS
from ..report import format_score
from .config import load_config

__all__ = ["DEMO_METHODS", "DEMO_OVERRIDES", "demo_table", "demo_verdict", "run_demo"]

DEMO_METHODS = ("smse-triplet", "baseline-ce")
#: small images and few epochs so that both runs fit in minutes on two CPU cores
DEMO_OVERRIDES = {
    "data": {"synthetic": True, "image_size": [48, 48], "num_workers": 0},
    "optim": {"epochs": 12, "step_size": 8, "patience": 0},
}
COLUMNS = ("40x", "100x", "200x", "400x", "pooled", "cross-mag mean")


def _row(method: str, predictor: str, level: str, report: dict) -> list[str]:
    key = "accuracy" if level == "image" else "patient_accuracy"
    cells = [report["per_scale"][str(s)][key] for s in (40, 100, 200, 400)]
    cells.append(report["pooled"][key])
    cells.append(report["cross_scale_mean"] if predictor == "kNN" else None)
    return [method, predictor, level] + ["-" if c is None else f"{c:.3f}" for c in cells]


def demo_table(results: dict[str, dict]) -> str:
    """A Markdown table: method x predictor (kNN, head) x level (image, patient), the
    accuracy per magnification, pooled, and the cross-magnification mean (kNN).

    Example:
        >>> rep = {"per_scale": {str(s): {"accuracy": 0.5, "patient_accuracy": 0.5}
        ...                     for s in (40, 100, 200, 400)},
        ...        "pooled": {"accuracy": 0.5, "patient_accuracy": 0.5}, "cross_scale_mean": 0.5}
        >>> table = demo_table({"m": {"test": {"knn": rep, "head": rep}}})
        >>> table.splitlines()[0].split("|")[1].strip(), len(table.splitlines())
        ('method', 6)
    """
    rows = [["method", "predictor", "level", *COLUMNS]]
    for method, metrics in results.items():
        for predictor, name in (("kNN", "knn"), ("head", "head")):
            for level in ("image", "patient"):
                rows.append(_row(method, predictor, level, metrics["test"][name]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def demo_verdict(results: dict[str, dict]) -> str:
    """One line per headline number: each method judged by the predictor its epoch was
    selected on (kNN for smse-triplet, the head for baseline-ce), and the kNN
    cross-magnification mean.

    Example:
        >>> rep = {"pooled": {"patient_accuracy": 0.75}, "cross_scale_mean": 0.5}
        >>> print(demo_verdict({"m": {"selected_on": "validation knn patient accuracy",
        ...                           "test": {"knn": rep, "head": rep}}}))
        m: pooled patient accuracy 0.750 (kNN, as selected on validation), cross-mag... 0.500
    """
    lines = []
    for method, m in results.items():
        select = "knn" if "knn" in m["selected_on"] else "head"
        patient = m["test"][select]["pooled"]["patient_accuracy"]
        lines.append(
            f"{method}: pooled patient accuracy {patient:.3f}"
            f" ({'kNN' if select == 'knn' else 'head'}, as selected on validation), "
            f"cross-magnification mean {format_score(m['test']['knn']['cross_scale_mean'])}"
        )
    return "\n".join(lines)


def run_demo(out_dir: str | Path, epochs: int | None = None, seed: int = 0,
             device: str = "auto", quiet: bool = False) -> dict[str, dict]:  # fmt: skip
    """Train both methods under ``out_dir/<method>``; returns {method: metrics}.

    Example:
        About two and a half minutes on two CPU cores (skipped here; `make demo` and
        tests/test_recipe.py run it):

        >>> results = run_demo("runs/demo")  # doctest: +SKIP
        >>> print(demo_table(results))  # doctest: +SKIP
    """
    from .breakhis import train

    out = Path(out_dir)
    root = out / f"data-seed{seed}"  # kept by --overwrite: the same seed makes the same data
    if not (root / "Folds.csv").is_file():
        make_synthetic_breakhis(root, {k: 2 * v for k, v in DEFAULT_PATIENTS.items()}, seed=seed)
    results = {}
    for method in DEMO_METHODS:
        overrides = {k: dict(v) for k, v in DEMO_OVERRIDES.items()}
        overrides["data"]["path"] = str(root.resolve())
        overrides["run"] = {"seed": seed, "device": device}
        if epochs is not None:
            overrides["optim"]["epochs"] = epochs
        cfg = load_config(method, overrides)
        if not quiet:
            print(f"training {method} ({cfg.optim.epochs} epochs) ...", flush=True)
        results[method] = train(cfg, out / method, root, quiet=quiet)
    table = demo_table(results)
    (out / "summary.md").write_text(
        "# Demo: SMSE vs a plain classifier on the synthetic dataset\n\n"
        + table
        + "\n\n"
        + demo_verdict(results).replace("\n", "\n\n")
        + "\n"
    )
    (out / "summary.json").write_text(json.dumps(
        {m: {"knn": r["test"]["knn"], "head": r["test"]["head"]} for m, r in results.items()},
        indent=1))  # fmt: skip
    return results
