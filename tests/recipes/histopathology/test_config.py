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
        "smse-frozen": "triplet",
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
        ({"data": {"magnifications": [40, 40]}}, r"data\.magnifications"),
        ({"data": {"columns": {"slide": "group"}}}, r"data\.columns\.slide"),
        ({"data": {"columns": {"group": 3}}}, r"data\.columns\.group must be a string"),
        ({"data": {"classes": ["a", "a"]}}, r"data\.classes"),
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


OLD_AND_NEW = [
    (
        "[loss]\nsquared = true\n",
        '[loss]\ndistance = "squared_l2"\n',
        'loss.distance = "squared_l2"',
    ),
    ("[loss]\nsquared = false\n", '[loss]\ndistance = "l2"\n', 'loss.distance = "l2"'),
    ('[eval]\nmetric = "l2"\n', '[eval]\ndistance = "l2"\n', 'eval.distance = "l2"'),
]


@pytest.mark.parametrize(("old", "new", "named"), OLD_AND_NEW)
def test_a_config_file_with_an_old_key_loads_the_same_and_warns_at_the_file(
    tmp_path, old, new, named
):
    base = "[data]\nsynthetic = true\n"
    (tmp_path / "old.toml").write_text(base + old)
    (tmp_path / "new.toml").write_text(base + new)
    with pytest.warns(DeprecationWarning, match="deprecated") as caught:
        got = load_config(tmp_path / "old.toml")
    assert len(caught) == 1 and named in str(caught[0].message)
    assert caught[0].filename == str(tmp_path / "old.toml")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert got == load_config(tmp_path / "new.toml")


def test_old_keys_in_overrides_warn_at_the_caller_and_disagreeing_keys_are_refused():
    with pytest.warns(DeprecationWarning, match=r"use eval\.distance") as caught:
        cfg = load_config(overrides={"data": {"synthetic": True}, "eval": {"metric": "l2"}})
    assert cfg.eval.distance == "l2" and caught[0].filename == __file__
    with pytest.raises(ValueError, match=r"loss\.squared and loss\.distance disagree"):
        load_config(
            overrides={"data": {"synthetic": True}, "loss": {"squared": True, "distance": "l2"}}
        )
    with pytest.raises(ValueError, match=r"loss\.squared must be a bool"):
        load_config(overrides={"data": {"synthetic": True}, "loss": {"squared": "yes"}})


def test_a_run_saved_with_the_old_keys_resumes_under_the_new_ones():
    from smse_metric.recipes.histopathology.checkpoint import check_resumable

    cfg = load_config("smse-triplet", {"data": {"synthetic": True}})
    saved = config_to_toml(cfg).replace('distance = "squared_l2"', "squared = true")
    saved = saved.replace('distance = "cosine"', 'metric = "cosine"')
    assert "squared = true" in saved and 'metric = "cosine"' in saved
    check_resumable(saved, cfg)  # no change: no error, no warning


def test_the_cli_shows_a_config_files_old_key(tmp_path):
    """DeprecationWarnings are hidden by default; the CLI shows those of the user's file."""
    import subprocess
    import sys

    (tmp_path / "old.toml").write_text("[loss]\nsquared = true\n")
    (tmp_path / "empty").mkdir()  # the config is read, then the data refused
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smse_metric",
            "train",
            "--config",
            str(tmp_path / "old.toml"),
            "--data",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "config key loss.squared is deprecated" in out.stderr, out.stderr
    assert 'use loss.distance = "squared_l2"' in out.stderr
