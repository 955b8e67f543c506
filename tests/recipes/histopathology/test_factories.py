"""The name -> constructor tables behind the config's choices, and what the builders
make of them."""

import dataclasses

import numpy as np
import pytest
import torch

from smse_metric.evaluation._inputs import EXCLUDE
from smse_metric.functional import DISTANCES, FUSED_TRIPLETS
from smse_metric.recipes.histopathology import config, factories, load_config
from smse_metric.recipes.histopathology.build import make_losses, make_optimizer
from smse_metric.recipes.histopathology.data.augment import INTERPOLATIONS


def test_choices_are_the_builders_and_the_librarys_tables():
    """A name the config accepts is one the builder (or the library) knows, and the
    other way round: the choices are those tables' keys, not a copy."""

    def choices(cls, name):
        return tuple(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"])

    assert choices(config.LossConfig, "metric") == tuple(factories.METRIC_LOSSES)
    assert choices(config.LossConfig, "triplets") == FUSED_TRIPLETS
    assert choices(config.LossConfig, "distance") == DISTANCES
    assert choices(config.LossConfig, "classification") == tuple(factories.CLASSIFICATION_LOSSES)
    assert choices(config.OptimConfig, "name") == tuple(factories.OPTIMIZERS)
    assert choices(config.OptimConfig, "schedule") == tuple(factories.SCHEDULES)
    assert choices(config.EvalConfig, "distance") == DISTANCES
    assert choices(config.EvalConfig, "exclude") == EXCLUDE
    assert choices(config.DataConfig, "interpolation") == INTERPOLATIONS
    assert set(factories.METRIC_DISTANCES) == set(factories.METRIC_LOSSES)
    for usable in factories.METRIC_DISTANCES.values():
        assert set(usable) <= set(DISTANCES)


@pytest.mark.parametrize(
    ("metric", "distance", "built"),
    [
        ("triplet", None, "squared_l2"),
        ("triplet", "cosine", "cosine"),
        ("triplet", "l2", "l2"),
        ("pair", None, None),
        ("pair", "l2", None),
    ],
)
def test_the_loss_distance_reaches_the_built_loss(metric, distance, built):
    import numpy as np

    from smse_metric.recipes.histopathology.build import make_losses

    loss = {"metric": metric} | ({} if distance is None else {"distance": distance})
    cfg = load_config(overrides={"data": {"synthetic": True}, "loss": loss})
    made = make_losses(cfg.loss, np.array([3, 7])).metric_loss
    assert getattr(made, "distance", None) == built


@pytest.mark.parametrize("distance", ["squared_l2", "cosine"])
def test_a_distance_the_pair_loss_cannot_take_is_refused(distance):
    with pytest.raises(ValueError, match=r"loss\.distance = .* has no pair loss"):
        load_config(
            overrides={
                "data": {"synthetic": True},
                "loss": {"metric": "pair", "distance": distance},
            }
        )


@pytest.mark.parametrize("classification", list(factories.CLASSIFICATION_LOSSES))
@pytest.mark.parametrize("metric", list(factories.METRIC_LOSSES))
def test_every_loss_name_builds_its_loss(metric, classification):
    cfg = load_config(
        overrides={
            "data": {"synthetic": True},
            "loss": {"metric": metric, "classification": classification},
        }
    )
    loss = make_losses(cfg.loss, np.array([30, 70]))
    want_cls = {"rfl": "ReinforcedFocalLoss", "focal": "FocalLoss", "ce": "CrossEntropyLoss"}
    want_metric = {"triplet": "TripletMarginLoss", "pair": "ContrastiveLoss", "none": "NoneType"}
    assert type(loss.cls_loss).__name__ == want_cls[classification]
    assert type(loss.metric_loss).__name__ == want_metric[metric]
    if classification == "rfl":  # the paper's beta_c = 1 - n_c / N from the counts
        assert torch.allclose(loss.cls_loss.beta, torch.tensor([0.7, 0.3]))


@pytest.mark.parametrize("schedule", list(factories.SCHEDULES))
@pytest.mark.parametrize("name", list(factories.OPTIMIZERS))
def test_every_optimiser_and_schedule_name_builds(name, schedule):
    optim = {"name": name, "schedule": schedule, "lr": 0.01, "weight_decay": 0.001}
    cfg = load_config(overrides={"data": {"synthetic": True}, "optim": optim})
    opt, sched = make_optimizer(cfg.optim, torch.nn.Linear(2, 2))
    assert isinstance(opt, factories.OPTIMIZERS[name])
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.001
    want = {"step": "StepLR", "cosine": "CosineAnnealingLR", "none": "NoneType"}[schedule]
    assert type(sched).__name__ == want
