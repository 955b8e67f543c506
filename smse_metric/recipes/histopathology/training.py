"""The SMSE recipe on BreakHis-layout data: data splits, training, evaluation.

``train(cfg, out_dir)`` fits the model of a
[`Config`][smse_metric.recipes.histopathology.Config] on the
training patients, selects the epoch on a validation split drawn from the training
patients (never on test), and evaluates the selected checkpoint on the test patients
with kNN over the training embeddings and with the classifier head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Config
from .interrupt import TrainingInterrupted
from .launch import launch
from .results import RunMetrics

__all__ = ["TrainingInterrupted", "train", "train_folds"]


def train(
    cfg: Config,
    out_dir: str | Path,
    root: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> RunMetrics | None:
    """Train on ``root`` (a BreakHis-layout directory), write ``out_dir``, return metrics.

    Writes ``config.toml``, ``history.jsonl`` (one line per epoch),
    ``checkpoints/{last,best}.pt`` (``last`` after every epoch and on Ctrl-C), then
    everything `save_evaluation` writes and ``report.md`` with its plots. The same checks
    and launch as the ``smse-metric train`` command (`launch`). ``resume=True`` continues from
    ``checkpoints/last.pt`` (mid-epoch after an interruption) to the same result as an
    uninterrupted run. Under ``torchrun`` it trains with DDP; only rank 0 writes and
    returns metrics (other ranks return ``None``).

    Args:
        cfg: the run's validated `Config`.
        out_dir: the run directory to write.
        root: the data directory (default: ``data.path``, or ``out_dir/data`` when synthetic).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        on_step: called after every step with ``{epoch, step, loss}`` (tests, logging).
        quiet: print nothing (no split sizes, no per-epoch lines, no progress bar).
        overwrite: replace an earlier run of smse-metric in ``out_dir``.

    Raises:
        RecipeError: ``out_dir`` is, holds or lies inside the data; it holds files that
            smse-metric did not write; it holds a finished run and neither ``resume`` nor
            ``overwrite`` is given; another process is writing it.
        TrainingInterrupted: after SIGINT / SIGTERM, once ``last.pt`` is written.
        FloatingPointError: on a non-finite loss, naming the step; ``last.pt`` keeps
            the last good epoch.

    Examples:
        Two epochs on the synthetic dataset (tests/recipes/histopathology/test_training.py runs this
        path; skipped here because it trains a network):

        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"synthetic": True}, "optim": {"epochs": 2}})
        >>> metrics = train(cfg, "runs/example")  # doctest: +SKIP
        >>> metrics.test.knn.pooled.patient_accuracy  # doctest: +SKIP
        0.8...
    """
    return launch(
        cfg,
        out_dir,
        root=root,
        resume=resume,
        overwrite=overwrite,
        on_step=on_step,
        quiet=quiet,
    )


def train_folds(
    cfg: Config,
    out_dir: str | Path,
    folds: Sequence[int],
    resume: bool = False,
    overwrite: bool = False,
) -> dict | None:
    """Train ``cfg`` on each fold into ``out_dir/fold<k>`` and write the summary
    (``folds.json``, ``folds.md``).

    With ``resume``, finished folds (their ``metrics.json``) are kept, an interrupted
    fold continues from its ``last.pt``, and the summary is rebuilt. A fold directory of
    ours that never reached a checkpoint is started again. Under ``torchrun`` only rank 0
    writes and returns the summary (other ranks return None).

    Args:
        cfg: the validated `Config` shared by every fold (``data.fold`` is replaced).
        out_dir: the parent run directory.
        folds: fold numbers, from 1.
        resume: continue an interrupted multi-fold run.
        overwrite: replace an earlier run of smse-metric in ``out_dir``.

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
    return launch(cfg, out_dir, folds=list(folds), resume=resume, overwrite=overwrite)
