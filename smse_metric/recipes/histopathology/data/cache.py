"""A decoded-image cache: every image of a dataset once as uint8 at the training size
plus the crop margin, in one memory-mapped file.

Decoding a 700 x 460 BreakHis PNG takes about 10 ms; reading its cached copy is a
memory copy. The file is keyed by the image files (path, size, modification time), the
cached size and the resampling, so a changed, added or removed file gives a new key
and the cache is built again; nothing else is ever read from it.
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

__all__ = ["DecodedCache", "cache_size", "stored_image"]

#: bump when the stored layout or the resampling changes: old files are then not used
FORMAT = 1


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
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    text = json.dumps([FORMAT, list(size), interpolation, files])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DecodedCache:
    """Images of ``paths`` as uint8 [3, H, W] at ``size``, memory-mapped from
    ``directory/decoded-<key>-<H>x<W>.u8``; built on first use (atomically: a partial
    file is never taken for a cache), read-only afterwards.

    Args:
        paths: the image files, in the order `__getitem__` indexes them.
        size: cached (H, W), e.g. from `cache_size`.
        directory: where cache files live (created if missing).
        read: ``(path) -> float [3, h, w] in [0, 1]``, the decoder (the dataset's).
        interpolation: the resize mode used to build it.

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> from smse_metric.recipes.histopathology.data.dataset import read_image
        >>> d = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 6), (255, 0, 0)).save(d / "a.png")
        >>> cache = DecodedCache([str(d / "a.png")], (4, 4), d / "cache", read=read_image)
        >>> cache[0].shape, cache[0].dtype, cache.built
        (torch.Size([3, 4, 4]), torch.uint8, True)
        >>> DecodedCache([str(d / "a.png")], (4, 4), d / "cache", read=read_image).built
        False
    """

    def __init__(self, paths: Sequence[str], size: Sequence[int], directory: str | Path,
                 read: Callable[[str], torch.Tensor],
                 interpolation: str = "bilinear") -> None:  # fmt: skip
        self.size = (int(size[0]), int(size[1]))
        self.shape = (len(paths), 3, *self.size)
        directory = Path(directory)
        key = _key(paths, self.size, interpolation)
        self.path = directory / f"decoded-{key}-{self.size[0]}x{self.size[1]}.u8"
        self.built = False
        if not self.path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            self._build(paths, interpolation, read)
            self.built = True
        if self.path.stat().st_size != math.prod(self.shape):
            raise RecipeError(f"{self.path} is not a cache of {self.shape} images; remove it")
        self._images: np.memmap | None = None

    def _build(self, paths: Sequence[str], interpolation: str, read) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        try:
            if not paths:  # an empty split: an empty file (numpy cannot map it)
                tmp.touch()
                os.replace(tmp, self.path)
                return
            images = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=self.shape)
            for i, p in enumerate(paths):
                images[i] = stored_image(read(p), self.size, interpolation).numpy()
            images.flush()
            del images
            os.replace(tmp, self.path)  # another process may have won: same content
        finally:
            tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self.shape[0]

    def _mapped(self) -> np.memmap:
        if self._images is None:  # opened per process: workers do not share the handle
            self._images = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
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
            for j, r in enumerate(idx):  # row copies: 3x faster than np.take(..., out=)
                dst[j] = images[r]
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None
        return state
