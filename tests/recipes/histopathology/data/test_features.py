"""The feature cache: each image's features computed once per view, equal to running the
backbone on that view directly (to float16 rounding), reused while nothing changes and
rebuilt when an image or the key changes."""

import numpy as np
import pytest
import torch
from PIL import Image

from smse_metric.recipes.histopathology.data.features import (
    VIEWS,
    FeatureCache,
    apply_view,
    feature_key,
)
from smse_metric.recipes.histopathology.data.images import read_image
from smse_metric.recipes.histopathology.errors import RecipeError


def _pngs(folder, n=5, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


class Backbone(torch.nn.Module):
    """A stand-in frozen backbone that sees orientation (a convolution), counting calls."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x).flatten(1)[:, :7]


KEY = feature_key("stand-in", None, (6, 6), None, None, "bilinear")


def test_features_equal_the_backbone_on_each_view(tmp_path):
    paths = _pngs(tmp_path / "img")
    net = Backbone()
    cache = FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=4, batch_size=2)
    assert cache.built and cache.computed == 5 * 4 and net.calls == 3 * 4  # ceil(5 / 2) x 4
    for i, p in enumerate(paths):  # a naive loop over images and views
        for v in range(4):
            with torch.no_grad():
                want = net(apply_view(read_image(p)[None], v))[0]
            # one image against the cache's batches of 2: float32 sums may differ in the
            # last bit, and then round to neighbouring float16 values (one ulp, 2^-10)
            got = cache.gather([i], [v])[0]
            torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-6, msg=f"{i}, {v}")
    assert torch.equal(cache.gather([3, 1]), cache.gather([3, 1], [0, 0]))
    assert cache.gather([0, 0], [1, 2]).dtype == torch.float32


def test_the_cache_is_reused_until_an_image_or_the_key_changes(tmp_path):
    paths = _pngs(tmp_path / "img")
    net = Backbone()
    first = FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=2)
    calls = net.calls
    again = FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=2)
    assert not again.built and again.computed == 0 and net.calls == calls
    assert torch.equal(again.gather(range(5)), first.gather(range(5)))
    other = FeatureCache(paths, read_image, net, 7, tmp_path / "f", {**KEY, "backbone": "b"})
    assert other.built and other.path != first.path
    Image.new("RGB", (6, 6), (1, 2, 3)).save(paths[2])  # one image changes
    changed = FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=2)
    assert changed.built and changed.path != first.path
    assert torch.equal(changed.gather([0, 1]), first.gather([0, 1]))
    assert not torch.equal(changed.gather([2]), first.gather([2]))
    assert len(list((tmp_path / "f").glob("features-*"))) == 3 * 2  # with their digests


def test_the_weights_file_is_part_of_the_key(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    a = feature_key("vit", w, (224, 224), [0.5] * 3, [0.5] * 3, "bicubic")
    w.write_bytes(b"two")
    b = feature_key("vit", w, (224, 224), [0.5] * 3, [0.5] * 3, "bicubic")
    assert a["weights"] != b["weights"] and {**a, "weights": 0} == {**b, "weights": 0}


def test_bad_arguments_and_a_backbone_of_another_size(tmp_path):
    paths = _pngs(tmp_path / "img", n=2)
    net = Backbone()
    with pytest.raises(RecipeError, match=r"features of shape \(2, 7\) for 2 images; .* 8"):
        FeatureCache(paths, read_image, net, 8, tmp_path / "f", KEY)
    assert not list((tmp_path / "f").glob("features-*"))  # nothing half-written
    with pytest.raises(ValueError, match=r"views must be in \[1, 8\]"):
        FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=9)
    with pytest.raises(ValueError, match="dtype must be"):
        FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, dtype="int8")
    cache = FeatureCache(paths, read_image, net, 7, tmp_path / "f", KEY, views=2)
    with pytest.raises(IndexError, match=r"views must lie in \[0, 2\)"):
        cache.gather([0], [2])
    with pytest.raises(ValueError, match="one view per row"):
        cache.gather([0, 1], [0])
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RecipeError, match="cannot hold the feature cache"):
        FeatureCache(paths, read_image, net, 7, tmp_path / "file", KEY)


def test_the_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(9.0).reshape(1, 3, 3)
    a = x[0].numpy()
    want = {  # numpy's own operations as the reference
        "identity": a,
        "hflip": np.fliplr(a),
        "vflip": np.flipud(a),
        "rot180": np.rot90(a, 2),
        "rot90": np.rot90(a, 1),
        "rot270": np.rot90(a, 3),
        "transpose": a.T,
        "antitranspose": np.rot90(a, 2).T,
    }
    for v, name in enumerate(VIEWS):
        assert np.array_equal(apply_view(x, v)[0].numpy(), want[name]), name
    assert len({apply_view(x, v).numpy().tobytes() for v in range(8)}) == 8
    with pytest.raises(ValueError, match=r"view must be in \[0, 8\)"):
        apply_view(x, 8)
