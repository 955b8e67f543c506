"""A torch Dataset over a BreakHis index: decode, augment, and return metadata.

Transforms are plain torch (no torchvision needed): resize, random crop, flips,
90-degree rotations, colour jitter and stain jitter in optical-density space.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError
from .augment import (
    INTERPOLATIONS,
    apply_augmentation,
    augment_batch,
    draw_augmentation,
    resize,
)
from .breakhis import BreakHisIndex
from .cache import DecodedCache, cache_size
from .images import MAX_IMAGE_PIXELS, read_image, read_pixels, unreadable

__all__ = [
    "INTERPOLATIONS",
    "BreakHisDataset",
    "collate_records",
    "eval_transform",
    "normalize_image",
    "split_records",
    "train_transform",
]


def _check_interpolation(mode: str) -> None:
    if mode not in INTERPOLATIONS:
        raise RecipeError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {mode!r}")


def _resize(img: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    _check_interpolation(mode)
    return resize(img, size, mode)


def normalize_image(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(img - mean) / std`` per channel, for an image [3, H, W] or a batch [B, 3, H, W].

    Args:
        img: [3, H, W] or [B, 3, H, W] float image.
        mean: three per-channel means.
        std: three per-channel standard deviations.

    Examples:
        >>> normalize_image(torch.full((3, 1, 1), 0.5), (0.5, 0.25, 0.0), (0.5, 0.5, 1.0)).flatten()
        tensor([0.0000, 0.5000, 0.5000])
    """
    m = torch.as_tensor(mean, dtype=img.dtype, device=img.device).reshape(3, 1, 1)
    s = torch.as_tensor(std, dtype=img.dtype, device=img.device).reshape(3, 1, 1)
    return (img - m) / s


def eval_transform(
    size: tuple[int, int], interpolation: str = "bilinear"
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Resize to ``size`` = (H, W) with ``interpolation``; images are float [3, H, W] in
    [0, 1].

    Args:
        size: output (height, width).
        interpolation: resize mode, one of ``INTERPOLATIONS``.

    Examples:
        >>> img = torch.rand(3, 46, 70)
        >>> eval_transform((32, 48))(img, None).shape
        torch.Size([3, 32, 48])
    """

    def apply(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _resize(img, size, interpolation)

    return apply


def collate_records(items: Sequence[tuple]) -> torch.Tensor:
    """The loader's ``collate_fn`` for ``augment_on="device"``: items ``(row, aug,
    label, group, scale)`` as one float64 tensor [B, 4 + AUG_FIELDS] (row, label,
    group, scale, then the record; integers below 2^53 are exact).

    One tensor per batch because every tensor a worker hands over travels through its
    own shared-memory file: the default collation's five a batch cost five files
    (`bench_data` measures the loader).

    Args:
        items: the dataset's items of one batch.

    Examples:
        >>> aug = torch.zeros(16, dtype=torch.float64)
        >>> packed = collate_records([(7, aug, 1, 30, 400), (2, aug + 1, 0, 31, 40)])
        >>> packed.shape, packed[:, :4].tolist()
        (torch.Size([2, 20]), [[7.0, 1.0, 30.0, 400.0], [2.0, 0.0, 31.0, 40.0]])
    """
    meta = torch.tensor(
        [[row, label, group, scale] for row, _, label, group, scale in items], dtype=torch.float64
    )
    return torch.cat([meta.reshape(len(items), 4), torch.stack([it[1] for it in items])], 1)


def split_records(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(rows, aug, labels, groups, scales)`` of a `collate_records` batch, on its
    device: int64 columns and the float64 records [B, AUG_FIELDS].

    Args:
        packed: [B, 4 + AUG_FIELDS] from `collate_records`.

    Examples:
        >>> aug = torch.zeros(16, dtype=torch.float64)
        >>> rows, aug, labels, groups, scales = split_records(
        ...     collate_records([(7, aug, 1, 30, 400)]))
        >>> rows.tolist(), aug.shape, labels.dtype, scales.tolist()
        ([7], torch.Size([1, 16]), torch.int64, [400])
    """
    ints = packed[:, :4].long()
    return ints[:, 0], packed[:, 4:], ints[:, 1], ints[:, 2], ints[:, 3]


#: the built-in training augmentation's crop area, colour and stain jitter
CROP_SCALE, COLOR, STAIN = (0.6, 1.0), 0.15, 0.05


def train_transform(
    size: tuple[int, int],
    crop_scale: tuple[float, float] = CROP_SCALE,
    color: float = COLOR,
    stain: float = STAIN,
    interpolation: str = "bilinear",
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Random crop (area fraction in ``crop_scale``), resize, flips, 90-degree rotations
    (square sizes only), brightness / contrast / saturation jitter of +-``color`` and
    H&E stain jitter: per-stain scale and shift of +-``stain`` in optical density.
    Images are float [3, H, W] in [0, 1], or uint8 [3, H, W], which is cropped,
    resized and turned in uint8 and converted after (`apply_augmentation`; what the
    dataset's built-in ``"train"`` transform is given).

    Args:
        size: output (height, width).
        crop_scale: range of the random crop's area, as a fraction of the image.
        color: brightness, contrast and saturation jitter, +- this factor.
        stain: H&E stain jitter in optical density, +- this scale and shift.
        interpolation: resize mode, one of ``INTERPOLATIONS``.

    Examples:
        >>> img = torch.rand(3, 46, 70)
        >>> out = train_transform((32, 32))(img, torch.Generator().manual_seed(0))
        >>> out.shape, bool(out.min() >= 0) and bool(out.max() <= 1)
        (torch.Size([3, 32, 32]), True)
    """
    _check_interpolation(interpolation)

    def apply(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        aug = draw_augmentation(g, img.shape[1], img.shape[2], size, crop_scale, color, stain)
        return apply_augmentation(img, aug, size, interpolation)

    return apply


class BreakHisDataset(torch.utils.data.Dataset):
    """Images of a [`BreakHisIndex`][smse_metric.recipes.histopathology.data.BreakHisIndex] as
    ``(image [3, H, W] float, label, group, scale)``.

    Args:
        index: the scanned dataset (use ``index.subset(mask)`` for a split).
        transform: ``"train"``, ``"eval"``, or a callable ``(img, generator) -> img``.
        size: model input (H, W).
        task: ``"binary"`` (benign / malignant) or ``"subtype"`` (8 classes).
        seed: augmentations draw from ``Generator().manual_seed(seed + epoch * N + i)``,
            so a run is reproducible whatever the worker layout; call ``set_epoch``.
        skip_bad_images: check every file once now; unreadable ones are left out,
            counted and listed in ``bad_images``. Otherwise a bad file raises an
            error naming it when it is read.
        mean: per-channel mean the backbone expects (None: images stay in [0, 1]).
        std: per-channel standard deviation, with ``mean``.
        interpolation: resize mode of the built-in transforms (one of
            ``INTERPOLATIONS``), as the backbone's data config gives it.
        cache_dir: read images from a `DecodedCache` there (uint8 at `cache_size`,
            built on first use) instead of decoding every file each epoch.
        augment_on: ``"worker"`` (the loader's workers return finished float images)
            or ``"device"`` (with ``"train"`` and ``cache_dir``: they return the item's
            row and its augmentation record, ``(row, aug, label, group, scale)``, batched
            by `collate_records`, and `device_batch` reads the rows' uint8 images from
            the cache in one copy, then augments and normalises the batch on the
            model's device, from the same random draws: no pixels pass between
            processes).
        max_image_pixels: larger images (width x height, read from the header) are
            unreadable: skipped and listed with ``skip_bad_images``, else an error.
        checked: with ``skip_bad_images``, the verdicts of images checked already
            (path -> None if readable, else the reason), shared by the datasets of one
            run so that an image in several of them is opened once; filled here.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology.data.dataset import BreakHisDataset
        >>> ds = BreakHisDataset(scan_breakhis(root), "train", size=(16, 16), seed=0)
        >>> image, label, group, scale = ds[0]
        >>> image.shape, image.dtype, scale in (40, 100, 200, 400)
        (torch.Size([3, 16, 16]), torch.float32, True)
        >>> ds.set_epoch(1)  # new augmentations, still reproducible
    """

    def __init__(
        self,
        index: BreakHisIndex,
        transform: str | Callable = "eval",
        size: tuple[int, int] = (224, 224),
        task: str = "binary",
        seed: int = 0,
        skip_bad_images: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str = "bilinear",
        cache_dir: str | Path | None = None,
        augment_on: str = "worker",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        checked: dict[str, str | None] | None = None,
    ) -> None:
        if task not in ("binary", "subtype"):
            raise RecipeError(f"task must be 'binary' or 'subtype', got {task!r}")
        if (mean is None) != (std is None):
            raise RecipeError("mean and std must be given together")
        if std is not None and (len(std) != 3 or len(mean) != 3 or min(std) <= 0):
            raise RecipeError(f"mean and std must hold 3 values, std > 0: {mean}, {std}")
        if augment_on not in ("worker", "device"):
            raise RecipeError(f"augment_on must be 'worker' or 'device', got {augment_on!r}")
        if augment_on == "device" and transform != "train":
            raise RecipeError("augment_on='device' applies the built-in 'train' transform")
        if augment_on == "device" and cache_dir is None:
            # the main process reads each batch's pixels; it must not decode them
            raise RecipeError("augment_on='device' reads its images from a cache: set cache_dir")
        self.on_device = augment_on == "device"
        self.size, self.interpolation = (int(size[0]), int(size[1])), interpolation
        # the built-in augmentation takes the pixels as stored (uint8): see load_pixels
        self.takes_pixels = transform == "train"
        if isinstance(transform, str):
            if transform not in ("train", "eval"):
                raise RecipeError(
                    f"transform must be 'train', 'eval' or a callable, got {transform!r}"
                )
            make = train_transform if transform == "train" else eval_transform
            transform = make(size, interpolation=interpolation)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.index, self.transform, self.task, self.seed = index, transform, task, int(seed)
        self.epoch = 0
        if (
            isinstance(max_image_pixels, bool)
            or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1
        ):
            raise RecipeError(f"max_image_pixels must be a positive int, got {max_image_pixels!r}")
        self.max_pixels = max_image_pixels
        self.bad_images: list[tuple[str, str]] = []
        rows = np.arange(len(index))
        if skip_bad_images:
            checked = {} if checked is None else checked
            good = []
            for i in rows:
                path = index.paths[i]
                if path not in checked:
                    checked[path] = unreadable(path, self.max_pixels)
                if checked[path] is None:
                    good.append(i)
                else:
                    self.bad_images.append((path, checked[path]))
            rows = np.array(good, dtype=np.int64)
        self.rows = rows
        self.stored_size = cache_size(size, CROP_SCALE)
        self.cache = None
        if cache_dir is not None:
            read = functools.partial(read_image, max_pixels=self.max_pixels)
            self.cache = DecodedCache(
                [index.paths[r] for r in rows], self.stored_size, cache_dir, read, interpolation
            )
        labels = index.label if task == "binary" else index.subtype
        self.labels = labels[rows]
        self.groups = index.group[rows]
        self.scales = index.magnification[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, i: int) -> torch.Tensor:
        """The i-th image as float [3, H, W] in [0, 1], untransformed (from the cache:
        at `cache_size`)."""
        return self.load_pixels(i).float() / 255.0

    def load_pixels(self, i: int) -> torch.Tensor:
        """The i-th image as uint8 [3, H, W], untransformed: what the built-in training
        transform takes (it crops and resizes before converting to float)."""
        if self.cache is not None:
            return self.cache[i]
        return read_pixels(self.index.paths[self.rows[i]], self.max_pixels)

    def device_transform(self, images: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        """With ``augment_on="device"``: a batch's uint8 images [B, 3, H, W] and records
        [B, AUG_FIELDS], on the model's device, augmented and normalised."""
        img = augment_batch(images, aug, self.size, self.interpolation)
        if self.mean is not None:
            img = normalize_image(img, self.mean, self.std)
        return img

    def device_batch(
        self, rows: torch.Tensor, aug: torch.Tensor, device: torch.device | str
    ) -> torch.Tensor:
        """With ``augment_on="device"``: the loader's ``rows`` [B] and records
        [B, AUG_FIELDS] as the finished batch on ``device``: the uint8 images gathered
        from the cache (into page-locked memory for a GPU), copied without blocking,
        augmented and normalised there."""
        if self.cache is None:
            raise RecipeError("device_batch reads the cache: the dataset has no cache_dir")
        device = torch.device(device)
        images = self.cache.gather(rows, pin_memory=device.type == "cuda")
        images = images.to(device, non_blocking=True)
        return self.device_transform(images, aug.to(device, non_blocking=True))

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed + self.epoch * len(self) + int(i))
        if self.on_device:
            h, w = self.stored_size
            aug = draw_augmentation(g, h, w, self.size, CROP_SCALE, COLOR, STAIN)
            return int(i), aug, int(self.labels[i]), int(self.groups[i]), int(self.scales[i])
        img = self.transform(self.load_pixels(i) if self.takes_pixels else self.load(i), g)
        if self.mean is not None:
            img = normalize_image(img, self.mean, self.std)
        return (
            img,
            int(self.labels[i]),
            int(self.groups[i]),
            int(self.scales[i]),
        )

    @property
    def paths(self) -> Sequence[str]:
        return [self.index.paths[r] for r in self.rows]

    def describe_bad_images(self) -> str:
        if not self.bad_images:
            return "no unreadable images"
        lines = [f"{len(self.bad_images)} unreadable images left out:"]
        lines += [f"  {Path(p)}: {why}" for p, why in self.bad_images]
        return "\n".join(lines)
