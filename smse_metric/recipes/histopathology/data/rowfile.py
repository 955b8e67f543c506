"""A file of fixed-shape rows (one per image), as the decoded-image and feature caches
keep them: written once and atomically with a digest of its bytes beside it (a partial
file is never taken for a cache), checked against that digest when opened (a damaged
file is refused, never used), and read through a memory map opened once per process
whose length is checked before every read (a file truncated while in use gives an error
that names it, not a bus error)."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError

__all__ = ["RowFile", "file_digest"]

_CHUNK = 1 << 20

_digests: dict[tuple, str] = {}  # (path, size, mtime, inode) -> digest, for this process


def file_digest(path: str | Path) -> str:
    """BLAKE2b (128 bits) of a file's bytes; remembered for the process while the file's
    size, modification time and inode stay the same (the train and gallery datasets
    open the same files).

    Args:
        path: a file.

    Examples:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> file_digest(p)
        'cf4ab791c62b8d2b2109c90275287816'
    """
    st = os.stat(path)
    # ctime moves on every write and no utime can set it back
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if memo not in _digests:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _digests[memo] = h.hexdigest()
    return _digests[memo]


class RowFile:
    """Rows of ``shape[1:]`` and ``dtype`` at ``path``, with ``path.b2`` holding the
    digest of the file's bytes.

    Args:
        path: the file.
        shape: ``(rows, *row_shape)``.
        dtype: the numpy dtype of the values.
        what: what a row is, for messages (``"images"``, ``"feature rows"``).

    Examples:
        >>> import tempfile
        >>> f = RowFile(Path(tempfile.mkdtemp()) / "x.u8", (2, 3), np.uint8)
        >>> f.exists()
        False
        >>> f.write(np.full(3, i, dtype=np.uint8) for i in range(2))
        >>> f.check()
        >>> f.gather([1, 0]).tolist()
        [[1, 1, 1], [0, 0, 0]]
    """

    def __init__(
        self, path: Path, shape: Sequence[int], dtype: type | np.dtype, what: str = "rows"
    ) -> None:
        self.path, self.shape, self.dtype, self.what = (
            Path(path),
            tuple(shape),
            np.dtype(dtype),
            what,
        )
        self.torch_dtype = torch.from_numpy(np.zeros(0, dtype=self.dtype)).dtype
        self.digest_path = self.path.with_name(self.path.name + ".b2")
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._file = None
        self._rows: np.memmap | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def exists(self) -> bool:
        """Whether the file and its digest are there (built by this or another process)."""
        return self.path.exists() and self.digest_path.exists()

    def write(self, rows: Iterable[np.ndarray]) -> None:
        """Write ``rows`` (each of ``shape[1:]``) to a partial file, then move the digest
        and the file into place; another process building the same file at the same time
        writes the same bytes."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        tmp_digest = self.digest_path.with_name(f"{self.digest_path.name}.{os.getpid()}.partial")
        try:
            h = hashlib.blake2b(digest_size=16)
            with open(tmp, "wb") as f:
                for row in rows:
                    data = np.ascontiguousarray(row, dtype=self.dtype).tobytes()
                    f.write(data)
                    h.update(data)
            tmp_digest.write_text(h.hexdigest() + "\n")
            # the digest first: the file is never without it
            os.replace(tmp_digest, self.digest_path)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_digest.unlink(missing_ok=True)

    def check(self) -> None:
        """Refuse a file whose length or digest differ from the build's."""
        size = self.path.stat().st_size
        if size != self.nbytes:
            raise RecipeError(
                f"{self.path} is not a cache of {self.shape} {self.what} "
                f"({size} bytes); remove it to rebuild it"
            )
        if file_digest(self.path) != self.digest_path.read_text().strip():
            raise RecipeError(
                f"{self.path} is damaged (its digest differs from the one "
                "recorded when it was built); remove it to rebuild it"
            )

    def mapped(self) -> np.memmap:
        """The file's map, opened once per process (a map does not travel to workers),
        after checking that the file still holds every row."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
            self._rows = np.memmap(self._file, dtype=self.dtype, mode="r", shape=self.shape)
        if os.fstat(self._file.fileno()).st_size < self.nbytes:
            raise OSError(
                f"{self.path} is shorter than its {len(self)} {self.what}: it was "
                "truncated while in use; remove it and run again"
            )
        return self._rows

    def gather(self, rows: torch.Tensor | Sequence[int], pin_memory: bool = False) -> torch.Tensor:
        """The rows at ``rows`` as one tensor [B, *row_shape] in one copy from the map
        (``pin_memory``: page-locked, for a non-blocking copy to a GPU); an IndexError
        names a row outside the file."""
        idx = np.asarray(torch.as_tensor(rows, dtype=torch.int64).cpu(), dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"rows must be one-dimensional, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        out = torch.empty(
            (len(idx), *self.shape[1:]), dtype=self.torch_dtype, pin_memory=pin_memory
        )
        if len(idx):  # an empty file cannot be mapped
            mapped, dst = self.mapped(), out.numpy()
            for j, r in enumerate(idx):  # row copies beat np.take(..., out=) here
                dst[j] = mapped[r]
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_rows"], state["_pid"] = None, None, -1  # per process
        return state
