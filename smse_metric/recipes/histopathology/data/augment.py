"""Training augmentation as drawn parameters, applied per image on the CPU or per batch
on the model's device: random crop and resize, flips, 90-degree rotations, H&E stain
jitter in optical density, brightness / contrast / saturation jitter.

The draws are made once per image, from the image's own generator, in one order, into
a record of `AUG_FIELDS` numbers. `apply_augmentation` (one float image, CPU) and
`augment_batch` (a uint8 batch on any device) both read that record, so the two paths
see the same random streams: same crops, flips, rotations and jitter factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from .breakhis import STAIN_VECTORS

__all__ = ["AUG_FIELDS", "apply_augmentation", "augment_batch", "draw_augmentation", "resize"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: y0, x0, crop height, crop width, flip W, flip H, quarter turns, 3 stain scales,
#: 3 stain shifts, brightness, contrast, saturation
AUG_FIELDS = 16

_HE = torch.tensor(STAIN_VECTORS)
_HE = _HE / _HE.norm(dim=1, keepdim=True)
_HE_PINV = torch.linalg.pinv(_HE)
#: (device, dtype) -> the two stain matrices there: a fresh host copy per batch would
#: make every GPU batch wait for the host
_STAINS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _stains(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (like.device, like.dtype)
    if key not in _STAINS:
        _STAINS[key] = (_HE.to(like), _HE_PINV.to(like))
    return _STAINS[key]


def resize(img: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[3, H, W] float image resized (antialiased) to ``size``; bicubic clamped to [0, 1]."""
    if mode == "nearest":
        return TF.interpolate(img[None], size=size, mode="nearest")[0]
    out = TF.interpolate(img[None], size=size, mode=mode, antialias=True, align_corners=False)
    return out[0].clamp(0, 1)  # bicubic overshoots


def draw_augmentation(
    g: torch.Generator,
    height: int,
    width: int,
    size: tuple[int, int],
    crop_scale: tuple[float, float],
    color: float,
    stain: float,
) -> torch.Tensor:
    """The random record of one image of ``height`` x ``width``: [AUG_FIELDS] float64.

    The crop covers a fraction of the area drawn from ``crop_scale``; quarter turns are
    drawn only for a square ``size``; stain scales and shifts are +-``stain``, the
    colour factors +-``color``.
    """

    # one call for all the record's uniforms: the CPU generator fills a float32 tensor
    # in order, so these are the values of as many scalar draws, at a quarter of the cost
    draws = iter(torch.rand(15 if size[0] == size[1] else 14, generator=g).tolist())

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * next(draws)

    frac = u(*crop_scale)
    ch, cw = max(1, round(height * math.sqrt(frac))), max(1, round(width * math.sqrt(frac)))
    y0, x0 = int(u(0, height - ch + 1)), int(u(0, width - cw + 1))
    flip_w, flip_h = u(0, 1) < 0.5, u(0, 1) < 0.5
    turns = int(u(0, 4)) if size[0] == size[1] else 0
    scale = [u(1 - stain, 1 + stain) for _ in range(3)]
    shift = [u(-stain, stain) for _ in range(3)]
    colour = [u(1 - color, 1 + color) for _ in range(3)]
    geometry = [y0, x0, ch, cw, float(flip_w), float(flip_h), turns]
    return torch.tensor(geometry + scale + shift + colour, dtype=torch.float64)


def _jitter(img: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Stain and colour jitter of [..., 3, H, W] images with records [..., AUG_FIELDS]."""
    lead = img.shape[:-3]
    scale = aug[..., 7:10].to(img).reshape(*lead, 1, 1, 3)
    shift = aug[..., 10:13].to(img).reshape(*lead, 1, 1, 3)
    bright, contrast, sat = (aug[..., i].to(img).reshape(*lead, 1, 1, 1) for i in (13, 14, 15))
    # optical density = concentrations @ stain vectors; jitter each stain's concentration
    od = -torch.log(img.clamp_min(1 / 255))
    he, he_pinv = _stains(img)
    conc = od.movedim(-3, -1) @ he_pinv
    img = torch.exp(-((conc * scale + shift) @ he).movedim(-1, -3))
    img = img * bright
    mean = img.mean((-3, -2, -1), keepdim=True)
    img = (img - mean) * contrast + mean
    gray = img.mean(-3, keepdim=True)
    img = (img - gray) * sat + gray
    return img.clamp(0, 1)


def apply_augmentation(
    img: torch.Tensor, aug: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """One float image [3, h, w] in [0, 1] augmented by its record (CPU path)."""
    y0, x0, ch, cw, flip_w, flip_h, turns = (int(v) for v in aug[:7].tolist())
    img = resize(img[:, y0 : y0 + ch, x0 : x0 + cw], size, interpolation)
    if flip_w:
        img = img.flip(2)
    if flip_h:
        img = img.flip(1)
    if size[0] == size[1]:
        img = torch.rot90(img, turns, dims=(1, 2))
    return _jitter(img, aug)


def augment_batch(
    images: torch.Tensor, aug: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """A uint8 batch [B, 3, h, w] augmented by its records [B, AUG_FIELDS], on the
    batch's device: float [B, 3, H, W] in [0, 1].

    Crop, resize, flips and quarter turns are one affine resampling
    (``grid_sample``, without the antialiasing of the CPU path: at the cache's size a
    crop shrinks by at most ``1 / sqrt(crop_scale[0])``); stain and colour jitter are
    the CPU path's arithmetic on the whole batch. Nothing syncs with the host.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if aug.shape != (images.shape[0], AUG_FIELDS):
        raise ValueError(f"aug must be [{images.shape[0]}, {AUG_FIELDS}], got {tuple(aug.shape)}")
    x = images.float() / 255.0
    b, _, h, w = x.shape
    a = aug.to(x.device, torch.float64)
    y0, x0, ch, cw, flip_w, flip_h, turns = a[:, :7].unbind(1)
    # output (x, y) -> R^turns (the inverse of rot90's quarter turns), flips, then the
    # crop's scale and offset, all in grid_sample's [-1, 1] coordinates
    # cos and sin of q quarter turns by arithmetic: a lookup table would be a host copy
    q = turns.remainder(4)
    odd = q.remainder(2)
    cos, sin = (1 - odd) * (1 - q), odd * (2 - q)
    sx, sy = (1 - 2 * flip_w) * cw / w, (1 - 2 * flip_h) * ch / h
    theta = torch.stack(
        [
            torch.stack([sx * cos, -sx * sin, (2 * x0 + cw) / w - 1], 1),
            torch.stack([sy * sin, sy * cos, (2 * y0 + ch) / h - 1], 1),
        ],
        1,
    ).to(x.dtype)
    grid = TF.affine_grid(theta, [b, 3, *size], align_corners=False)
    x = TF.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return _jitter(x.clamp(0, 1), a)
