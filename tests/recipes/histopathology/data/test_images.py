"""Reading image files: the pixel limit is checked on the header (nothing decoded), a
bad file is an OSError that names it, and a good one decodes to RGB in [0, 1]."""

import numpy as np
import pytest
import torch
from PIL import Image

from smse_metric.recipes.histopathology.data import images
from smse_metric.recipes.histopathology.data.images import (
    MAX_IMAGE_PIXELS,
    open_image,
    read_image,
    unreadable,
)


def test_a_png_decodes_to_rgb_floats_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.png")  # mode L: becomes RGB
    img = read_image(tmp_path / "a.png")
    assert img.dtype == torch.float32 and img.shape == (3, 7, 9)
    assert torch.equal(img, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    grey = read_image(tmp_path / "grey.png")
    assert torch.equal(grey[0], grey[2]) and torch.equal(grey[0], img[0])


def test_the_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    decoded = []
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: decoded.append(1))
    with pytest.raises(OSError, match=r"50 x 40 pixels, over the limit of 1999"):
        read_image(tmp_path / "a.png", max_pixels=1999)
    assert decoded == []
    with open_image(tmp_path / "a.png", max_pixels=2000) as im:  # at the limit: accepted
        assert im.size == (50, 40)


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_a_bad_file_is_an_oserror_naming_it_and_unreadable_says_why(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(OSError, match=r"bad\.png"):
        read_image(path)
    why = unreadable(str(path), MAX_IMAGE_PIXELS)
    assert why is not None and why.split(":")[0] in {"OSError", "SyntaxError"}


def test_a_truncated_png_is_unreadable_and_a_good_one_is_not(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert unreadable(str(tmp_path / "good.png"), MAX_IMAGE_PIXELS) is None
    assert unreadable(str(tmp_path / "cut.png"), MAX_IMAGE_PIXELS) is not None
    assert images.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's own threshold
