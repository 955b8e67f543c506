"""Reading image files: a pixel limit checked on the header before any decoding, PIL's
verification, and decoding to a float tensor."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "open_image", "read_image", "read_pixels", "unreadable"]


#: PIL's own warning threshold: a larger image is refused before it is decoded (a 92 KB
#: PNG can hold 95 megapixels, 3.3 GB once decoded)
MAX_IMAGE_PIXELS = 89_478_485


def unreadable(path: str, max_pixels: int) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it can (PIL's ``verify``,
    which checks the file without decoding its pixels).

    Args:
        path: an image file.
        max_pixels: the largest width x height accepted.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> _ = path.write_bytes(b"not a png")
        >>> unreadable(str(path), MAX_IMAGE_PIXELS).split(":")[0]
        'OSError'
    """
    try:
        with open_image(path, max_pixels) as im:
            im.verify()
    except (OSError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``PIL.Image.open`` with a pixel limit checked on the header, before any decoding;
    an OSError names a file PIL cannot open or one over the limit.

    Args:
        path: an image file.
        max_pixels: the largest width x height accepted (``data.max_image_pixels``).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (50, 40)).save(path)
        >>> try:
        ...     with open_image(path, max_pixels=1000):
        ...         pass
        ... except OSError as e:
        ...     print(str(e).split(": ", 1)[1])
        50 x 40 pixels, over the limit of 1000 (data.max_image_pixels)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            im = Image.open(path)
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    with im:
        if im.width * im.height > max_pixels:
            raise OSError(
                f"{path}: {im.width} x {im.height} pixels, over the limit of "
                f"{max_pixels} (data.max_image_pixels)"
            )
        yield im


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file as RGB float [3, H, W] in [0, 1]; an OSError names a bad file, or
    one over ``max_pixels`` (refused before decoding).

    Args:
        path: an image file PIL can open.
        max_pixels: the largest width x height accepted.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (5, 4), (255, 0, 0)).save(path)
        >>> img = read_image(path)
        >>> img.shape, img[:, 0, 0].tolist()
        (torch.Size([3, 4, 5]), [1.0, 0.0, 0.0])
    """
    return read_pixels(path, max_pixels).float() / 255.0


def read_pixels(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file as RGB uint8 [3, H, W], checked like `read_image`."""
    with open_image(path, max_pixels) as im:
        try:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as e:
            raise OSError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
