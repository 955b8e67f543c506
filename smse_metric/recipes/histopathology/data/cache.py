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
from .rowfile import RowFile, file_digest

__all__ = ["DecodedCache", "cache_size", "file_digest", "stored_image"]

#: bump when the stored layout, the key or the resampling changes: old files are then
#: not used
FORMAT = 2


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
        name = f"decoded-{key}-{self.size[0]}x{self.size[1]}.u8"
        self.rows = RowFile(directory / name, self.shape, np.uint8, "images")
        self.path, self.digest_path = self.rows.path, self.rows.digest_path
        self.built = False
        if not self.rows.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.rows.write(
                    stored_image(read(p), self.size, interpolation).numpy() for p in paths
                )
            except (PermissionError, FileExistsError, NotADirectoryError) as e:
                raise RecipeError(
                    f"data.cache_dir {directory} cannot hold the decoded cache: "
                    f"{e.strerror or e}; give a writable directory"
                ) from e
            self.built = True
        self.rows.check()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.rows.mapped()[i]))

    def gather(self, rows: torch.Tensor | Sequence[int], pin_memory: bool = False) -> torch.Tensor:
        """The images at ``rows`` as one uint8 batch [B, 3, H, W], in one copy from the
        mapped file (``pin_memory``: into page-locked memory, for a non-blocking copy to
        a GPU); an IndexError names a row outside the cache."""
        return self.rows.gather(rows, pin_memory)
