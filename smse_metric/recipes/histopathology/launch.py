"""Launching a run, the one way the CLI and the Python `train` start one: resolve the
inputs and check them before anything is written, join the process group torchrun
describes, take the run directory on rank 0 (check, lock, claim; synthetic data) with
every rank learning whether that failed, then train one fold or several."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from smse_metric.distributed import any_rank, barrier, is_main_process

from .build import device_of
from .config import Config, load_config
from .data import make_synthetic_breakhis
from .errors import RecipeError
from .fit import fit_run
from .folds import write_fold_summary
from .inputs import Inputs, resolve
from .lock import lock_run_dir
from .results import RunMetrics
from .rundir import RunDir, check_data_apart, check_run_dir, clear_run_dir, open_run_dir

__all__ = ["init_distributed", "launch", "resume_config"]


def init_distributed(device_type: str, timeout_s: float = 300.0) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), whose
    collectives give up after ``timeout_s`` (``run.dist_timeout``; torch's default is 30
    minutes of silence); returns whether this call created it (and should destroy it).

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        timeout_s: seconds a collective waits for a silent rank.

    Examples:
        >>> init_distributed("cpu")  # not under torchrun
        False
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return True


def resume_config(
    out: str | Path, folds: Sequence[int] | None = None, epochs: int | None = None
) -> Config:
    """The saved config of the run (or multi-fold run) in ``out`` that ``--resume``
    continues.

    Args:
        out: the run directory.
        folds: the folds of a multi-fold run, or None.
        epochs: train to this many epochs instead of the saved number.

    Examples:
        >>> import tempfile
        >>> try:
        ...     resume_config(tempfile.mkdtemp())
        ... except RecipeError as e:
        ...     print("no checkpoints/last.pt" in str(e))
        True
    """
    run = RunDir(out)
    runs = [run.fold(k) for k in folds] if folds else [run]
    saved = [r.config for r in runs if r.config.is_file()]
    if not saved or (not folds and not run.last.is_file()):
        raise RecipeError(f"{run} has no checkpoints/last.pt to resume from")
    return load_config(saved[0], {"optim": {"epochs": epochs}} if epochs else None)


@contextlib.contextmanager
def _own_run_dir(
    run: RunDir, inputs: Inputs, resume: bool, overwrite: bool, flag: str
) -> Iterator[None]:
    """Rank 0 checks, locks and claims ``run`` (writing synthetic data into it); every
    rank learns whether that failed, so none waits for a rank that has left."""
    # the data is the run's own only where this launch writes it, or wrote it before
    generate = inputs.generated and not resume
    own = generate or (resume and inputs.root.resolve() == run.data.resolve())
    protected = [] if own else inputs.data_paths()
    with contextlib.ExitStack() as stack:
        error = None
        if is_main_process():
            try:
                if resume:
                    check_data_apart(run.path, protected)
                    stack.enter_context(lock_run_dir(run.path))
                    if not run.marker.is_file():
                        raise RecipeError(f"{run} is not a run of smse-metric (no .smse-run)")
                else:
                    stack.enter_context(open_run_dir(run.path, overwrite, protected, flag=flag))
                    if generate:
                        make_synthetic_breakhis(inputs.root, seed=inputs.cfg.run.seed)
            except RecipeError as e:
                error = e
        if any_rank(error is not None):
            raise error or RecipeError(f"rank 0 refused the run directory {run}")
        barrier()
        yield


def launch(
    cfg: Config,
    out: str | Path,
    *,
    root: str | Path | None = None,
    folds: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
    flag: str = "overwrite=True",
) -> RunMetrics | dict | None:
    """Train ``cfg`` into ``out``: one run (`RunMetrics`) or, with ``folds``, one per fold
    into ``out/fold<k>`` and their summary (a dict); None on ranks other than 0.

    Args:
        cfg: the validated config.
        out: the run directory.
        root: the data directory, if not the config's.
        folds: train these folds, from 1 (default: ``data.fold`` alone).
        resume: continue an interrupted run (finished folds are kept).
        overwrite: replace an earlier run of ours in ``out``.
        on_step: called after every step with ``{epoch, step, loss}``.
        quiet: print nothing.
        flag: how a refusal names ``overwrite`` (``--overwrite`` for the CLI).

    Raises:
        RecipeError: an input is wrong (data, splits, backbone), or ``out`` is, holds or
            lies inside the data, holds files smse-metric did not create, holds a
            finished run without ``overwrite``, or another process is writing it.

    Examples:
        What `train` and ``smse-metric train --folds 1-5`` call (skipped here: it trains):

        >>> launch(cfg, "runs/smse", folds=[1, 2, 3, 4, 5], flag="--overwrite")  # doctest: +SKIP
    """
    run = RunDir(out)
    inputs = resolve(cfg, run, root)
    if not (
        inputs.generated and not resume
    ):  # every check that needs the data, before anything is written
        for k in folds or [inputs.cfg.data.fold]:
            inputs.splits(k)
    own_group = init_distributed(device_of(inputs.cfg.run.device).type, inputs.cfg.run.dist_timeout)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with _own_run_dir(run, inputs, resume, overwrite, flag):
            if inputs.cfg.run.deterministic:
                torch.use_deterministic_algorithms(True)
            if folds:
                return _train_folds(inputs, run, folds, resume, on_step, quiet)
            return fit_run(inputs, run, inputs.cfg.data.fold, resume, on_step, quiet)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if own_group:
            dist.destroy_process_group()


def _train_folds(
    inputs: Inputs,
    run: RunDir,
    folds: Sequence[int],
    resume: bool,
    on_step: Callable[[dict], None] | None,
    quiet: bool,
) -> dict | None:
    """Each fold into ``run/fold<k>``: with ``resume`` a finished fold is kept and an
    interrupted one continues; a fold of ours that never reached a checkpoint starts
    again."""
    results: dict[int, RunMetrics | None] = {}
    for k in folds:
        fold = run.fold(k)
        if resume and fold.metrics.is_file():
            results[k] = RunMetrics.load(fold.metrics)
            continue
        resume_k = resume and fold.last.is_file()
        if not resume_k and is_main_process() and check_run_dir(fold.path, overwrite=False):
            clear_run_dir(fold.path)
        if not quiet:
            print(f"fold {k}: {fold}", flush=True)
        results[k] = fit_run(inputs, fold, k, resume_k, on_step, quiet)
    if any(m is None for m in results.values()):
        return None  # not rank 0
    return write_fold_summary(run, results, quiet)
