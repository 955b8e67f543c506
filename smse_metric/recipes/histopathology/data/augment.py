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
    """[3, H, W] float or uint8 image resized (antialiased) to ``size``; float bicubic
    clamped to [0, 1] (uint8 saturates by itself)."""
    if mode == "nearest":
        return TF.interpolate(img[None], size=size, mode="nearest")[0]
    out = TF.interpolate(img[None], size=size, mode=mode, antialias=True, align_corners=False)
    return out[0] if img.dtype == torch.uint8 else out[0].clamp(0, 1)  # bicubic overshoots


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
    """Stain and colour jitter of [..., 3, H, W] images with records [..., AUG_FIELDS].

    Stain jitter scales and shifts each stain's concentration in optical density,
    ``od' = (od @ pinv(HE) * scale + shift) @ HE``: one 3 x 3 map and a shift of ``od``.
    Brightness ``b``, contrast ``k`` (about the image's mean) and saturation ``s``
    (about each pixel's grey) compose to ``k b S x + (1 - k) b mean(x)`` with
    ``S = s I + (1 - s) / 3``: one more 3 x 3 map. So the whole jitter is two passes of
    3 x 3 products around one log and one exp (it was some twenty elementwise passes).
    """
    h, w = img.shape[-2:]
    he, he_pinv = (m.double() for m in _stains(img))
    aug = aug.double().reshape(-1, AUG_FIELDS)  # one record per image of the batch
    scale, shift = aug[:, 7:10], aug[:, 10:13]
    bright, contrast, sat = (aug[:, i, None, None] for i in (13, 14, 15))
    # [B, 3, 3] maps acting on channel columns [3, H W] (hence the transposes)
    stain_map = ((he_pinv * scale[:, None, :]) @ he).transpose(1, 2).to(img)
    stain_shift = (shift[:, None, :] @ he).transpose(1, 2).to(img)
    eye = torch.eye(3, dtype=torch.float64, device=aug.device)
    colour_map = (contrast * bright * (sat * eye + (1 - sat) / 3)).to(img)
    od = torch.log(img.clamp_min(1 / 255).reshape(-1, 3, h * w)).neg_()
    x = torch.baddbmm(stain_shift, stain_map, od).neg_().exp_()
    mean = x.mean((1, 2), keepdim=True) * ((1 - contrast) * bright).to(img)
    return torch.baddbmm(mean, colour_map, x).clamp_(0, 1).reshape(img.shape)


def apply_augmentation(
    img: torch.Tensor, aug: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """One image [3, h, w] augmented by its record (CPU path): float [3, H, W] in [0, 1].

    A uint8 image (as decoded or cached) is cropped, resized, flipped and turned in
    uint8, where torch's resampling is vectorised, and converted to float after: the
    resized pixels round to 1/255, and the float work is one image of the output size.
    A float image in [0, 1] takes the same steps in float.
    """
    y0, x0, ch, cw, flip_w, flip_h, turns = (int(v) for v in aug[:7].tolist())
    img = resize(img[:, y0 : y0 + ch, x0 : x0 + cw], size, interpolation)
    if flip_w:
        img = img.flip(2)
    if flip_h:
        img = img.flip(1)
    if size[0] == size[1]:
        img = torch.rot90(img, turns, dims=(1, 2))
    if img.dtype == torch.uint8:
        img = img.float().div_(255.0)
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
