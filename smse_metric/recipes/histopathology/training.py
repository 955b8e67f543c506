"""The SMSE recipe on BreakHis-layout data: data splits, training, evaluation.

``train(cfg, out_dir)`` fits the model of a
[`Config`][smse_metric.recipes.histopathology.Config] on the
training patients, selects the epoch on a validation split drawn from the training
patients (never on test), and evaluates the selected checkpoint on the test patients
with kNN over the training embeddings and with the classifier head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from smse_metric.distributed import is_main_process

from .build import build, device_of, resolve_inputs
from .config import Config, config_to_toml
from .engine import TrainingInterrupted, any_rank, init_distributed
from .errors import RecipeError
from .evaluate import evaluate_run, unreadable_images
from .results import RunMetrics
from .rundir import LOCK_FILE, RUN_MARKER, check_data_apart, lock_run_dir
from .splits import data_root, load_splits, split_sizes
from .trainer import Trainer

__all__ = ["TrainingInterrupted", "train"]


def train(
    cfg: Config,
    out_dir: str | Path,
    root: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> RunMetrics | None:
    """Train on ``root`` (a BreakHis-layout directory), write ``out_dir``, return metrics.

    Writes ``config.toml``, ``history.jsonl`` (one line per epoch),
    ``checkpoints/{last,best}.pt`` (``last`` after every epoch and on Ctrl-C) and then
    everything `evaluate_run` writes. ``resume=True`` continues from
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

    Raises:
        RecipeError: ``out_dir`` is, holds or lies inside the data; it holds files that
            smse-metric did not write; it holds a finished run and ``resume`` is False;
            another process is writing it.
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
    out = Path(out_dir)
    root = data_root(cfg, out) if root is None else Path(root)
    if root.resolve() != (out / "data").resolve():  # config.toml must name the data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root.resolve())))
    if cfg.data.cache_dir is not None:  # evaluate, run from elsewhere, finds the same cache
        cache_dir = os.path.abspath(cfg.data.cache_dir)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=cache_dir))
    cfg = resolve_inputs(cfg)
    device = device_of(cfg)
    own_group = init_distributed(device.type, cfg.run.dist_timeout)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if is_main_process():  # the one process that writes
                try:
                    stack.enter_context(_own_run_dir(out, root, resume))
                except RecipeError as e:
                    error = e
            if any_rank(error is not None):  # no rank waits for one that left
                raise error or RecipeError(f"rank 0 refused the run directory {out}")
            if cfg.run.deterministic:
                torch.use_deterministic_algorithms(True)
            return _train(cfg, out, root, resume, on_step, quiet, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if own_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def _own_run_dir(out: Path, root: Path, resume: bool) -> Iterator[None]:
    """The run directory's checks for library callers too: apart from the data (but for
    synthetic data in ``out/data``), locked, and either ours or empty; checked before
    the lock (which writes its file) and again under it."""
    synthetic = root.resolve() == (out / "data").resolve()
    check_data_apart(out, [] if synthetic else [root])

    def check() -> None:
        ours = (LOCK_FILE, "data") if synthetic else (LOCK_FILE,)
        theirs = [p.name for p in out.iterdir() if p.name not in ours] if out.is_dir() else []
        if theirs and not (out / RUN_MARKER).is_file():
            raise RecipeError(
                f"refusing to write into {out}: it holds files smse-metric did not create "
                f"({theirs[0]}, ...); give a new or empty directory"
            )
        if not resume and (out / "checkpoints" / "last.pt").is_file():
            raise RecipeError(
                f"{out} holds an earlier run: resume it (resume=True) or give another directory"
            )

    check()
    with lock_run_dir(out):
        check()
        yield


def _train(cfg, out, root, resume, on_step, quiet, device):
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg, root)  # inputs validated before anything is written
    built = build(cfg, splits, device)
    if is_main_process():
        if not quiet:
            print(f"data: {split_sizes(splits)}", flush=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():
            (out / RUN_MARKER).write_text("created by smse-metric\n")
        (out / "config.toml").write_text(config_to_toml(cfg))
    trainer = Trainer(cfg, built, out, on_step, quiet)
    if resume:
        trainer.resume()
    trainer.fit()
    if not is_main_process():
        return None
    try:
        return evaluate_run(
            out,
            root,
            device=device,
            cfg=cfg,
            model=built.model,
            bad_images=unreadable_images(built.datasets),
        )
    except OSError as e:  # a full disk, say: the training itself is safe in best.pt
        raise OSError(
            f"{e}; training finished: once that is fixed, smse-metric evaluate "
            f"--run {out} finishes the evaluation"
        ) from e
