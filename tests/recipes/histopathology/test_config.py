"""Recipe configuration: presets, validation errors that name the key, round trip."""

import pytest

from smse_metric.recipes.histopathology import PRESETS, config_to_toml, load_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name, {"data": {"synthetic": True}})
    assert cfg.data.synthetic and cfg.optim.epochs == 40
    expected = {
        "smse-triplet": "triplet",
        "smse-triplet-small": "triplet",
        "smse-pair": "pair",
        "baseline-ce": "none",
    }[name]
    assert cfg.loss.metric == expected
    if name == "baseline-ce":
        assert cfg.sampler.kind == "frequency" and cfg.loss.classification == "ce"
    else:
        assert cfg.loss.cross_scale and cfg.loss.classification == "rfl"
        assert (cfg.loss.alpha, cfg.loss.gamma, cfg.loss.margin) == (2.0, 1.5, 1.0)


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(
        "smse-triplet", {"data": {"path": "/data/BreaKHis_v1"}, "optim": {"epochs": 3}}
    )
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"loss": {"margn": 1.0}}, r"unknown key loss\.margn"),
        ({"optimiser": {"lr": 1}}, r"unknown section \[optimiser\]"),
        ({"loss": {"metric": "arcface"}}, r"loss\.metric must be one of"),
        ({"optim": {"epochs": 0}}, r"optim\.epochs must be at least 1"),
        ({"optim": {"epochs": 2.5}}, r"optim\.epochs must be an integer"),
        ({"optim": {"lr": -1}}, r"optim\.lr must be positive"),
        ({"run": {"amp": "yes"}}, r"run\.amp must be true or false"),
        ({"data": {"magnifications": [40, 50]}}, r"data\.magnifications"),
        ({"data": {"image_size": [8, 8]}}, r"data\.image_size"),
        ({"data": {"val_fraction": 1.5}}, r"data\.val_fraction"),
        ({"data": {"synthetic": False}}, r"data\.path is empty"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    base = {"data": {"synthetic": True}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    with pytest.raises(ValueError, match=match):
        load_config("smse-triplet", base)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("smse-quadruplet")
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\nmargin = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    "key, value",
    [("optim.lr", float("nan")), ("loss.margin", float("inf")), ("loss.gamma", float("-inf"))],
)
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    section, name = key.split(".")
    with pytest.raises(ValueError, match=rf"{key} must be a finite number"):
        load_config("smse-triplet", {"data": {"synthetic": True}, section: {name: value}})


def test_input_normalisation_keys_are_checked():
    base = {"synthetic": True}
    with pytest.raises(ValueError, match=r"data\.mean and data\.std must be given together"):
        load_config(overrides={"data": {**base, "mean": [0.5, 0.5, 0.5]}})
    with pytest.raises(ValueError, match=r"data\.std must hold 3 values"):
        load_config(overrides={"data": {**base, "mean": [0.5] * 3, "std": [0.5]}})
    with pytest.raises(ValueError, match=r"data\.interpolation must be one of"):
        load_config(overrides={"data": {**base, "interpolation": "lanczos"}})
    with pytest.raises(ValueError, match=r"augment_on = \"device\" reads its images from data\.c"):
        load_config(overrides={"data": {**base, "augment_on": "device"}})
    cached = load_config(overrides={"data": {**base, "augment_on": "device", "cache_dir": "c"}})
    assert cached.data.augment_on == "device"


def test_the_small_preset_is_smse_triplet_on_the_small_cnn():
    small = load_config("smse-triplet-small", {"data": {"synthetic": True}})
    full = load_config("smse-triplet", {"data": {"synthetic": True}})
    assert (small.model.backbone, small.data.image_size) == ("smse-cnn", [96, 96])
    assert small.loss == full.loss and small.optim == full.optim and small.sampler == full.sampler
