"""An exclusive lock on a run directory (``.smse-lock``) while a command writes it: a
second command on the same directory is refused instead of mixing its files with the
first one's. The operating system releases the lock when the process ends, however it
ends, so a dead run never blocks a retry."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RecipeError

__all__ = ["LOCK_FILE", "lock_run_dir"]

LOCK_FILE = ".smse-lock"

_held: dict[Path, int] = {}  # locks this process holds: the recipe nests them (CLI -> train)


def _lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def lock_run_dir(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory ``out`` (created if missing) for the
    body; refuse with the holder's process id when another process holds it. Nested
    calls in one process share the lock.

    Args:
        out: the run directory.

    Raises:
        RecipeError: another live process holds the lock, or ``out`` cannot be written.

    Examples:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> with lock_run_dir(run), lock_run_dir(run):  # nested: the same process
        ...     (run / LOCK_FILE).is_file()
        True
    """
    out = Path(out).resolve()
    if out in _held:
        _held[out] += 1
        try:
            yield out
        finally:
            _held[out] -= 1
        return
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock(fd):
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RecipeError(
                    f"{out} is in use by another smse-metric process "
                    f"({holder}); wait for it to end or stop it"
                )
            try:  # the file we locked may have been removed by its last holder: retry
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except PermissionError as e:
        raise RecipeError(f"cannot write the run directory {out}: {e.strerror}") from e
    _held[out] = 1
    try:
        yield out
    finally:
        del _held[out]
        os.close(fd)  # closing releases the lock
