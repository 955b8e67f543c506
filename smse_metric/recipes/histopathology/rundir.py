"""Run directories that cannot eat data.

The recipe writes into a directory the user names (``--out``). It removes a directory
only when the project itself created it: every directory it creates holds a marker file
(``.smse-run`` for a training run, ``.smse-demo`` for a demo), and ``--overwrite``
refuses anything else, as well as the current directory, the data or any directory that
holds the data, whatever markers they carry. All checks run before anything is written
or removed; a run that fails before its first checkpoint removes what it created.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RecipeError

__all__ = ["DEMO_MARKER", "RUN_MARKER", "check_run_dir", "claim_run_dir", "is_unfinished_run"]

RUN_MARKER = ".smse-run"
DEMO_MARKER = ".smse-demo"


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


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
    return (path / RUN_MARKER).is_file() and not any(path.rglob("last.pt"))


def check_run_dir(
    out: str | Path,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    marker: str = RUN_MARKER,
    flag: str = "--overwrite",
) -> bool:
    """Decide, without touching anything, whether ``out`` may become a new run.

    Returns True when ``out`` must be removed first (it is ours and ``overwrite`` was
    given, or it is an unfinished run of ours), False when it is missing or empty.
    Raises ``ValueError`` naming the path and the reason otherwise: it holds files and
    ``overwrite`` was not given; it lacks the project's marker; it is the current
    directory or one of its parents; it is, or holds, a ``protected`` path (the data).

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
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    cwd = Path.cwd().resolve()
    if _contains(out, cwd):
        raise RecipeError(f"refusing to use {out}: it is the current directory or holds it")
    for p in protected:
        p = Path(p).resolve()
        if _contains(out, p):
            raise RecipeError(f"refusing to use {out}: it is or holds the data {p}")
    ours = (out / marker).is_file()
    if marker == RUN_MARKER and is_unfinished_run(out):
        return True  # a run of ours that never saved a checkpoint: nothing to keep
    if not overwrite:
        what = "an earlier run" if ours else "files"
        raise RecipeError(f"{out} holds {what}; pass {flag} to replace it"
                         + ("" if ours else " (only directories smse-metric created)"))  # fmt: skip
    if not ours:
        raise RecipeError(
            f"refusing to replace {out}: it was not created by smse-metric (no {marker} file)"
        )
    return True


@contextmanager
def claim_run_dir(out: str | Path, replace: bool, marker: str = RUN_MARKER) -> Iterator[Path]:
    """Create ``out`` with its marker (after removing it when ``replace``, which only
    `check_run_dir` may decide); if the body raises before ``checkpoints/last.pt``
    exists, remove what this call created, so a retry starts clean.

    Args:
        out: the run directory.
        replace: remove ``out`` first (only what `check_run_dir` returned).
        marker: the marker file to write.

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
    if replace:
        if not (out / marker).is_file():  # the last line of defence
            raise RecipeError(f"refusing to remove {out}: no {marker} file")
        shutil.rmtree(out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text("created by smse-metric; --overwrite may remove this directory\n")
    try:
        yield out
    except BaseException:
        if not existed and not (out / "checkpoints" / "last.pt").is_file():
            shutil.rmtree(out, ignore_errors=True)
        elif existed and not any(p.name != marker for p in out.iterdir()):
            os.remove(out / marker)
        raise
