"""A run's inputs, resolved once: data path, backbone input settings, one network."""

import torch
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.inputs import resolve
from smse_metric.recipes.histopathology.rundir import RunDir


def test_inputs_name_the_data_and_fill_the_backbones_settings(tmp_path, root):
    cfg = load_config("smse-triplet", TINY)
    inputs = resolve(cfg, RunDir(tmp_path / "run"), root)
    assert inputs.cfg.data.path == str(root.resolve())
    assert inputs.cfg.data.mean == [0.485, 0.456, 0.406]  # resnet18's, from its data config
    synthetic = resolve(cfg, RunDir(tmp_path / "run"))
    assert synthetic.root == tmp_path / "run" / "data" and synthetic.cfg.data.path is None
    fold2 = inputs.config(2, RunDir(tmp_path / "run"))
    assert fold2.data.fold == 2 and fold2.data.path == str(root.resolve())


def test_the_first_network_is_the_resolved_one_later_ones_start_alike(tmp_path, root):
    inputs = resolve(load_config("smse-triplet", TINY), RunDir(tmp_path / "run"), root)
    first = inputs.new_model()
    after_first = torch.rand(3)  # the generator continues where building left it
    second = inputs.new_model()
    after_second = torch.rand(3)
    assert first is not second
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(after_first, after_second)


def test_several_folds_scan_the_data_once(tmp_path, root, monkeypatch):
    from smse_metric.recipes.histopathology import splits as module

    calls = []
    scan = module.scan_breakhis
    monkeypatch.setattr(module, "scan_breakhis", lambda *a, **k: calls.append(a) or scan(*a, **k))
    inputs = resolve(load_config("smse-triplet", TINY), RunDir(tmp_path / "run"), root)
    one, two = inputs.splits(1), inputs.splits(2)
    assert len(calls) == 1
    assert not (one.test == two.test).all()  # different folds, one scan
