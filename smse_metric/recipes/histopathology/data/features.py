"""Backbone features of a dataset's images, computed once and kept in a file.

A frozen backbone gives every image the same features in every epoch, fold and compared
method: `FeatureCache` runs it once per image and fixed view (flips and 90-degree
rotations) and keeps the features, float16 by default, in a `RowFile` keyed by the
image files' contents, the views and what the caller says makes features differ (the
backbone, its weights file, input size and normalisation: `feature_key`). A changed,
added or removed image, or another backbone, gives another key and another file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RecipeError
from .rowfile import RowFile, file_digest

__all__ = [
    "VIEWS",
    "FeatureCache",
    "FeatureDataset",
    "apply_view",
    "default_cache_dir",
    "feature_key",
    "module_digest",
]

#: bump when the stored layout or the key changes: old files are then not used
FORMAT = 1

#: the fixed views, in order: the identity, then flips and rotations (the dihedral group
#: of the square, under which a tissue tile means the same)
VIEWS = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")


def apply_view(images: Tensor, view: int) -> Tensor:
    """``images`` [..., H, W] under view ``view`` (an index into `VIEWS`).

    Examples:
        >>> x = torch.arange(4.0).reshape(1, 2, 2)
        >>> apply_view(x, 1).tolist(), apply_view(x, 6).tolist()
        ([[[1.0, 0.0], [3.0, 2.0]]], [[[0.0, 2.0], [1.0, 3.0]]])
    """
    if not 0 <= view < len(VIEWS):
        raise ValueError(f"view must be in [0, {len(VIEWS)}), got {view}")
    name = VIEWS[view]
    if name == "identity":
        return images
    if name == "hflip":
        return images.flip(-1)
    if name == "vflip":
        return images.flip(-2)
    if name.startswith("rot"):
        return images.rot90(int(name[3:]) // 90, dims=(-2, -1))
    t = images.transpose(-2, -1)
    return t if name == "transpose" else t.flip(-1).flip(-2)


def feature_key(
    backbone: str,
    weights: str | Path | None,
    size: Sequence[int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: str,
) -> dict[str, Any]:
    """What makes a backbone's features of an image differ, for `FeatureCache`'s key:
    the backbone's name, the content digest of its weights file (None: its own or random
    weights, named by ``backbone``), the input size, normalisation and resampling.

    Examples:
        >>> feature_key("resnet18", None, (224, 224), None, None, "bilinear")["size"]
        [224, 224]
    """
    return {
        "backbone": backbone,
        "weights": None if weights is None else file_digest(weights),
        "size": [int(s) for s in size],
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "interpolation": interpolation,
    }


class FeatureCache:
    """Features [N, V, F] of ``paths`` under ``views`` fixed views, read from
    ``directory/features-<key>-<V>x<F>.<dtype>``; computed on first use in batches
    (under ``torch.no_grad``), checked on opening, read-only afterwards.

    Args:
        paths: the image files, in the order rows are indexed.
        load: ``(path) -> float [3, H, W]``: the backbone's input for one image (read,
            resized and normalised as the caller's evaluation transform does).
        encode: ``(images [B, 3, H, W]) -> [B, F]``: the frozen backbone (its device is
            its own business: the result is copied to the CPU).
        dim: ``F``, the backbone's feature size.
        directory: where the feature files live (created if missing).
        key: what else makes features differ (`feature_key`).
        views: how many of `VIEWS`, from the first (1: the images as they are).
        batch_size: images per ``encode`` call while building.
        dtype: ``"float16"`` (half the disk and memory) or ``"float32"``.

    Raises:
        RecipeError: ``directory`` cannot be created or written; ``encode`` gives rows
            of another size than ``dim``; the file is damaged.

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> from smse_metric.recipes.histopathology.data.images import read_image
        >>> d = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (4, 4), (255, 0, 0)).save(d / "a.png")
        >>> encode = lambda x: x.mean(dim=(2, 3))  # a stand-in backbone: 3 features
        >>> key = feature_key("mean-rgb", None, (4, 4), None, None, "bilinear")
        >>> cache = FeatureCache([str(d / "a.png")], read_image, encode, 3, d / "f", key, views=2)
        >>> cache.gather([0], [1]).tolist(), cache.computed
        ([[1.0, 0.0, 0.0]], 2)
        >>> FeatureCache([str(d / "a.png")], read_image, encode, 3, d / "f", key, views=2).computed
        0
    """

    def __init__(
        self,
        paths: Sequence[str],
        load: Callable[[str], Tensor],
        encode: Callable[[Tensor], Tensor],
        dim: int,
        directory: str | Path,
        key: Mapping[str, Any],
        views: int = 1,
        batch_size: int = 64,
        dtype: str = "float16",
    ) -> None:
        if not 1 <= views <= len(VIEWS):
            raise ValueError(f"views must be in [1, {len(VIEWS)}], got {views}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        self.shape = (len(paths), views, int(dim))
        self.computed = 0  # (image, view) rows computed by this instance
        directory = Path(directory)
        files = [[os.path.abspath(p), file_digest(p)] for p in paths]
        text = json.dumps([FORMAT, dict(sorted(key.items())), views, dtype, files])
        name = f"features-{hashlib.sha256(text.encode()).hexdigest()[:24]}-{views}x{dim}.{dtype}"
        self.rows = RowFile(directory / name, self.shape, np.dtype(dtype), "feature rows")
        self.path = self.rows.path
        self.built = False
        if not self.rows.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.rows.write(self._compute(paths, load, encode, batch_size))
            except (PermissionError, FileExistsError, NotADirectoryError) as e:
                raise RecipeError(
                    f"{directory} cannot hold the feature cache: {e.strerror or e}; give a "
                    "writable directory"
                ) from e
            self.built = True
        self.rows.check()

    def _compute(
        self,
        paths: Sequence[str],
        load: Callable[[str], Tensor],
        encode: Callable[[Tensor], Tensor],
        batch_size: int,
    ) -> Iterator[np.ndarray]:
        _, views, dim = self.shape
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                images = torch.stack([load(p) for p in paths[start : start + batch_size]])
                out = np.empty((len(images), views, dim), dtype=self.rows.dtype)
                for v in range(views):
                    feats = encode(apply_view(images, v))
                    if feats.ndim != 2 or feats.shape != (len(images), dim):
                        raise RecipeError(
                            f"the backbone gave features of shape {tuple(feats.shape)} for "
                            f"{len(images)} images; the cache expects {dim} per image"
                        )
                    out[:, v] = feats.detach().float().cpu().numpy()
                    self.computed += len(images)
                yield from out

    def __len__(self) -> int:
        return self.shape[0]

    def gather(
        self, rows: Tensor | Sequence[int], views: Tensor | Sequence[int] | None = None
    ) -> Tensor:
        """float32 features [B, F] of ``rows``, each under its view in ``views`` (default:
        the first view, the images as they are)."""
        feats = self.rows.gather(rows)  # [B, V, F], float16 or float32
        if views is None:
            return feats[:, 0].float()
        v = torch.as_tensor(views, dtype=torch.int64)
        if v.shape != (len(feats),):
            raise ValueError(f"views must hold one view per row, got shape {tuple(v.shape)}")
        if len(v) and (v.min() < 0 or v.max() >= self.shape[1]):
            raise IndexError(f"views must lie in [0, {self.shape[1]}), got {v.tolist()}")
        return feats[torch.arange(len(feats)), v].float()  # the chosen views only


class FeatureDataset(torch.utils.data.Dataset):
    """An image dataset's items with the images replaced by their cached backbone
    features: ``(features [F] float32, label, group, scale)``. A training dataset draws
    one of the cached views per image and epoch (seeded, like the image augmentation);
    an evaluation dataset takes the images as they are (the first view).

    Args:
        images: the image dataset (its evaluation transform: what the cache holds); its
            labels, groups, scales, paths and left-out images are this dataset's.
        cache: a `FeatureCache` holding these images (and maybe others).
        rows: the cache row of each of ``images``' items.
        train: draw a random view per image and epoch.
        seed: the draws' seed.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> from smse_metric.recipes.histopathology.data.dataset import BreakHisDataset
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> images = BreakHisDataset(scan_breakhis(root), "eval", size=(8, 8))
        >>> key = feature_key("mean-rgb", None, (8, 8), None, None, "bilinear")
        >>> cache = FeatureCache(images.paths, lambda p: images[images.paths.index(p)][0],
        ...                      lambda x: x.mean(dim=(2, 3)), 3, root / "f", key, views=2)
        >>> ds = FeatureDataset(images, cache, range(len(images)), train=True)
        >>> features, label, group, scale = ds[0]
        >>> features.shape, scale in (40, 100, 200, 400)
        (torch.Size([3]), True)
    """

    def __init__(
        self,
        images: Any,
        cache: FeatureCache,
        rows: Sequence[int],
        train: bool,
        seed: int = 0,
    ) -> None:
        self.cache_rows = np.asarray(rows, dtype=np.int64)
        if len(self.cache_rows) != len(images):
            raise ValueError(f"rows has {len(self.cache_rows)} entries, the dataset {len(images)}")
        if len(self.cache_rows) and not 0 <= self.cache_rows.min() <= self.cache_rows.max() < len(
            cache
        ):
            raise ValueError(f"rows must lie in [0, {len(cache)}), the cache's rows")
        self.images, self.cache, self.train, self.seed = images, cache, bool(train), int(seed)
        self.labels, self.groups, self.scales = images.labels, images.groups, images.scales
        self.bad_images = images.bad_images
        self.on_device = False  # features need no device augmentation
        self.epoch = 0

    @property
    def index(self) -> Any:
        return self.images.index

    @property
    def rows(self) -> Any:
        return self.images.rows

    @property
    def paths(self) -> Sequence[str]:
        return self.images.paths

    def describe_bad_images(self) -> str:
        return self.images.describe_bad_images()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cache_rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, int]:
        view = 0
        if self.train and self.cache.shape[1] > 1:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            view = int(rng.integers(self.cache.shape[1]))
        features = self.cache.gather([int(self.cache_rows[i])], [view])[0]
        return features, int(self.labels[i]), int(self.groups[i]), int(self.scales[i])


def module_digest(module: torch.nn.Module) -> str:
    """BLAKE2b (128 bits) of a module's state (names, dtypes, shapes and values): the
    weights a backbone actually has, whether pretrained, loaded from a file or seeded.

    Examples:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> module_digest(a) == module_digest(a), module_digest(a) == module_digest(b)
        (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where features are kept without ``data.cache_dir``: ``$XDG_CACHE_HOME/smse-metric``
    (default ``~/.cache/smse-metric``), shared by every run of the machine's user."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smse-metric"
