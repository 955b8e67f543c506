"""A decoded-image cache: every image of a dataset once as uint8 at the training size
plus the crop margin, in one file.

Decoding a 700 x 460 BreakHis PNG takes about 10 ms; reading its cached copy is a
memory copy. The file is keyed by the image files' contents (a BLAKE2b digest of
every byte, not their size and modification time, which a rewrite can keep), the
cached size and the resampling, so a changed, added or removed file gives a new key and
the cache is built again. A digest of the cache file itself, written beside it at
build, is checked when the cache is opened: a damaged file is refused, never used. Rows
are copied from a memory map of the file, whose length is checked before every read
(``fstat``, about a microsecond): a file truncated while in use gives an error that
names it, not a bus error. Only a truncation landing during the copy itself could
still raise SIGBUS; ``os.pread`` per row, which never can, read 0.84x the rows per
second of the map at 224 px, where the check costs nothing measurable
(benchmarks/results/data.md, "cache reads").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError
from .augment import resize

__all__ = ["DecodedCache", "cache_size", "file_digest", "stored_image"]

#: bump when the stored layout, the key or the resampling changes: old files are then
#: not used
FORMAT = 2

_CHUNK = 1 << 20


def cache_size(size: Sequence[int], crop_scale: Sequence[float]) -> tuple[int, int]:
    """(H, W) that a crop of the smallest area fraction still covers ``size`` at: the
    training size divided by ``sqrt(crop_scale[0])``, rounded up.

    Examples:
        >>> cache_size((224, 224), (0.6, 1.0))
        (290, 290)
    """
    lo = float(crop_scale[0])
    if not 0 < lo <= 1:
        raise RecipeError(f"crop_scale[0] must be in (0, 1], got {lo}")
    return tuple(math.ceil(s / math.sqrt(lo) - 1e-9) for s in size)


def stored_image(img: torch.Tensor, size: Sequence[int], interpolation: str) -> torch.Tensor:
    """A float [3, h, w] image in [0, 1] as the cache stores it: resized, uint8."""
    img = resize(img, tuple(size), interpolation)
    return img.mul(255).round_().clamp_(0, 255).to(torch.uint8)


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


def _key(paths: Sequence[str], size: tuple[int, int], interpolation: str) -> str:
    files = [[os.path.abspath(p), file_digest(p)] for p in paths]
    text = json.dumps([FORMAT, list(size), interpolation, files])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DecodedCache:
    """Images of ``paths`` as uint8 [3, H, W] at ``size``, read from
    ``directory/decoded-<key>-<H>x<W>.u8``; built on first use (atomically: a partial
    file is never taken for a cache), checked against its recorded digest on opening,
    read-only afterwards.

    Args:
        paths: the image files, in the order `__getitem__` indexes them.
        size: cached (H, W), e.g. from `cache_size`.
        directory: where cache files live (created if missing).
        read: ``(path) -> float [3, h, w] in [0, 1]``, the decoder (the dataset's).
        interpolation: the resize mode used to build it.

    Raises:
        RecipeError: ``directory`` cannot be created or written; the cache file is
            damaged (its size or digest differ from the build's).

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> from smse_metric.recipes.histopathology.data.images import read_image
        >>> d = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 6), (255, 0, 0)).save(d / "a.png")
        >>> cache = DecodedCache([str(d / "a.png")], (4, 4), d / "cache", read=read_image)
        >>> cache[0].shape, cache[0].dtype, cache.built
        (torch.Size([3, 4, 4]), torch.uint8, True)
        >>> DecodedCache([str(d / "a.png")], (4, 4), d / "cache", read=read_image).built
        False
    """

    def __init__(
        self,
        paths: Sequence[str],
        size: Sequence[int],
        directory: str | Path,
        read: Callable[[str], torch.Tensor],
        interpolation: str = "bilinear",
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.shape = (len(paths), 3, *self.size)
        directory = Path(directory)
        key = _key(paths, self.size, interpolation)
        self.path = directory / f"decoded-{key}-{self.size[0]}x{self.size[1]}.u8"
        self.digest_path = self.path.with_name(self.path.name + ".b2")
        self.built = False
        if not self.path.exists() or not self.digest_path.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self._build(paths, interpolation, read)
            except (PermissionError, FileExistsError, NotADirectoryError) as e:
                raise RecipeError(
                    f"data.cache_dir {directory} cannot hold the decoded cache: "
                    f"{e.strerror or e}; give a writable directory"
                ) from e
            self.built = True
        self._check()
        self._file = None
        self._images: np.memmap | None = None
        self._pid = -1

    def _check(self) -> None:
        size = self.path.stat().st_size
        if size != math.prod(self.shape):
            raise RecipeError(
                f"{self.path} is not a cache of {self.shape} images "
                f"({size} bytes); remove it to rebuild it"
            )
        if file_digest(self.path) != self.digest_path.read_text().strip():
            raise RecipeError(
                f"{self.path} is damaged (its digest differs from the one "
                "recorded when it was built); remove it to rebuild it"
            )

    def _build(self, paths: Sequence[str], interpolation: str, read) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        tmp_digest = self.digest_path.with_name(f"{self.digest_path.name}.{os.getpid()}.partial")
        try:
            h = hashlib.blake2b(digest_size=16)
            with open(tmp, "wb") as f:
                for p in paths:
                    row = stored_image(read(p), self.size, interpolation).numpy().tobytes()
                    f.write(row)
                    h.update(row)
            tmp_digest.write_text(h.hexdigest() + "\n")
            # the digest first: a cache file is never without it (another process may
            # have won the race: the same content, the same digest)
            os.replace(tmp_digest, self.digest_path)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_digest.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self.shape[0]

    def _mapped(self) -> np.memmap:
        """The file's map, opened once per process (a map does not travel to workers),
        after checking that the file still holds every image."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
            self._images = np.memmap(self._file, dtype=np.uint8, mode="r", shape=self.shape)
        if os.fstat(self._file.fileno()).st_size < math.prod(self.shape):
            raise OSError(
                f"{self.path} is shorter than its {len(self)} images: it was "
                "truncated while in use; remove it and run again"
            )
        return self._images

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._mapped()[i]))

    def gather(self, rows: torch.Tensor | Sequence[int], pin_memory: bool = False) -> torch.Tensor:
        """The images at ``rows`` as one uint8 batch [B, 3, H, W], in one copy from the
        mapped file (``pin_memory``: into page-locked memory, for a non-blocking copy to
        a GPU); an IndexError names a row outside the cache."""
        idx = np.asarray(torch.as_tensor(rows, dtype=torch.int64).cpu(), dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"rows must be one-dimensional, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        if len(idx):  # an empty cache file cannot be mapped
            images, dst = self._mapped(), out.numpy()
            for j, r in enumerate(idx):  # row copies beat np.take(..., out=) here
                dst[j] = images[r]
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_images"], state["_pid"] = None, None, -1  # per process
        return state
