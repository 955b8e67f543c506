"""Run directories that cannot eat or mix data.

The recipe writes into a directory the user names (``--out``). It removes a directory
only when the project itself created it: every directory it creates holds a marker file
(``.smse-run`` for a training run, ``.smse-demo`` for a demo), and ``--overwrite``
refuses anything else, as well as the current directory, the data, any directory that
holds the data and any directory inside it, whatever markers they carry. All checks run
before anything is written or removed; a run that fails before its first checkpoint
removes what it created. While a command writes a run directory it holds an exclusive
lock on ``.smse-lock`` there, so a second command on the same directory is refused
instead of mixing its files with the first one's; the operating system releases the
lock when the process ends, however it ends, so a dead run never blocks a retry.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError
from .lock import LOCK_FILE, lock_run_dir

__all__ = [
    "DEMO_MARKER",
    "LOCK_FILE",
    "RUN_MARKER",
    "RunDir",
    "check_data_apart",
    "check_run_dir",
    "claim_run_dir",
    "clear_run_dir",
    "is_unfinished_run",
    "lock_run_dir",
    "open_run_dir",
]

RUN_MARKER = ".smse-run"
DEMO_MARKER = ".smse-demo"


@dataclass(frozen=True)
class RunDir:
    """Every path of a run directory, named once: no other module builds one.

    Attributes:
        path: the run directory.

    Examples:
        >>> run = RunDir("runs/a")
        >>> run.best.as_posix(), run.fold(2).metrics.as_posix()
        ('runs/a/checkpoints/best.pt', 'runs/a/fold2/metrics.json')
    """

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def fold(self, k: int) -> RunDir:
        """The run of fold ``k`` of a multi-fold run."""
        return RunDir(self.path / f"fold{k}")

    def replicate(self, seed: int, method: str) -> RunDir:
        """The run of one demo replicate and method."""
        return RunDir(self.path / f"seed{seed}" / method)

    def plot(self, name: str) -> Path:
        """A PNG of the report."""
        return self.plots / f"{name}.png"

    def search_sheet(self, image: str | Path) -> Path:
        """The default contact sheet of ``search`` for a query image."""
        return self.path / f"search-{Path(image).stem}.png"

    marker = property(lambda self: self.path / RUN_MARKER, doc="the project's marker")
    demo_marker = property(lambda self: self.path / DEMO_MARKER, doc="a demo's marker")
    lock = property(lambda self: self.path / LOCK_FILE, doc="the lock of the writing command")
    config = property(lambda self: self.path / "config.toml", doc="the resolved config")
    history = property(lambda self: self.path / "history.jsonl", doc="one line per epoch")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="checkpoint folder")
    last = property(lambda self: self.checkpoints / "last.pt", doc="where --resume starts")
    best = property(lambda self: self.checkpoints / "best.pt", doc="the selected weights")
    metrics = property(lambda self: self.path / "metrics.json", doc="the test results")
    embeddings = property(lambda self: self.path / "embeddings", doc="embeddings folder")
    gallery_embeddings = property(
        lambda self: self.embeddings / "gallery.npz", doc="the kNN gallery search queries"
    )
    test_embeddings = property(lambda self: self.embeddings / "test.npz", doc="test images")
    index = property(lambda self: self.path / "index" / "gallery.faiss", doc="FAISS gallery")
    report = property(lambda self: self.path / "report.md", doc="the Markdown report")
    plots = property(lambda self: self.path / "plots", doc="the report's PNGs")
    data = property(lambda self: self.path / "data", doc="synthetic data of the run")
    folds_json = property(lambda self: self.path / "folds.json", doc="fold summary")
    folds_md = property(lambda self: self.path / "folds.md", doc="fold summary table")
    summary_md = property(lambda self: self.path / "summary.md", doc="demo summary")
    summary_json = property(lambda self: self.path / "summary.json", doc="demo summary data")
    features = property(lambda self: self.path / "features", doc="a demo's feature cache")


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def _is_empty(path: Path) -> bool:
    """No entry but a lock file (which a refused or finished command may leave)."""
    return all(p.name == LOCK_FILE for p in path.iterdir())


def is_unfinished_run(path: str | Path) -> bool:
    """A run directory of ours where no run (nor fold) reached its first checkpoint.

    Args:
        path: a directory.

    Examples:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> is_unfinished_run(run)  # not ours: no marker
        False
        >>> _ = (run / RUN_MARKER).write_text("")
        >>> is_unfinished_run(run)
        True
    """
    path = Path(path)
    return (path / RUN_MARKER).is_file() and not any(path.rglob(RunDir(path).last.name))


def check_data_apart(out: str | Path, protected: Iterable[str | Path] = ()) -> None:
    """Refuse a run directory that is, holds or lies inside a ``protected`` path (the
    data), or that is the current directory or holds it: the run's plots and files would
    mix with the data, and a later ``--overwrite`` could remove it.

    Args:
        out: the run directory (it need not exist).
        protected: paths that must survive whatever happens (the data).

    Examples:
        >>> try:
        ...     check_data_apart("/data/breakhis/runs/a", protected=["/data/breakhis"])
        ... except RecipeError as e:
        ...     print(e)
        refusing to use /data/breakhis/runs/a: it lies inside the data /data/breakhis
    """
    out = Path(out).resolve()
    for p in protected:
        p = Path(p).resolve()
        if _contains(out, p):
            raise RecipeError(f"refusing to use {out}: it is or holds the data {p}")
        if _contains(p, out):
            raise RecipeError(f"refusing to use {out}: it lies inside the data {p}")


def check_run_dir(
    out: str | Path,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    marker: str = RUN_MARKER,
    flag: str = "--overwrite",
) -> bool:
    """Decide, without touching anything, whether ``out`` may become a new run.

    Returns True when ``out`` must be cleared first (it is ours and ``overwrite`` was
    given, or it is an unfinished run of ours), False when it is missing or empty.
    Raises ``ValueError`` naming the path and the reason otherwise: it is, holds or lies
    inside a ``protected`` path (the data); it holds files and ``overwrite`` was not
    given; it lacks the project's marker; it is the current directory or one of its
    parents.

    Args:
        out: the directory the run would use.
        overwrite: whether the user asked to replace an existing run.
        protected: paths that must survive whatever happens (the data).
        marker: the file that marks a directory as the project's own.
        flag: the option named in the refusal.

    Examples:
        >>> import tempfile
        >>> home = Path(tempfile.mkdtemp())
        >>> check_run_dir(home / "new", overwrite=False)
        False
        >>> _ = (home / "notes.txt").write_text("mine")
        >>> try:
        ...     check_run_dir(home, overwrite=True)
        ... except RecipeError as e:
        ...     print(str(e).split(": ", 1)[1])
        it was not created by smse-metric (no .smse-run file)
    """
    check_data_apart(out, protected)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out} exists and is not a directory")
    if not out.exists() or _is_empty(out):
        return False
    if _contains(out, Path.cwd().resolve()):
        raise RecipeError(f"refusing to use {out}: it is the current directory or holds it")
    ours = (out / marker).is_file()
    if marker == RUN_MARKER and is_unfinished_run(out):
        return True  # a run of ours that never saved a checkpoint: nothing to keep
    if not overwrite:
        if not ours:  # --overwrite would be refused too: say what to do instead
            raise RecipeError(
                f"{out} holds files smse-metric did not create; give a new or empty directory"
            )
        raise RecipeError(f"{out} holds an earlier run; pass {flag} to replace it")
    if not ours:
        raise RecipeError(
            f"refusing to replace {out}: it was not created by smse-metric (no {marker} file)"
        )
    return True


def clear_run_dir(out: str | Path, marker: str = RUN_MARKER) -> None:
    """Remove everything in a run directory of ours but its lock (held by the caller).

    Args:
        out: a directory holding ``marker``.
        marker: the marker that makes it ours.

    Examples:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "notes.txt").write_text("mine")
        >>> try:
        ...     clear_run_dir(run)
        ... except RecipeError as e:
        ...     print(str(e).split(": ", 1)[1])
        no .smse-run file
    """
    out = Path(out)
    if out.is_symlink() or not (out / marker).is_file():  # the last line of defence
        raise RecipeError(f"refusing to remove {out}: no {marker} file")
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def claim_run_dir(
    out: str | Path, replace: bool, marker: str = RUN_MARKER, existed: bool | None = None
) -> Iterator[Path]:
    """Create ``out`` with its marker (after clearing it when ``replace``, which only
    `check_run_dir` may decide); if the body raises before ``checkpoints/last.pt``
    exists, remove what this call created, so a retry starts clean.

    Args:
        out: the run directory.
        replace: clear ``out`` first (only what `check_run_dir` returned).
        marker: the marker file to write.
        existed: whether ``out`` existed before the command (default: whether it exists
            now); a directory that did not is removed whole on failure.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "run"
        >>> try:
        ...     with claim_run_dir(out, replace=False):
        ...         raise RuntimeError("failed before the first checkpoint")
        ... except RuntimeError:
        ...     pass
        >>> out.exists()
        False
    """
    out = Path(out)
    existed = out.exists() if existed is None else existed
    if replace:
        clear_run_dir(out, marker)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text("created by smse-metric; --overwrite may remove this directory\n")
    try:
        yield out
    except BaseException:
        if not existed and not RunDir(out).last.is_file():
            shutil.rmtree(out, ignore_errors=True)
        elif existed and all(p.name in (marker, LOCK_FILE) for p in out.iterdir()):
            os.remove(out / marker)
        raise


@contextmanager
def open_run_dir(
    out: str | Path,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    marker: str = RUN_MARKER,
    flag: str = "--overwrite",
) -> Iterator[Path]:
    """`check_run_dir`, then `lock_run_dir`, the same check again under the lock (another
    process may have written meanwhile), then `claim_run_dir`: the one way a command
    takes a directory for a new run.

    Args:
        out: the run directory.
        overwrite: whether the user asked to replace an existing run of ours.
        protected: paths that must survive whatever happens (the data).
        marker: the marker file of the project's directories of this kind.
        flag: the option named in a refusal.

    Examples:
        >>> import tempfile
        >>> data = Path(tempfile.mkdtemp())
        >>> try:
        ...     with open_run_dir(data / "runs" / "a", False, protected=[data]):
        ...         pass
        ... except RecipeError as e:
        ...     print("lies inside the data" in str(e), (data / "runs").exists())
        True False
    """
    check_run_dir(out, overwrite, protected, marker, flag)  # refuse before creating anything
    existed = Path(out).exists()
    with lock_run_dir(out) as path:
        try:
            replace = check_run_dir(path, overwrite, protected, marker, flag)
        except RecipeError:
            if not existed and _is_empty(path):
                shutil.rmtree(path, ignore_errors=True)  # the directory the lock made
            raise
        with claim_run_dir(path, replace, marker, existed=existed):
            yield path
