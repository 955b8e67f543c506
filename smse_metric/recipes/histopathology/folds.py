"""Several folds of one config: each trained into ``OUT/fold<k>``, then summarised as
mean +- std over folds in ``OUT/folds.json`` and ``OUT/folds.md``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from smse_metric.distributed import is_main_process

from .config import Config
from .report import fold_summary, fold_table
from .results import RunMetrics
from .rundir import check_run_dir, clear_run_dir
from .training import train

__all__ = ["train_folds"]


def train_folds(
    cfg: Config, out_dir: str | Path, folds: Sequence[int], resume: bool = False
) -> dict | None:
    """Train ``cfg`` on each fold into ``out_dir/fold<k>`` and write the summary.

    With ``resume``, finished folds (their ``metrics.json``) are kept, an interrupted
    fold continues from its ``last.pt``, and the summary is rebuilt. A fold directory of
    ours that never reached a checkpoint is started again. Under ``torchrun`` only rank 0
    writes and returns the summary (other ranks return None).

    Args:
        cfg: the validated `Config` shared by every fold (``data.fold`` is replaced).
        out_dir: the parent run directory.
        folds: fold numbers, from 1.
        resume: continue an interrupted multi-fold run.

    Returns:
        What `fold_summary` gives (mean, std and values per metric), or None on other
        ranks.

    Examples:
        Five folds of the SMSE preset (skipped here: it trains five networks;
        tests/recipes/histopathology/test_folds.py runs two folds):

        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"path": "/data/BreaKHis"}})
        >>> summary = train_folds(cfg, "runs/smse", range(1, 6))  # doctest: +SKIP
    """
    out = Path(out_dir)
    results = {}
    for k in folds:
        run = out / f"fold{k}"
        cfg_k = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=k))
        if resume and (run / "metrics.json").is_file():
            results[k] = RunMetrics.load(run / "metrics.json")
            continue
        resume_k = resume and (run / "checkpoints" / "last.pt").is_file()
        if not resume_k and is_main_process() and check_run_dir(run, overwrite=False):
            clear_run_dir(run)  # ours, started but never reached a checkpoint
        print(f"fold {k}: {run}", flush=True)
        results[k] = train(cfg_k, run, resume=resume_k)
    if any(m is None for m in results.values()):
        return None  # not rank 0
    summary = fold_summary(results)
    table = fold_table(summary)
    (out / "folds.json").write_text(json.dumps(summary, indent=1))
    (out / "folds.md").write_text(
        f"# Test accuracy over folds {', '.join(map(str, results))} (mean +- std)\n\n"
        + "\n".join(table)
        + "\n"
    )
    print("\n".join(table))
    print(f"wrote {out / 'folds.md'}")
    return summary
