"""Objects built from the config: the backbone's input normalisation."""

import torch
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.build import resolve_inputs
from smse_metric.recipes.histopathology.splits import load_splits


def test_pretrained_style_inputs_get_the_backbones_mean_and_std(root):
    from smse_metric.recipes.histopathology.data.dataset import eval_transform
    from smse_metric.recipes.histopathology.data.images import read_image
    from smse_metric.recipes.histopathology.loaders import make_datasets

    cfg = resolve_inputs(load_config("smse-triplet", {**TINY, "model": {"pretrained": False}}))
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    assert cfg.data.interpolation == "bicubic"  # resnet18's timm default
    assert "mean = [0.485, 0.456, 0.406]" in config_to_toml(cfg)
    own = {**TINY, "data": {**TINY["data"], "mean": [0.5] * 3, "std": [0.5] * 3}}
    assert resolve_inputs(load_config("smse-triplet", own)).data.std == [0.5] * 3  # key wins
    ds = make_datasets(cfg, load_splits(cfg, root))
    for name in ("train", "gallery", "val", "test"):
        assert (getattr(ds, name).mean, getattr(ds, name).std) == (
            tuple(cfg.data.mean),
            tuple(cfg.data.std),
        )
    # evaluation: exactly (resize(img) - mean) / std
    img = read_image(ds.test.paths[0])
    want = eval_transform(tuple(cfg.data.image_size), "bicubic")(img, None)
    want = (want - torch.tensor(cfg.data.mean)[:, None, None]) / torch.tensor(cfg.data.std)[
        :, None, None
    ]
    assert torch.allclose(ds.test[0][0], want)
    # training images are normalised alike: undoing it lands exactly in [0, 1]
    batch = torch.stack([ds.train[i][0] for i in range(16)])
    pixels = (
        batch * torch.tensor(cfg.data.std)[:, None, None]
        + torch.tensor(cfg.data.mean)[:, None, None]
    )
    assert batch.max() > 1.5 and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
