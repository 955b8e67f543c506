"""One run from its resolved inputs to its report: build, train, evaluate the selected
checkpoint with the objects training built, save, render."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from smse_metric.distributed import get_world_size, is_main_process

from .build import build, device_of
from .checkpoint import TrainState, load_checkpoint
from .config import config_to_toml
from .data.manifest import data_folder
from .evaluate import evaluate_model, run_metrics, save_evaluation
from .inputs import Inputs
from .report import write_report
from .results import RunMetrics
from .rundir import RunDir
from .splits import split_sizes
from .trainer import Trainer

__all__ = ["fit_run"]


def _best_on_every_rank(run: RunDir, model: torch.nn.Module, device: torch.device) -> dict:
    """Load ``run.best`` (written by rank 0) into ``model`` on rank 0 and send its
    weights to the other ranks, which need not share rank 0's disk; returns the
    checkpoint on rank 0, an empty dict on the others."""
    best = load_checkpoint(run.best, device) if is_main_process() else {}
    if best:
        model.load_state_dict(best["model"])
    if get_world_size() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    return best


def fit_run(
    inputs: Inputs,
    run: RunDir,
    fold: int,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> RunMetrics | None:
    """Train fold ``fold`` of ``inputs`` into ``run`` (a directory the caller holds),
    evaluate its best checkpoint on the test patients, write the run's files and its
    report; the metrics on rank 0, None on the other ranks.

    Args:
        inputs: the resolved inputs (`resolve`).
        run: the run directory, claimed and locked by the caller.
        fold: the fold to train.
        resume: continue from ``run.last``.
        on_step: called after every step with ``{epoch, step, loss}``.
        quiet: print nothing.

    Examples:
        What `train` does once the run directory is its own (skipped here: it trains):

        >>> metrics = fit_run(resolve(cfg, RunDir("runs/a")), RunDir("runs/a"), 1)  # doctest: +SKIP
    """
    cfg = inputs.config(fold, run)
    splits = inputs.splits(fold)
    device = device_of(cfg.run.device)
    built = build(cfg, splits, device, inputs.new_model())
    if is_main_process():
        if not quiet:
            print(f"data: {split_sizes(splits)}", flush=True)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        if not run.marker.is_file():
            run.marker.write_text("created by smse-metric\n")
        run.config.write_text(config_to_toml(cfg))
    trainer = Trainer(cfg, built, run, on_step, quiet)
    if resume:
        trainer.resume()
    trainer.fit()
    best = _best_on_every_rank(run, built.model, device)
    ds = built.datasets
    ev = evaluate_model(cfg, built.model, ds.gallery, ds.test, device)  # on every rank
    if not is_main_process():
        return None
    try:
        metrics = run_metrics(
            cfg.eval.select,
            ev,
            TrainState.from_checkpoint(best),
            splits,
            ds.bad_images(),
            cfg.data.task,
        )
        save_evaluation(run, metrics, ev, ds, data_folder(inputs.root), cfg.eval.distance)
        write_report(run, metrics, trainer.state.history, ev.test_points(ds.test))
    except OSError as e:  # a full disk, say: the training itself is safe in best.pt
        raise OSError(
            f"{e}; training finished: once that is fixed, smse-metric evaluate --run "
            f"{run} finishes the evaluation"
        ) from e
    return metrics
