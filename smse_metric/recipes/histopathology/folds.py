"""The summary of a multi-fold run: mean +- std over folds in ``OUT/folds.json`` and
``OUT/folds.md`` (the folds themselves are trained by `train_folds`)."""

from __future__ import annotations

import json

from .report import fold_summary, fold_table
from .results import RunMetrics
from .rundir import RunDir

__all__ = ["write_fold_summary"]


def write_fold_summary(run: RunDir, results: dict[int, RunMetrics], quiet: bool = False) -> dict:
    """Write ``folds.json`` and ``folds.md`` of the folds' results; returns the summary.

    Args:
        run: the parent run directory.
        results: each fold's `RunMetrics`, by fold number.
        quiet: print nothing (else the table and where it went).

    Returns:
        What `fold_summary` gives (mean, std and values per metric).

    Examples:
        Written by `train_folds` after the last fold (skipped here: it needs trained
        folds; tests/recipes/histopathology/test_folds.py runs two):

        >>> summary = write_fold_summary(RunDir("runs/smse"), results)  # doctest: +SKIP
    """
    summary = fold_summary(results)
    table = fold_table(summary)
    run.folds_json.write_text(json.dumps(summary, indent=1))
    run.folds_md.write_text(
        f"# Test accuracy over folds {', '.join(map(str, results))} (mean +- std)\n\n"
        + "\n".join(table)
        + "\n"
    )
    if not quiet:
        print("\n".join(table))
        print(f"wrote {run.folds_md}")
    return summary
